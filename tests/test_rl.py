"""Unified-GRPO rollouts and loop: sampler log-probs equal the training forward's teacher-forced
log-probs; the t2i block built from captions; exact resume after SIGKILL (subprocesses)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.infer import context as ctx_lib
from sgt_jax.models.bagel import Bagel
from sgt_jax.models.config import tiny
from sgt_jax.rl import rollout as ro

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tiny_policy():
    cfg = tiny()
    model = Bagel(cfg, rngs=nnx.Rngs(0))
    sp = ctx_lib.special_tokens(cfg)
    # make the stop token likely so the rows stop at different lengths (and some run to the cap)
    k = model.language_model.lm_head.kernel
    k.set_value(k.get_value().at[:, sp.eos_token_id].add(0.3))
    return cfg, model, sp


def test_sampler_logprobs_equal_training_forward(tiny_policy):
    cfg, model, sp = tiny_policy
    rc = ro.RolloutConfig(group_size=3, max_caption_tokens=10, temperature=1.0, image_size=64)
    imgs = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    cb = ctx_lib.pack_contexts(cfg, ro.caption_contexts(imgs, [5, 6, 7], 56, rc.group_size), special=sp)
    keys = jax.vmap(jax.random.key)(jnp.arange(6))

    @nnx.jit
    def run(m, batch, n_valid, rope_end, keys):
        out = ro.sample_captions(m, batch, n_valid, rope_end, keys, rc, sp)
        mask = ro.caption_mask(out)
        return out, mask, ro.policy_logprobs(m, batch, rope_end, out["tokens"], mask, sp.bos_token_id)

    out, mask, lp = run(model, cb.batch, jnp.asarray(cb.n_valid), jnp.asarray(cb.rope_end), keys)
    n, stopped = np.asarray(out["num_tokens"]), np.asarray(out["stopped"])
    assert stopped.any() and (~stopped).any() and len(set(n.tolist())) > 2     # varied lengths exercised
    mask = np.asarray(mask)
    assert (mask.sum(1) == n + stopped).all()
    sampled = np.asarray(out["logprobs"])
    err = np.abs(np.asarray(lp) - sampled)[mask].max()
    print(f"sampler vs teacher-forced log-prob max abs err {err:.2e}")
    assert err <= 1e-5
    assert np.all(np.asarray(lp)[~mask] == 0) and np.all(sampled[mask] < 0)
    # a different token sequence gets different teacher-forced log-probs (the check can fail)
    other = jnp.roll(out["tokens"], 1, axis=1)
    lp2 = nnx.jit(lambda m, b, r, t, k: ro.policy_logprobs(m, b, r, t, k, sp.bos_token_id))(
        model, cb.batch, jnp.asarray(cb.rope_end), other, jnp.asarray(mask))
    assert np.abs(np.asarray(lp2) - sampled)[mask].max() > 1e-2


def test_caption_block_and_recon_row(tiny_policy):
    cfg, _, sp = tiny_policy
    toks = jnp.asarray([[9, 8, 7, sp.eos_token_id], [4, 5, 6, 3]], jnp.int32)
    ids, valid, n = ro.caption_block(toks, jnp.asarray([3, 4]), sp.bos_token_id, sp.eos_token_id)
    np.testing.assert_array_equal(np.asarray(ids), [[sp.bos_token_id, 9, 8, 7, sp.eos_token_id, 0],
                                                    [sp.bos_token_id, 4, 5, 6, 3, sp.eos_token_id]])
    np.testing.assert_array_equal(np.asarray(n), [5, 6])
    from sgt_jax.batch import check_routing
    b = ro.recon_batch(cfg, toks, jnp.asarray([3, 4]), jnp.zeros((2, 64, 64, 3), jnp.uint8), jnp.zeros(2),
                       sp, 3 * 14 * 14)
    check_routing(jax.device_get(b), 16)            # 64 px -> 4x4 latent tokens through the gen expert
    assert int(b.mse_mask.sum()) == 32 and b.kind.shape == (2, 6 + 18)


def _worker(workdir, *extra):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COMPILATION_CACHE_DIR=os.path.join(os.path.dirname(workdir), "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, os.path.join(HERE, "rl_worker.py"), workdir, *extra],
                          capture_output=True, text=True, env=env, timeout=1500)


def _result(r):
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert lines, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_resume_after_sigkill_is_exact(tmp_path):
    """4 steps (und x3 with 2 GRPO updates each, gen x1), saves at 2 and 4: a run killed after step 3
    and restarted ends with the same parameters, EMA and metrics rows as an uninterrupted run."""
    ref = _result(_worker(str(tmp_path / "a")))
    assert ref["compiles"] == 2                   # one program per stage kind
    killed = _worker(str(tmp_path / "b"), "--kill-after", "3")
    assert killed.returncode == -signal.SIGKILL
    res = _result(_worker(str(tmp_path / "b")))
    assert res["params"] == ref["params"] and res["ema"] == ref["ema"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("step_time_s", "step_compiles")} for r in rows]
    assert [r["step"] for r in res["rows"]] == [1, 2, 3, 4]          # the killed step 3 row replaced, not doubled
    assert strip(res["rows"]) == strip(ref["rows"])
    row = ref["rows"][0]
    for k in ("reward_mean", "reward_std", "caption_len", "kl", "clip_fraction", "loss"):
        assert k in row and np.isfinite(row[k])


def test_stage_freezing_masks(tiny_policy):
    """und trains the encoder side only, gen the decoder side only, cold_start everything."""
    from sgt_jax.rl import loop

    _, model, _ = tiny_policy
    p = nnx.state(model, nnx.Param)
    ones = jax.tree.map(jnp.ones_like, p)
    und_side = {"connector", "vit_model", "language_model/embed_tokens", "language_model/layers/und",
                "language_model/lm_head", "language_model/norm"}
    for stage in ("und", "gen", "cold_start"):
        kept = {}
        for kp, x in jax.tree_util.tree_leaves_with_path(loop.mask_tree(ones, loop.trainable(stage))):
            n = loop._names(kp)
            group = n[0] if n[0] != "language_model" else "/".join(n[:3] if n[1] == "layers" else n[:2])
            kept.setdefault(group, set()).add(bool(np.asarray(x).all()) if np.asarray(x).any() else False)
        assert all(len(v) == 1 for v in kept.values()), kept
        trained = {g for g, v in kept.items() if True in v}
        want = {"und": und_side, "gen": set(kept) - und_side, "cold_start": set(kept)}[stage]
        assert trained == want, (stage, trained ^ want)
    frozen_vit = loop.mask_tree(ones, loop.trainable("und", train_vit=False))
    assert not any(np.asarray(x).any() for x in jax.tree.leaves(frozen_vit["vit_model"]))
    assert all(np.asarray(x).all() for x in jax.tree.leaves(frozen_vit["connector"]))
