"""FLOPs and step time of one step from cost probes (see the package doc): the compiler's counts
of unrolled 1-2 layer probes extrapolated to the real depth, the model FLOPs the trainer counts,
and the step-time / MFU estimate."""
from __future__ import annotations


from sgt_jax.aot.compile import _cfg_copy, _compile, _costs, _setup, loop_free_seconds, vae_encode_phase
from sgt_jax.aot.topology import Topology, make_topology_mesh
from sgt_jax.parallel.tpu import CHIPS

def nominal_batch(cfg, doc_tokens: int = 3000, vit_image_patches: int = 256):
    """A fully packed numpy stand-in (kind, doc_ids, vit_image_ids) for ``step_flops``: every token
    real, documents of ``doc_tokens``, every ViT slot used by images of ``vit_image_patches``.
    The SGT stream's mean sample is ~3.0k tokens (bench/results/packing.json: seg 3.27k, VQA 2.51k
    at 2:1); a seg ViT image at 224 px is 16 x 16 = 256 patches."""
    import types

    import numpy as np

    from sgt_jax import batch as B

    d = cfg.data
    b, length, p = int(d.rows_per_batch), int(d.tokens_per_row), int(d.vit_patches_per_row)
    kind = np.full((b, length), B.TEXT, np.int32)
    docs = np.broadcast_to(np.arange(length) // max(1, doc_tokens), (b, length)).astype(np.int32)
    img = np.broadcast_to(np.arange(p) // max(1, vit_image_patches), (b, p)).astype(np.int32)
    return types.SimpleNamespace(kind=kind, doc_ids=docs, vit_image_ids=img)

def cost_probe(cfg, topo: Topology, devices, compiler_options=None, log=print) -> dict:
    """FLOPs / bytes / optimal_seconds per chip of one full step (see the module doc):

    * the model: unrolled probes of the real step at 1-2 decoder / ViT layers, one micro-batch,
      unchunked CE and 32 px VAE images (the LLM's cost does not depend on the latent grid; the
      VAE at full size is counted separately), extrapolated linearly to the real depth and
      multiplied by the micro-batches;
    * the VAE encode of one micro-batch at full size (``vae_encode_phase``), times the micro-batches."""
    llm_n, vit_n = int(cfg.model.llm.num_layers), int(cfg.model.vit.num_layers)
    accum = int(cfg.train.grad_accum)
    rows = int(cfg.data.rows_per_batch)
    probes = {}
    points = [(1, 1)]
    if llm_n > 1:
        points.append((2, 1))
    if vit_n > 1:
        points.append((1, 2))
    for nl, nv in points:
        c = _cfg_copy(cfg)
        c.model.llm.num_layers, c.model.vit.num_layers = nl, nv
        c.model.llm.scan_layers = c.model.vit.scan_layers = False
        c.model.llm.ce_chunk_size = 0
        c.train.grad_accum = 1
        c.data.rows_per_batch = rows // accum
        c.data.vae_image_size = 2 * int(c.data.vae_downsample)
        c.data.transforms.vae_max = c.data.transforms.vae_min = c.data.vae_image_size   # (never sampled)
        mesh = make_topology_mesh(c.mesh.to_dict(), topo, devices)
        setup = _setup(c, mesh)
        compiled, _, secs, _ = _compile(setup, c, compiler_options)
        probes[f"llm{nl}_vit{nv}"] = _costs(compiled) | {"compile_s": secs}
        if (nl, nv) == (1, 1):   # the probes' own (small) VAE encode, subtracted below
            small_vae = vae_encode_phase(setup, c, compiler_options, log=log).get("costs") or {}
        log(f"  cost probe llm_layers={nl} vit_layers={nv}: {probes[f'llm{nl}_vit{nv}']['flops']:.4g} FLOPs "
            f"({secs:.1f} s)")
    vae = vae_encode_phase(_setup(cfg, make_topology_mesh(cfg.mesh.to_dict(), topo, devices)), cfg,
                           compiler_options, log=log)
    out = combine_probes(probes, small_vae, vae.get("costs") or {}, llm_n, vit_n, accum, vae_per_micro_batch=True)
    out["method"] = (f"unrolled probes at (llm, vit) layers {points} with 32 px VAE images, linear in depth to "
                     f"({llm_n}, {vit_n}), x{accum} micro-batch(es)"
                     + (" (the optimizer update counted per micro-batch)" if accum > 1 else "")
                     + ", minus the probes' own VAE encode, + the full-size VAE encode of a micro-batch compiled alone"
                     + (f" x{accum}" if accum > 1 else ""))
    return out

def combine_probes(probes: dict, small_vae: dict, vae: dict, llm_n: int, vit_n: int, accum: int,
                   vae_per_micro_batch: bool = False) -> dict:
    """Per-chip totals of one step from the probe costs (see ``cost_probe``). ``vae``: the
    full-size encode of one micro-batch (``vae_per_micro_batch``, the step since the encode moved
    into the micro-batch loop) or of the whole batch (reports written before)."""
    keys = ("flops", "bytes_accessed", "transcendentals", "optimal_seconds")
    for p in probes.values():     # reports written before loop_free_seconds existed
        if "optimal_seconds_raw" in p or p.get("optimal_seconds") is not None:
            p["optimal_seconds"] = loop_free_seconds(p.get("optimal_seconds_raw", p.get("optimal_seconds")),
                                                     p.get("while_loops"))
    base = probes["llm1_vit1"]
    known = {k: all(p.get(k) is not None for p in probes.values()) for k in keys}
    per_llm = {k: (probes["llm2_vit1"][k] - base[k]) if llm_n > 1 and known[k] else 0.0 for k in keys}
    per_vit = {k: (probes["llm1_vit2"][k] - base[k]) if vit_n > 1 and known[k] else 0.0 for k in keys}
    total = {}
    for k in keys:
        if not known[k]:
            total[k] = None
            continue
        model = base[k] + (llm_n - 1) * per_llm[k] + (vit_n - 1) * per_vit[k] - (small_vae.get(k) or 0.0)
        total[k] = accum * model + (accum if vae_per_micro_batch else 1) * (vae.get(k) or 0.0)
    loops = [p.get("while_loops") for p in probes.values()]
    raw = [p.get("optimal_seconds_raw") for p in probes.values()]
    has_loops = any(n for n in loops if n) or any(r is not None and r < 0 for r in raw)
    return {"per_chip": total, "per_llm_layer": per_llm, "per_vit_layer": per_vit, "vae_encode": vae,
            "vae_encode_per_micro_batch": vae_per_micro_batch,
            "small_vae_encode": small_vae, "probes": probes,
            "probe_while_loops": loops,
            "note": ("the probes hold while loops (their count grows with the layers, so they sit inside the "
                     "layers and do not cancel in the per-layer differences): the cost analysis counts a while "
                     "body once (bench/cost_sentinel.py), so the work inside them is undercounted, while the flash "
                     "kernels are counted at their full grid (overcounted): FLOPs and time are not bounds either way"
                     if has_loops else "")}

# the packer's padding at the recipe's 16k row spec (bench/results/packing.json: sgt.results.ours.padding)
PADDING = 0.189


# the flash kernel's live (not skipped) fraction of the 512 x 512 blocks at the recipe's 16k rows
# (bench/results/attention_blocks.json: skip.lengths.16384.mean.512x512.skip = 0.744)
FLASH_LIVE_FRACTION = 1 - 0.744
# the model count's layers recomputed under remat: forward + re-forward + backward (2x) over
# forward + backward; 1 for "none". An upper bound for the policies that save some activations.
REMAT_FACTOR = 4 / 3


def flash_kernel_cost(report: dict) -> dict | None:
    """The Pallas flash kernels' ``pl.CostEstimate`` per chip and step as the TPU compiler counts
    it: every grid step of the longest bucket (the ``lax.switch`` over buckets counts its largest
    branch; bench/cost_sentinel.py), forward (twice when remat recomputes it: every policy that
    does not save "context"), dq and dk/dv (models/flash_attention.py ``_cost``: 2, 3 and 4
    matmul passes of 2 * heads * L_q * L_kv * head_dim). ``live`` scales it by the blocks that do
    work at the recipe's rows. None for a report without flash attention or without the head
    shape (``config.llm_num_heads`` / ``llm_head_dim``)."""
    c, t = report["config"], report["topology"]
    if not str(c.get("attention_impl", "")).startswith("flash") or "llm_num_heads" not in c:
        return None
    from sgt_jax.models.config import REMAT_SAVED_NAMES

    policy = c["llm_remat_policy"]
    refwd = policy != "none" and "context" not in REMAT_SAVED_NAMES.get(policy, ())
    passes = 2 * (2 if refwd else 1) + 3 + 4
    lp, b = c["tokens_per_row"], c["rows_per_chip_per_micro_batch"]
    per_layer = 2.0 * passes * b * c["llm_num_heads"] * lp * lp * c["llm_head_dim"]
    total = c["grad_accum"] * c["llm_layers"] * per_layer
    out = {"flops_per_chip": total, "per_layer_flops": per_layer, "passes": passes,
           "seconds_at_peak": total / (t["peak_tflops_per_chip"] * 1e12),
           "live_fraction": FLASH_LIVE_FRACTION, "flops_per_chip_live": total * FLASH_LIVE_FRACTION,
           "basis": "the kernels' pl.CostEstimate over every grid step of the longest bucket (what the "
                    "compiler adds to its counts); 'live' scales it by the blocks not skipped at 16k rows"}
    f = report.get("flops") or {}
    pll = ((report.get("costs") or {}).get("per_llm_layer") or {}).get("flops")
    if f.get("compiler_flops_per_chip"):
        out["share_of_compiler_flops"] = total / f["compiler_flops_per_chip"]
    if pll:
        out["share_of_compiler_per_llm_layer"] = per_layer / pll
    return out


def roofline(report: dict) -> dict:
    """An estimate independent of the compiler's time, per chip and phase: matmul FLOPs at the
    chip's peak, HBM bytes (the probes' bytes accessed) at its bandwidth, and the FSDP collectives
    (parameter all-gathers in forward, remat forward and backward, gradient reduce-scatter, per
    micro-batch; fp32 parameters as stored) at the chip's ICI bandwidth. Compute is bracketed by
    two FLOP counts: the compiler's (``compute_s``; loop bodies once, the flash kernels at their
    full grid) and the model count with the remat recompute (``compute_model_s``; the trainer's
    count x ``REMAT_FACTOR``). ``low`` = the slowest phase at the smaller compute (perfect
    overlap), ``high`` = the sum at the larger (no overlap). Phases unknown are None; None for a
    report without the chip family, mesh or state sizes."""
    t, f, c = report["topology"], report["flops"], report["config"]
    if "family" not in t or "mesh" not in c or "state_per_chip_gib" not in report:
        return None
    spec = CHIPS[t["family"]]
    peak = t["peak_tflops_per_chip"] * 1e12
    pc = (report.get("costs") or {}).get("per_chip") or {}
    compute = f["compiler_flops_per_chip"] / peak if f.get("compiler_flops_per_chip") else None
    remat = 1.0 if c["llm_remat_policy"] == "none" else REMAT_FACTOR
    compute_model = f["model_flops_per_chip"] * remat / peak
    hbm = pc["bytes_accessed"] / (spec["hbm_gbps"] * 1e9) if pc.get("bytes_accessed") else None
    n = c["mesh"]["fsdp"]
    params = report["state_per_chip_gib"]["params"] * (1 << 30) * n      # bytes of the sharded parameters
    gathers = 3 if c["llm_remat_policy"] != "none" else 2
    ici_bytes = c["grad_accum"] * (gathers + 1) * params * (n - 1) / n
    ici = ici_bytes / (spec["ici_gbps"] * 1e9) if spec["ici_gbps"] and n > 1 else None
    computes = [x for x in (compute, compute_model) if x is not None]
    rest = [x for x in (hbm, ici) if x is not None]
    return {"compute_s": compute, "compute_model_s": compute_model, "hbm_s": hbm, "ici_s": ici,
            "low_s": max([min(computes)] + rest), "high_s": max(computes) + sum(rest),
            "flops_basis": "compiler and model x remat" if compute is not None else "model x remat",
            "remat_factor": remat, "ici_bytes_per_chip": ici_bytes}


def estimate(report: dict) -> dict | None:
    """The step-time estimate and MFU of a report from its combined probe costs."""
    c = report.get("costs") or {}
    pc = c.get("per_chip") or {}
    est = pc.get("optimal_seconds")
    if not est or est <= 0:
        return None
    t, f = report["topology"], report["flops"]
    chips, peak = t["chips"], t["peak_tflops_per_chip"] * 1e12
    raw = [p.get("optimal_seconds_raw") for p in (c.get("probes") or {}).values()]
    verified = bool(raw) and all(r is not None and r >= 0 for r in raw)
    return {"step_time_s": est, "source": "compiler cost analysis optimal_seconds of unrolled probes, "
                                          "extrapolated over layers" + ("; " + c["note"] if c.get("note") else "")
                                          + ("" if verified else "; unverified: the probes' raw values are "
                                             "negative (decoded by aot.compile.loop_free_seconds) or were not "
                                             "recorded"),
            "verified": verified,
            "mfu": f["model_flops_per_step"] / (est * chips * peak),
            "mfu_real_tokens": (1 - f.get("padding", PADDING)) * f["model_flops_per_step"] / (est * chips * peak),
            "model_tflops_per_chip": f["model_flops_per_chip"] / est / 1e12,
            "tokens_per_s_per_chip": f["tokens_per_step"] / est / chips,
            "hardware_flops_utilisation": (pc["flops"] / (est * peak)) if pc.get("flops") else None}

def reestimate(report: dict) -> dict:
    """Recompute ``costs`` totals, ``flops.compiler_*`` and ``estimate`` of a saved report."""
    c = report.get("costs")
    if c and "probes" in c:
        cfg = report["config"]
        new = combine_probes(c["probes"], c.get("small_vae_encode") or {}, c.get("vae_encode") or {},
                             cfg["llm_layers"], cfg["vit_layers"], cfg["grad_accum"],
                             vae_per_micro_batch=bool(c.get("vae_encode_per_micro_batch")))
        c.update({k: v for k, v in new.items() if k != "small_vae_encode" or v})
        f = report["flops"]
        f["compiler_flops_per_chip"] = c["per_chip"]["flops"]
        f["compiler_over_model"] = c["per_chip"]["flops"] / f["model_flops_per_chip"]
    report["estimate"] = estimate(report)
    report["roofline"] = roofline(report)
    report["flash_kernel"] = flash_kernel_cost(report)
    return report
