"""CLI: ``python -m sgt_jax.convert import|export ...`` (see docs/convert.md).

Exit status 0 on success, 2 on a refused checkpoint (the message lists every offending name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sgt_jax.convert", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    im = sub.add_parser("import", help="BAGEL release layout -> sgt-jax model dir (Orbax)")
    im.add_argument("--from", dest="src", required=True,
                    help="BAGEL dir (ema.safetensors or model.safetensors, possibly sharded with an index json; "
                         "llm_config.json, vit_config.json, ae.safetensors, tokenizer files), or a weights file")
    im.add_argument("--to", dest="dst", required=True, help="model dir to create")
    im.add_argument("--weights", default=None,
                    help="'ema' or 'model' (default: ema when present), or a .safetensors / index json path")
    im.add_argument("--latent-patch-size", type=int, default=2, help="BAGEL latent_patch_size (default 2)")
    im.add_argument("--max-latent-size", type=int, default=64, help="BAGEL max_latent_size (default 64)")
    im.add_argument("--vit-max-patches-per-side", type=int, default=70,
                    help="BAGEL vit_max_num_patch_per_side (default 70)")
    im.add_argument("--timestep-shift", type=float, default=1.0, help="BAGEL timestep_shift (default 1.0)")
    im.add_argument("--preset", default="bagel_7b", choices=["bagel_7b", "tiny"],
                    help="base config for what the files do not hold (training settings, special token ids "
                         "when there is no tokenizer)")
    im.add_argument("--no-vae", action="store_true", help="import without ae.safetensors")
    im.add_argument("--vae-scale-factor", type=float, default=None, help="override FLUX's 0.3611")
    im.add_argument("--vae-shift-factor", type=float, default=None, help="override FLUX's 0.1159")
    im.add_argument("--compress", action="store_true", help="zstd-compress the Orbax chunks")
    ex = sub.add_parser("export", help="sgt-jax model dir -> BAGEL release layout")
    ex.add_argument("--from", dest="src", required=True,
                    help="model dir, or a training run / checkpoint (RUN, RUN/checkpoints or RUN/checkpoints/<step>)")
    ex.add_argument("--to", dest="dst", required=True, help="directory to write")
    ex.add_argument("--ema", action="store_true",
                    help="export the EMA weights of a training checkpoint (default: its raw parameters); a "
                         "model dir holds one set of weights, so it is accepted and ignored there")
    ex.add_argument("--dtype", choices=["bf16", "fp32"], default=None,
                    help="dtype of the Bagel weights (default: as stored); ae.safetensors keeps its stored dtype")
    ex.add_argument("--shard-size", default=None,
                    help="e.g. 5GB: HF-style shards + <name>.safetensors.index.json (default: one file)")
    ex.add_argument("--weights-name", default=None,
                    help="file stem: default 'ema' for one file (ema.safetensors, what BAGEL's app/inferencer "
                         "load) and 'model' when sharded (model-0000i-of-0000N + model.safetensors.index.json)")
    for p in (im, ex):
        p.add_argument("--arch", choices=["bagel", "omnigen2"], default="bagel",
                       help="bagel (default) or omnigen2 (mllm/ + transformer/ of an OmniGen2 release <-> "
                            "an OmniGen2 model dir; the BAGEL-only options do not apply; docs/omnigen2.md)")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--stats", default=None, help="write timing / throughput / peak RSS as JSON here")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from sgt_jax import fileio
    from sgt_jax.convert.bagel_io import export_bagel, import_bagel
    from sgt_jax.convert.model_dir import ModelDirError
    from sgt_jax.convert.safetensors_io import ConversionError

    try:
        if args.arch == "omnigen2":
            from sgt_jax.convert import omnigen2_io

            fn = omnigen2_io.import_omnigen2 if args.cmd == "import" else omnigen2_io.export_omnigen2
            stats = fn(args.src, args.dst, overwrite=args.overwrite, progress=not args.no_progress)
        elif args.cmd == "import":
            stats = import_bagel(
                args.src, args.dst, latent_patch_size=args.latent_patch_size, max_latent_size=args.max_latent_size,
                vit_max_patches_per_side=args.vit_max_patches_per_side, timestep_shift=args.timestep_shift,
                preset=args.preset, weights=args.weights, no_vae=args.no_vae,
                vae_scale_factor=args.vae_scale_factor, vae_shift_factor=args.vae_shift_factor,
                compress=args.compress, overwrite=args.overwrite, progress=not args.no_progress)
        else:
            from sgt_jax.train.export import checkpoint_to_model_dir, is_training_checkpoint

            if is_training_checkpoint(args.src):       # a run: through a model dir next to the output
                tmp = fileio.abspath(args.dst) + ".model_dir"
                info = checkpoint_to_model_dir(args.src, tmp, ema=args.ema, overwrite=True)
                print(f"training checkpoint step {info['step']} ({info['weights']}) -> {tmp}")
                args.src, args.ema = tmp, False
            stats = export_bagel(args.src, args.dst, dtype=args.dtype, shard_size=args.shard_size,
                                 weights_name=args.weights_name, overwrite=args.overwrite,
                                 progress=not args.no_progress, ema=args.ema)
    except (ConversionError, ModelDirError, fileio.BackendMissingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.cmd}: {stats['bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s = {stats['gb_per_s']:.3f} GB/s, "
          f"peak RSS {stats['peak_rss_gb']:.2f} GB -> {args.dst}")
    if args.stats:
        fileio.write_text(args.stats, json.dumps({"cmd": args.cmd, "src": args.src, "dst": args.dst, **stats},
                                                 indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
