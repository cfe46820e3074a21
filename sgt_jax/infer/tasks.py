"""Tasks over the Engine (placeholder while building)."""
from __future__ import annotations


def transforms_for(cfg, data_cfg=None):
    return None
