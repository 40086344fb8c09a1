"""`python -m harness run [CONFIG.toml]`: the whole study in one command.

Without a config it runs the built-in demo: synthetic data and tiny random-weight
stand-ins of every model family, on CPU, into ./harness_out/demo."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


LABELS = {"json": "results", "markdown": "report", "html": "report (HTML, figures embedded)"}


def register(sub) -> None:
    p = sub.add_parser("run", help="data check -> extraction -> metrics -> report",
                       description=__doc__)
    p.add_argument("config", nargs="?", help="study config (TOML); omit for the demo")
    p.add_argument("--output_dir", "--output-dir", dest="output_dir", default=None,
                   help="where features and the report go (default: the config's, or "
                        "harness_out/demo for the demo)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (default: the config's `threads`, else chosen from "
                        "the CPUs free to this process; see README, Threads)")
    p.set_defaults(func=run)


def chance_summary(results: dict) -> str:
    """One line: how many of the report's values clear their chance level."""
    from harness.cknna.chance import records

    found = [rec for _, rec in records(results)]
    mt = results["_meta"].get("multiple_testing") or {}
    if not found:
        return "chance levels: not computed (permutations = 0); bare CKNNA values cannot be read alone"
    above = sum(bool(r.get("above_chance")) for r in found)
    return (f"above chance: {above} of {len(found)} CKNNA values ({mt.get('method')} adjusted "
            f"p < {mt.get('alpha')}; the report marks the others 'at chance')")


def run(args: argparse.Namespace) -> int:
    from harness.study import pipeline
    from harness.extractors.engine import state_input
    from harness.errors import HarnessError
    from harness.study.report.markdown import report_files

    if args.threads is not None and args.threads < 1:
        raise HarnessError(f"--threads must be >= 1, got {args.threads}")
    out = Path(args.output_dir) if args.output_dir else None
    if args.config:
        study = pipeline.load_config(args.config, output_dir=out)
    else:
        study = pipeline.default_study(out or Path("harness_out/demo"))
        print(f"[run] built-in demo. {pipeline.STAND_IN_NOTICE}", file=sys.stderr)
    if args.threads is not None:
        study.threads = args.threads
    results = pipeline.run_study(study)
    failed = [n for n, s in results["_meta"]["study"]["models"].items() if s["status"] == "failed"]
    files = report_files(results, study.output_dir)
    report = files["markdown"]
    if study.stand_ins:
        print(pipeline.STAND_IN_NOTICE)
    print(chance_summary(results))
    for name, path in files.items():
        print(f"{LABELS.get(name, 'figure')}: {path}")
    for line in state_input.console_lines(results):
        print(line)
    if failed:
        print(f"failed models: {', '.join(failed)} (details in {report})")
        return 1
    return 0
