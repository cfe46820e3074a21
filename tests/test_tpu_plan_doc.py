"""docs/tpu_plan.md's generated tables match docs/tpu_plan.json, and the JSON's derived fields
match the code that derives them (scripts/tpu_plan_doc.py; no compile)."""
import importlib.util
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script():
    spec = importlib.util.spec_from_file_location("tpu_plan_doc", os.path.join(ROOT, "scripts", "tpu_plan_doc.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load():
    with open(os.path.join(ROOT, "docs", "tpu_plan.json")) as f:
        plan = json.load(f)
    with open(os.path.join(ROOT, "docs", "tpu_plan.md")) as f:
        doc = f.read()
    return plan, doc


def test_doc_tables_match_the_json():
    T = _script()
    plan, doc = _load()
    assert T.render(doc, plan) == doc, "docs/tpu_plan.md is out of date: python scripts/tpu_plan_doc.py"


def test_json_derived_fields_are_current():
    T = _script()
    plan, _ = _load()
    assert T.refreshed(plan) == plan, "docs/tpu_plan.json is out of date: python scripts/tpu_plan_doc.py"


def test_fits_means_below_hbm_with_headroom():
    plan, doc = _load()
    for name, r in plan.items():
        if name == "before_vae_change":
            continue
        m = r["memory_per_chip"]
        below = m is not None and m["total_gib"] <= (1 - r["hbm_headroom"]) * r["topology"]["hbm_per_chip_gib"]
        assert r["fits"] == (r["oom"] is None and below), name
    # every compiler step time in the reports is marked unverified when decoded from negative values
    for name, r in plan.items():
        e = r.get("estimate") if name != "before_vae_change" else None
        if e:
            raws = [p.get("optimal_seconds_raw") for p in r["costs"]["probes"].values()]
            assert e["verified"] == all(x is not None and x >= 0 for x in raws), name


def test_doc_calls_nothing_measured_on_a_tpu():
    _, doc = _load()
    for line in doc.splitlines():
        if re.search(r"\bmeasured\b", line, re.I):
            assert re.search(r"not measured|nothing here was measured|no tpu|to measure|measure it|metrics\.jsonl"
                             r"|measured work fraction|bench/", line, re.I), line
