"""``python -m sgt_jax.data.preview``: the CLI on configs/tiny.py (synthetic default data), and
the reconstruction of documents from PackedBatch rows checked against the batch and the source
images."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from fake_data import REPO, tiny_run_config
from PIL import Image

from sgt_jax.batch import VIT
from sgt_jax.data import pipeline, preview
from sgt_jax.data.instructions import SEGMENT_INSTRUCTIONS
from sgt_jax.data.packer import RowSpec, assemble
from sgt_jax.data.samples import SampleBuilder
from sgt_jax.data.tokenizer import Tokenizer



@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    out = tmp_path_factory.mktemp("preview") / "out"
    p = subprocess.run([sys.executable, "-m", "sgt_jax.data.preview", "--config", "configs/tiny.py",
                        "--batches", "2", "--out", str(out), "--samples", "4",
                        "--config.data.seed=3"],
                       check=False, cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stdout, json.loads((out / "preview.json").read_text())


def test_cli_writes_png_json_and_prints_counters(cli):
    out, stdout, summary = cli
    # the contact sheet is a real image with content
    im = np.asarray(Image.open(out / "contact_sheet.png").convert("RGB"))
    assert im.shape[0] > 400 and im.shape[1] > 400 and im.std() > 10
    # one line per batch with fill, tokens by kind, samples by stream
    lines = [ln for ln in stdout.splitlines() if ln.startswith("batch ")]
    assert len(lines) == 2
    for i, ln in enumerate(lines):
        assert ln.startswith(f"batch {i}: fill ")
        for part in ("tokens text", "vit", "latent", "pad", "samples", "seg", "vqa"):
            assert part in ln
        st = summary["per_batch"][i]
        assert f"fill {st['fill']:.3f}" in ln
        assert f"pad {st['tokens/pad']}" in ln
        assert f"seg {st['samples/seg']} vqa {st['samples/vqa']}" in ln
        assert st["samples/seg"] == 2 * st["samples/vqa"]             # the tiny preset mixes 2:1
        kinds = sum(st[f"tokens/{k}"] for k in ("text", "vit", "vae_clean", "vae_noised", "pad"))
        assert kinds == st["rows"] * summary["static_shapes"]["tokens_per_row"]
    # the counters with their reasons, printed and in the JSON
    assert "skipped (bad records):" in stdout and "dropped (never fit a row):" in stdout
    deferred = int(re.search(r"deferred \(to a later batch\):\s+(\d+)", stdout).group(1))
    assert deferred == summary["counters"]["deferred"] == summary["totals"]["total/deferred"]
    assert summary["totals"]["total/batches"] == 2
    assert summary["config"] == "configs/tiny.py"
    assert summary["data_config"]["seed"] == 3                        # --config.<key>= overrides apply
    assert summary["problems"] == []                                  # data and model configs agree
    assert (out / "work" / "synthetic").is_dir()                      # default workdir OUT/work
    # both kinds of documents on the sheet, with their text decoded
    cats = [d["category"] for d in summary["samples"]]
    assert cats.count("generation") == 2 and cats.count("understanding") == 2
    for d in summary["samples"]:
        if d["category"] == "generation":
            assert d["vae"] and d["vae"][0]["noised"] and d["vae"][0]["timestep"] is not None
            instr = [t["text"] for t in d["text"] if not t["loss"]]
            assert all(t in SEGMENT_INSTRUCTIONS for t in instr)         # (text CFG dropout may remove it)
        else:
            assert d["vit"] and any(t["loss"] for t in d["text"]) and not d["vae"]


def test_reconstructed_vit_image_is_the_unpatchified_batch(cli):
    """The PNGs equal the ViT patches / VAE images of the very batch the pipeline yields (pulled
    again here with the same config and workdir), un-patchified independently of preview.py."""
    out, _, summary = cli
    cfg = tiny_run_config().data
    cfg.seed = 3
    it = pipeline.make_train_iterator(cfg, workdir=str(out / "work"))
    batches = [next(it)[0] for _ in range(2)]
    p, S, d = cfg.vit_patch_size, cfg.vit_max_patches_per_side, cfg.vae_downsample
    n_vit = 0
    for doc in summary["samples"]:
        b = batches[doc["batch"]]
        r = doc["row"]
        tok_mask = (b.doc_ids[r] == doc["doc"]) & (b.kind[r] == VIT)
        ids_in_doc = sorted(set(b.vit_image_ids[r][b.vit_index[r][tok_mask]].tolist()))
        assert [v["image_id"] for v in doc["vit"]] == ids_in_doc
        for v in doc["vit"]:
            png = np.asarray(Image.open(out / v["file"]))
            slots = np.nonzero(b.vit_image_ids[r] == v["image_id"])[0]
            pos = b.vit_position_ids[r][slots]
            hp, wp = pos.max() // S + 1, pos % S
            wp = wp.max() + 1
            assert png.shape == (hp * p, wp * p, 3) and len(slots) == hp * wp
            x = b.vit_patches[r][slots].reshape(hp, wp, p, p, 3).swapaxes(1, 2).reshape(hp * p, wp * p, 3)
            expect = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(png, expect)
            # and back: the PNG re-normalised is bit for bit what the batch holds
            y = png.reshape(hp, p, wp, p, 3).swapaxes(1, 2).reshape(hp * wp, p * p * 3)
            np.testing.assert_array_equal((y.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5),
                                          b.vit_patches[r][slots])
            n_vit += 1
        for v in doc["vae"]:
            png = np.asarray(Image.open(out / v["file"]))
            gh, gw = v["grid"]
            raw = np.asarray(b.vae_images[r, v["slot"]], np.float32)
            np.testing.assert_array_equal(png, np.clip(np.round((raw[:gh * d, :gw * d] + 1) * 127.5), 0, 255))
            assert not raw[gh * d:].any() and not raw[:, gw * d:].any()     # the rest is padding
    assert n_vit >= 3


def test_reconstruct_recovers_the_resized_inputs_and_text(cli):
    """Pack known records and reconstruct: ViT image == the ViT transform of the RGB, target ==
    the VAE transform of the mask, text == the instruction / the Q and A."""
    out, _, _ = cli
    cfg = tiny_run_config().data
    for k in ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"):
        cfg.samples[k] = 0.0
    tok = Tokenizer(str(out / "work" / "tokenizer"))
    builder = SampleBuilder(cfg, tok)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 71, 3), dtype=np.uint8)
    mask = np.zeros((50, 71, 3), np.uint8)
    mask[10:30, 5:40] = (255, 0, 0)
    vqa_img = rng.integers(0, 256, (60, 45, 3), dtype=np.uint8)
    seg = builder({"task": "seg", "id": "s", "image": rgb, "target": mask}, stream="seg", index=0)
    vqa = builder({"task": "vqa", "id": "q", "images": [vqa_img], "conversations": [
        {"from": "human", "value": "<image>\nHow many shapes are there?"},
        {"from": "gpt", "value": "Three."}]}, stream="vqa", index=1)
    batch = assemble([[], [vqa, seg]], RowSpec.from_config(cfg))          # row 0 empty: valid
    assert preview.row_documents(batch, 0) == []
    assert preview.row_documents(batch, 1) == [0, 1]
    geom = dict(vit_patch_size=cfg.vit_patch_size, vit_max_patches_per_side=cfg.vit_max_patches_per_side,
                vae_downsample=cfg.vae_downsample)
    special = tuple(tok.special.as_dict().values())
    q = preview.reconstruct(batch, 1, 0, tokenizer=tok, special_ids=special, **geom)
    s = preview.reconstruct(batch, 1, 1, tokenizer=tok, special_ids=special, **geom)
    assert q["category"] == "understanding" and s["category"] == "generation"
    np.testing.assert_array_equal(q["vit"][0]["image"], builder.vqa_vit(vqa_img, img_num=1))
    assert [(t["text"], t["loss"]) for t in q["text"]] == [("How many shapes are there?", False), ("Three.", True)]
    np.testing.assert_array_equal(s["vit"][0]["image"], builder.vit(rgb))
    np.testing.assert_array_equal(s["vae"][0]["image"],
                                  builder.vae(mask, resample=cfg.transforms.target_resample))
    assert s["vae"][0]["noised"] and s["vae"][0]["timestep"] == pytest.approx(seg.tokens["timesteps"][-2])
    assert [t["text"] for t in s["text"]] == [seg.text]
    # the contact sheet takes both categories and renders
    docs = [{"batch": 0, "row": 1, "doc": i, **x} for i, x in enumerate((q, s))]
    assert [x["category"] for x in preview.select(docs, 4)] == ["understanding", "generation"]
    preview.contact_sheet(docs, str(out / "unit_sheet.png"), title="unit")
    assert (out / "unit_sheet.png").stat().st_size > 1000


def test_counters_name_the_reasons_of_bad_records(cli, tmp_path):
    """In process, with a seg source holding corrupt and incomplete records: the skip counters
    are printed with their reasons and match the JSON."""
    out, _, _ = cli
    from sgt_jax.data import synthetic

    d = tmp_path / "sa1b"
    synthetic.generate(str(d), 6, size=(48, 80), num_shapes=(1, 4))
    (d / "sa_1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")      # corrupt_image
    (d / "sa_2.json").unlink()                                                 # missing_file
    cfg = tiny_run_config()
    cfg.data.sources.seg = f"sa1b:{d}"
    lines = []
    summary = preview.run(cfg, batches=2, out=str(tmp_path / "out"), workdir=str(out / "work"), samples=2,
                          log=lines.append)
    text = "\n".join(lines)
    skipped = summary["counters"]["skipped"]
    assert skipped["corrupt_image"] >= 1 and skipped["missing_file"] >= 1
    line = next(ln for ln in lines if ln.lstrip().startswith("skipped (bad records):"))
    for reason, n in skipped.items():
        assert f"{reason} {n}" in line
    assert "skipped/corrupt_image +" in text                                   # per-batch events
    assert (tmp_path / "out" / "contact_sheet.png").exists()
