"""docs/tpu_plan.md's generated tables from docs/tpu_plan.json, with no recompile.

    python scripts/tpu_plan_doc.py            # refresh the JSON's derived fields, rewrite the tables
    python scripts/tpu_plan_doc.py --check    # exit 1 if the JSON or the doc is out of date

The derived fields of every saved report (the current rows and ``before_vae_change``) are
recomputed from what the compiler returned: "fits" (the total below HBM minus
``report.HBM_HEADROOM``), the probe combination, the estimate, the roofline bracket and the flash
kernels' cost (``aot.costs.reestimate``). Reports saved before the head shape was recorded get
``llm_num_heads`` / ``llm_head_dim`` from the recipe (configs/sgt_bagel_7b.py: every plan row
compiles that model). The tables go between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``
markers: ``results`` (``aot.report.table``) and ``bracket`` (``aot.report.bracket_table``).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgt_jax.aot.costs import reestimate  # noqa: E402
from sgt_jax.aot.report import HBM_HEADROOM, bracket_table, table  # noqa: E402

JSON = os.path.join(ROOT, "docs", "tpu_plan.json")
DOC = os.path.join(ROOT, "docs", "tpu_plan.md")
ARCHIVE = "before_vae_change"


def recipe_heads() -> tuple[int, int]:
    spec = importlib.util.spec_from_file_location("recipe", os.path.join(ROOT, "configs", "sgt_bagel_7b.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    llm = mod.get_config().model.llm
    return int(llm.num_heads), int(llm.hidden_size // llm.num_heads)


def refresh(report: dict, heads: tuple[int, int]) -> dict:
    r = copy.deepcopy(report)
    c = r["config"]
    c.setdefault("llm_num_heads", heads[0])
    c.setdefault("llm_head_dim", heads[1])
    m = r.get("memory_per_chip")
    r["hbm_headroom"] = HBM_HEADROOM
    r["fits"] = r.get("oom") is None and m is not None and m["total_gib"] <= (1 - HBM_HEADROOM) * r["topology"]["hbm_per_chip_gib"]
    return reestimate(r)


def refreshed(plan: dict) -> dict:
    heads = recipe_heads()
    out = {}
    for name, r in plan.items():
        if name == ARCHIVE:
            out[name] = {k: refresh(v, heads) for k, v in r.items()}
        else:
            out[name] = refresh(r, heads)
    return out


def rows(plan: dict) -> list:
    return [(k, v) for k, v in plan.items() if k != ARCHIVE]


def render(doc: str, plan: dict) -> str:
    tables = {"results": table(rows(plan)), "bracket": bracket_table(rows(plan))}
    for name, text in tables.items():
        pat = re.compile(rf"(<!-- {name}:start -->\n)(?:.*?\n)?(<!-- {name}:end -->)", re.S)
        if not pat.search(doc):
            raise SystemExit(f"{DOC}: no <!-- {name}:start --> ... <!-- {name}:end --> markers")
        doc = pat.sub(lambda m, text=text: m.group(1) + text + "\n" + m.group(2), doc)
    return doc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    with open(JSON) as f:
        plan = json.load(f)
    with open(DOC) as f:
        doc = f.read()
    new_plan = refreshed(plan)
    new_doc = render(doc, new_plan)
    stale = [p for p, old, new in ((JSON, plan, new_plan), (DOC, doc, new_doc)) if old != new]
    if args.check:
        for p in stale:
            print(f"{os.path.relpath(p, ROOT)} is out of date: python scripts/tpu_plan_doc.py")
        sys.exit(1 if stale else 0)
    with open(JSON, "w") as f:
        json.dump(new_plan, f, indent=1)
        f.write("\n")
    with open(DOC, "w") as f:
        f.write(new_doc)
    print("updated" if stale else "up to date", *[os.path.relpath(p, ROOT) for p in stale])


if __name__ == "__main__":
    main()
