"""``analyse``: one topology's report (memory, state, FLOPs, cost probes, estimate, advice), as
text (``format_report``) and as the markdown table of docs/tpu_plan.md (``table``)."""
from __future__ import annotations

import json
import math
import os
import time

from sgt_jax.aot.advice import advise
from sgt_jax.aot.compile import (GiB, _bytes_per_device, _compile, _memory, _setup,
                                 _with_shardings, abstract_batch, component_memory, parse_oom)
from sgt_jax.aot.compile import _costs
from sgt_jax.aot.costs import PADDING, cost_probe, estimate, flash_kernel_cost, nominal_batch, roofline
from sgt_jax.aot.topology import AotError, Topology, make_topology_mesh, parse_topology, topology_devices
from sgt_jax.train.executable import save_compiled, step_fingerprint, version as _version

HBM_HEADROOM = 0.05     # "fits" leaves this fraction of the chip's nominal HBM free


def analyse(cfg, topology: str | Topology, *, costs: bool = True, components: bool | None = None,
            doc_tokens: int = 3000, compiler_options: dict | None = None, serialize: str | None = None,
            log=print) -> dict:
    """Compile the train step of ``cfg`` for ``topology``; return the report dict.
    ``components``: also compile the VAE encode and the model fwd+bwd alone (None: only when the
    step does not fit or uses > 80% of HBM)."""
    import jax

    from sgt_jax.train import metrics as metrics_lib

    topo = parse_topology(topology) if isinstance(topology, str) else topology
    devices = topology_devices(topo)
    if len(devices) != topo.chips:
        raise AotError(f"{topo.name}: the topology has {len(devices)} devices, expected {topo.chips} chips")
    mesh = make_topology_mesh(cfg.mesh.to_dict(), topo, devices)
    sizes = dict(mesh.shape)
    d, m, t = cfg.data, cfg.model, cfg.train
    accum = int(t.grad_accum)
    batch_ways = sizes["data"] * sizes["fsdp"]
    rows = int(d.rows_per_batch)
    if rows % accum or (rows // accum) % batch_ways:
        raise AotError(f"data.rows_per_batch={rows} / train.grad_accum={accum} must be a multiple of "
                       f"mesh data*fsdp = {batch_ways}: every chip needs whole rows; set "
                       f"--config.data.rows_per_batch={batch_ways * accum * max(1, rows // (batch_ways * accum))}")
    report = {
        "topology": topo.to_dict() | {"device_kind": devices[0].device_kind},
        "config": {
            "mesh": sizes, "rows_per_batch": rows, "rows_per_chip": rows / batch_ways,
            "rows_per_chip_per_micro_batch": rows / accum / batch_ways,
            "tokens_per_row": int(d.tokens_per_row), "gen_tokens_per_row": int(d.gen_tokens_per_row),
            "vit_patches_per_row": int(d.vit_patches_per_row), "vae_images_per_row": int(d.vae_images_per_row),
            "vae_image_size": d.vae_image_size, "grad_accum": accum,
            "llm_layers": int(m.llm.num_layers), "vit_layers": int(m.vit.num_layers),
            "llm_num_heads": int(m.llm.num_heads), "llm_head_dim": int(m.llm.hidden_size // m.llm.num_heads),
            "llm_remat_policy": m.llm.remat_policy, "vit_remat_policy": m.vit.remat_policy,
            "attention_impl": _attention(m, devices[0].platform), "ce_chunk_size": int(m.llm.ce_chunk_size),
            "compute_dtype": m.compute_dtype, "param_dtype": "float32",   # the master weights, always
        },
        "versions": {"jax": jax.__version__, "libtpu": _version("libtpu")},
        "compiler_options": compiler_options or {},
    }
    log(f"[aot] {topo.name}: {topo.chips} chips ({topo.topology_name} x{topo.num_slices}, "
        f"{devices[0].device_kind}), mesh {sizes}")
    t0 = time.perf_counter()
    setup = _setup(cfg, mesh)
    report["setup_s"] = time.perf_counter() - t0
    state = _with_shardings(setup.abstract_state, setup.state_shardings)
    consts = _with_shardings(setup.abstract_consts, setup.consts_shardings)
    batch = abstract_batch(cfg, setup.batch_sharding)
    report["state_per_chip_gib"] = {
        "params": _bytes_per_device(state.params) / GiB, "opt_state": _bytes_per_device(state.opt_state) / GiB,
        "ema": _bytes_per_device(state.ema) / GiB, "frozen": _bytes_per_device(consts.frozen) / GiB,
        "vae": _bytes_per_device(consts.vae) / GiB, "fixed": _bytes_per_device(consts.fixed) / GiB,
        "batch": _bytes_per_device(batch) / GiB}
    n_train = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_state.params))
    n_frozen = sum(int(math.prod(x.shape)) for x in jax.tree.leaves(setup.abstract_consts.frozen))
    report["parameters"] = {"trainable": n_train, "frozen": n_frozen}
    log(f"[aot] compiling the train step ({n_train / 1e9:.2f} B trainable params) ...")
    report["oom"] = None
    compiled = None
    try:
        compiled, _, secs, _ = _compile(setup, cfg, compiler_options)
        report["compile_s"] = secs
        report["memory_per_chip"] = _memory(compiled)
        report["compiled_costs_as_is"] = _costs(compiled)
    except Exception as e:   # the compiler's OOM is an XlaRuntimeError / JaxRuntimeError
        oom = parse_oom(str(e))
        if oom is None:
            raise
        report["oom"] = oom
        report["memory_per_chip"] = None
        log(f"[aot] HBM exhausted: {oom['message']}")
    mem = report["memory_per_chip"]
    hbm = topo.hbm_gib
    if mem is not None:
        mem["hbm_gib"] = hbm
        mem["fraction_of_hbm"] = mem["total_gib"] / hbm
    # "fits": compiled, and the total below HBM minus HBM_HEADROOM (runtime buffers, fragmentation)
    report["fits"] = report["oom"] is None and mem["total_gib"] <= (1 - HBM_HEADROOM) * hbm
    report["hbm_headroom"] = HBM_HEADROOM
    report["components_per_chip"] = None
    if components or (components is None and (not report["fits"] or mem["fraction_of_hbm"] > 0.8)):
        log("[aot] compiling the VAE encode and the model fwd+bwd alone to attribute the memory ...")
        report["components_per_chip"] = component_memory(setup, cfg, compiler_options, log=log)
    # FLOPs: the trainer's model count on a fully packed nominal batch, and the compiler's
    model_flops = metrics_lib.step_flops(m, nominal_batch(cfg, doc_tokens=doc_tokens))
    real_tokens = rows * int(d.tokens_per_row)
    report["flops"] = {"model_flops_per_step": model_flops, "model_flops_per_chip": model_flops / topo.chips,
                       "model_basis": f"train.metrics.step_flops on a fully packed batch: every token real, "
                                      f"documents of {doc_tokens} tokens, every ViT slot used",
                       "tokens_per_step": real_tokens, "padding": PADDING}
    report["costs"] = None
    if costs == "always" or (costs and report["fits"]):
        try:
            report["costs"] = cost_probe(cfg, topo, devices, compiler_options, log=log)
        except Exception as e:   # a probe that does not fit still leaves the memory report
            report["costs"] = {"error": str(e).splitlines()[0][:400]}
    if report["costs"] and "per_chip" in report["costs"]:
        pc = report["costs"]["per_chip"]
        report["flops"]["compiler_flops_per_chip"] = pc["flops"]
        report["flops"]["compiler_over_model"] = pc["flops"] / report["flops"]["model_flops_per_chip"]
    report["estimate"] = estimate(report)
    report["roofline"] = roofline(report)
    report["flash_kernel"] = flash_kernel_cost(report)
    report["advice"] = advise(cfg, report)
    report["knob"] = report["advice"][0]["knob"] if report["advice"] else None
    if serialize and compiled is not None:
        report["serialized"] = save_compiled(compiled, serialize, fingerprint=step_fingerprint(cfg))
        log(f"[aot] serialized executable -> {serialize} ({report['serialized']['bytes'] / 1e6:.1f} MB)")
    return report

def _attention(model_cfg, platform: str) -> str:
    """The attention kernel the step compiles with (``attention.resolve_impl``): "flash (auto)"
    for ``auto`` on a TPU topology."""
    from sgt_jax.models.attention import resolve_impl

    impl = model_cfg.llm.get("attention_impl", "dense")
    got = resolve_impl(impl, model_cfg.llm.hidden_size // model_cfg.llm.num_heads, platform)
    return got if got == impl else f"{got} ({impl})"

def format_report(r: dict) -> str:
    t, c = r["topology"], r["config"]
    lines = [f"== {t['name']}: {t['chips']} x {t['device_kind']} ({t['topology_name']}"
             f"{' x' + str(t['slices']) + ' slices' if t['slices'] > 1 else ''}, {t['hosts']} hosts), "
             f"HBM {t['hbm_per_chip_gib']:.0f} GiB/chip, peak {t['peak_tflops_per_chip']:.0f} TFLOP/s/chip",
             f"   mesh {c['mesh']}; rows {c['rows_per_batch']} x {c['tokens_per_row']} tokens "
             f"({c['rows_per_chip']:g} rows/chip, grad_accum {c['grad_accum']}); remat llm={c['llm_remat_policy']} "
             f"vit={c['vit_remat_policy']}; attention {c['attention_impl']}"]
    st = r["state_per_chip_gib"]
    lines.append("   state per chip (GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in st.items()))
    mem = r["memory_per_chip"]
    if mem:
        lines.append(f"   memory per chip (GiB): arguments {mem['argument_gib']:.2f}, outputs {mem['output_gib']:.2f}, "
                     f"aliased {mem['alias_gib']:.2f}, temporaries {mem['temp_gib']:.2f}, code "
                     f"{mem['generated_code_gib']:.3f} -> total {mem['total_gib']:.2f} of {mem['hbm_gib']:.0f} "
                     f"({100 * mem['fraction_of_hbm']:.0f}%)")
    if r["oom"]:
        o = r["oom"]
        need = f" (needs {o['required_gib']:.1f} GiB of {o.get('available_gib', float('nan')):.2f})" \
            if "required_gib" in o else ""
        lines.append(f"   DOES NOT FIT{need}: {o['message'][:300]}")
    f = r["flops"]
    lines.append(f"   model FLOPs/step {f['model_flops_per_step']:.4g} ({f['model_flops_per_chip']:.4g}/chip; "
                 f"{f['model_basis']})")
    if "compiler_flops_per_chip" in f:
        lines.append(f"   compiler FLOPs/chip {f['compiler_flops_per_chip']:.4g} "
                     f"({f['compiler_over_model']:.2f} x the model count)")
    e = r.get("estimate")
    if e:
        how = "" if e.get("verified") else " (decoded optimal_seconds, unverified)"
        lines.append(f"   compiler-estimated step{how} {e['step_time_s']:.3f} s -> "
                     f"MFU {100 * e['mfu']:.1f}% "
                     f"({100 * e.get('mfu_real_tokens', float('nan')):.1f}% on real tokens), "
                     f"{e['model_tflops_per_chip']:.0f} model TFLOP/s/chip, {e['tokens_per_s_per_chip']:.0f} tok/s/chip")
    rl = r.get("roofline")
    if rl:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        lines.append(f"   roofline step {rl['low_s']:.2f}-{rl['high_s']:.2f} s (compute {fmt(rl.get('compute_s'))} compiler / "
                     f"{fmt(rl.get('compute_model_s'))} model x remat, HBM {fmt(rl['hbm_s'])}, ICI {fmt(rl['ici_s'])} s)")
    fk = r.get("flash_kernel")
    if fk:
        share = (f", {100 * fk['share_of_compiler_flops']:.0f}% of the compiler's FLOPs"
                 if fk.get("share_of_compiler_flops") else "")
        lines.append(f"   flash kernels (their CostEstimate, every grid step): {fk['flops_per_chip']:.4g} FLOPs/chip"
                     f"{share}, {fk['seconds_at_peak']:.2f} s at peak; {100 * fk['live_fraction']:.1f}% of the "
                     f"blocks do work at 16k rows")
    if r.get("costs") and "error" in r["costs"]:
        lines.append(f"   cost probes failed: {r['costs']['error']}")
    comp = r.get("components_per_chip") or {}
    for k, v in comp.items():
        if "total_gib" in v:
            lines.append(f"   {k} alone: temporaries {v['temp_gib']:.2f} GiB, total {v['total_gib']:.2f} GiB per chip")
        elif v.get("oom"):
            o = v["oom"]
            lines.append(f"   {k} alone: does not fit either"
                         + (f" (needs {o['required_gib']:.1f} GiB)" if "required_gib" in o else "")
                         + f": {o.get('message', '')[:160]}")
    for a in r["advice"]:
        lines.append(f"   -> {a['knob']}: {a['why']}")
    return "\n".join(lines)

def _items(reports):
    """(name, report) pairs from JSON paths (the name is the file's stem) or from pairs."""
    for x in reports:
        if isinstance(x, (str, os.PathLike)):
            with open(x) as f:
                yield os.path.splitext(os.path.basename(x))[0], json.load(f)
        else:
            yield x


def _fits(r) -> str:
    m = r.get("memory_per_chip")
    if not m:
        return "no"
    free = (1 - r.get("hbm_headroom", HBM_HEADROOM)) * m["hbm_gib"] - m["total_gib"]
    return f"yes ({free:.1f} free)" if r["fits"] else f"no ({-free:.1f} over)"


def table(reports) -> str:
    """The Results table of docs/tpu_plan.md: one row per report (JSON paths or (name, report)
    pairs). "fits": the total below HBM minus the report's headroom, GiB to spare in brackets."""
    head = ("| run | topology | mesh d/f/t | rows x tokens | rows/chip (micro) | remat llm/vit | attention | args GiB | "
            "temp GiB | total GiB | HBM | fits (GiB below HBM - 5 %) | knob |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in _items(reports):
        c, t, m = r["config"], r["topology"], r.get("memory_per_chip")
        mesh = "/".join(str(c["mesh"][a]) for a in ("data", "fsdp", "tensor"))
        if m:
            mem = f"{m['argument_gib']:.1f} | {m['temp_gib']:.1f} | {m['total_gib']:.1f}"
        else:
            o = r["oom"] or {}
            mem = f"- | needs {o.get('required_gib', float('nan')):.1f} | -"
        lines.append(f"| {name} | {t['name']} | {mesh} | {c['rows_per_batch']} x {c['tokens_per_row']} | "
                     f"{c['rows_per_chip']:g} ({c['rows_per_chip_per_micro_batch']:g}) | "
                     f"{c['llm_remat_policy']}/{c['vit_remat_policy']} | {c['attention_impl']} | {mem} | "
                     f"{t['hbm_per_chip_gib']:.0f} | {_fits(r)} | {r.get('knob') or ''} |")
    return "\n".join(lines)


def bracket_table(reports) -> str:
    """Step time and MFU of the reports that fit: the roofline bracket (``costs.roofline``), the
    compiler's decoded figure beside it, and the flash kernels' share of the compiler's FLOPs."""
    head = ("| run | roofline low-high s | compute s: compiler / model x remat | HBM s | ICI s | "
            "MFU at high-low | on real tokens | compiler step s (decoded, unverified) | flash kernel FLOPs "
            "(share of compiler's) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    fmt = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for name, r in _items(reports):
        rl = r.get("roofline")
        if not r.get("fits") or not rl:
            continue
        t, f = r["topology"], r["flops"]
        mfu = lambda s, f=f, t=t: f["model_flops_per_step"] / (s * t["chips"] * t["peak_tflops_per_chip"] * 1e12)  # noqa: E731
        pad = 1 - f.get("padding", PADDING)
        e = r.get("estimate")
        fk = r.get("flash_kernel")
        kern = "-" if not fk else (f"{fk['flops_per_chip'] / 1e12:.0f} T" + (
            f" ({100 * fk['share_of_compiler_flops']:.0f} %)" if fk.get("share_of_compiler_flops") else ""))
        if rl["hbm_s"] is None:    # no probes: compute at peak + ICI only, a lower bound on the time
            span, m_all, m_real = (f">= {rl['low_s']:.2f}", f"<= {100 * mfu(rl['low_s']):.0f} %",
                                   f"<= {100 * pad * mfu(rl['low_s']):.0f} %")
        else:
            span = f"{rl['low_s']:.2f}-{rl['high_s']:.2f}"
            m_all = f"{100 * mfu(rl['high_s']):.0f}-{100 * mfu(rl['low_s']):.0f} %"
            m_real = f"{100 * pad * mfu(rl['high_s']):.0f}-{100 * pad * mfu(rl['low_s']):.0f} %"
        lines.append(f"| {name} | {span} | {fmt(rl.get('compute_s'))} / {fmt(rl.get('compute_model_s'))} | "
                     f"{'no probes' if rl['hbm_s'] is None else fmt(rl['hbm_s'])} | {fmt(rl['ici_s'])} | {m_all} | "
                     f"{m_real} | {fmt(e['step_time_s']) if e else '-'} | {kern} |")
    return "\n".join(lines)
