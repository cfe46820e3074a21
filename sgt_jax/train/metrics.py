"""Metrics of a run: FLOPs and MFU, a JSONL log, TensorBoard event files, a console progress bar
and a loss-curve PNG at the end.

A ``gs://`` (any URL) workdir: object stores cannot append, so the files are written to a local
staging dir and uploaded whole (``sync``) every ``sync_every_s`` seconds and at the end; a
resumed run first downloads the run's ``metrics.jsonl`` and keeps appending to it.

Resuming, ``metrics.jsonl`` is first cut back to the restored step (the rows logged after the
last checkpoint are logged again), so every step appears once and the loss curve never jumps back.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time

import numpy as np

from sgt_jax import batch as B
from sgt_jax import fileio
from sgt_jax.parallel.tpu import peak_tflops


def device_peak_tflops(device=None) -> float | None:
    """Peak bf16 TFLOP/s of one device (``parallel.tpu``), or None where unknown (CPU: MFU is not
    meaningful)."""
    import jax

    d = device or jax.devices()[0]
    if d.platform == "cpu":
        return None
    return peak_tflops(d.device_kind)


def llm_dense_params(cfg) -> int:
    """BAGEL's N_dense: per-layer q/k/v/o + MLP over L layers, plus embed and lm_head. One expert
    per token, so a MoT layer counts as one dense layer."""
    c = cfg.llm
    hd = c.hidden_size // c.num_heads
    q, kv = c.num_heads * hd, c.num_kv_heads * hd
    per_layer = 3 * c.hidden_size * c.intermediate_size + c.hidden_size * (q + 2 * kv + q)
    return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size


def vit_dense_params(cfg) -> int:
    v, h = cfg.vit, cfg.llm.hidden_size
    per_layer = 4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size
    return (v.num_layers * per_layer + 3 * v.patch_size ** 2 * v.hidden_size
            + v.hidden_size * h + h * h)


def _segment_sq_sum(ids: np.ndarray, valid: np.ndarray) -> float:
    total = 0.0
    for r in range(ids.shape[0]):
        _, counts = np.unique(ids[r][valid[r]], return_counts=True)
        total += float(np.sum(counts.astype(np.float64) ** 2))
    return total


def step_flops(cfg_model, batch) -> float:
    """Model FLOPs of one training step (fwd + bwd = 6 N per token + attention), BAGEL's
    formula extended to the ViT: LLM over non-pad tokens with 12*hd*nh*layers*sum(doc_len^2),
    ViT over real patches with its own attention term. VAE encode and remat are not counted."""
    kind = np.asarray(batch.kind)
    real = kind != B.PAD
    c, v = cfg_model.llm, cfg_model.vit
    hd = c.hidden_size // c.num_heads
    flops = 6.0 * llm_dense_params(cfg_model) * real.sum()
    flops += 12.0 * hd * c.num_heads * c.num_layers * _segment_sq_sum(np.asarray(batch.doc_ids), real)
    img = np.asarray(batch.vit_image_ids)
    n_patch = (img >= 0).sum()
    if n_patch:
        flops += 6.0 * vit_dense_params(cfg_model) * n_patch
        flops += 12.0 * (v.hidden_size // v.num_heads) * v.num_heads * v.num_layers * _segment_sq_sum(img, img >= 0)
    return float(flops)


def staging_dir(workdir: str) -> str:
    """The local directory metrics are written to: the workdir itself, or for a URL a directory
    under $TMPDIR named after it."""
    if not fileio.is_remote(workdir):
        return workdir
    tag = hashlib.sha1(workdir.rstrip("/").encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), "sgt_jax_runs", tag)


class MetricsWriter:
    """JSONL + TensorBoard + a tqdm bar; ``close`` writes the loss-curve PNG. ``jsonl_path``,
    ``png_path`` and ``tb_dir`` name the run's files (URLs for a URL workdir)."""

    FILES = ("metrics.jsonl", "loss_curve.png", "tensorboard")

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True,
                 sync_every_s: float = 60.0):
        self.workdir = workdir
        self.enabled = enabled
        self.remote = fileio.is_remote(workdir)
        self.local = staging_dir(workdir)
        self.jsonl_path, self.png_path, self.tb_dir = (fileio.join(workdir, f) for f in self.FILES)
        self._jsonl, self._png, self._tbl = (os.path.join(self.local, f) for f in self.FILES)
        self.sync_every_s = sync_every_s
        self._tb = None
        self._bar = None
        if enabled:
            os.makedirs(self.local, exist_ok=True)
            if self.remote:
                self._fetch()
            truncate_rows(self._jsonl, start_step)
            from tensorboardX import SummaryWriter
            from tqdm import tqdm

            # purge_step: TensorBoard hides the old event files' points past the resumed step
            self._tb = SummaryWriter(self._tbl, purge_step=start_step + 1 if start_step else None)
            self._bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
        self.t0 = self._synced = time.perf_counter()

    def _fetch(self):
        """Resume: the run's metrics.jsonl replaces any stale staging copy (TensorBoard starts a
        new event file per writer, so the old ones stay where they are)."""
        if fileio.exists(self.jsonl_path):
            fileio.copy(self.jsonl_path, self._jsonl)
        elif os.path.exists(self._jsonl):
            os.remove(self._jsonl)

    def sync(self):
        """Upload the staged files (no-op for a local workdir)."""
        if not (self.enabled and self.remote):
            return
        if self._tb is not None:
            self._tb.flush()
        for name in os.listdir(self._tbl) if os.path.isdir(self._tbl) else ():
            fileio.copy(os.path.join(self._tbl, name), fileio.join(self.tb_dir, name))
        for src, dst in ((self._jsonl, self.jsonl_path), (self._png, self.png_path)):
            if os.path.exists(src):
                fileio.copy(src, dst)
        self._synced = time.perf_counter()

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if np.ndim(v) == 0 else v) for k, v in scalars.items()}}
        with open(self._jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and np.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}", ce=f"{row.get('ce', float('nan')):.3f}",
                              mse=f"{row.get('mse', float('nan')):.4f}", refresh=False)
        if self.remote and time.perf_counter() - self._synced >= self.sync_every_s:
            self.sync()

    def write_eval(self, step: int, scalars: dict, images: dict | None = None):
        """An evaluation row: ``eval/<name>`` scalars as a row of their own in metrics.jsonl
        (same ``step`` as a training row, merged with it on resume) and in TensorBoard; ``images``
        (name -> uint8 HWC) as TensorBoard images ``eval/<name>``."""
        if not self.enabled:
            return
        row = {f"eval/{k}": float(v) for k, v in scalars.items()}
        with open(self._jsonl, "a") as f:
            f.write(json.dumps({"step": step, **row}) + "\n")
        for k, v in row.items():
            if np.isfinite(v):
                self._tb.add_scalar(k, v, step)
        for k, im in (images or {}).items():
            self._tb.add_image(f"eval/{k}", np.asarray(im), step, dataformats="HWC")
        self._tb.flush()

    def advance(self, n: int = 1):
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> str | None:
        if not self.enabled:
            return None
        self._bar.close()
        self._tb.close()
        png = plot_loss_curve(self._jsonl, self._png)
        self.sync()
        return png and self.png_path


def read_rows(jsonl_path: str) -> list[dict]:
    """The rows of a metrics.jsonl (a last line cut by a kill is left out)."""
    rows = []
    for line in open(jsonl_path):
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def truncate_rows(jsonl_path: str, step: int) -> None:
    """Keep the rows of steps <= ``step``, one per step (a resumed run logs the later ones
    again; the training and evaluation rows of one step merged), replacing the file atomically."""
    if not os.path.exists(jsonl_path):
        return
    by_step: dict = {}
    for r in read_rows(jsonl_path):
        if isinstance(r, dict) and r.get("step", 0) <= step:
            by_step.setdefault(r["step"], {}).update(r)
    rows = [by_step[k] for k in sorted(by_step)]
    tmp = jsonl_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, jsonl_path)


def plot_loss_curve(jsonl_path: str, png_path: str) -> str | None:
    if not os.path.exists(jsonl_path):
        return None
    rows = [r for r in read_rows(jsonl_path) if "loss" in r]      # training rows
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    steps = [r["step"] for r in rows]
    for ax, key in zip(axes, ("loss", "mse", "ce")):
        ax.plot(steps, [r.get(key, np.nan) for r in rows], lw=1)
        ax.set_title({"loss": "total loss", "mse": "segmentation MSE (flow)", "ce": "VQA CE"}[key])
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
