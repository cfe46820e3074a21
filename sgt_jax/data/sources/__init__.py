"""Data sources: random-access readers that turn files on disk into records (``records.py``).

Modules: ``images`` (decoding), ``cache`` / ``tar`` / ``jsonl`` (indexes and their caches),
``files`` (file sets, keyed files), ``base`` (reasons, ``Kind``, ``Spec``, ``_Source``,
``SkippingSource``), one module per format, ``registry`` (``KINDS``: the one table of spec
kinds; ``make_source``). A new format: a module with its ``Kind`` and one row in ``KINDS``.

Every source is a Grain ``RandomAccessDataSource`` (``__len__``, ``__getitem__(i) -> record``,
a stable ``__repr__`` for checkpointing; picklable, thread-safe, no open file handles kept), and
raises ``BadRecord(reason, source, key)`` for a record it cannot deliver. Reason keys are stable
counter names (``REASONS``):

  missing_file          an image / annotation / mask file named by the index is not there
  path_outside_root     a path taken from data (a record's image / file_name, a symlink in a
                        data folder) leaves its root: absolute, ``..``, a symlink out, another
                        bucket or scheme (``fileio.resolve_inside``); never opened
  read_error            a file or tar member could not be read (I/O error, truncated shard)
  corrupt_image         an image that does not decode (truncated JPEG, not an image, 0 pixels)
  image_too_large       more pixels than ``max_pixels`` (decompression-bomb guard)
  bad_annotation        broken annotation: unparsable JSON, broken RLE (run lengths out of
                        range, not integers), mask size != image size, an image entry that is
                        no path
  no_masks              a segmentation record without any mask / segment
  bad_json              a LLaVA line / row that is not a JSON object
  bad_conversation      LLaVA turns missing, roles not human/gpt alternating, no gpt turn
  bad_text              a turn whose text is not valid Unicode (a lone surrogate such as
                        ``"\ud800"``: valid JSON, but no tokenizer encodes it)
  placeholder_mismatch  number of ``<image>`` placeholders (human turns) != number of images
  unsupported           a record kind this reader does not handle (e.g. LLaVA ``video``)

Use ``SkippingSource`` (or catch ``BadRecord`` and count ``e.reason``) to skip and count them.
Records dropped while indexing (a key without its image; a damaged tar header) are counted once
by ``source.index_counts()`` under the same reasons.

Spec grammar (``make_source``)::

    spec     := KIND ":" BODY [ "?" OPTIONS ]
    OPTIONS  := NAME "=" VALUE ( "&" NAME "=" VALUE )*
    PATHS    := PATH ( "," PATH )*     each a directory (walked recursively; ``*.tar`` files found
                                        there are read as shards), an uncompressed ``.tar`` shard,
                                        or a glob of those
    PATH, FILE, DIR ...                 a local path or a URL (``gs://bucket/x``, any fsspec URL;
                                        gs:// needs gcsfs), also in ``list=`` and image roots

    kinds (one module each, its options in its docstring; unknown option names are an error):
    sa1b:PATHS                            sa1b.py       raw SA-1B (COCO RLE), rendered target
    sgt_pairs:PATHS                       sgt_pairs.py  image + pre-rendered colour-mask PNG
    coco_panoptic:JSON::PNG_DIR::IMAGE_DIR  coco.py     COCO panoptic PNGs
    coco_instances:JSON::IMAGE_DIR        coco.py       instances JSON via pycocotools, rendered
    coco_scene:JSON::IMAGE_DIR            coco_scene.py instances as scene records (proxy tasks:
                                                        boxes, classes, masks)
    llava:FILE[::IMAGE_ROOT]              llava.py      .jsonl / .json (list) / .parquet SFT data
    synthetic_seg:[DIR], synthetic_vqa:[DIR]  synthetic.py  the built-in scenes (seg / VQA)
    tfds:NAME:SPLIT                       tfds.py       a prepared TFDS dataset (ArrayRecord):
                                                        COCO panoptic / instances as coco.py
    every seg kind also takes max_pixels=N (default 67108864) and max_side=N (downscale image and
    target so the long side <= N; the target by nearest neighbour, colours stay exact); the COCO
    kinds (coco_panoptic, coco_instances, tfds) and sgt_pairs take subset=N[&subset_seed=S]: the
    N image ids (keys) ``base.subset_ids`` ranks first, the same images in every reader and task.

    examples:  sa1b:/data/sa1b/sa_00000*.tar      sgt_pairs:/data/SAM-SGT?max_side=1024
               llava:/data/ov/all_data.jsonl::/data/ov/images      synthetic_seg:?n=5000

The run seed (``make_source(..., seed=)``) only affects rendered colours (SA-1B, COCO
instances, ``colors=render``); the synthetic scenes themselves depend on ``gen_seed``.
Tar shards are indexed once (member offsets; with ``workdir`` the index is cached under
``WORKDIR/index_cache``) and read by offset -- never extracted. Compressed tars cannot be read
by offset: decompress them first.

URLs go through ``sgt_jax.fileio`` (local paths take the same code as before): a file or a tar
member is one ranged read per sample; a remote tar is indexed from its headers (``tarfile`` over
a read-ahead window of ``tar.TAR_READAHEAD`` bytes per member, or in big windows when members are
small: ``tar.TAR_STREAM_BELOW``; never the whole shard otherwise; shards in parallel) and its index
cached in the local cache (``fileio.local_cache_dir('index_cache')``) and in
``WORKDIR/index_cache`` (also when that is a URL), keyed by URL, size and generation / etag; a
remote .jsonl is indexed in one streaming pass (its line index cached the same way).
``python -m sgt_jax.data.index`` builds all the indexes of a run config once. Sources hold paths
only (no filesystem objects), so each Grain worker process opens its own. A URL workdir's
synthetic data is generated into the local cache (``synthetic._synthetic_dir``).
"""
from sgt_jax.data.sources.base import REASONS, SEG_OPTIONS, Kind, SkippingSource, Spec, SpecError, subset_ids
from sgt_jax.data.sources.coco import CocoInstancesSource, CocoPanopticSource
from sgt_jax.data.sources.files import FileSet, expand_paths
from sgt_jax.data.sources.images import DEFAULT_MAX_PIXELS, _ImageError, decode_image
from sgt_jax.data.sources.jsonl import _jsonl_index
from sgt_jax.data.sources.llava import IMAGE_PLACEHOLDER, LlavaSource
from sgt_jax.data.sources.registry import KINDS, build_index, index_targets, make_source, parse_spec
from sgt_jax.data.sources.sa1b import SA1BSource
from sgt_jax.data.sources.sgt_pairs import SgtPairsSource
from sgt_jax.data.sources.synthetic import SyntheticSeg, SyntheticVqa
from sgt_jax.data.sources.tar import _tar_members
from sgt_jax.data.sources.tfds import TfdsSource

__all__ = ["REASONS", "SEG_OPTIONS", "Kind", "SkippingSource", "Spec", "SpecError", "CocoInstancesSource",
           "CocoPanopticSource", "FileSet", "expand_paths", "DEFAULT_MAX_PIXELS", "decode_image",
           "IMAGE_PLACEHOLDER", "LlavaSource", "KINDS", "build_index", "index_targets", "make_source",
           "parse_spec", "SA1BSource", "SgtPairsSource", "SyntheticSeg", "SyntheticVqa", "TfdsSource",
           "subset_ids"]
