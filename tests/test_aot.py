"""sgt_jax.aot: topology names, OOM parsing, the abstract batch, and (with libtpu installed) the
tiny preset's real train step compiled for small TPU topologies on this CPU machine."""
import json
import math

import numpy as np
import pytest

from sgt_jax import aot
from sgt_jax.aot import compile as aot_compile
from sgt_jax.aot import report as aot_report

HAVE_TPU_COMPILER, WHY = aot.libtpu_available()
needs_libtpu = pytest.mark.skipif(not HAVE_TPU_COMPILER, reason=f"no TPU compiler: {WHY}")


def tiny_cfg(**data):
    from configs.tiny import get_config

    cfg = get_config()
    cfg.data.update(data)
    return cfg


@pytest.mark.parametrize("name,chips,shape,hosts,wrap,acc", [
    ("v5p-8", 4, (2, 2, 1), 1, (False,) * 3, "v5p-8"),
    ("v5p-16", 8, (2, 2, 2), 2, (False,) * 3, "v5p-16"),
    ("v5p-64", 32, (2, 4, 4), 8, (False,) * 3, "v5p-64"),
    ("v5p-128", 64, (4, 4, 4), 16, (True,) * 3, "v5p-128"),
    ("v5p-1280", 640, (4, 8, 20), 160, (True,) * 3, "v5p-1280"),
    ("v4-32", 16, (2, 2, 4), 4, (False,) * 3, "v4-32"),
    ("v4-512", 256, (4, 8, 8), 64, (True,) * 3, "v4-512"),
    ("v5e-8", 8, (2, 4), 1, (False,) * 3, "v5litepod-8"),
    ("v5litepod-16", 16, (4, 4), 4, (False,) * 3, "v5litepod-16"),
    ("v6e-64", 64, (8, 8), 16, (False,) * 3, "v6e-64"),
    ("v6e-256", 256, (16, 16), 64, (True, True, False), "v6e-256"),
])
def test_parse_topology(name, chips, shape, hosts, wrap, acc):
    t = aot.parse_topology(name)
    assert (t.chips, t.shape, t.hosts_per_slice, t.wrap, t.accelerator_type) == (chips, shape, hosts, wrap, acc)
    assert t.topology_name.endswith("x".join(map(str, shape)))


def test_parse_multislice_and_errors():
    t = aot.parse_topology("2xv5p-64")
    assert (t.num_slices, t.chips, t.chips_per_slice, t.to_dict()["hosts"]) == (2, 64, 32, 16)
    assert t.topology_name == "v5:2x4x4" and t.hbm_gib == 95 and t.peak_tflops == 459
    for bad in ("v9-8", "v5p-7", "v6e-12", "tpu", "v5p-40"):
        with pytest.raises(aot.AotError):
            aot.parse_topology(bad)


def test_parse_oom_messages():
    m = aot.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                      "temporaries (169.42G) exceeds available HBM (95.74G).")
    assert m["required_gib"] == pytest.approx(169.42) and m["available_gib"] == pytest.approx(95.74)
    m = aot.parse_oom("XLA:TPU compile permanent error. Ran out of memory in memory space hbm. Used 120.5G of "
                      "31.25G hbm. Exceeded hbm capacity by 89.3G.")
    assert m["required_gib"] == pytest.approx(120.5) and m["available_gib"] == pytest.approx(31.25)
    assert aot.parse_oom("INVALID_ARGUMENT: shapes do not match") is None


def test_abstract_batch_matches_the_packer():
    from sgt_jax.data.packer import RowSpec, assemble

    cfg = tiny_cfg()
    real = assemble([[] for _ in range(cfg.data.rows_per_batch)], RowSpec.from_config(cfg.data))
    abstract = aot.abstract_batch(cfg)
    for f in real.__dataclass_fields__:
        a, r = getattr(abstract, f), getattr(real, f)
        if r is None:
            assert a is None, f
            continue
        assert a.shape == r.shape and np.dtype(a.dtype) == r.dtype, f


def test_resolve_mesh_multislice():
    t = aot.parse_topology("2xv5p-16")
    assert aot.resolve_mesh_spec({"data": 1, "fsdp": -1, "tensor": 1}, t) == {"data": 2, "fsdp": 8, "tensor": 1}
    assert aot.resolve_mesh_spec({"data": 4, "fsdp": -1, "tensor": 2}, t) == {"data": 4, "fsdp": 2, "tensor": 2}
    with pytest.raises(aot.AotError, match="multiple of the 2 slices"):
        aot.resolve_mesh_spec({"data": 3, "fsdp": -1, "tensor": 1}, aot.parse_topology("2xv5e-4"))


# ---- with the TPU compiler -------------------------------------------------------------------


@needs_libtpu
def test_topology_devices_and_meshes():
    d = aot.topology_devices(aot.parse_topology("v5p-16"))
    assert len(d) == 8 and len({x.process_index for x in d}) == 2 and d[0].platform == "tpu"
    d = aot.topology_devices(aot.parse_topology("v5e-4"))
    assert len(d) == 4 and "lite" in d[0].device_kind.lower()
    t = aot.parse_topology("2xv5e-4")
    d = aot.topology_devices(t)
    mesh = aot.make_topology_mesh({"data": 1, "fsdp": -1, "tensor": 1}, t, d)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    # the data axis spans the slices: each data row of the mesh is one slice
    for row in np.asarray(mesh.devices)[:, :, 0]:
        assert len({x.slice_index for x in row}) == 1
    # the trainer builds the same hybrid mesh from the devices alone (multislice on real pods)
    from sgt_jax.parallel import mesh as mesh_lib

    m = mesh_lib.make_mesh({"data": -1, "fsdp": 2, "tensor": 2}, devices=d)
    assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for i, sub in enumerate(np.asarray(m.devices)):
        assert {x.slice_index for x in sub.flat} == {np.asarray(m.devices)[i, 0, 0].slice_index}
    with pytest.raises(ValueError, match="multiple of the 2 slices"):
        mesh_lib.make_mesh({"data": 3, "fsdp": -1, "tensor": 1}, devices=d)


@needs_libtpu
def test_tiny_step_report_on_two_hosts(tmp_path):
    """The tiny preset's real train step compiled for v5p-16 (2 hosts, 8 chips): every field."""
    cfg = tiny_cfg(rows_per_batch=8)
    out = tmp_path / "step.bin"
    r = aot.analyse(cfg, "v5p-16", costs=False, components=False, serialize=str(out), log=lambda s: None)
    json.dumps(r, default=str)
    assert r["fits"] and r["oom"] is None and r["advice"] == [] and r["knob"] is None
    t = r["topology"]
    assert (t["chips"], t["hosts"], t["hbm_per_chip_gib"], t["device_kind"]) == (8, 2, 95, "TPU v5")
    assert r["config"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["config"]["rows_per_chip"] == 1
    m = r["memory_per_chip"]
    for k in ("argument_gib", "output_gib", "alias_gib", "temp_gib", "generated_code_gib", "total_gib",
              "fraction_of_hbm"):
        assert m[k] >= 0, k
    assert m["total_gib"] == pytest.approx(m["argument_gib"] + m["output_gib"] + m["temp_gib"] - m["alias_gib"]
                                           + m["generated_code_gib"])
    # the donated state aliases its outputs; the arguments are the sharded state + consts + batch
    st = r["state_per_chip_gib"]
    assert m["alias_gib"] > 0.9 * (st["params"] + st["opt_state"] + st["ema"])
    assert m["argument_gib"] >= 0.99 * sum(st.values())    # small arrays are padded to TPU tiles
    assert r["flops"]["model_flops_per_step"] > 0
    assert r["flops"]["model_flops_per_chip"] == pytest.approx(r["flops"]["model_flops_per_step"] / 8)
    # as compiled (scanned layers, chunked CE): loop bodies count once and the time estimate is
    # unknown (negative) -- why the report measures FLOPs and time on unrolled probes
    as_is = r["compiled_costs_as_is"]
    assert as_is["flops"] > 0 and as_is["optimal_seconds_raw"] < 0 and as_is["while_loops"] >= 2
    assert r["serialized"]["bytes"] > 1000 and out.stat().st_size == r["serialized"]["bytes"]
    text = aot.format_report(r)
    assert "memory per chip" in text and "v5p-16" in text


@needs_libtpu
def test_hbm_exhaustion_names_the_knob():
    """Rows of 24k tokens on a v5e (16 GiB): the dense attention's L x L scores do not fit."""
    cfg = tiny_cfg(rows_per_batch=4, tokens_per_row=24576, gen_tokens_per_row=96, max_tokens_per_sample=384)
    cfg.model.llm.num_heads = 8
    cfg.model.llm.num_kv_heads = 8
    r = aot.analyse(cfg, "v5e-4", costs=False, components=False, log=lambda s: None)
    assert not r["fits"] and r["memory_per_chip"] is None
    assert r["oom"]["required_gib"] > r["oom"]["available_gib"] > 15
    assert "attention" in r["knob"] and "tokens_per_row" in r["knob"]
    assert any(a["knob"] == "data.tokens_per_row" for a in r["advice"])
    assert "DOES NOT FIT" in aot.format_report(r)


@needs_libtpu
@pytest.mark.slow
def test_cost_probes_extrapolate_exactly():
    """FLOPs of the scanned step from 1-2 layer probes == the fully unrolled step's own count."""
    cfg = tiny_cfg()
    cfg.model.llm.num_layers = 3
    cfg.model.vit.num_layers = 3
    topo = aot.parse_topology("v5e-4")
    devs = aot.topology_devices(topo)
    probe = aot.cost_probe(cfg, topo, devs, log=lambda s: None)
    full = aot_compile._cfg_copy(cfg)
    full.model.llm.scan_layers = full.model.vit.scan_layers = False
    full.model.llm.ce_chunk_size = 0
    setup = aot_compile._setup(full, aot.make_topology_mesh(full.mesh.to_dict(), topo, devs))
    compiled = aot_compile._compile(setup, full)[0]
    want = aot_compile._costs(compiled)
    assert probe["per_chip"]["flops"] == pytest.approx(want["flops"], rel=1e-2)
    assert probe["per_llm_layer"]["flops"] > 0 and probe["per_vit_layer"]["flops"] > 0
    assert math.isfinite(probe["per_chip"]["optimal_seconds"])


def test_loop_sentinels_and_probe_combination():
    """The (unverified) -k + t reading of a negative optimal_seconds; the combination is affine in depth."""
    assert aot.loop_free_seconds(-1.9005, 57) == pytest.approx(0.0995)   # k = 2 whatever the loop count
    assert aot.loop_free_seconds(-1.9005) == pytest.approx(0.0995)     # loops unknown: ceil(-raw)
    assert aot.loop_free_seconds(0.25, 0) == 0.25 and aot.loop_free_seconds(None) is None
    probes = {"llm1_vit1": {"flops": 10.0, "bytes_accessed": 1.0, "transcendentals": 0.0, "optimal_seconds_raw": -1.9},
              "llm2_vit1": {"flops": 13.0, "bytes_accessed": 1.5, "transcendentals": 0.0, "optimal_seconds_raw": -1.8},
              "llm1_vit2": {"flops": 11.0, "bytes_accessed": 1.1, "transcendentals": 0.0, "optimal_seconds_raw": -1.85}}
    out = aot.combine_probes(probes, {"flops": 1.0, "optimal_seconds": 0.01}, {"flops": 5.0, "optimal_seconds": 0.5},
                             llm_n=28, vit_n=26, accum=4)
    assert out["per_chip"]["flops"] == pytest.approx(4 * (10 + 27 * 3 + 25 * 1 - 1) + 5)
    assert out["per_chip"]["optimal_seconds"] == pytest.approx(4 * (0.1 + 27 * 0.1 + 25 * 0.05 - 0.01) + 0.5)
    assert "not bounds" in out["note"]
    per_micro = aot.combine_probes(probes, {"flops": 1.0}, {"flops": 5.0}, llm_n=28, vit_n=26, accum=4,
                                   vae_per_micro_batch=True)    # the VAE encode runs once per micro-batch
    assert per_micro["per_chip"]["flops"] == pytest.approx(4 * (10 + 27 * 3 + 25 * 1 - 1 + 5))
    report = {"costs": out, "config": {"llm_layers": 28, "vit_layers": 26, "grad_accum": 4},
              "topology": {"chips": 32, "peak_tflops_per_chip": 459.0},
              "flops": {"model_flops_per_step": 1e15, "model_flops_per_chip": 1e15 / 32, "tokens_per_step": 1 << 20}}
    e = aot.reestimate(report)["estimate"]
    assert e["step_time_s"] == pytest.approx(out["per_chip"]["optimal_seconds"])
    assert e["mfu"] == pytest.approx(1e15 / (e["step_time_s"] * 32 * 459e12))
    assert e["verified"] is False and "unverified" in e["source"]     # decoded from negative raw values


def test_flash_kernel_cost_and_roofline_bracket():
    """The flash kernels' CostEstimate as the compiler counts it (full grid; forward twice under
    remat full, once when "context" is saved) and the roofline's compute bracket (no compile)."""
    def report(policy, impl="flash"):
        return {"config": {"attention_impl": impl, "llm_remat_policy": policy, "tokens_per_row": 1024,
                           "rows_per_chip_per_micro_batch": 1, "llm_num_heads": 4, "llm_head_dim": 64,
                           "grad_accum": 2, "llm_layers": 3, "mesh": {"data": 1, "fsdp": 4, "tensor": 1}},
                "topology": {"family": "v5p", "chips": 4, "peak_tflops_per_chip": 459.0},
                "state_per_chip_gib": {"params": 1.0},
                "flops": {"model_flops_per_step": 4e15, "model_flops_per_chip": 1e15,
                          "compiler_flops_per_chip": 1.2e15},
                "costs": {"per_chip": {"bytes_accessed": 2765e9}, "per_llm_layer": {"flops": 1e12}}}
    full = aot.flash_kernel_cost(report("full"))
    per_layer = 2.0 * (2 * 2 + 3 + 4) * 4 * 1024 * 1024 * 64
    assert full["per_layer_flops"] == per_layer and full["flops_per_chip"] == 2 * 3 * per_layer
    assert full["share_of_compiler_flops"] == pytest.approx(2 * 3 * per_layer / 1.2e15)
    assert full["share_of_compiler_per_llm_layer"] == pytest.approx(per_layer / 1e12)
    assert aot.flash_kernel_cost(report("minimal"))["passes"] == 2 + 3 + 4      # "context" saved
    assert aot.flash_kernel_cost(report("none"))["passes"] == 2 + 3 + 4
    assert aot.flash_kernel_cost(report("full", "dense")) is None
    rl = aot.roofline(report("full"))
    assert rl["compute_s"] == pytest.approx(1.2e15 / 459e12)
    assert rl["compute_model_s"] == pytest.approx(1e15 * 4 / 3 / 459e12)
    assert rl["hbm_s"] == pytest.approx(1.0)
    assert rl["low_s"] == pytest.approx(max(min(rl["compute_s"], rl["compute_model_s"]), rl["hbm_s"], rl["ici_s"]))
    assert rl["high_s"] == pytest.approx(max(rl["compute_s"], rl["compute_model_s"]) + rl["hbm_s"] + rl["ici_s"])


# ---- attention "auto" and the presets as shipped ---------------------------------------------


def test_auto_attention_resolution():
    from sgt_jax.models.attention import resolve_impl

    assert resolve_impl("auto", 128, "tpu") == "flash"
    assert resolve_impl("auto", 16, "tpu") == "dense"          # shapes the Pallas kernel refuses
    assert resolve_impl("auto", 128, "cpu") == resolve_impl("auto", 128, "gpu") == "dense"
    assert resolve_impl("auto", 128) == "dense"                # this CPU process, no mesh
    assert resolve_impl("flash", 16, "cpu") == "flash" and resolve_impl("dense", 128, "tpu") == "dense"


def _head128_cfg(impl):
    cfg = tiny_cfg(rows_per_batch=4)
    cfg.model.llm.update(hidden_size=256, num_heads=2, num_kv_heads=1, attention_impl=impl)
    return cfg


@needs_libtpu
def test_auto_attention_is_the_pallas_kernel_for_a_tpu_topology():
    """AOT from this CPU machine for a TPU topology: ``auto`` lowers to the Pallas kernel (a
    tpu_custom_call), ``dense`` does not; the report names the kernel."""
    import jax

    topo = aot.parse_topology("v5e-4")
    devs = aot.topology_devices(topo)
    texts = {}
    for impl in ("auto", "dense"):
        cfg = _head128_cfg(impl)
        setup = aot_compile._setup(cfg, aot.make_topology_mesh(cfg.mesh.to_dict(), topo, devs))
        state = aot_compile._with_shardings(setup.abstract_state, setup.state_shardings)
        consts = aot_compile._with_shardings(setup.abstract_consts, setup.consts_shardings)
        with jax.set_mesh(setup.mesh):
            texts[impl] = setup.step_fn.lower(state, consts, aot.abstract_batch(cfg, setup.batch_sharding)).as_text()
    assert "tpu_custom_call" in texts["auto"] and "tpu_custom_call" not in texts["dense"]
    assert aot_report._attention(_head128_cfg("auto").model, devs[0].platform) == "flash (auto)"
    small = tiny_cfg()
    small.model.llm.attention_impl = "auto"
    assert aot_report._attention(small.model, devs[0].platform) == "dense (auto)"        # head_dim 16


def _presets():
    import importlib
    import pathlib

    names = sorted(p.stem for p in (pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py")
                   if p.stem != "__init__" and not p.stem.startswith("uae_"))   # RL presets: sgt_jax.rl
    return {n: importlib.import_module(f"configs.{n}") for n in names}


def test_every_pod_preset_names_the_slice_it_fits():
    """A preset for a real model (not a CPU preset) names its slice (``TOPOLOGY``, also in its
    docstring), and the AOT test below compiles it there as shipped."""
    for name, mod in _presets().items():
        cfg = mod.get_config()
        if cfg.model.compute_dtype != "bfloat16":                  # the CPU presets: fp32
            assert not hasattr(mod, "TOPOLOGY"), name
            continue
        topo = getattr(mod, "TOPOLOGY", None)
        assert topo and topo in (mod.__doc__ or ""), f"configs/{name}.py: name its slice in TOPOLOGY"
        aot.parse_topology(topo)
        assert cfg.model.llm.attention_impl in ("auto", "flash"), name


def _memory_groups() -> dict[str, list[str]]:
    """Presets with a ``TOPOLOGY``, grouped by what their compiled step's memory depends on: the
    step fingerprint with the scalar loss weights set to 1 and no weight decay
    (``sgt_bagel_7b_official`` differs from ``sgt_bagel_7b`` only in ce_weight, weight decay and
    the data mix, ``sgt_proxy`` only in the data: same buffers, one compile for all)."""
    from sgt_jax.train.loop import step_fingerprint

    groups: dict[str, list[str]] = {}
    for name, mod in _presets().items():
        if hasattr(mod, "TOPOLOGY"):
            cfg = mod.get_config()
            cfg.train.update(ce_weight=1.0, mse_weight=1.0, weight_decay=0.0)
            groups.setdefault(f"{mod.TOPOLOGY}-{step_fingerprint(cfg)}", []).append(name)
    return groups


@needs_libtpu
@pytest.mark.slow
@pytest.mark.parametrize("names", list(_memory_groups().values()), ids="+".join)
def test_preset_fits_its_slice_as_shipped(names):
    """The preset's real train step, no overrides, compiled for its ``TOPOLOGY``: it fits, with
    the Pallas kernel. Full depth: a reduced-depth compile would not prove the fit and is barely
    cheaper (2 layers: 7.8 min, 28 layers: 10.7 min of a shared 2-core machine)."""
    mod = _presets()[names[0]]
    r = aot.analyse(mod.get_config(), mod.TOPOLOGY, costs=False, components=False, log=lambda s: None)
    assert r["fits"], r["oom"]
    assert r["memory_per_chip"]["total_gib"] < 0.9 * r["topology"]["hbm_per_chip_gib"]
    assert r["config"]["attention_impl"] == "flash (auto)"
