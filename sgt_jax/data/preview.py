"""Preview the data pipeline before paying for a TPU: no model, no JAX compile.

    python -m sgt_jax.data.preview --config configs/<preset>.py [--config.<key>=<value> ...] \
        --batches N --out DIR [--workdir DIR] [--samples K]

Runs ``pipeline.make_train_iterator`` on the run config's ``data`` section (a data-only config
file works too) as process 0 of ``--process_count`` (default 1: the whole global batch; N: one
host's slice of a pod of N hosts, e.g. 16 for v6e-64), and

* prints one line per batch: fill (und / gen budgets separately), tokens by kind (text, ViT,
  latent, pad), CE / MSE tokens, ViT patch and VAE image slots used, samples by stream, the
  skipped / dropped records of that batch with their reasons, and the time it took;
* prints the cumulative counters at the end: ``skipped/<reason>`` (bad records),
  ``dropped/<reason>`` (samples that never fit a row), ``index/<reason>`` (records the sources
  dropped while indexing: keys without their image, damaged tar headers), ``deferred`` (carried
  to a later batch), and a WARNING when records were skipped by an unexpected exception;
* writes ``DIR/contact_sheet.png``: K documents reconstructed **from the PackedBatch rows** (what
  the train step will see, not the records): the ViT input un-patchified from ``vit_patches``
  (``vit_image_ids`` / ``vit_position_ids`` give each image's grid), the generation target cropped
  from ``vae_images`` (its latent grid from ``vae_token_index``), and the document's text decoded
  with the tokenizer (prompt / instruction / human turns vs CE-supervised answers);
* writes ``DIR/samples/*.png`` (each reconstructed image, lossless) and ``DIR/preview.json``:
  static shapes, per-batch statistics, totals, counters, the reconstructed documents.

Any proxy task of the SGT study previews the same way (``--config.data.proxy=<task>``, see
docs/proxy_tasks.md); the contact sheet's title names it.

The workdir (default ``DIR/work``) is where the default config generates its synthetic scenes and
tiny tokenizer; point ``--workdir`` at a run's workdir to preview exactly its data.
"""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import numpy as np

from sgt_jax import fileio
from sgt_jax.batch import PAD, TEXT, VAE_CLEAN, VAE_NOISED, VIT

GEN, UND = "generation", "understanding"


# ------------------------------------------------------------------------------------------------
# reconstruction from a PackedBatch row

def unpatchify(patches: np.ndarray, h_patches: int, w_patches: int, patch: int) -> np.ndarray:
    """(h*w, p*p*3) patches, row-major, each flattened (py, px, c) -> (h*p, w*p, 3): the inverse of
    ``models.siglip.patchify``."""
    x = np.asarray(patches).reshape(h_patches, w_patches, patch, patch, 3)
    return x.transpose(0, 2, 1, 3, 4).reshape(h_patches * patch, w_patches * patch, 3)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[-1, 1] float (the packer's Normalize(0.5, 0.5)) -> uint8; exact for uint8-born pixels."""
    x = np.asarray(x, np.float32)
    return np.clip(np.rint((x * 0.5 + 0.5) * 255.0), 0, 255).astype(np.uint8)


def row_documents(batch, r: int) -> list[int]:
    """Document ids of row ``r`` in packing order, without the padding document."""
    kind, doc = np.asarray(batch.kind[r]), np.asarray(batch.doc_ids[r])
    ids = doc[kind != PAD]
    return list(dict.fromkeys(int(d) for d in ids))


def doc_category(batch, r: int, d: int) -> str:
    kind = np.asarray(batch.kind[r])[np.asarray(batch.doc_ids[r]) == d]
    return GEN if (kind == VAE_NOISED).any() else UND


def reconstruct(batch, r: int, d: int, *, vit_patch_size: int, vit_max_patches_per_side: int,
                vae_downsample: int, tokenizer=None, special_ids=()) -> dict:
    """Document ``d`` of row ``r`` as the train step sees it.

    Returns ``{"category", "tokens", "vit": [{"image_id", "grid", "image" uint8}],
    "vae": [{"slot", "grid", "noised", "timestep", "image" uint8}], "text": [{"text", "loss",
    "ids"}]}``. ViT images come only from ``vit_patches`` (rows selected by ``vit_image_ids``, grid
    from ``vit_position_ids``), VAE images only from ``vae_images`` (slot and grid from
    ``vae_token_index``)."""
    kind = np.asarray(batch.kind[r])
    sel = np.asarray(batch.doc_ids[r]) == d
    out: dict = {"category": GEN if (kind[sel] == VAE_NOISED).any() else UND, "tokens": int(sel.sum()),
                 "vit": [], "vae": [], "text": []}
    # ViT images: the patch slots this document's VIT tokens point at, grouped by image id
    vit_ids = np.asarray(batch.vit_image_ids[r])
    slots = np.asarray(batch.vit_index[r])[sel & (kind == VIT)]
    S = vit_max_patches_per_side
    for iid in dict.fromkeys(int(i) for i in vit_ids[slots]):
        idx = np.nonzero(vit_ids == iid)[0]
        pos = np.asarray(batch.vit_position_ids[r])[idx]
        rr, cc = pos // S, pos % S
        hp, wp = int(rr.max()) + 1, int(cc.max()) + 1
        order = np.lexsort((cc, rr))
        if len(idx) != hp * wp or not np.array_equal(rr[order] * wp + cc[order], np.arange(hp * wp)):
            raise ValueError(f"row {r} ViT image {iid}: {len(idx)} patches do not form a {hp}x{wp} grid")
        img = unpatchify(np.asarray(batch.vit_patches[r])[idx[order]], hp, wp, vit_patch_size)
        out["vit"].append({"image_id": iid, "grid": [hp, wp], "image": to_uint8(img)})
    # VAE images: slot and latent grid from vae_token_index
    if batch.vae_images is not None:
        vae = np.asarray(batch.vae_images[r])
        H, W = vae.shape[1:3]
        gw = W // vae_downsample
        cells = (H // vae_downsample) * gw
        lat = sel & ((kind == VAE_CLEAN) | (kind == VAE_NOISED))
        vti = np.asarray(batch.vae_token_index[r])[lat]
        lat_kind = kind[lat]
        ts = np.asarray(batch.timesteps[r])[lat]
        for slot in dict.fromkeys(int(s) for s in vti // cells):
            m = vti // cells == slot
            cell = vti[m] % cells
            h, w = int((cell // gw).max()) + 1, int((cell % gw).max()) + 1
            noised = bool((lat_kind[m] == VAE_NOISED).any())
            img = vae[slot, :h * vae_downsample, :w * vae_downsample].astype(np.float32)
            out["vae"].append({"slot": slot, "grid": [h, w], "noised": noised,
                               "timestep": float(ts[m][0]) if noised else None, "image": to_uint8(img)})
    # text: one entry per causal split holding TEXT tokens only (image blocks carry their own
    # <|vision_start|>/<|vision_end|> in full / noise splits)
    split, mode = np.asarray(batch.split_ids[r]), np.asarray(batch.split_mode[r])
    ids_all, ce = np.asarray(batch.text_ids[r]), np.asarray(batch.ce_mask[r])
    special = {int(i) for i in special_ids}
    for s in dict.fromkeys(int(x) for x in split[sel]):
        m = sel & (split == s)
        if (kind[m] != TEXT).any() or (mode[m] != 0).any():
            continue
        ids = [int(i) for i in ids_all[m] if int(i) not in special]
        text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        out["text"].append({"text": text, "loss": bool(ce[m].any()), "ids": ids})
    return out


# ------------------------------------------------------------------------------------------------
# statistics

def batch_line(i: int, st: dict, extra: dict, secs: float) -> str:
    t = lambda k: int(st.get(f"batch/tokens/{k}", 0))   # noqa: E731
    streams = " ".join(f"{k.split('/')[-1]} {int(v)}" for k, v in st.items()
                       if k.startswith("batch/samples/"))
    latent = t("vae_clean") + t("vae_noised")
    line = (f"batch {i}: fill {st['batch/fill']:.3f} (und {extra['und_fill']:.3f}, gen {extra['gen_fill']:.3f})"
            f" | tokens text {t('text')} vit {t('vit')} latent {latent} (noised {t('vae_noised')}) pad {t('pad')}"
            f" | CE {t('ce')} MSE {t('mse')} | ViT patches {st['batch/vit_patches']}/{extra['vit_slots']}"
            f" VAE images {st['batch/vae_images']}/{extra['vae_slots']} | samples {st['batch/samples']}"
            f" ({streams}) | {secs:.2f} s")
    ev = extra.get("events") or {}
    if ev:
        line += " | " + ", ".join(f"{k} +{v}" for k, v in sorted(ev.items()))
    return line


def budget_fill(batch, gen_tokens_per_row: int) -> dict:
    """Fill of the und budget (L - num_gen) and the gen budget (num_gen) separately."""
    kind = np.asarray(batch.kind)
    B, L = kind.shape
    lat = ((kind == VAE_CLEAN) | (kind == VAE_NOISED)).sum()
    und = ((kind != PAD) & (kind != VAE_CLEAN) & (kind != VAE_NOISED)).sum()
    G = gen_tokens_per_row
    return {"und_fill": float(und / (B * (L - G))) if L > G else 0.0,
            "gen_fill": float(lat / (B * G)) if G else 0.0,
            "row_fill": [float(x) for x in (kind != PAD).mean(axis=1)]}


def counters(totals: dict) -> dict:
    """{"skipped": {reason: n}, "dropped": {reason: n}, "index": {reason: n}, "deferred": n} from
    ``total/*`` stats (``index``: records the sources dropped while indexing, once per run)."""
    out = {"skipped": {}, "dropped": {}, "index": {}, "deferred": int(totals.get("total/deferred", 0))}
    for k, v in totals.items():
        for kind in ("skipped", "dropped", "index"):
            p = f"total/{kind}/"
            if k.startswith(p):
                out[kind][k[len(p):]] = int(v)
    return out


def _events(prev: dict, cur: dict) -> dict:
    ev = {}
    for k, v in cur.items():
        if k.startswith(("total/skipped/", "total/dropped/")):
            dv = int(v) - int(prev.get(k, 0))
            if dv:
                ev[k[len("total/"):]] = dv
    return ev


# ------------------------------------------------------------------------------------------------
# contact sheet

def select(docs: list[dict], k: int) -> list[dict]:
    """Up to ``k`` documents, alternating categories (generation, understanding) in batch order."""
    by = {GEN: [d for d in docs if d["category"] == GEN], UND: [d for d in docs if d["category"] == UND]}
    out, i = [], 0
    while len(out) < k and (by[GEN] or by[UND]):
        c = (GEN, UND)[i % 2]
        if by[c]:
            out.append(by[c].pop(0))
        i += 1
    return sorted(out, key=lambda d: (d["batch"], d["row"], d["doc"]))


def contact_sheet(docs: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(docs), 1)
    fig, axes = plt.subplots(n, 3, figsize=(13, 3.2 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.6]})
    for ax in axes.ravel():
        ax.axis("off")
    for i, d in enumerate(docs):
        a_vit, a_vae, a_txt = axes[i]
        head = f"batch {d['batch']} row {d['row']} doc {d['doc']}"
        if d["vit"]:
            v = d["vit"][0]
            a_vit.imshow(v["image"], interpolation="nearest")
            more = f" (+{len(d['vit']) - 1} more)" if len(d["vit"]) > 1 else ""
            a_vit.set_title(f"{head}\nViT input {v['image'].shape[1]}x{v['image'].shape[0]}{more}", fontsize=8)
        else:
            a_vit.set_title(f"{head}\nno ViT image (CFG-dropped or text-only)", fontsize=8)
        if d["vae"]:
            v = d["vae"][0]
            a_vae.imshow(v["image"], interpolation="nearest")
            what = f"noised target, t={v['timestep']:.2f}" if v["noised"] else "clean VAE image"
            a_vae.set_title(f"{what}\n{v['image'].shape[1]}x{v['image'].shape[0]}", fontsize=8)
        else:
            a_vae.set_title("no generation target", fontsize=8)
        lines = [f"[{d['category']}, {d['tokens']} tokens]"]
        for t in d["text"]:
            tag = "A (CE):" if t["loss"] else ("instruction:" if d["category"] == GEN else "Q:")
            lines += textwrap.wrap(f"{tag} {t['text']}", 70) or [tag]
        if len(lines) > 14:
            lines = lines[:13] + ["..."]
        a_txt.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8,
                   transform=a_txt.transAxes)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10)
        top = 1.0 - 0.45 / (3.2 * n)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# the run

def check_model(run_cfg, tok) -> list[str]:
    """Data/model mismatches the trainer would refuse (config tables, vocabulary)."""
    from sgt_jax.data import config as config_lib

    if "model" not in run_cfg:
        return []
    problems = []
    try:
        config_lib.check_consistency(run_cfg)
    except ValueError as e:
        problems.append(str(e))
    vs = run_cfg.model.llm.vocab_size
    if tok.vocab_size > vs:
        problems.append(f"the tokenizer has {tok.vocab_size} ids but model.llm.vocab_size={vs}")
    return problems


def run(run_cfg, *, batches: int, out: str, workdir: str | None = None, samples: int = 6,
        config_path: str = "", process_count: int = 1, log=print) -> dict:
    """The preview (see the module doc); returns the summary written to ``out/preview.json``."""
    from sgt_jax.data import config as config_lib
    from sgt_jax.data import pipeline

    cfg = run_cfg.data if "data" in run_cfg else run_cfg
    workdir = workdir or os.path.join(out, "work")
    os.makedirs(os.path.join(out, "samples"), exist_ok=True)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    config_lib.validate(cfg, process_count)
    tok = pipeline.ensure_tokenizer(cfg, workdir)
    problems = check_model(run_cfg, tok) if cfg is not run_cfg else []
    H, W = config_lib.vae_hw(cfg)
    L, G = cfg.tokens_per_row, cfg.gen_tokens_per_row
    shapes = {"rows_per_batch": cfg.rows_per_batch, "process_count": process_count,
              "rows_previewed": cfg.rows_per_batch // process_count, "tokens_per_row": L, "gen_tokens_per_row": G,
              "und_tokens_per_row": L - G, "vit_patches_per_row": cfg.vit_patches_per_row,
              "vae_images_per_row": cfg.vae_images_per_row, "vae_image_size": [H, W],
              "grain_num_workers": cfg.grain.num_workers}
    log(f"sgt-jax data preview: {config_path or 'config'} -> {out} (workdir {workdir})")
    log("static shapes: " + ", ".join(f"{k}={v}" for k, v in shapes.items()))
    log("streams: " + ", ".join(f"{k} <- {v}" for k, v in cfg.sources.items())
        + f" | mix {cfg.mix.mode} " + ", ".join(f"{k}:{v}" for k, v in
                                                 (cfg.mix.weights if cfg.mix.mode == "weights" else cfg.mix.ratios).items()))
    for p in problems:
        log(f"WARNING: {p} (the trainer will refuse this config)")
    it = pipeline.make_train_iterator(cfg, workdir=workdir, tokenizer=tok, process_index=0,
                                      process_count=process_count)
    special = tuple(tok.special.as_dict().values())
    geom = dict(vit_patch_size=cfg.vit_patch_size, vit_max_patches_per_side=cfg.vit_max_patches_per_side,
                vae_downsample=cfg.vae_downsample)
    per_batch, picked, prev = [], [], {}
    t_first = time.perf_counter()
    st = {}
    try:
        for b in range(batches):
            tb = time.perf_counter()
            batch, st = next(it)
            secs = time.perf_counter() - tb
            extra = budget_fill(batch, G)
            rows = batch.kind.shape[0]
            extra.update(vit_slots=rows * cfg.vit_patches_per_row, vae_slots=rows * cfg.vae_images_per_row,
                         events=_events(prev, st))
            prev = st
            log(batch_line(b, st, extra, secs))
            per_batch.append({"batch": b, "seconds": secs, **{k[len("batch/"):]: v for k, v in st.items()
                                                              if k.startswith("batch/")}, **extra})
            # keep up to `samples` documents of each category (reconstructed now: batches are big)
            need = {GEN: samples - sum(d["category"] == GEN for d in picked),
                    UND: samples - sum(d["category"] == UND for d in picked)}
            for r in range(batch.kind.shape[0]):
                for d in row_documents(batch, r):
                    c = doc_category(batch, r, d)
                    if need[c] > 0:
                        need[c] -= 1
                        rec = reconstruct(batch, r, d, tokenizer=tok, special_ids=special, **geom)
                        picked.append({"batch": b, "row": r, "doc": d, **rec})
    finally:
        it.close()
    elapsed = time.perf_counter() - t_first
    totals = {k: v for k, v in st.items() if k.startswith("total/")}
    cnt = counters(totals)
    log(f"counters after {batches} batches ({int(totals.get('total/samples', 0))} samples, "
        f"{int(totals.get('total/rows', 0))} rows):")
    log("  skipped (bad records):        " + (", ".join(f"{k} {v}" for k, v in sorted(cnt["skipped"].items())) or "none"))
    log("  dropped (never fit a row):    " + (", ".join(f"{k} {v}" for k, v in sorted(cnt["dropped"].items())) or "none"))
    log("  dropped while indexing:       " + (", ".join(f"{k} {v}" for k, v in sorted(cnt["index"].items())) or "none"))
    unnamed = {k: v for k, v in cnt["skipped"].items() if k.startswith("error_")}
    if unnamed:
        log(f"WARNING: {sum(unnamed.values())} record(s) skipped by an unexpected exception ({unnamed}): "
            "a reader bug, please report it with the record")
    log(f"  deferred (to a later batch):  {cnt['deferred']}")
    fills = [p["fill"] for p in per_batch]
    if fills:
        log(f"fill: mean {np.mean(fills):.3f}, min {np.min(fills):.3f}; padding fraction {1 - np.mean(fills):.3f}")
    rows = int(totals.get("total/rows", 0))
    log(f"time: {elapsed:.2f} s for {batches} batches ({rows / max(elapsed, 1e-9):.2f} rows/s in this process "
        f"incl. start-up, grain.num_workers={cfg.grain.num_workers})")

    sheet_docs = select(picked, samples)
    for d in picked:
        stem = f"b{d['batch']}_r{d['row']}_d{d['doc']}"
        for v in d["vit"]:
            v["file"] = os.path.join("samples", f"{stem}_vit{v['image_id']}.png")
        for v in d["vae"]:
            v["file"] = os.path.join("samples", f"{stem}_vae{v['slot']}.png")
    from PIL import Image

    for d in sheet_docs:
        for v in d["vit"] + d["vae"]:
            Image.fromarray(v["image"]).save(os.path.join(out, v["file"]))
    sheet = os.path.join(out, "contact_sheet.png")
    proxy = cfg.get("proxy") or ""
    contact_sheet(sheet_docs, sheet, title=f"{os.path.basename(config_path) or 'data preview'}"
                  f"{f' (proxy task {proxy} on stream {cfg.proxy_stream})' if proxy else ''}: "
                  f"{len(sheet_docs)} documents reconstructed from PackedBatch rows")
    log(f"contact sheet: {sheet} ({len(sheet_docs)} documents)")

    def doc_json(d):
        strip = lambda v: {k: x for k, x in v.items() if k != "image"} | {"shape": list(v["image"].shape)}  # noqa: E731
        return {"batch": d["batch"], "row": d["row"], "doc": d["doc"], "category": d["category"],
                "tokens": d["tokens"], "vit": [strip(v) for v in d["vit"]], "vae": [strip(v) for v in d["vae"]],
                "text": [{"text": t["text"], "loss": t["loss"]} for t in d["text"]]}

    summary = {"config": config_path, "workdir": workdir, "batches": batches, "seconds": elapsed,
               "setup_seconds": t_first - t0, "static_shapes": shapes, "problems": problems,
               "per_batch": per_batch, "totals": totals, "counters": cnt,
               "mean_fill": float(np.mean(fills)) if fills else None,
               "contact_sheet": os.path.basename(sheet), "samples": [doc_json(d) for d in sheet_docs],
               "data_config": cfg.to_dict()}
    path = os.path.join(out, "preview.json")
    with open(path, "w") as f:
        json.dump(fileio.jsonable(summary), f, indent=1)
    log(f"summary: {path}")
    return summary


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    here = os.path.dirname(os.path.abspath(__file__))
    config_flags.DEFINE_config_file("config", os.path.join(here, "..", "..", "configs", "tiny.py"),
                                    "a configs/<preset>.py file (its `data` section is previewed)",
                                    lock_config=True)
    flags.DEFINE_integer("batches", 4, "batches to pull from the pipeline")
    flags.DEFINE_string("out", None, "output directory: contact_sheet.png, preview.json, samples/")
    flags.DEFINE_string("workdir", None, "where synthetic data / the tiny tokenizer live (default OUT/work)")
    flags.DEFINE_integer("samples", 6, "documents on the contact sheet")
    flags.DEFINE_integer("process_count", 1, "preview one host's slice (rows_per_batch / process_count rows, "
                         "process 0's shard) as on a pod of this many hosts")
    flags.mark_flags_as_required(["out"])

    def _main(args):
        del args
        F = flags.FLAGS
        from sgt_jax.data.sources.base import SpecError

        try:
            run(F.config, batches=F.batches, out=F.out, workdir=F.workdir, samples=F.samples,
                process_count=F.process_count,
                config_path=config_flags.get_config_filename(F["config"]))
        except SpecError as e:
            print(e.one_line(), file=sys.stderr, flush=True)
            return 2
        return 0

    app.run(_main, argv=argv)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
