"""Defaults of the ``train`` and ``mesh`` sections of a run config (presets in configs/)."""
from __future__ import annotations

import ml_collections


def default_train_config() -> ml_collections.ConfigDict:
    """BAGEL's TrainingArguments defaults where they exist (reference/bagel.md 4.1)."""
    return ml_collections.ConfigDict(dict(
        seed=0,
        steps=300,
        lr=1e-4, warmup_steps=2000, schedule="constant", min_lr=1e-7,   # constant | cosine
        b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0,
        max_grad_norm=1.0,
        ema_decay=0.9999,
        ce_weight=1.0, mse_weight=1.0, ce_loss_reweighting=False,
        grad_accum=1,
        freeze_llm=False, freeze_vit=False,          # freeze_und lives in model.llm (it changes the forward)
        copy_init_moe=True,                          # gen expert := und at random init (BAGEL init_moe)
        init_from="",                                # an imported model dir (python -m sgt_jax.convert import)
        executable="",                               # a step compiled ahead of time (python -m sgt_jax.aot --serialize)
        nan_max_streak=10,                           # stop after this many consecutive non-finite steps
        save_every=100, keep=3, async_checkpointing=True,
        log_every=10,
    ))


def default_mesh_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
