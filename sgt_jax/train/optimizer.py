"""BAGEL's optimizer recipe: AdamW, linear warmup from lr 0 then constant or cosine, global-norm
clipping, freezing, copy_init_moe, and an fp32 EMA of the trainable parameters (a device-side
pytree sharded like the parameters -- never a host copy)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def schedule(t) -> optax.Schedule:
    """lr * min(1, count / warmup) (the first update uses lr 0, as BAGEL's scheduler), then
    constant or cosine down to ``min_lr``."""
    warm = max(int(t.warmup_steps), 0)
    if t.schedule == "constant":
        after = optax.constant_schedule(t.lr)
    elif t.schedule == "cosine":
        decay = max(int(t.steps) - warm, 1)
        after = lambda c: t.min_lr + (t.lr - t.min_lr) * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(c, decay) / decay))
    else:
        raise ValueError(f"train.schedule must be 'constant' or 'cosine', got {t.schedule!r}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warm), after], [warm])


def clip_by_global_norm_bagel(max_norm: float) -> optax.GradientTransformation:
    """grads *= min(1, max_norm / (norm + 1e-6)) -- torch's clip_grad_norm_ as BAGEL calls it."""
    def update(g, state, params=None):
        del params
        norm = optax.global_norm(g)
        scale = jnp.minimum(1.0, max_norm / (norm + 1e-6))
        return jax.tree.map(lambda x: x * scale.astype(x.dtype), g), state
    return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


def make_tx(t) -> optax.GradientTransformation:
    parts = []
    if t.max_grad_norm and t.max_grad_norm > 0:
        parts.append(clip_by_global_norm_bagel(float(t.max_grad_norm)))
    parts.append(optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay))
    return optax.chain(*parts)


def trainable_filter(t, cfg_model):
    """An nnx filter selecting the trainable Params of Bagel (the VAE is a separate, always
    frozen module). BAGEL's switches: freeze_llm, freeze_vit, freeze_und (no gradient through
    und tokens: the und expert, final und norm, embeddings, ViT and connector get none)."""
    frozen_prefixes = []
    if t.freeze_llm:
        frozen_prefixes.append(("language_model",))
    if t.freeze_vit:
        frozen_prefixes.append(("vit_model",))
    if cfg_model.llm.freeze_und:
        frozen_prefixes += [("language_model", "layers", "und"), ("language_model", "norm"),
                            ("language_model", "embed_tokens"), ("vit_model",), ("connector",)]

    def is_frozen(path):
        return any(tuple(path[:len(p)]) == p for p in frozen_prefixes)

    return nnx.All(nnx.Param, lambda path, x: not is_frozen(tuple(path)))


def copy_init_moe(state: nnx.State) -> nnx.State:
    """BAGEL's init_moe(): every gen-expert parameter := its und twin (norm_gen := norm)."""
    flat = dict(nnx.to_flat_state(state))
    for path, var in flat.items():
        src = None
        if "gen" in path and path[:2] == ("language_model", "layers"):
            src = tuple("und" if p == "gen" else p for p in path)
        elif path[:2] == ("language_model", "norm_gen"):
            src = ("language_model", "norm") + path[2:]
        if src is not None:
            var.set_value(jnp.array(flat[src].get_value()))
    return state


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: e * decay + p.astype(e.dtype) * (1.0 - decay), ema, params)
