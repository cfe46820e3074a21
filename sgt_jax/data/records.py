"""The record contract between data sources and sample builders.

A source is a random-access sequence (``__len__``, ``__getitem__``, Grain ``RandomAccessDataSource``
protocol) of records, plain dicts of numpy arrays and strings:

  segmentation  {"task": "seg", "id": str, "image": uint8 (H, W, 3), "target": uint8 (H, W, 3)}
                (target = the pseudo-colour mask rendering)
  vqa           {"task": "vqa", "id": str, "images": [uint8 (H, W, 3), ...],
                 "conversations": [{"from": "human" | "gpt", "value": str}, ...]}
                (``<image>`` placeholders in human turns, one per image, in order)
  t2i           {"task": "t2i", "id": str, "image": uint8 (H, W, 3), "caption": str}
  reconstruction {"task": "recon", "id": str, "image": uint8 (H, W, 3)}   (RecA-style)
  scene         {"task": "scene", "id": str, "image": uint8 (H, W, 3), optional "masks" [bool (H, W)],
                 "labels" [str], "label_ids" [int], "isthing" [bool], "boxes" (N, 4) xywh,
                 "depth" float (H, W), "target"}: what a source's ``scene(i)`` gives the proxy tasks
  proxy         a scene (or any record with an image) plus "proxy": TASK, "task": "proxy"
                (``proxy/source.ProxyRecords``; built by ``proxy/tasks.build``)

A record that cannot be read raises ``BadRecord(reason, source, key)``: the pipeline skips it and
counts it under ``reason`` -- a bad file never stops a run.
"""
from __future__ import annotations

TASKS = ("seg", "vqa", "t2i", "recon", "proxy")


class BadRecord(Exception):
    """A record that cannot be used; ``reason`` is a short counter key (e.g. 'corrupt_image')."""

    def __init__(self, reason: str, source: str = "", key: str = "", detail: str = ""):
        self.reason, self.source, self.key, self.detail = reason, source, key, detail
        super().__init__(f"{source}[{key}]: {reason}{': ' + detail if detail else ''}")
