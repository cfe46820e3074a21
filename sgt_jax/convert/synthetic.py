"""Random BAGEL-layout checkpoints of any size, written and verified block by block.

For the conversion tests, ``bench/convert.py`` and ``scripts/convert_full_size.py``: a model
config (e.g. ``bagel_7b`` with fewer layers) -> a directory in BAGEL's release layout whose
values are a deterministic function of (key, row block), so a round trip can be verified
against the generator without keeping the source on disk. Values are random finite numbers
(random sign and mantissa bits, exponent in a small range; no NaN/Inf so bit equality is
value equality).
"""
from __future__ import annotations

import json
import math
import os
import zlib

import ml_dtypes
import numpy as np

from sgt_jax.convert.bagel_io import bagel_config_files
from sgt_jax.convert.safetensors_io import PlannedTensor, SafetensorsPlanWriter, SafetensorsSource
import sgt_jax.convert.keymap as keymap

GEN_BLOCK_BYTES = 64 * 2 ** 20


def _dtype(name) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if str(name) in ("bf16", "bfloat16") else np.dtype(name)


def bagel_plan(cfg, dtype) -> list[PlannedTensor]:
    """Every tensor of BAGEL's ``Bagel.state_dict()`` for ``cfg`` (incl. the two fixed tables)."""
    from sgt_jax.convert.model_dir import abstract_params, flatten

    shapes = {p: tuple(v.shape) for p, v in flatten(abstract_params(cfg)).items()}
    dt = _dtype(dtype)
    plan = [PlannedTensor(e.key, dt, keymap.torch_shape(e.kind, shapes[tuple(e.path)] if e.layer is None
                                                        else shapes[tuple(e.path)][1:]))
            for e in keymap.bagel_table(cfg)]
    plan += [PlannedTensor(k, dt, s) for k, s in keymap.fixed_table_shapes(cfg).items()]
    return plan


def vae_plan(cfg) -> list[PlannedTensor]:
    from sgt_jax.convert.model_dir import abstract_vae, flatten

    shapes = {p: tuple(v.shape) for p, v in flatten(abstract_vae(cfg)).items()}
    return [PlannedTensor(e.key, np.dtype(np.float32), keymap.torch_shape(e.kind, shapes[tuple(e.path)]))
            for e in keymap.vae_entries(cfg)]


def _rows_per_block(t: PlannedTensor) -> int:
    if not t.shape:
        return 1
    row = max(1, t.nbytes // max(t.shape[0], 1))
    return max(1, GEN_BLOCK_BYTES // row)


def value_blocks(t: PlannedTensor, fixed: dict | None = None):
    """Yield (r0, r1, block) of tensor ``t``'s values (deterministic in key and rows)."""
    if fixed and t.key in fixed:
        yield 0, t.shape[0], fixed[t.key].astype(t.dtype)
        return
    n = t.shape[0] if t.shape else 1
    step = _rows_per_block(t)
    dt = np.dtype(t.dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        shape = ((r1 - r0),) + tuple(t.shape[1:]) if t.shape else ()
        rng = np.random.default_rng([zlib.crc32(t.key.encode()), r0])
        count = math.prod(shape)
        if dt.itemsize == 2:      # bf16: sign | exponent 0x78..0x7F (2^-7 .. 1) | random mantissa
            bits = np.frombuffer(rng.bytes(2 * count), np.uint16).copy()
            bits = (bits & np.uint16(0x83FF)) | np.uint16(0x3C00)
            block = bits.view(dt).reshape(shape)
        else:                     # fp32: the same recipe on 32 bits
            bits = np.frombuffer(rng.bytes(4 * count), np.uint32).copy()
            bits = (bits & np.uint32(0x83FFFFFF)) | np.uint32(0x3C000000)
            block = bits.view(np.float32).astype(dt, copy=False).reshape(shape)
        yield r0, r1, block


def write_checkpoint(cfg, out_dir: str, *, dtype="bf16", shard_bytes: int | None = None,
                     weights_name: str = "ema", with_vae: bool = True, tokenizer: bool = True) -> dict:
    """Write a random BAGEL release-layout dir for ``cfg``; returns {"bytes", "largest_tensor_bytes"}."""
    os.makedirs(out_dir, exist_ok=True)
    plan = bagel_plan(cfg, dtype)
    fixed = keymap.fixed_tables(cfg)
    w = SafetensorsPlanWriter(out_dir, weights_name, plan, shard_bytes)
    for t in plan:
        for _, _, block in value_blocks(t, fixed):
            w.write(t.key, block)
    w.close()
    total = sum(t.nbytes for t in plan)
    largest = max(t.nbytes for t in plan)
    if with_vae:
        vp = vae_plan(cfg)
        w = SafetensorsPlanWriter(out_dir, "ae", vp)
        for t in vp:
            for _, _, block in value_blocks(t):
                w.write(t.key, block)
        w.close()
        total += sum(t.nbytes for t in vp)
    lj, vj = bagel_config_files(cfg, torch_dtype="bfloat16" if str(dtype) in ("bf16", "bfloat16") else "float32")
    for name, obj in (("llm_config.json", lj), ("vit_config.json", vj)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)
    if tokenizer:
        added = {str(getattr(cfg.llm, k)): {"content": tok, "special": True}
                 for k, tok in (("bos_token_id", "<|im_start|>"), ("eos_token_id", "<|im_end|>"),
                                ("start_of_image", "<|vision_start|>"), ("end_of_image", "<|vision_end|>"))}
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added}, f, indent=1)
        with open(os.path.join(out_dir, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n")
    return {"bytes": total, "largest_tensor_bytes": largest}


def verify_export(cfg, export_path: str, *, dtype="bf16", with_vae: bool = True) -> list[str]:
    """Compare an exported weights file/index (and ae.safetensors next to it) with the generator:
    names, shapes, dtypes and every bit. Returns the list of differences (empty = identical)."""
    diffs = []
    fixed = keymap.fixed_tables(cfg)
    plans = [(export_path, bagel_plan(cfg, dtype), fixed)]
    if with_vae:
        plans.append((os.path.join(os.path.dirname(export_path), "ae.safetensors"), vae_plan(cfg), None))
    for path, plan, fx in plans:
        src = SafetensorsSource(path)
        want = {t.key for t in plan}
        if set(src.keys()) != want:
            diffs.append(f"{path}: keys differ: missing {sorted(want - set(src.keys()))[:10]}, "
                         f"extra {sorted(set(src.keys()) - want)[:10]}")
        for t in plan:
            info = src.tensors.get(t.key)
            if info is None:
                continue
            if tuple(info.shape) != tuple(t.shape) or info.np_dtype != np.dtype(t.dtype):
                diffs.append(f"{t.key}: {info.dtype}{list(info.shape)} vs {np.dtype(t.dtype)}{list(t.shape)}")
                continue
            for r0, r1, block in value_blocks(t, fx):
                got = src.read(t.key, (r0, r1)) if t.shape else src.read(t.key)
                if got.tobytes() != np.ascontiguousarray(block).tobytes():
                    diffs.append(f"{t.key}: values differ in rows [{r0}, {r1})")
                    break
    return diffs


# --------------------------------------------------------------------------------------------------
# round-trip measurement (bench/convert.py, scripts/convert_full_size.py)


def reduced_bagel_7b(llm_layers: int, vit_layers: int = 26):
    """BAGEL-7B-MoT's widths with ``llm_layers`` decoder and ``vit_layers`` ViT layers."""
    from sgt_jax.models import config as config_lib

    cfg = config_lib.bagel_7b()
    cfg.llm.num_layers, cfg.vit.num_layers = int(llm_layers), int(vit_layers)
    return config_lib.validate(cfg)


def _du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def round_trip(cfg, workdir: str, *, dtype="bf16", src_shard_bytes: int | None = 5 * 10 ** 9,
               export_shard_size: str | None = "5GB", delete_source: bool = True, keep: bool = False,
               log=print) -> dict:
    """Write a random BAGEL-layout checkpoint for ``cfg``, import it and export it with the CLI
    (separate processes, so each phase's peak RSS is its own), and verify the export bit for bit
    against the generator. ``delete_source`` removes the source weights after the import (the
    check does not need them), so the disk peak is two copies instead of three."""
    import shutil
    import subprocess
    import sys
    import time

    src, mdir, out = (os.path.join(workdir, n) for n in ("src", "model_dir", "export"))
    for d in (src, mdir, out):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(workdir, exist_ok=True)
    res = {"llm_layers": cfg.llm.num_layers, "vit_layers": cfg.vit.num_layers, "dtype": str(dtype)}
    t = time.perf_counter()
    info = write_checkpoint(cfg, src, dtype=dtype, shard_bytes=src_shard_bytes)
    res["generate_seconds"] = time.perf_counter() - t
    res.update(checkpoint_bytes=info["bytes"], largest_tensor_bytes=info["largest_tensor_bytes"])
    log(f"source: {info['bytes'] / 1e9:.2f} GB written in {res['generate_seconds']:.0f} s -> {src}")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")

    def cli(*args):
        stats = os.path.join(workdir, f"{args[0]}_stats.json")
        cmd = [sys.executable, "-m", "sgt_jax.convert", *args, "--no-progress", "--stats", stats]
        log("$ " + " ".join(cmd[1:]))
        p = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stdout}\n{p.stderr}")
        with open(stats) as f:
            s = json.load(f)
        log(f"  {args[0]}: {s['gb_per_s']:.3f} GB/s, {s['seconds']:.1f} s ({s['cpu_seconds']:.0f} CPU-s), "
            f"peak RSS {s['peak_rss_gb']:.2f} GB")
        return s

    imp = cli("import", "--from", src, "--to", mdir)
    keys = ("bytes", "seconds", "gb_per_s", "peak_rss_gb", "cpu_seconds")
    res["import"] = {k: imp[k] for k in keys}
    res["model_dir_bytes"] = _du(mdir)
    if delete_source:
        for f in os.listdir(src):
            if f.endswith(".safetensors"):
                os.remove(os.path.join(src, f))
    args = ["export", "--from", mdir, "--to", out] + (["--shard-size", export_shard_size] if export_shard_size else [])
    exp = cli(*args)
    res["export"] = {k: exp[k] for k in keys}
    t = time.perf_counter()
    weights = ("model.safetensors.index.json" if export_shard_size else "ema.safetensors")
    diffs = verify_export(cfg, os.path.join(out, weights), dtype=dtype)
    res["verify_seconds"] = time.perf_counter() - t
    res["bit_exact"] = not diffs
    res["diffs"] = diffs[:20]
    res["rss_target_gb"] = 4.0 + info["largest_tensor_bytes"] / 1e9
    res["rss_within_target"] = max(res["import"]["peak_rss_gb"], res["export"]["peak_rss_gb"]) <= res["rss_target_gb"]
    log(f"bit-exact: {res['bit_exact']}; peak RSS import {res['import']['peak_rss_gb']:.2f} GB, export "
        f"{res['export']['peak_rss_gb']:.2f} GB (target <= {res['rss_target_gb']:.2f} GB)")
    if not keep:
        for d in (src, mdir, out):
            shutil.rmtree(d, ignore_errors=True)
    return res
