"""Loading (model dir, training run), the four tasks batched over requests, and the
``python -m sgt_jax.generate`` CLI (outputs, seeds, counted skips, clear errors)."""
import json

import ml_collections
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image as PILImage
from safetensors.numpy import load_file

from fake_data import FakeIterator
from sgt_jax.generate import main as generate_main
from sgt_jax.infer import tasks
from sgt_jax.infer.context import Image, Text
from sgt_jax.infer.engine import CheckpointNotFound, Engine
from sgt_jax.infer.image import FlowConfig
from sgt_jax.parallel import mesh as mesh_lib

FAST = FlowConfig(num_timesteps=3, cfg_text_scale=3.0, cfg_img_scale=1.5, cfg_interval=(0.0, 1.0))


@pytest.fixture(scope="module")
def imported(golden_dir, tmp_path_factory):
    """tiny_v1 imported with the converter (a model dir, no tokenizer)."""
    from sgt_jax.convert.__main__ import main as convert_main

    out = tmp_path_factory.mktemp("imp") / "model"
    assert convert_main(["import", "--from", str(golden_dir), "--to", str(out), "--max-latent-size", "8",
                         "--vit-max-patches-per-side", "8", "--preset", "tiny", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A random tiny model with the tiny tokenizer (vocab 512), saved as a model dir."""
    from sgt_jax.convert.model_dir import save_model_dir
    from sgt_jax.data.tokenizer import build_tiny_tokenizer
    from sgt_jax.models.bagel import Bagel
    from sgt_jax.models.config import tiny
    from sgt_jax.models.vae import AutoEncoder

    d = tmp_path_factory.mktemp("tok")
    tok = build_tiny_tokenizer(str(d / "tok"), vocab_size=512)
    cfg = tiny()
    cfg.llm.vocab_size = 512
    m = Bagel(cfg, rngs=nnx.Rngs(3))
    st = nnx.state(m, nnx.Param)
    st["llm2vae"]["kernel"].set_value(np.random.default_rng(0).normal(0, 0.02, st["llm2vae"]["kernel"].shape))
    ae = AutoEncoder(cfg, rngs=nnx.Rngs(4))
    save_model_dir(str(d / "model"), cfg, nnx.to_pure_dict(st), nnx.to_pure_dict(nnx.state(ae, nnx.Param)),
                   tokenizer_dir=tok)
    return d / "model"


def vqa_golden_check(eng, golden_dir):
    meta = json.loads((golden_dir.parent / "inference_v1" / "meta.json").read_text())
    t = load_file(str(golden_dir.parent / "inference_v1" / "inference.safetensors"))
    case = meta["cases"]["vqa"]
    blocks = case["blocks"]
    patches, pos = t[blocks[0]["tensor"]], np.asarray(blocks[0]["packed_vit_position_ids"])
    r, c = pos // 8, pos % 8
    img = patches.reshape(r.max() + 1, c.max() + 1, 14, 14, 3).transpose(0, 2, 1, 3, 4)
    img = img.reshape((r.max() + 1) * 14, (c.max() + 1) * 14, 3)
    cache = eng.prefill(eng.new_cache(1, 64), eng.pack([[Image(img, vae=False), Text(blocks[1]["ids"][1:-1])]]))
    _, out = eng.generate_text(cache, eng.keys([0]), max_new_tokens=case["steps"], return_logits=True)
    return float(np.abs(np.asarray(out["logits"][0]) - t["vqa.logits"]).max())


def test_engine_from_a_model_dir(golden_dir, imported, tmp_path):
    """An imported BAGEL model dir reproduces BAGEL's greedy logits; a missing path is a clear error."""
    eng = Engine.load(str(imported), compute_dtype="float32")
    assert eng.tokenizer is None and eng.has_vae
    assert vqa_golden_check(eng, golden_dir) < 1e-5
    with pytest.raises(CheckpointNotFound, match="no such file"):
        Engine.load(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFound, match="neither a model dir"):
        Engine.load(str(tmp_path / "empty"))


@pytest.mark.slow
def test_engine_from_a_training_run(golden_dir, imported, tmp_path):
    """A run trained from the import with lr 1e-30 (updates below fp32 resolution: EMA == params ==
    the import; the run config refuses lr 0) reproduces BAGEL."""
    from sgt_jax.convert.model_dir import read_config
    from sgt_jax.train import loop
    from sgt_jax.train.config import default_mesh_config, default_train_config

    cfg = ml_collections.ConfigDict(dict(model=read_config(str(imported)),
                                         data=ml_collections.ConfigDict(dict(gen_tokens_per_row=8)),
                                         train=default_train_config(), mesh=default_mesh_config()))
    cfg.model.compute_dtype = "float32"
    cfg.train.update(steps=2, warmup_steps=1, log_every=1, save_every=100, lr=1e-30, ema_decay=0.5,
                     init_from=str(imported))
    cfg.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
    run = tmp_path / "run"
    one = mesh_lib.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])   # see test_train._one_device
    loop.train(cfg, str(run), data_iterator=FakeIterator(cfg, rows=8), quiet=True, mesh=one)
    for weights in ("ema", "params"):
        eng = Engine.load(str(run), weights=weights)
        assert "run" in eng.source and vqa_golden_check(eng, golden_dir) < 1e-5


def scene(rng, h, w):
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_segment_one_image(tok_model):
    """SGT's task on one image: a pseudo-colour image at the VAE-transformed size, per seed."""
    eng = Engine.load(str(tok_model))
    im = scene(np.random.default_rng(0), 60, 80)
    a, b = tasks.segment(eng, [im, im], flow=FAST, batch_size=2, seeds=[0, 1])
    w, h = eng.transforms.vae.size(80, 60)
    assert a.shape == (h, w, 3) and a.dtype == np.uint8 and not np.array_equal(a, b)


@pytest.mark.slow
def test_tasks_batched_results_do_not_depend_on_the_batch(tok_model):
    eng = Engine.load(str(tok_model))
    assert eng.special == eng.tokenizer.special and eng.special.bos_token_id != eng.cfg.llm.bos_token_id
    rng = np.random.default_rng(0)
    ims = [scene(rng, 60, 80), scene(rng, 70, 50), scene(rng, 64, 64)]
    qs = ["How many red circles are there?", "What color is the square?", "Is there a triangle?"]
    one = tasks.answer(eng, [([im], q) for im, q in zip(ims, qs)], max_new_tokens=6, batch_size=1, seeds=[0, 1, 2])
    three = tasks.answer(eng, [([im], q) for im, q in zip(ims, qs)], max_new_tokens=6, batch_size=3, seeds=[0, 1, 2])
    for a, b in zip(one, three):
        assert a["tokens"] == b["tokens"] and isinstance(a["text"], str)
        np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5)
    sampled = tasks.answer(eng, [([ims[0]], qs[0])] * 2, max_new_tokens=6, temperature=1.0, seeds=[5, 5])
    assert sampled[0]["tokens"] == sampled[1]["tokens"]
    think = tasks.answer(eng, [([ims[0]], qs[0])], max_new_tokens=4, think=True)
    assert len(think[0]["tokens"]) <= 4
    longer = tasks.context_tokens(eng, tasks.answer_context(eng, [ims[0]], qs[0], think=True))
    assert longer > tasks.context_tokens(eng, tasks.answer_context(eng, [ims[0]], qs[0])) + 10

    masks = tasks.segment(eng, ims, flow=FAST, batch_size=2, seeds=[0, 1, 2])
    again = tasks.segment(eng, ims[1:], flow=FAST, batch_size=1, seeds=[1, 2])
    for m, im in zip(masks, ims):
        w, h = eng.transforms.vae.size(im.shape[1], im.shape[0])
        assert m.shape == (h, w, 3) and m.dtype == np.uint8
    for a, b in ((masks[1], again[0]), (masks[2], again[1])):   # uint8: +-1 where fp32 round-off crosses an integer
        d = np.abs(a.astype(int) - b.astype(int))
        assert d.max() <= 1 and (d > 0).mean() < 1e-3
    back = tasks.segment(eng, ims[:1], flow=FAST, resize_to_input=True)
    assert back[0].shape == ims[0].shape
    edits = tasks.edit(eng, ims[:2], ["Make it blue.", "Remove the circle."], flow=FAST)
    assert [e.shape[:2] for e in edits] == [m.shape[:2] for m in masks[:2]]
    imgs, plans = tasks.generate_images(eng, [tasks.t2i_inputs("a red circle")] * 2, [(32, 48)] * 2,
                                        flow=FAST, seeds=[0, 1], think=True, think_tokens=4)
    assert imgs[0].shape == (32, 48, 3) and all(isinstance(p, str) for p in plans)
    assert not np.array_equal(imgs[0], imgs[1])          # two seeds, two images


@pytest.mark.slow
def test_cli_outputs_seeds_and_counted_skips(tok_model, tmp_path):
    rng = np.random.default_rng(1)
    PILImage.fromarray(scene(rng, 60, 72)).save(tmp_path / "a.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "seg"
    rc = generate_main(["segment", "--model", str(tok_model), "--out", str(out), "--image", str(tmp_path / "a.png"),
                        "--num-timesteps", "3", "--no-progress"])
    assert rc == 0
    rec = json.loads((out / "00000.json").read_text())
    assert rec["settings"]["flow"]["num_timesteps"] == 3 and rec["settings"]["flow"]["cfg_renorm_type"] == "text_channel"
    assert (out / "00000.png").exists() and rec["output"]["image"] == "00000.png"
    reqs = [{"id": "ok", "prompt": "a blue square", "height": 32, "width": 32},
            {"id": "big", "prompt": "x", "height": 256, "width": 256},
            {"id": "long", "prompt": "red " * 600}]
    (tmp_path / "t2i.jsonl").write_text("\n".join(json.dumps(r) for r in reqs) + "\nnot json\n")
    out = tmp_path / "t2i"
    rc = generate_main(["t2i", "--model", str(tok_model), "--out", str(out), "--jsonl", str(tmp_path / "t2i.jsonl"),
                        "--seeds", "0,1", "--num-timesteps", "3", "--max-context-tokens", "512", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["ok_s0.png", "ok_s1.png"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == 2 and summary["skipped"] == {"bad_size": 1, "prompt_too_long": 1, "bad_request": 1}
    assert summary["compilations"] and all("infer_" in k for k in summary["compilations"])
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert [x["seed"] for x in lines] == [0, 1]
    out = tmp_path / "ans"
    (tmp_path / "ans.jsonl").write_text(json.dumps({"id": "q1", "image": "a.png", "question": "How many?"}) + "\n"
                                        + json.dumps({"id": "q2", "image": "broken.png", "question": "?"}) + "\n"
                                        + json.dumps({"id": "q3", "image": "missing.png", "question": "?"}) + "\n")
    rc = generate_main(["answer", "--model", str(tok_model), "--out", str(out), "--jsonl", str(tmp_path / "ans.jsonl"),
                        "--max-new-tokens", "4", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["outputs"] == 1 and summary["skipped"] == {"bad_image": 2}
    details = " ".join(s["detail"] for s in summary["skipped_requests"])
    assert "broken.png: not a readable image" in details and "missing.png: no such image file" in details
    ans = json.loads((out / "q1.json").read_text())["output"]
    assert isinstance(ans["text"], str) and len(ans["tokens"]) == len(ans["logprobs"])
    rc = generate_main(["answer", "--model", str(tok_model), "--out", str(tmp_path / "bad"), "--jsonl",
                        str(tmp_path / "ans.jsonl"), "--max-new-tokens", "4", "--no-progress",
                        "--max-context-tokens", "8"])
    assert rc == 1      # every request skipped


def test_cli_clear_errors(imported, tmp_path, capsys):
    assert generate_main(["answer", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"),
                          "--question", "?"]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert generate_main(["answer", "--model", str(imported), "--out", str(tmp_path / "o"), "--question", "?"]) == 2
    assert "has no tokenizer" in capsys.readouterr().err
