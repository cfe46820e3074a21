"""``python -m sgt_jax.aot``: the command line (flags in ``main``; usage in the package doc)."""
from __future__ import annotations

import json
import sys

from sgt_jax.aot.costs import cost_probe, reestimate
from sgt_jax.aot.report import analyse, format_report, table
from sgt_jax.aot.topology import libtpu_available, parse_topology, topology_devices

def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a configs/<preset>.py file", lock_config=True)
    flags.DEFINE_string("topology", None, "v5p-64, v6e-64, v5e-16, v4-32, 2xv5p-64, ...")
    flags.DEFINE_string("out", None, "write the report as JSON here")
    flags.DEFINE_string("serialize", None, "write the compiled executable here (local path or gs://)")
    flags.DEFINE_enum("costs", "yes", ["yes", "no", "always"],
                      "the FLOP / step-time probes (3 small compiles + the VAE alone): yes = when the step fits")
    flags.DEFINE_enum("components", "auto", ["auto", "yes", "no"],
                      "compile the VAE encode and the model fwd+bwd alone (auto: when HBM is short)")
    flags.DEFINE_integer("doc_tokens", 3000, "document length of the nominal batch for the model FLOP count")
    flags.DEFINE_multi_string("xla", [], "compiler option key=value (e.g. xla_tpu_enable_...=true)")
    flags.DEFINE_multi_string("table", [], "print a markdown table of these JSON reports and exit")
    flags.DEFINE_multi_string("reestimate", [], "recompute the estimate of these JSON reports in place and exit")
    flags.DEFINE_string("add_costs", None, "run only the cost probes for --config/--topology and add them to "
                        "this existing JSON report (of the same config) in place")

    def run(args):
        del args
        F = flags.FLAGS
        if F.reestimate:
            for p in F.reestimate:
                with open(p) as fh:
                    r = reestimate(json.load(fh))
                with open(p, "w") as fh:
                    json.dump(r, fh, indent=1, default=str)
                print(format_report(r))
            return 0
        if F.table:
            print(table(F.table))
            return 0
        if F.config is None or F.topology is None:
            print("--config and --topology are required", file=sys.stderr)
            return 2
        opts = {}
        for kv in F.xla:
            k, _, v = kv.lstrip("-").partition("=")
            opts[k] = v
        ok, why = libtpu_available()
        if not ok:
            print(f"[aot] {why}", file=sys.stderr)
            return 2
        if F.add_costs:
            with open(F.add_costs) as fh:
                r = json.load(fh)
            topo = parse_topology(F.topology)
            r["costs"] = cost_probe(F.config, topo, topology_devices(topo), opts, log=lambda s: print(s, flush=True))
            r = reestimate(r)
            with open(F.add_costs, "w") as fh:
                json.dump(r, fh, indent=1, default=str)
            print(format_report(r))
            return 0
        comps = {"auto": None, "yes": True, "no": False}[F.components]
        if F.serialize:   # an executable out of the persistent cache may not re-serialise (XLA:CPU does not)
            import jax

            jax.config.update("jax_enable_compilation_cache", False)
        r = analyse(F.config, F.topology, costs={"yes": True, "no": False, "always": "always"}[F.costs], components=comps, doc_tokens=F.doc_tokens, compiler_options=opts,
                    serialize=F.serialize, log=lambda s: print(s, flush=True))
        r["command"] = "python -m sgt_jax.aot " + " ".join(sys.argv[1:])
        print(format_report(r), flush=True)
        if F.out:
            with open(F.out, "w") as fh:
                json.dump(r, fh, indent=1, default=str)
            print(f"[aot] report -> {F.out}")
        return 0 if r["fits"] else 3

    app.run(run, argv=argv)
    return 0
