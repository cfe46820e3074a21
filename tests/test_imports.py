"""Imports run one way (issue 13; the layer diagram is docs/architecture.md).

A static AST graph of every ``import`` in sgt_jax -- function-local ones included, which is where
cycles hide -- must have no cycle and no edge against the layer order:

    batch, fileio, keydiff  ->  models  ->  data  ->  parallel  ->  train  ->  infer | aot | convert
                                                                                 ->  generate

A module may import its own layer and any layer to its left; ``infer``, ``aot`` and ``convert``
sit side by side above ``train`` (inference loads runs through train's Program and Checkpointer),
``convert.model_dir`` at the ``parallel`` level (the trainer reads and writes model dirs). ``models`` is below ``data`` (the data pipeline patchifies with the ViT's helpers;
the model never sees the pipeline, only ``batch.PackedBatch``). Then every module must import in
a fresh interpreter state (no sgt_jax module loaded before it).
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "sgt_jax"

# layer rank of each top-level room; same rank = side by side (no imports between them)
LAYERS = {"sgt_jax": 0, "sgt_jax.batch": 0, "sgt_jax.fileio": 0, "sgt_jax.keydiff": 0,
          "sgt_jax.models": 1,
          "sgt_jax.data": 2,
          "sgt_jax.parallel": 3,
          "sgt_jax.train": 4,
          # programs over a trained run: inference loads runs through train (Program, Checkpointer)
          "sgt_jax.infer": 5, "sgt_jax.aot": 5, "sgt_jax.convert": 5,
          "sgt_jax.generate": 6,   # the inference CLI
          "sgt_jax.eval": 6,       # evaluation over inference engines
          "sgt_jax.analyze": 6,    # mechanistic analysis over inference engines (+ its CLI, __main__)
          "sgt_jax.rl": 6,         # UAE's Unified-GRPO: rollouts over infer, updates through train
          "sgt_jax.rl.__main__": 7,  # the RL CLI
          "sgt_jax.evaluate": 7,   # the evaluation CLI
          # the training CLI hands the evaluation hook (sgt_jax.eval) to train.loop.train
          "sgt_jax.train.__main__": 7,
          # the model-dir format (Orbax params + BAGEL config files): the trainer reads it
          # (train.init_from) and writes it (train/export.py), the converter produces it
          "sgt_jax.convert.model_dir": 3}

# Edges other branches of issue 13 remove (the lead deletes a line when its fix merges; a line
# whose edge is gone fails below, so this list cannot go stale).
PENDING: dict = {}


def modules(root: Path = ROOT) -> dict[str, Path]:
    out = {}
    for p in sorted((root / PKG).rglob("*.py")):
        name = ".".join(p.relative_to(root).with_suffix("").parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the sgt_jax modules it imports anywhere in its body. ``from pkg import sub`` is
    an edge to ``pkg.sub`` (the submodule), ``from pkg import name`` one to ``pkg``."""
    def known(n):
        while n and n not in mods:
            n = n.rpartition(".")[0]
        return n

    g = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = m.split(".") if p.name == "__init__.py" else m.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            g[m] |= {t for t in map(known, targets) if t and t != m}
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = n; n += 1; stack.append(root); on.add(root)  # noqa: E702
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = n; n += 1; stack.append(w); on.add(w)  # noqa: E702
                    work.append((w, iter(sorted(g[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop(); on.discard(w); comp.append(w)  # noqa: E702
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def room(m: str) -> str | None:
    """The most specific LAYERS key ``m`` belongs to."""
    keys = [k for k in LAYERS if m == k or m.startswith(k + ".")]
    return max(keys, key=len) if keys else None


def layer_violations(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, deps in g.items():
        a = room(m)
        if a is None or (a == PKG and m != PKG):
            bad.append(f"{m}: has no layer in tests/test_imports.py LAYERS (add it, and to "
                       "docs/architecture.md)")
            continue
        for d in sorted(deps):
            b = room(d)
            if b != a and LAYERS[b] >= LAYERS[a]:
                bad.append(f"{m} imports {d}: {b} (layer {LAYERS[b]}) is not below {a} (layer {LAYERS[a]})")
    return bad


def _without_pending(g):
    return {m: {d for d in deps if (m, d) not in PENDING} for m, deps in g.items()}


def test_the_checker_finds_a_function_local_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / PKG
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "batch.py").write_text("def f():\n    from sgt_jax.models import a\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("from sgt_jax import batch\n")
    g = import_graph(modules(tmp_path))
    assert g["sgt_jax.batch"] == {"sgt_jax.models.a"}
    assert cycles(g) == [["sgt_jax.batch", "sgt_jax.models.a"]]
    assert layer_violations(g) == ["sgt_jax.batch imports sgt_jax.models.a: sgt_jax.models (layer 1) is "
                                   "not below sgt_jax.batch (layer 0)"]


def test_no_import_cycles():
    g = import_graph(modules())
    found = cycles(_without_pending(g))
    assert not found, "import cycles (move the shared piece down a layer, docs/architecture.md):\n" + \
        "\n".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_layer_order():
    g = import_graph(modules())
    bad = layer_violations(_without_pending(g))
    assert not bad, "imports against the layer order (docs/architecture.md):\n  " + "\n  ".join(bad)
    stale = [f"{a} -> {b} ({why})" for (a, b), why in PENDING.items() if b not in g.get(a, ())]
    assert not stale, "fixed: delete from tests/test_imports.py PENDING:\n  " + "\n  ".join(stale)


# Each sgt_jax module imported in a forked child of an interpreter that has loaded the third-party
# packages but no sgt_jax module: every module imports first, in any order.
_FRESH = r"""
import importlib, os, sys, traceback
mods = sys.argv[1:]
for dep in ("numpy", "jax", "jax.numpy", "flax.nnx", "ml_collections", "orbax.checkpoint", "PIL.Image"):
    try:
        importlib.import_module(dep)
    except Exception:
        pass
failed = []
for m in mods:
    pid = os.fork()
    if pid == 0:
        try:
            importlib.import_module(m)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(m)
print("FAILED", " ".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_in_a_fresh_interpreter():
    mods = sorted(modules())
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", _FRESH, *mods], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, f"modules that fail to import on their own:\n{r.stdout[-2000:]}\n{r.stderr[-6000:]}"


def closure(start: str, root: Path = ROOT) -> list[str]:
    """Every sgt_jax module ``start`` imports, directly or not (itself included)."""
    g, seen, todo = import_graph(modules(root)), set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += g.get(m, ())
    return sorted(seen)


if __name__ == "__main__":     # python tests/test_imports.py [CHECKOUT] MODULE: its import closure
    *root, start = sys.argv[1:]
    found = closure(start, Path(root[0]) if root else ROOT)
    print(len(found), " ".join(found))
