"""The train step: one pure function of (state, consts, batch) under jax.jit.

    state   = TrainState(step, params, opt_state, ema, nan_streak, nan_total)   (donated)
    consts  = Consts(frozen Bagel params, fixed sin-cos tables, VAE params)
    batch   = PackedBatch with ``vae_images`` (pixels); the step VAE-encodes them (frozen, keyed)

Randomness: key = fold_in(key(seed), step) -> VAE sampling key, flow-noise key; every draw is
per global row (``row_normal``), so the numbers do not depend on sharding or micro-batching.
Loss: BAGEL's global token means (CE over CE tokens, MSE channel-mean then over noised latent
tokens).

Gradient accumulation (``train.grad_accum`` = A): micro-batch i takes rows i, A+i, 2A+i, ...
(strided), so with rows sharded in contiguous blocks over the batch axes every device keeps its
share of every micro-batch (no reshuffle); each micro-batch is VAE-encoded inside the loop (the
frozen encoder's activations then live for one micro-batch only), normalised by its own token
totals, and the micro losses are averaged, as BAGEL does.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sgt_jax import batch as B
from sgt_jax.models.bagel import row_normal
from sgt_jax.models.vae import latent_from_moments
from sgt_jax.train.optimizer import ema_update, schedule


class TrainState(NamedTuple):
    step: jax.Array          # int32 scalar: train steps run (batches consumed), skipped ones included
    params: Any              # nnx.State of trainable Params (fp32)
    opt_state: Any
    ema: Any                 # fp32 EMA of params, same sharding
    nan_streak: jax.Array    # consecutive skipped (non-finite) steps
    nan_total: jax.Array


class Consts(NamedTuple):
    """What the step reads but never updates."""
    frozen: Any              # nnx.State of the frozen Bagel Params (train.freeze_*); stored
    fixed: Any               # nnx.State of the regenerated sin-cos position tables; never stored
    vae: Any                 # nnx.State of the FLUX VAE (always frozen); stored


def reduce_losses(out: dict, batch: B.PackedBatch, t) -> tuple[jax.Array, dict]:
    """BAGEL's reduction (pretrain_unified_navit.py): global token means over the whole
    (sharded) batch -- sums over all rows are global sums inside jit."""
    ce_mask = batch.ce_mask
    if t.ce_loss_reweighting:
        w = jnp.where(ce_mask, batch.ce_weights, 0.0)
        ce = jnp.sum(out["ce"] * w) / jnp.maximum(jnp.sum(w), 1e-12)
    else:
        ce = jnp.sum(out["ce"]) / jnp.maximum(jnp.sum(ce_mask), 1)
    n_mse = jnp.sum(batch.mse_mask)
    mse = jnp.sum(jnp.mean(out["mse"], axis=-1)) / jnp.maximum(n_mse, 1)
    loss = t.ce_weight * ce + t.mse_weight * mse
    return loss, {"ce": ce, "mse": mse}


def token_counts(batch: B.PackedBatch) -> dict:
    k = batch.kind
    return {"tokens_text": jnp.sum(k == B.TEXT), "tokens_vit": jnp.sum(k == B.VIT),
            "tokens_latent": jnp.sum((k == B.VAE_CLEAN) | (k == B.VAE_NOISED)),
            "tokens_pad": jnp.sum(k == B.PAD), "tokens_ce": jnp.sum(batch.ce_mask),
            "tokens_mse": jnp.sum(batch.mse_mask)}


def encode_images(vae_graphdef, vae_params, images: jax.Array, key: jax.Array,
                  row_ids: jax.Array | None = None) -> jax.Array:
    """(B, N, H, W, 3) pixels -> (B, N, h, w, C) sampled, scaled fp32 latents; no gradient. The
    encoder runs in the VAE graphdef's dtype (the model's compute dtype, as BAGEL encodes under
    bf16 autocast); the sampling noise of row r comes from fold_in(key, row_ids[r])."""
    vae = nnx.merge(vae_graphdef, vae_params)
    b, n = images.shape[:2]
    flat = images.reshape((b * n,) + images.shape[2:])
    moments = vae.encode_moments(flat)
    eps = row_normal(key, (b, n) + moments.shape[1:-1] + (moments.shape[-1] // 2,), row_ids)
    lat = latent_from_moments(moments, eps.reshape((b * n,) + eps.shape[2:]),
                              vae.config.scale_factor, vae.config.shift_factor)
    return jax.lax.stop_gradient(lat.reshape((b, n) + lat.shape[1:]))


def _loss_fn(graphdef, t, num_gen: int, num_ce: int = 0):
    """(params, consts, batch with latents, flow-noise key, row ids) -> (loss, {"ce", "mse"}): the
    forward and loss of the train step (and of ``make_eval_losses``)."""
    def loss_fn(params, consts, mb, key, row_ids):
        model = nnx.merge(graphdef, params, consts.frozen, consts.fixed)
        out = model(mb, num_gen=num_gen, key=key, row_ids=row_ids, num_ce=num_ce)
        loss, parts = reduce_losses(out, mb, t)
        return loss, parts

    return loss_fn


def make_eval_losses(*, graphdef, vae_graphdef, cfg, num_gen: int, num_ce: int = 0):
    """The train step's forward and loss without gradient or update, at a given key: held-out CE /
    MSE with fixed VAE-sampling and flow noise (the timesteps come with the batch). Returns
    ``sgt_eval_losses(params, consts, batch, key) -> {"loss", "ce", "mse", "tokens_ce",
    "tokens_mse"}`` (jit it with the step's shardings)."""
    loss_fn = _loss_fn(graphdef, cfg.train, num_gen, num_ce)

    def sgt_eval_losses(params, consts, batch: B.PackedBatch, key):
        k_vae, k_noise = jax.random.split(key)
        rows = jnp.arange(batch.kind.shape[0])
        latents = encode_images(vae_graphdef, consts.vae, batch.vae_images, k_vae, rows)
        loss, parts = loss_fn(params, consts, batch.replace(latents=latents, vae_images=None), k_noise, rows)
        return {"loss": loss, **parts, "tokens_ce": jnp.sum(batch.ce_mask), "tokens_mse": jnp.sum(batch.mse_mask)}

    return sgt_eval_losses


def make_train_step(*, graphdef, vae_graphdef, tx: optax.GradientTransformation, cfg, num_gen: int,
                    num_ce: int = 0):
    """The pure step function (jit it with shardings in the loop). ``num_ce``: the data config's
    ``ce_tokens_per_row`` (``Bagel.__call__``)."""
    t = cfg.train
    loss_fn = _loss_fn(graphdef, t, num_gen, num_ce)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_loss(params, consts, mb, k_vae, k_noise, row_ids):
        latents = encode_images(vae_graphdef, consts.vae, mb.vae_images, k_vae, row_ids)
        return grad_fn(params, consts, mb.replace(latents=latents, vae_images=None), k_noise, row_ids)

    def sgt_train_step(state: TrainState, consts: dict, batch: B.PackedBatch):
        key = jax.random.fold_in(jax.random.key(t.seed), state.step)
        k_vae, k_noise = jax.random.split(key)
        accum = int(t.grad_accum)
        rows = batch.kind.shape[0]
        if accum == 1:
            (loss, parts), grads = micro_loss(state.params, consts, batch, k_vae, k_noise, jnp.arange(rows))
        else:
            if rows % accum:
                raise ValueError(f"rows per batch {rows} not divisible by train.grad_accum {accum}")
            # row j*A + i -> micro-batch i, position j (strided: see the module doc)
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((rows // accum, accum) + x.shape[1:]), 0, 1),
                                 batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(carry, xs):
                g_acc, l_acc, ce_acc, mse_acc = carry
                mb, i = xs
                rows_i = jnp.arange(rows // accum) * accum + i     # global row ids
                (l, p), g = micro_loss(state.params, consts, mb, k_vae, k_noise, rows_i)
                g_acc = jax.tree.map(lambda a, b: a + b / accum, g_acc, g)
                return (g_acc, l_acc + l / accum, ce_acc + p["ce"] / accum, mse_acc + p["mse"] / accum), None

            z = jnp.zeros((), jnp.float32)
            (grads, loss, ce, mse), _ = jax.lax.scan(body, (zeros, z, z, z), (micro, jnp.arange(accum)))
            parts = {"ce": ce, "mse": mse}
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema, params, t.ema_decay)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            ema=keep(ema, state.ema),
            nan_streak=jnp.where(ok, 0, state.nan_streak + 1),
            nan_total=state.nan_total + (~ok).astype(jnp.int32))
        lr = schedule(t)(state.step - state.nan_total)     # the count optax used for this update
        metrics = {"loss": loss, "ce": parts["ce"], "mse": parts["mse"], "grad_norm": grad_norm, "lr": lr,
                   "skipped": ~ok, "nan_streak": new_state.nan_streak, **token_counts(batch)}
        if num_ce:      # CE tokens beyond data.ce_tokens_per_row (the packer never makes any; 0 expected)
            metrics["tokens_ce_over_budget"] = jnp.sum(jnp.maximum(jnp.sum(batch.ce_mask, axis=1) - num_ce, 0))
        return new_state, metrics

    return sgt_train_step
