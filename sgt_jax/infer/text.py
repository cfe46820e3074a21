"""Text generation on a prefilled cache (BAGEL ``prepare_start_tokens`` + ``generate_text``).

Step 0 feeds ``<|im_start|>`` at the row's current RoPE position; every step appends the fed
token to the cache, computes the logits of the last token and picks the next one: greedy
(``temperature == 0``, BAGEL's ``do_sample=False``) or sampled from softmax(logits / T) after
optional top-k / top-p filtering. A row stops when it produces ``stop_token`` (``<|im_end|>`` by
default; the stop token is not part of the answer, as in BAGEL); the loop ends when every row
stopped or after ``max_new_tokens``. One ``lax.while_loop`` inside one jitted function: the
sampling settings are traced (per row), so they never recompile.

Per token the outputs carry ``logprobs`` = log softmax(logits) of the chosen token (the model's
distribution at temperature 1, what RL losses use) and ``sampling_logprobs`` under the
distribution actually sampled from (0 for greedy rows).

The cache is functional: the rows' entries before generation are never touched, so the context
as it was (BAGEL's ``deepcopy(gen_context)`` in ``gen_text``) is the returned cache with
``length`` and ``rope`` set back (``rewind``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sgt_jax.infer.cache import KVCache, block_segments, run_block
from sgt_jax.batch import CAUSAL


def lm_logits(lm, h: jax.Array) -> jax.Array:
    """lm_head in fp32 accumulation: (..., H) -> (..., vocab) float32."""
    return jnp.dot(h, lm.lm_head.kernel[...].astype(h.dtype), preferred_element_type=jnp.float32)


def filter_logits(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside the top-k (``top_k`` > 0) and outside the top-p nucleus (``top_p`` < 1;
    the smallest set of most likely tokens with probability >= p) to -inf. z (B, V); per-row
    ``top_k`` (B,) int, ``top_p`` (B,) float."""
    v = z.shape[-1]
    srt = -jnp.sort(-z, axis=-1)
    kth = jnp.take_along_axis(srt, jnp.clip(top_k - 1, 0, v - 1)[:, None], axis=-1)
    z = jnp.where((top_k[:, None] > 0) & (z < kth), -jnp.inf, z)
    srt = -jnp.sort(-z, axis=-1)
    p = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(p, axis=-1) - p                    # mass of the more likely tokens
    keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
    thresh = jnp.take_along_axis(srt, (keep - 1)[:, None], axis=-1)
    return jnp.where((top_p[:, None] < 1.0) & (z < thresh), -jnp.inf, z)


def choose(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array):
    """Next tokens (B,) and their log-probs (model, sampling) from fp32 logits (B, V)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits / jnp.maximum(temperature, 1e-6)[:, None]
    need = jnp.any((top_k > 0) | (top_p < 1.0))
    z = jax.lax.cond(need, lambda a: filter_logits(a, top_k, top_p), lambda a: a, z)
    sampled = jax.vmap(jax.random.categorical)(keys, z).astype(jnp.int32)
    tok = jnp.where(temperature > 0, sampled, greedy)
    lp = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    slp = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp, jnp.where(temperature > 0, slp, 0.0)


def generate(model, cache: KVCache, keys: jax.Array, temperature: jax.Array, top_k: jax.Array,
             top_p: jax.Array, *, start_token: int, stop_token: int, max_new_tokens: int,
             return_logits: bool = False, forced: jax.Array | None = None, constrain=lambda c: c):
    """Decode up to ``max_new_tokens`` tokens per row. ``keys`` (B,) per-row PRNG keys (step i
    samples with fold_in(fold_in(keys[r], 2), i); 0 and 1 are the VAE and flow noise streams).
    ``forced`` (B, T): teacher forcing -- these tokens are taken instead of the chosen ones (their
    log-probs scored; a forced stop token ends the row). ``constrain``: a sharding constraint
    for the cache carried by the loop.

    Returns (cache after decoding, dict: ``tokens`` (B, T) int32 (``stop_token`` after a row
    stopped), ``num_tokens`` (B,) answer length (stop token excluded), ``stopped`` (B,) bool,
    ``logprobs`` / ``sampling_logprobs`` (B, T) (0 past the end), ``steps`` (), and ``logits``
    (B, T, V) fp32 if ``return_logits``)."""
    lm = model.language_model
    bsz = keys.shape[0]
    T = int(max_new_tokens)
    seg = block_segments(jnp.full((bsz, 1), CAUSAL, jnp.int32), jnp.ones((bsz, 1), bool))
    vocab = lm.lm_head.kernel.shape[-1]
    ones = jnp.ones((bsz,), jnp.int32)

    def body(c):
        i, cache, tok, done, n, out, lp, slp, lg = c
        x = lm.embed_tokens(tok[:, None])
        h, kb, vb = run_block(lm, x, cache.rope[:, None], seg, 0, cache)
        cache = constrain(cache.write(kb, vb, ones).replace(rope=cache.rope + 1))
        logits = lm_logits(lm, h[:, 0])
        step_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, 2), i))(keys)
        nxt, lp_i, slp_i = choose(logits, step_keys, temperature, top_k, top_p)
        if forced is not None:
            nxt = forced[:, i].astype(jnp.int32)
            lp_i = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
            slp_i = jnp.zeros_like(lp_i)
        live = ~done
        stop_now = live & (nxt == stop_token)
        emit = live & ~stop_now
        nxt = jnp.where(live, nxt, stop_token)
        out = out.at[:, i].set(nxt)
        lp = lp.at[:, i].set(jnp.where(live, lp_i, 0.0))
        slp = slp.at[:, i].set(jnp.where(live, slp_i, 0.0))
        if return_logits:
            lg = lg.at[:, i].set(logits)
        return i + 1, cache, nxt, done | stop_now, n + emit.astype(jnp.int32), out, lp, slp, lg

    def cond(c):
        return (c[0] < T) & ~jnp.all(c[3])

    z = jnp.zeros((bsz, T), jnp.float32)
    lg = jnp.zeros((bsz, T, vocab) if return_logits else (0,), jnp.float32)
    init = (jnp.int32(0), cache, jnp.full((bsz,), start_token, jnp.int32), jnp.zeros((bsz,), bool),
            jnp.zeros((bsz,), jnp.int32), jnp.full((bsz, T), stop_token, jnp.int32), z, z, lg)
    steps, cache, _, done, n, out, lp, slp, lg = jax.lax.while_loop(cond, body, init)
    res = {"tokens": out, "num_tokens": n, "stopped": done, "logprobs": lp, "sampling_logprobs": slp,
           "steps": steps}
    if return_logits:
        res["logits"] = lg
    return cache, res


def rewind(cache: KVCache, length, rope) -> KVCache:
    """The cache as it was before decoding (entries < ``length`` were never written)."""
    return cache.replace(length=jnp.asarray(length, jnp.int32), rope=jnp.asarray(rope, jnp.int32))
