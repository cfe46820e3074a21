"""Less work per step (issue 23): lm_head + CE only at the CE positions (``ce_tokens_per_row``),
checked against the golden fixtures made by the real BAGEL PyTorch code; the packer's CE budget;
the train step with it still compiles once."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.convert import check_golden as G
from sgt_jax.convert import keymap
from sgt_jax.data import packer as PK


@pytest.fixture(scope="module")
def golden(golden_dir):
    fx = G.load_fixture(str(golden_dir))
    cfg = G.config_from_meta(fx["meta"])
    return fx, cfg, G.build_model(cfg, fx["model"])


@pytest.mark.golden
def test_ce_at_the_ce_positions_matches_golden(golden):
    """num_ce = the row's CE count (and with unused slots): per-token CE at the CE positions within
    the fixture's tolerance of BAGEL's ce_tok, exactly 0 elsewhere; the loss gradient within the
    fixture's gradient tolerance of BAGEL's."""
    fx, cfg, model = golden
    meta, gb = fx["meta"], fx["batch"]
    batch, noise, num_gen = G.packed_batch_from_golden(meta, gb, cfg, pad_to=int(meta["batch"]["sequence_length"]) + 5)
    n_ce = int(np.asarray(batch.ce_mask).sum())
    assert n_ce == len(gb["ce_loss_indexes"])
    lim = G.limits(fx)
    idx = gb["ce_loss_indexes"]
    for num_ce in (n_ce, n_ce + 9):
        out = model(batch, num_gen=num_gen, noise=noise, num_ce=num_ce)
        ce = np.asarray(out["ce"][0])
        assert np.abs(ce[idx] - gb["ce_tok"]).max() <= lim["ce_tok"][0]
        off = np.ones(ce.shape, bool)
        off[idx] = False
        assert not ce[off].any()

    def loss_fn(m):
        return G.reduced_loss(m(batch, num_gen=num_gen, noise=noise, num_ce=n_ce + 9), batch, {})[0]

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    gmodel = nnx.merge(nnx.graphdef(model), grads, nnx.state(model, nnx.Not(nnx.Param)))
    ours = keymap.export_state(gmodel, keymap.bagel_table(cfg))
    gmax = max(np.abs(g).max() for g in fx["grads"].values())
    worst = max(np.abs(ours[k] - g).max() / max(np.abs(g).max(), 1e-6 * gmax) for k, g in fx["grads"].items())
    assert worst <= lim["grads_rel"][0], worst


@pytest.mark.golden
def test_ce_at_positions_equals_all_positions_on_random_rows(golden):
    """Rows with CE tokens anywhere in the und slice (several rows, random masks): the gathered path
    gives the all-positions path's per-token CE."""
    fx, cfg, model = golden
    rng = np.random.default_rng(0)
    h = jnp.asarray(rng.standard_normal((3, 40, cfg.llm.hidden_size)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, cfg.llm.vocab_size, (3, 40)), jnp.int32)
    mask = rng.random((3, 40)) < 0.3
    mask[2] = False                                  # a row without CE tokens
    mask = jnp.asarray(mask)
    full = model.und_cross_entropy(h, labels, mask, 0)
    k = int(np.asarray(mask).sum(1).max())
    for num_ce in (k, k + 3):
        np.testing.assert_allclose(np.asarray(model.und_cross_entropy(h, labels, mask, num_ce)), np.asarray(full),
                                   rtol=1e-6, atol=1e-6)


def _sample(n_ce: int, n_text: int = 20):
    """A minimal text-only sample with ``n_ce`` CE tokens."""
    from sgt_jax.data.samples import Sample

    ce = np.zeros(n_text, bool)
    ce[:n_ce] = True
    z = np.zeros(n_text, np.int32)
    tokens = {"kind": np.ones(n_text, np.int32), "text_ids": z, "position_ids": np.arange(n_text, dtype=np.int32),
              "split_ids": z, "split_mode": z, "ce_mask": ce, "ce_labels": z, "ce_weights": np.ones(n_text, np.float32),
              "mse_mask": np.zeros(n_text, bool), "vit_index": z, "vae_token_index": z, "latent_position_ids": z,
              "timesteps": np.zeros(n_text, np.float32)}
    return Sample(stream="t", index=0, key="k", task="t", tokens=tokens,
                  vit_patches=np.zeros((0, 3 * 14 * 14), np.float32), vit_position_ids=np.zeros(0, np.int32),
                  vit_image_ids=np.zeros(0, np.int32), vae_images=[])


def test_packer_ce_budget():
    spec = PK.RowSpec(64, 8, 8, 1, (32, 32), ce_tokens_per_row=10)
    assert PK.fit_reason(_sample(11), spec) == "over_ce_tokens"
    assert PK.fit_reason(_sample(10), spec) is None
    assert PK.fit_reason(_sample(11), PK.RowSpec(64, 8, 8, 1, (32, 32))) is None     # 0: no budget
    rows = [PK.Row(), PK.Row()]
    assert PK.place_group(rows, [_sample(6), _sample(6), _sample(4)], spec)
    assert sorted(r.ce for r in rows) == [6, 10]      # 6 + 6 > 10: the second sample goes to the other row
    assert not PK.place_group(rows, [_sample(5)], spec)
    assert [r.ce for r in rows] in ([6, 10], [10, 6])   # all or nothing


def test_train_with_ce_budget_compiles_the_step_once(tmp_path):
    """A training with ce_tokens_per_row set (rows of varying samples) compiles its step once and
    reports the time to its first step; no CE token is over the budget."""
    import ml_collections

    from fake_data import FakeIterator
    from sgt_jax.models.config import tiny
    from sgt_jax.parallel import mesh as mesh_lib
    from sgt_jax.train import loop
    from sgt_jax.train.config import default_mesh_config, default_train_config

    cfg = ml_collections.ConfigDict(dict(model=tiny(), data=ml_collections.ConfigDict(
        dict(gen_tokens_per_row=8, ce_tokens_per_row=8)), train=default_train_config(), mesh=default_mesh_config()))
    cfg.train.update(steps=3, warmup_steps=1, log_every=1, save_every=100)
    mesh = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    assert loop.Program(cfg, mesh=mesh).num_ce == 8
    s = loop.train(cfg, str(tmp_path / "run"), data_iterator=FakeIterator(cfg, rows=4, vary=True), quiet=True,
                   mesh=mesh)
    assert s["steps"] == 3 and s["compiles_in_loop"] == 1, s["compiles_in_loop"]
    assert all(np.isfinite(h["loss"]) for h in s["history"])
    assert all(h["ce_tokens_over_budget"] == 0 for h in s["history"]), s["history"]   # logged, none lost
    t = s["timing"]
    assert 0 < t["first_step_s"] <= t["to_first_step_s"]
