"""Inference functions: cached decoding == the training forward with teacher forcing, batching
and padding change nothing, sampling filters, CFG contexts, bounded compilations, sharding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sgt_jax.data import packer, samples
from sgt_jax.infer import text as text_lib
from sgt_jax.infer.cache import bucket
from sgt_jax.infer.context import Image, Text, cfg_contexts, layout_spec
from sgt_jax.infer.engine import Engine, compile_counts
from sgt_jax.infer.image import FlowConfig
from sgt_jax.convert import check_golden as G
from sgt_jax.models.bagel import patchify_latents
from sgt_jax.convert.keymap import load_vae
from sgt_jax.models.vae import AutoEncoder
from sgt_jax.parallel import mesh as mesh_lib

TOL = 1e-5


@pytest.fixture(scope="module")
def tiny(golden_dir):
    """The tiny_v1 model (random weights, every expert distinct) and its AE."""
    fx = G.load_fixture(str(golden_dir))
    cfg = G.config_from_meta(fx["meta"])
    model = G.build_model(cfg, fx["model"])
    ae = AutoEncoder(cfg, rngs=nnx.Rngs(0))
    load_vae(ae, fx["ae"])
    return cfg, model, ae, Engine.from_model(model, ae)


def rand_image(rng, h, w):
    return rng.uniform(-1, 1, (h, w, 3)).astype(np.float32)


def ids(rng, n):
    return rng.integers(0, 150, n).tolist()


def training_forward(model, items, cfg, latents=None, noise=None):
    """BAGEL's training forward (Bagel.__call__) on one laid-out sample."""
    s = samples.layout(items, layout_spec(cfg))
    hw = (max([im.shape[0] for im in s.vae_images] or [16]), max([im.shape[1] for im in s.vae_images] or [16]))
    rs = packer.RowSpec(tokens_per_row=s.num_tokens + 3, gen_tokens_per_row=s.num_gen,
                        vit_patches_per_row=max(s.num_vit_patches, 1), vae_images_per_row=max(s.num_vae_images, 1),
                        vae_hw=hw)
    batch = packer.assemble([[s]], rs)
    if latents is not None:
        batch = batch.replace(latents=latents)
    batch = jax.tree.map(jnp.asarray, batch)
    out = model(batch, num_gen=s.num_gen, noise=noise)
    return batch, out


def test_teacher_forced_decoding_equals_the_training_forward(tiny):
    """VQA: a ViT image, a question, the answer with CE. The training forward's logits at the CE
    positions == prefill(image, question) + cached decoding fed <|im_start|>, a1 .. an."""
    cfg, model, _, eng = tiny
    rng = np.random.default_rng(0)
    img, q, a = rand_image(rng, 28, 42), ids(rng, 6), ids(rng, 5)
    items = [samples.Item("vit_image", image=img), samples.Item("text", text_ids=q),
             samples.Item("text", loss=1, text_ids=a)]
    batch, out = training_forward(model, items, cfg)
    ce = np.asarray(batch.ce_mask[0])
    want = np.asarray(text_lib.lm_logits(model.language_model, out["hidden"]))[0, ce]
    assert want.shape[0] == len(a) + 1
    cache = eng.prefill(eng.new_cache(1, 64), eng.pack([[Image(img, vae=False), Text(q)]]))
    forced = [a + [cfg.llm.eos_token_id]]
    _, res = eng.generate_text(cache, eng.keys([0]), max_new_tokens=len(a) + 1, forced_tokens=forced,
                               return_logits=True)
    np.testing.assert_allclose(np.asarray(res["logits"][0]), want, atol=TOL, rtol=0)
    lp = jax.nn.log_softmax(want, axis=-1)[np.arange(len(a) + 1), forced[0]]
    np.testing.assert_allclose(np.asarray(res["logprobs"][0]), lp, atol=TOL)
    assert int(res["num_tokens"][0]) == len(a) and bool(res["stopped"][0])


def test_flow_velocity_equals_the_training_forward(tiny):
    """Editing: source as clean VAE + ViT, instruction, noised target. The training forward's
    velocity llm2vae(h) at the noised tokens == prefill(source, instruction) + the flow block at
    x_t = (1 - t) x0 + t noise."""
    cfg, model, ae, eng = tiny
    rng = np.random.default_rng(1)
    src, src_vit, instr = rand_image(rng, 32, 48), rand_image(rng, 28, 42), ids(rng, 5)
    raw = 0.3
    items = [samples.Item("vae_image", image=src), samples.Item("vit_image", image=src_vit),
             samples.Item("text", text_ids=instr), samples.Item("vae_image", loss=1, image=np.zeros((32, 48, 3)),
                                                               timestep=raw)]
    eps = rng.standard_normal((4, 6, 4)).astype(np.float32)
    src_lat = ae.encode(jnp.asarray(src)[None], eps=jnp.asarray(eps)[None])[0]
    tgt_lat = jnp.asarray(rng.standard_normal((4, 6, 4)).astype(np.float32))
    latents = jnp.stack([src_lat, tgt_lat])[None]
    s = samples.layout(items, layout_spec(cfg))
    noise = rng.standard_normal((s.num_tokens + 3, 16)).astype(np.float32)
    batch, out = training_forward(model, items, cfg, latents=latents, noise=jnp.asarray(noise)[None])
    mse = np.asarray(batch.mse_mask[0])
    want = np.asarray(model.llm2vae(out["hidden"]))[0, mse]
    cache = eng.prefill(eng.new_cache(1, 64), eng.pack([[Image(src, vit_image=src_vit, eps=eps), Text(instr)]]))
    x0 = patchify_latents(tgt_lat[None, None], 2)[0]
    t = jax.nn.sigmoid(jnp.float32(raw))             # timestep_shift 1.0 in tiny_v1
    x_t = (1.0 - t) * x0 + t * jnp.asarray(noise)[mse]
    got = eng.velocity(cache, x_t[None], float(t), 2, 3)[0, 0]
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)


def test_batched_padded_rows_equal_single_rows(tiny):
    """Three contexts of different lengths in one padded batch give each row's own result."""
    cfg, _, _, eng = tiny
    rng = np.random.default_rng(2)
    ctxs = [[Image(rand_image(rng, 28, 28), vae=False), Text(ids(rng, n))] for n in (3, 9, 5)]
    cache = eng.prefill(eng.new_cache(3, 64), eng.pack(ctxs))
    _, batched = eng.generate_text(cache, eng.keys([0, 1, 2]), max_new_tokens=4, return_logits=True)
    for r, c in enumerate(ctxs):
        single = eng.prefill(eng.new_cache(1, 64), eng.pack([c]))
        _, one = eng.generate_text(single, eng.keys([r]), max_new_tokens=4, return_logits=True)
        np.testing.assert_allclose(np.asarray(batched["logits"][r]), np.asarray(one["logits"][0]), atol=TOL)


def test_context_in_pieces_equals_one_prefill(tiny):
    """BAGEL updates the cache block by block; prefilling the context at once or in pieces agrees."""
    cfg, _, _, eng = tiny
    rng = np.random.default_rng(3)
    img, q1, q2 = Image(rand_image(rng, 28, 28), vae=False), Text(ids(rng, 4)), Text(ids(rng, 3))
    one = eng.prefill(eng.new_cache(1, 64), eng.pack([[img, q1, q2]]))
    parts = eng.new_cache(1, 64)
    for piece in ([img], [q1], [q2]):
        parts = eng.prefill(parts, eng.pack([piece]))
    n = int(one.length[0])
    assert int(parts.length[0]) == n and int(parts.rope[0]) == int(one.rope[0])
    np.testing.assert_allclose(np.asarray(parts.k[:, 0, :n]), np.asarray(one.k[:, 0, :n]), atol=TOL)


def test_cfg_contexts_follow_interleave_inference():
    img, t1, t2, sys_ = Image(np.zeros((16, 16, 3))), Text("a"), Text("b"), Text("sys")
    assert cfg_contexts([t1]) == ([t1], [], [t1])
    assert cfg_contexts([img, t1]) == ([img, t1], [img], [t1])
    assert cfg_contexts([t1, img, t2]) == ([t1, img, t2], [t1, img], [t1, t2])
    assert cfg_contexts([img, t1], system=[sys_]) == ([sys_, img, t1], [sys_, img], [sys_, t1])
    assert FlowConfig(cfg_text_scale=1.0, cfg_img_scale=2.0).num_contexts == 1
    assert FlowConfig(cfg_text_scale=4.0, cfg_img_scale=1.0).num_contexts == 2
    assert FlowConfig(cfg_text_scale=4.0, cfg_img_scale=1.5).num_contexts == 3


def test_top_k_top_p_filters():
    z = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]] * 3, jnp.float32))
    out = np.asarray(text_lib.filter_logits(z, jnp.asarray([2, 0, 0]), jnp.asarray([1.0, 0.6, 0.7])))
    kept = np.isfinite(out)
    # top-2; top-p 0.6 -> {0.5, 0.2} (0.5 < 0.6); top-p 0.7 -> {0.5, 0.2} (0.7 reached)
    assert kept.tolist() == [[True, True, False, False, False], [True, True, False, False, False],
                             [True, True, False, False, False]]
    out = np.asarray(text_lib.filter_logits(z, jnp.asarray([0, 0, 0]), jnp.asarray([1.0, 0.3, 0.71])))
    assert np.isfinite(out).sum(1).tolist() == [5, 1, 3]


def test_sampling_is_per_seed_and_position_independent(tiny):
    cfg, _, _, eng = tiny
    rng = np.random.default_rng(4)
    ctx = [Text(ids(rng, 5))]
    cache = eng.prefill(eng.new_cache(3, 32), eng.pack([ctx] * 3))
    _, a = eng.generate_text(cache, eng.keys([7, 8, 7]), max_new_tokens=8, temperature=1.0, top_k=50)
    tok = np.asarray(a["tokens"])
    assert (tok[0] == tok[2]).all() and not (tok[0] == tok[1]).all()
    assert np.all(np.asarray(a["sampling_logprobs"]) <= 0) and np.any(np.asarray(a["sampling_logprobs"]) < 0)
    cache = eng.prefill(eng.new_cache(1, 32), eng.pack([ctx]))
    _, b = eng.generate_text(cache, eng.keys([8]), max_new_tokens=8, temperature=1.0, top_k=50)
    assert (np.asarray(b["tokens"][0]) == tok[1]).all()


def test_over_long_prompt_is_a_clear_error(tiny):
    cfg, _, _, eng = tiny
    with pytest.raises(ValueError, match="KV cache holds 16"):
        eng.prefill(eng.new_cache(1, 16), eng.pack([[Text(list(range(20)))]]))
    cache = eng.prefill(eng.new_cache(1, 32), eng.pack([[Text(list(range(10)))]]))
    with pytest.raises(ValueError, match="decoding"):
        eng.generate_text(cache, eng.keys([0]), max_new_tokens=30)


def test_compilations_are_bounded(tiny):
    """A second batch of other prompt lengths in the same buckets compiles nothing new."""
    cfg, _, _, eng = tiny
    rng = np.random.default_rng(5)
    flow = FlowConfig(num_timesteps=3, cfg_text_scale=2.0, cfg_img_scale=1.0)

    def run(n):
        ctxs = [[Image(rand_image(rng, 28, 28), vae=False), Text(ids(rng, n))]] * 2
        cache = eng.prefill(eng.new_cache(2, 64), eng.pack(ctxs))
        eng.generate_text(cache, eng.keys([0, 1]), max_new_tokens=3)
        gen, cfg_text, _ = cfg_contexts([Text(ids(rng, n))])
        cache = eng.prefill(eng.new_cache(4, 64), eng.pack([gen, gen, cfg_text, cfg_text]))
        lat = eng.sample_latents(cache, 2, 2, flow, keys=eng.keys([0, 1]))
        return eng.decode_latents(lat, 2, 2)

    run(4)
    before = compile_counts()
    assert before, "the compile counter saw no infer_* compilation"
    run(7)
    run(2)
    assert compile_counts() == before
    assert bucket(4 + 16) == bucket(7 + 16) == 32       # the und block bucket the three runs share


@pytest.mark.slow
def test_sharded_engine_equals_single_device(tiny):
    """The same model on a (data 2, fsdp 2, tensor 2) mesh of 8 CPU devices: parameters and cache
    sharded by the trainer's rules, results equal."""
    cfg, model, ae, eng = tiny
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py forces 8 CPU devices)")
    mesh = mesh_lib.make_mesh(dict(data=2, fsdp=2, tensor=2))
    sharded = Engine.from_model(model, ae, mesh=mesh)
    single = Engine.from_model(model, ae, mesh=mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1),
                                                                  devices=jax.devices()[:1]))
    q = sharded.params["language_model"]["layers"]["und"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.sharding.spec != jax.sharding.PartitionSpec()
    rng = np.random.default_rng(6)
    ctxs = [[Image(rand_image(rng, 32, 32), vit_image=rand_image(rng, 28, 28), eps=None), Text(ids(rng, n))]
            for n in (3, 5, 4, 6)]
    flow = FlowConfig(num_timesteps=3, cfg_text_scale=2.0, cfg_img_scale=1.0)
    outs = []
    for e in (sharded, single):
        cache = e.prefill(e.new_cache(4, 64), e.pack(ctxs), e.keys([0, 1, 2, 3]))
        if e is sharded:
            assert cache.k.sharding.spec[1] is not None      # rows over the batch axes
        _, txt = e.generate_text(cache, e.keys([0, 1, 2, 3]), max_new_tokens=3, return_logits=True)
        gen = [c for c in ctxs[:2]] + [[c[0]] for c in ctxs[:2]]
        cache = e.prefill(e.new_cache(4, 64), e.pack(gen), e.keys([0, 1, 0, 1]))
        lat = e.sample_latents(cache, 2, 2, flow, keys=e.keys([0, 1]))
        outs.append((np.asarray(txt["logits"]), np.asarray(lat)))
    np.testing.assert_allclose(outs[0][0], outs[1][0], atol=TOL)
    np.testing.assert_allclose(outs[0][1], outs[1][1], atol=TOL)


def test_unrolled_layers_and_abstract_engine(tiny):
    """``llm.scan_layers=False`` (the AOT cost probes of bench/generate_aot.py) unrolls the
    decoder over the cache and gives the scanned result; ``Engine.abstract`` (weights as shapes)
    lowers and compiles the same program, with the output shape the real one has."""
    cfg, model, ae, eng = tiny
    rng = np.random.default_rng(3)
    img, q = rand_image(rng, 32, 48), ids(rng, 6)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    vparams = nnx.to_pure_dict(nnx.state(ae, nnx.Param))
    ucfg = cfg.copy_and_resolve_references()
    ucfg.llm.scan_layers = False
    uneng = Engine(ucfg, params, vparams)
    x = jnp.asarray(rng.standard_normal((1, 6, 16)).astype(np.float32))
    out = []
    for e in (eng, uneng):
        cache = e.prefill(e.new_cache(1, 64), e.pack([[Image(img, vit=False, eps=np.zeros((4, 6, 4), np.float32)),
                                                      Text(q)]]))
        out.append(np.asarray(e.velocity(cache, x, 0.4, 2, 3)))
    np.testing.assert_allclose(out[1], out[0], atol=1e-6, rtol=0)
    ab = Engine.abstract(cfg, eng.mesh)
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(ab.params))
    cache = jax.eval_shape(lambda: eng.new_cache(1, 64))
    lat = jnp.asarray(np.arange(6, dtype=np.int32))
    lowered = ab._velocity.lower(ab.params, ab.fixed, cache, jax.ShapeDtypeStruct(x.shape, x.dtype),
                                 jax.ShapeDtypeStruct((), jnp.float32), lat, n_ctx=1)
    assert lowered.compile().out_info.shape == out[0].shape
