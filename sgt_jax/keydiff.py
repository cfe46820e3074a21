"""One reporter for a set of named tensors against what a model expects: missing, unexpected and
mis-shaped keys, each listed (the converter's import checks, ``keymap.load_state`` and the
trainer's ``train.init_from`` all report through it, so the wording is the same everywhere)."""
from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping


def listing(names: Iterable, limit: int = 40) -> str:
    """``a, b, c ... (+N more)``."""
    names = list(names)
    more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(str(n) for n in names[:limit]) + more


@dataclasses.dataclass
class KeyDiff:
    missing: list            # expected keys not found
    unexpected: list         # found keys nothing expects
    misshaped: list          # (key, found shape, expected shape)

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.misshaped)

    def lines(self, what: str = "", limit: int = 40, layout: str = "", shape=list) -> list[str]:
        """One line per kind of problem, e.g. ``ae.safetensors: 1 missing keys: decoder.norm_out.bias``.
        ``layout`` names the layout the shapes are given in (e.g. "torch layout"); ``shape`` how a
        shape is written (``list``: [32, 3, 3, 3], the converter's; ``tuple``: (32, 3, 3, 3))."""
        pre = f"{what}: " if what else ""
        out = []
        if self.missing:
            out.append(f"{pre}{len(self.missing)} missing keys: {listing(self.missing, limit)}")
        if self.unexpected:
            out.append(f"{pre}{len(self.unexpected)} unexpected keys: {listing(self.unexpected, limit)}")
        if self.misshaped:
            rows = [f"{k}: file {shape(a)}, config expects {shape(b)}" for k, a, b in self.misshaped]
            lay = f" ({layout})" if layout else ""
            out.append(f"{pre}{len(self.misshaped)} mis-shaped keys{lay}: {listing(rows, min(limit, 20))}")
        return out


def key_diff(expected: Mapping[str, tuple], found: Mapping[str, tuple], *,
             optional: Iterable[str] = ()) -> KeyDiff:
    """Compare ``found`` (key -> shape) with ``expected`` (key -> shape). Keys in ``optional`` may
    be present or not and are not shape-checked. Missing keys keep ``expected``'s order; the
    others are sorted."""
    optional = set(optional)
    missing = [k for k in expected if k not in found]
    unexpected = sorted(set(found) - set(expected) - optional)
    mis = [(k, tuple(found[k]), tuple(want)) for k, want in expected.items()
           if k in found and tuple(found[k]) != tuple(want)]
    return KeyDiff(missing, unexpected, mis)
