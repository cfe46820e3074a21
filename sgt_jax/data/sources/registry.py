"""The one table of spec kinds (``KINDS``) and what reads it: ``parse_spec``, ``make_source``,
``index_targets``, ``build_index``. A new format is a module with a ``Kind`` (a ``_Source``
subclass, or a ``Kind`` building another source) plus one row here."""
from __future__ import annotations

from sgt_jax import fileio
from sgt_jax.data.sources.base import Kind, Spec, SpecError
from sgt_jax.data.sources.coco import CocoInstancesSource, CocoPanopticSource
from sgt_jax.data.sources.coco_scene import CocoSceneSource
from sgt_jax.data.sources.jsonl import _jsonl_index
from sgt_jax.data.sources.llava import LlavaSource
from sgt_jax.data.sources.sa1b import SA1BSource
from sgt_jax.data.sources.sgt_pairs import SgtPairsSource
from sgt_jax.data.sources.synthetic import SyntheticSeg, SyntheticVqa
from sgt_jax.data.sources.tar import _tar_members
from sgt_jax.data.sources.tfds import TfdsSource

KINDS: dict[str, type[Kind]] = {k.name: k for k in (
    SA1BSource, SgtPairsSource, CocoPanopticSource, CocoInstancesSource, LlavaSource,
    SyntheticSeg, SyntheticVqa, TfdsSource, CocoSceneSource,
)}

_INDEXES = {"tar": _tar_members, "jsonl": _jsonl_index}     # index kind -> builder (cached)


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``'kind:body?a=1&b=2'`` -> ``(kind, body, {'a': '1', 'b': '2'})``; raises SpecError."""
    if not isinstance(spec, str) or ":" not in spec:
        raise SpecError(f"source spec {spec!r}: expected KIND:BODY, KIND one of "
                        f"{sorted(KINDS)}; e.g. {KINDS['sa1b'].usage!r}")
    kind, _, rest = spec.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise SpecError(f"source spec {spec!r}: unknown kind {kind!r}; known kinds: "
                        f"{', '.join(sorted(KINDS))}")
    body, _, query = rest.partition("?")
    opts: dict[str, str] = {}
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq:
            raise SpecError(f"source spec {spec!r}: option {item!r} must be NAME=VALUE; "
                            f"usage: {KINDS[kind].usage!r}")
        if name not in KINDS[kind].options:
            raise SpecError(f"source spec {spec!r}: unknown option {name!r} for {kind}; valid: "
                            f"{', '.join(sorted(KINDS[kind].options))}")
        opts[name] = value
    return kind, body.strip(), opts


def _spec(spec: str, **run) -> Spec:
    kind, body, opts = parse_spec(spec)
    return Spec(spec, kind, body, opts, KINDS[kind].usage, **run)


def index_targets(spec: str) -> list[tuple[str, str]]:
    """The indexes ``make_source(spec)`` builds: ``("tar", path)`` for each tar shard (given, or
    met in a folder) of ``sa1b`` / ``sgt_pairs``, ``("jsonl", url)`` for a remote ``llava`` .jsonl
    (the only cached kinds; see ``sgt_jax.data.index``). Paths resolve as in ``make_source``."""
    s = _spec(spec)
    try:
        return KINDS[s.kind].index_targets(s)
    except (ValueError, OSError) as e:
        raise s.error(str(e)) from e


def build_index(kind: str, path: str, *, workdir: str | None, fill_all: bool = True) -> dict:
    """Build (or find cached) the index of one ``index_targets`` entry, as ``make_source`` with
    this ``workdir`` would; returns its stats: ``cached``, ``members``, ``reads``,
    ``bytes_read``."""
    cache_dir = fileio.join(workdir, "index_cache") if workdir else None
    stats: dict = {}
    _INDEXES[kind](path, cache_dir, stats=stats, fill_all=fill_all)
    return stats


def make_source(spec: str, *, seed: int, workdir: str | None = None):
    """Build a source from a spec string (grammar in the package docstring; options in each
    kind's module)."""
    s = _spec(spec, seed=seed, workdir=workdir)
    try:
        return KINDS[s.kind].from_spec(s)
    except SpecError:
        raise
    except (ValueError, OSError, ImportError) as e:
        raise s.error(str(e)) from e
