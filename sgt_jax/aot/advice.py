"""Which knob to turn when the step does not fit in HBM (or barely does)."""
from __future__ import annotations

from sgt_jax.aot.compile import GiB

def attention_scores_gib(cfg, mesh_sizes: dict) -> float:
    """fp32 score bytes one dense-attention layer materialises per chip (B_local x heads x L x L)."""
    c = cfg.model.llm
    rows = cfg.data.rows_per_batch / cfg.train.grad_accum / (mesh_sizes["data"] * mesh_sizes["fsdp"])
    heads = c.num_heads / (mesh_sizes["tensor"] if c.num_kv_heads % mesh_sizes["tensor"] == 0 else 1)
    return rows * heads * float(cfg.data.tokens_per_row) ** 2 * 4 / GiB

def vae_attention_gib(cfg, mesh_sizes: dict) -> float:
    """fp32 scores of the VAE encoder's mid attention per chip (one head over (H/f)(W/f) pixels)."""
    from sgt_jax.data.config import vae_hw
    from sgt_jax.models.config import vae_downsample

    h, w = vae_hw(cfg.data)
    f = vae_downsample(cfg.model)
    rows = cfg.data.rows_per_batch / (mesh_sizes["data"] * mesh_sizes["fsdp"])
    return rows * cfg.data.vae_images_per_row * float(h // f * (w // f)) ** 2 * 4 / GiB

def advise(cfg, report: dict) -> list[dict]:
    """Which knob to turn when the step does not fit (or barely does): ordered, most effective first."""
    mem, hbm = report["memory_per_chip"], report["topology"]["hbm_per_chip_gib"]
    over = report["oom"] is not None or (mem is not None and mem["total_gib"] > 0.92 * hbm)
    if not over:
        return []
    sizes = report["config"]["mesh"]
    st = report["state_per_chip_gib"]
    state = st["params"] + st["opt_state"] + st["ema"] + st["frozen"] + st["vae"]
    out = []
    llm, vit = cfg.model.llm, cfg.model.vit
    if state > 0.6 * hbm:
        out.append({"knob": "mesh.fsdp / a larger slice",
                    "why": f"parameters + optimizer state + EMA take {state:.1f} GiB of {hbm:.0f} GiB per chip: "
                           f"shard them over more chips (a larger slice; keep mesh.fsdp=-1, mesh.data=1)"})
    att = attention_scores_gib(cfg, sizes)
    if report["config"]["attention_impl"].startswith("dense") and att > 0.1 * hbm:
        out.append({"knob": "model.llm.attention_impl / mesh.tensor / data.tokens_per_row",
                    "why": f"dense attention materialises B x heads x L x L fp32 scores: {att:.1f} GiB per chip "
                           f"per layer at L={cfg.data.tokens_per_row}; a flash kernel (llm.attention_impl) removes "
                           f"it, mesh.tensor splits the heads (with fewer rows per chip), or lower data.tokens_per_row"})
    rows_chip = report["config"]["rows_per_chip_per_micro_batch"]
    if rows_chip > 1:
        k = int(rows_chip)
        out.append({"knob": "train.grad_accum",
                    "why": f"{rows_chip:g} rows per chip per micro-batch: --config.train.grad_accum="
                           f"{int(cfg.train.grad_accum) * k} runs one row per chip at a time (same global batch)"})
    for part, c in (("llm", llm), ("vit", vit)):
        if c.remat_policy != "full":
            out.append({"knob": f"model.{part}.remat_policy",
                        "why": f"model.{part}.remat_policy={c.remat_policy} saves activations per layer; "
                               f"'full' recomputes them (least HBM, ~+33% FLOPs)"})
    if int(llm.ce_chunk_size) == 0:
        out.append({"knob": "model.llm.ce_chunk_size",
                    "why": "the lm_head logits (tokens x vocab fp32) exist at once: set ce_chunk_size=4096"})
    comp = report.get("components_per_chip") or {}
    vae_mem = comp.get("vae_encode") or {}
    vae_total = vae_mem.get("total_gib") or (vae_mem.get("oom") or {}).get("required_gib") or 0.0
    vae = vae_attention_gib(cfg, sizes)
    if vae_total > 0.3 * hbm:
        out.insert(0, {"knob": "data.vae_images_per_row / data.vae_image_size / mesh (rows per chip)",
                       "why": f"the VAE encode of the whole batch alone needs {vae_total:.1f} GiB per chip "
                              f"({report['config']['rows_per_chip']:g} rows x {cfg.data.vae_images_per_row} images "
                              f"of {cfg.data.vae_image_size} px, fp32; it runs before the micro-batch loop, so "
                              f"grad_accum does not shrink it): fewer / smaller images per row, or more chips "
                              f"on the batch axes (mesh.tensor replicates rows)"})
    elif vae > 0.05 * hbm:
        out.append({"knob": "data.vae_images_per_row / data.vae_image_size",
                    "why": f"the VAE encoder's mid attention holds {vae:.1f} GiB of fp32 scores per chip "
                           f"({cfg.data.vae_images_per_row} images of {cfg.data.vae_image_size} px per row)"})
    out.append({"knob": "data.tokens_per_row",
                "why": "activations grow linearly (attention quadratically) with the row length"})
    return out
