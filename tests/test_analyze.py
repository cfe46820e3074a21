"""sgt_jax.analyze: attention capture against an independent reference on the golden fixture,
the separability numbers on features of known separability, and the commands on the tiny model."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from golden import GOLDEN
from sgt_jax.analyze import capture
from sgt_jax.analyze import metrics
from sgt_jax.convert import check_golden as G
from sgt_jax.models.qwen2_mot import Routing


# -- an independent reference: BAGEL's MoT decoder in numpy (float64) from the fixture's tensors ---

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    f = pos[:, None].astype(np.float64) * inv[None]
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    return x * cos + rot * sin


def reference_probs(fx):
    """Per-layer attention probabilities (layers, heads, L, L) and the final hidden states of
    BAGEL's decoder on the fixture's ``input_embeds``, its dense mask and its weights."""
    meta, t, m = fx["meta"], fx["batch"], fx["model"]
    c = meta["config"]["llm"]
    n = meta["batch"]["sequence_length"]
    nh, nkv, hd, eps = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"], c["rms_norm_eps"]
    x = t["input_embeds"].astype(np.float64)
    mask = t["attn_mask_dense"][:n, :n]
    gen = np.zeros(n, bool)
    gen[t["packed_vae_token_indexes"]] = True
    pos = t["packed_position_ids"]
    W = lambda l, name, sfx="", leaf="weight": m[f"language_model.model.layers.{l}.{name}{sfx}.{leaf}"].astype(np.float64)

    def expert(fn):      # fn(suffix) evaluated for both experts, picked per token
        a, b = fn(""), fn("_moe_gen")
        return np.where(gen.reshape((n,) + (1,) * (a.ndim - 1)), b, a)

    probs = []
    for l in range(c["num_hidden_layers"]):
        hn = expert(lambda s: _rms(x, W(l, "input_layernorm", s), eps))

        def proj(name, heads, norm=None):
            def f(s):
                y = hn @ W(l, f"self_attn.{name}", s).T + W(l, f"self_attn.{name}", s, "bias")
                y = y.reshape(n, heads, hd)
                return _rms(y, W(l, f"self_attn.{norm}", s), eps) if norm else y
            return expert(f)

        q = _rope(proj("q_proj", nh, "q_norm"), pos, c["rope_theta"])
        k = _rope(proj("k_proj", nkv, "k_norm"), pos, c["rope_theta"])
        v = proj("v_proj", nkv)
        p = np.zeros((nh, n, n))
        o = np.zeros((n, nh, hd))
        for h in range(nh):
            s = q[:, h] @ k[:, h // (nh // nkv)].T / np.sqrt(hd)
            s = np.where(mask, s, -np.inf)
            e = np.exp(s - s.max(-1, keepdims=True))
            p[h] = e / e.sum(-1, keepdims=True)
            o[:, h] = p[h] @ v[:, h // (nh // nkv)]
        probs.append(p)
        x = x + expert(lambda s: o.reshape(n, -1) @ W(l, "self_attn.o_proj", s).T)
        hn = expert(lambda s: _rms(x, W(l, "post_attention_layernorm", s), eps))

        def mlp(s):
            g = hn @ W(l, "mlp" + s, ".gate_proj").T
            return (g / (1 + np.exp(-g)) * (hn @ W(l, "mlp" + s, ".up_proj").T)) @ W(l, "mlp" + s, ".down_proj").T
        x = x + expert(mlp)
    fn = lambda s: _rms(x, m[f"language_model.model.norm{s}.weight"].astype(np.float64), eps)
    return np.stack(probs), expert(fn)


@pytest.fixture(scope="module")
def golden():
    fx = G.load_fixture(str(GOLDEN))
    ref_p, ref_h = reference_probs(fx)
    return fx, ref_p, ref_h


def test_reference_reproduces_bagel(golden):
    """The numpy reference is itself checked against BAGEL's own output."""
    fx, _, ref_h = golden
    assert np.abs(ref_h - fx["batch"]["last_hidden_state"]).max() < 2e-5


def _full_probs(b, nh, length, lk):
    def reduce(p, qidx, h0):
        return jnp.zeros((b, nh, length, lk), jnp.float32).at[:, h0:h0 + p.shape[1], qidx, :].add(p)
    return reduce


@functools.partial(nnx.jit, static_argnames=("num_gen", "query_chunk", "head_block"))
def _capture(model, batch, noise, *, num_gen, query_chunk, head_block):
    """The training forward (its embeddings and hidden states) and the analysis pass with a
    reduction that keeps every probability, back in packing order."""
    out = model(batch, num_gen=num_gen, noise=noise)
    length = batch.kind.shape[1]
    r = Routing.make(batch.expert, num_gen)
    seg = capture.Segments(batch.doc_ids, batch.split_ids, batch.split_mode,
                           jnp.arange(length, dtype=jnp.int32)[None]).permute(r.perm)
    nh = model.cfg.llm.num_heads
    h, probs = capture.attention_pass(model.language_model, r.sort(out["input_embeds"]), r.sort(batch.position_ids),
                                      seg, num_gen, _full_probs(1, nh, length, length),
                                      query_chunk=query_chunk, head_block=head_block)
    inv = r.inverse[0]
    probs = probs[:, 0][:, :, inv][:, :, :, inv]
    return out["hidden"], r.unsort(h), probs


@pytest.mark.parametrize("pad_to,query_chunk,head_block", [(None, 0, 0), (112, 24, 1)])
def test_capture_equals_dense_attention_probabilities(golden, pad_to, query_chunk, head_block):
    fx, ref_p, _ = golden
    meta, t = fx["meta"], fx["batch"]
    n = meta["batch"]["sequence_length"]
    cfg = G.config_from_meta(meta)
    model = G.build_model(cfg, fx["model"])
    batch, noise, num_gen = G.packed_batch_from_golden(meta, t, cfg, pad_to=pad_to)
    hidden, h, probs = _capture(model, batch, noise, num_gen=num_gen, query_chunk=query_chunk, head_block=head_block)
    probs = np.asarray(probs)
    got = probs[:, :, :n, :n]
    mask = t["attn_mask_dense"][:n, :n]
    assert np.all(got[:, :, ~mask] == 0.0)                             # masked keys exactly 0
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)            # rows sum to 1 over visible keys
    assert np.abs(got - ref_p).max() < 1e-5
    # the analysis pass's hidden states are the training forward's
    np.testing.assert_allclose(np.asarray(h)[0, :n], np.asarray(hidden)[0, :n], atol=1e-5)
    if pad_to:
        assert np.all(probs[:, :, :n, n:] == 0) and np.all(probs[:, :, n:, :n] == 0)


def test_key_profile_is_the_mean_of_the_reference_rows(golden):
    """The reduction the commands use: mass from one sample's text tokens to every key."""
    fx, ref_p, _ = golden
    meta, t = fx["meta"], fx["batch"]
    cfg = G.config_from_meta(meta)
    model = G.build_model(cfg, fx["model"])
    batch, noise, num_gen = G.packed_batch_from_golden(meta, t, cfg)
    from sgt_jax import batch as B
    w = (np.asarray(batch.kind[0]) == B.TEXT) & (np.asarray(batch.doc_ids[0]) == 1)      # sample 1: VQA

    @nnx.jit
    def profile(model, batch, noise, w):
        out = model(batch, num_gen=num_gen, noise=noise)
        return capture.packed_key_profile(model, out["input_embeds"], batch, num_gen, w, query_chunk=32)

    prof = profile(model, batch, noise, jnp.asarray(w[None], jnp.float32))
    want = ref_p[:, :, w].mean(axis=(1, 2))                            # (layers, L)
    np.testing.assert_allclose(np.asarray(prof)[:, 0], want, atol=1e-5)
    np.testing.assert_allclose(np.asarray(prof).sum(-1), 1.0, atol=1e-5)


# -- separability numbers on features of known separability ------------------------------------------

def test_probe_and_silhouette_on_known_separability():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 40)
    centers = rng.normal(size=(4, 32)) * 10.0
    apart = centers[labels] + rng.normal(size=(160, 32))
    same = rng.normal(size=(160, 32))
    a, s = metrics.separability(apart, labels), metrics.separability(same, labels)
    assert a["linear_probe_accuracy"] >= 0.99 and a["silhouette"] > 0.5
    assert s["linear_probe_accuracy"] < 0.45 and abs(s["silhouette"]) < 0.05     # chance: 0.25, 0
    assert a["num_classes"] == 4 and a["num_samples"] == 160 and a["chance"] == pytest.approx(0.25)


# -- the commands on the tiny model: an SGT-trained checkpoint vs an untrained one ----------------

TRAIN_STEPS = 30


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """configs/tiny.py (SGT: segmentation + VQA on the synthetic scenes) trained TRAIN_STEPS steps
    on one device, and an untrained model of the same config (a model dir with the run's tokenizer)."""
    from flax import nnx

    from fake_data import tiny_run_config
    from sgt_jax.convert.model_dir import save_model_dir
    from sgt_jax.models.bagel import Bagel
    from sgt_jax.models.vae import AutoEncoder
    from sgt_jax.parallel import mesh as mesh_lib
    from sgt_jax.train import loop

    d = tmp_path_factory.mktemp("analyze")
    cfg = tiny_run_config()
    cfg.data.sources.seg = "synthetic_seg:{workdir}/synthetic?n=32&size=48-80"
    cfg.data.sources.vqa = "synthetic_vqa:{workdir}/synthetic?n=32&size=48-80"
    cfg.train.update(steps=TRAIN_STEPS, save_every=TRAIN_STEPS, log_every=10)
    one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    loop.train(cfg, str(d / "run"), quiet=True, mesh=one)
    m = Bagel(cfg.model, rngs=nnx.Rngs(1))
    ae = AutoEncoder(cfg.model, rngs=nnx.Rngs(2))
    save_model_dir(str(d / "untrained"), cfg.model, nnx.to_pure_dict(nnx.state(m, nnx.Param)),
                   nnx.to_pure_dict(nnx.state(ae, nnx.Param)), tokenizer_dir=str(d / "run" / "tokenizer"))
    return d / "untrained", d / "run"


def _cli(*args):
    from sgt_jax.analyze.__main__ import main

    return main([str(a) for a in args])


@pytest.mark.slow
def test_features_trained_vs_untrained(tiny_runs, tmp_path, capsys):
    untrained, run = tiny_runs
    out = tmp_path / "features"
    rc = _cli("features", "--ckpt", f"untrained={untrained}", "--ckpt", f"sgt={run}", "--weights", "params",
              "--data", "synthetic:120?size=64&label=color", "--pool", "mean", "--embedding", "pca",
              "--batch-size", "40", "--out", out)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "features.json").read_text())
    u, s = res["checkpoints"]["untrained"], res["checkpoints"]["sgt"]
    print("features untrained", {k: (u[k]["linear_probe_accuracy"], u[k]["silhouette"]) for k in ("vit", "connector")})
    print("features sgt", {k: (s[k]["linear_probe_accuracy"], s[k]["silhouette"]) for k in ("vit", "connector")})
    assert res["inputs"] == 120 and sum(res["labels"].values()) == 120 and len(res["labels"]) == 8
    assert u["vit"]["num_samples"] == s["vit"]["num_samples"] == 120 and u["pool"] == "mean"
    for r in (u, s):
        for k in ("vit", "connector"):
            assert r[k]["chance"] <= r[k]["linear_probe_accuracy"] <= 1 and -1 <= r[k]["silhouette"] <= 1
    # training changed the feature space: the numbers differ (measured values: docs/analysis.md)
    assert s["vit"]["silhouette"] != u["vit"]["silhouette"]
    for f in ("features_vit.png", "features_connector.png"):
        assert 5_000 < (out / f).stat().st_size < 300_000


@pytest.mark.slow
def test_attention_and_prompt_attention_commands(tiny_runs, tmp_path, capsys):
    _, run = tiny_runs
    out = tmp_path / "att"
    # the same weights twice: differences exactly 0, the second checkpoint reuses the program
    rc = _cli("attention", "--ckpt", f"base={run}", "--ckpt", f"sgt={run}", "--data", "synthetic:4",
              "--batch-size", "4", "--query-chunk", "16", "--head-block", "1", "--out", out)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "attention.json").read_text())
    u, s = res["checkpoints"]["base"], res["checkpoints"]["sgt"]
    layers = 2
    for r in (u, s):
        assert len(r["vit_mass_per_layer"]) == layers and r["items"] == 4
        assert all(0 < v < 1 for v in r["vit_mass_per_layer"])
        assert all(a + b <= 1 + 1e-5 for a, b in zip(r["vit_mass_per_layer"], r["text_mass_per_layer"]))
    assert s["vit_mass_minus_base"] == u["vit_mass_minus_base"] == [0.0] * layers
    assert res["compilations"]["jit(analyze_vqa_attention)"] == 1 and (out / "attention.png").exists()

    out = tmp_path / "prompt"
    rc = _cli("prompt_attention", "--ckpt", f"sgt={run}", "--max-items", "1", "--batch-size", "1",
              "--num-timesteps", "3", "--steps", "0,1", "--out", out)
    assert rc == 0, capsys.readouterr().err
    res = json.loads((out / "prompt_attention.json").read_text())
    r = res["checkpoints"]["sgt"]
    assert sum(r["category_share_pct"].values()) == pytest.approx(100.0, abs=1e-3)
    p = r["prompts"][0]
    assert p["prompt"] == "a photo of a red apple left of a green cup"
    assert sum(p["token_share_pct"]) == pytest.approx(100.0, abs=1e-3)
    assert {"Color", "Object", "Relation", "Special"} <= set(p["categories"])
    assert 0 < r["mean_prompt_mass"] <= 1 + 1e-5 and (out / "prompt_attention.png").exists()


def test_bad_inputs_are_counted_or_refused(tmp_path, capsys):
    bad = tmp_path / "set.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not a png")
    bad.write_text('{"image": "broken.png", "label": "a"}\nnot json\n{"image": "missing.png", "label": "b"}\n')
    from sgt_jax.analyze import data as D

    sk = D.Skipped()
    ims, labels = D.labelled_images(str(bad), sk)
    assert ims == [] and sk.counts == {"bad_image": 2, "bad_record": 1}
    assert _cli("features", "--ckpt", tmp_path / "nope", "--data", bad, "--out", tmp_path / "o") == 1
    assert _cli("features", "--ckpt", tmp_path / "nope", "--data", "synthetic:4", "--out", tmp_path / "o") == 2
    assert "no such file" in capsys.readouterr().err


def test_word_categories_of_split_tokens():
    from sgt_jax.analyze import words as W

    p = ["<|im_start|>", "a", " p", "h", "o", "to", " of", " a", " red", " a", "p", "ple", " ", "le", "f", "t",
         " of", " a", " green", " c", "u", "p", "<|im_end|>"]
    cats = W.categorize(p, [i in (0, len(p) - 1) for i in range(len(p))], W.load_words(None))
    assert cats == ["Special"] + ["Other"] * 7 + ["Color"] + ["Object"] * 3 + ["Other"] + ["Relation"] * 3 \
        + ["Other"] * 2 + ["Color"] + ["Object"] * 3 + ["Special"]


def test_coco_crops_labelled_by_category(tmp_path):
    from PIL import Image as PILImage

    from sgt_jax.analyze import data as D

    (tmp_path / "img").mkdir()
    for i in (1, 2):
        PILImage.fromarray(np.full((60, 80, 3), 40 * i, np.uint8)).save(tmp_path / "img" / f"{i}.jpg")
    js = {"images": [{"id": 1, "file_name": "1.jpg", "height": 60, "width": 80},
                     {"id": 2, "file_name": "2.jpg", "height": 60, "width": 80},
                     {"id": 3, "file_name": "missing.jpg", "height": 60, "width": 80}],
          "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}],
          "annotations": [{"image_id": 1, "category_id": 5, "bbox": [10, 5, 40, 30], "area": 1200, "iscrowd": 0},
                          {"image_id": 1, "category_id": 7, "bbox": [0, 0, 20, 20], "area": 400, "iscrowd": 0},
                          {"image_id": 2, "category_id": 7, "bbox": [30, 20, 50, 40], "area": 2000, "iscrowd": 0},
                          {"image_id": 2, "category_id": 5, "bbox": [0, 0, 80, 60], "area": 4800, "iscrowd": 1},
                          {"image_id": 3, "category_id": 5, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(js))
    sk = D.Skipped()
    ims, labels = D.labelled_images(f"coco:{tmp_path / 'ann.json'}::{tmp_path / 'img'}?min_area=1000", sk)
    assert labels == ["cat", "dog"] and [im.shape for im in ims] == [(30, 40, 3), (40, 50, 3)]
    assert sk.counts == {"bad_image": 1}
    ims, labels = D.labelled_images(f"coco:{tmp_path / 'ann.json'}::{tmp_path / 'img'}?min_area=0&categories=dog", sk)
    assert labels == ["dog", "dog"]
    with pytest.raises(ValueError, match="no categories"):
        D.labelled_images(f"coco:{tmp_path / 'ann.json'}::{tmp_path / 'img'}?categories=cow", sk)
