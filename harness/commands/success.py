"""`python -m harness success`: rank correlation of CKNNA with task success, from a table.

Reads a CSV with one row per model (e.g. the seed authors' `cknna_3way_5k.csv`), takes
Spearman's rho of each CKNNA column with the success column and a bootstrap interval
that resamples models; rows with an empty or non-numeric cell are left out and named."""
from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

from harness.study import success
from harness.errors import HarnessError
from harness.io import check_output_file, write_json


def register(sub) -> None:
    p = sub.add_parser("success", help="Spearman correlation of CKNNA with task success "
                                       "across models, from a CSV", description=__doc__)
    p.add_argument("--csv", required=True, metavar="FILE", help="one row per model, with a header")
    p.add_argument("--cknna_column", nargs="+", required=True, metavar="C",
                   help="CKNNA column(s), each correlated with the success column")
    p.add_argument("--success_column", required=True, metavar="S",
                   help="task success per model (any scale: ranks are used)")
    p.add_argument("--label_column", metavar="L", help="model names (default: the first column)")
    p.add_argument("--draws", type=int, default=success.DRAWS, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="F.json", help="write the records here (atomically)")
    p.add_argument("--plot", metavar="F.png", help="scatter plot, one panel per CKNNA column")
    p.set_defaults(func=run)


def read_table(path: Path) -> tuple[list[str], list[dict]]:
    if not path.is_file():
        raise HarnessError(f"--csv {path}: no such file")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise HarnessError(f"--csv {path}: not a readable CSV ({err})") from None
    if not header or not rows:
        raise HarnessError(f"--csv {path}: no header or no rows")
    return header, rows


def number(cell) -> float | None:
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def run(args: argparse.Namespace) -> int:
    for path, what in ((args.output, "--output"), (args.plot, "--plot")):
        if path:
            check_output_file(path, what)
    if args.draws < 1:
        raise HarnessError(f"--draws {args.draws}: must be >= 1")
    path = Path(args.csv)
    header, rows = read_table(path)
    label = args.label_column or header[0]
    for column, flag in [(label, "--label_column"), (args.success_column, "--success_column")] + [
            (c, "--cknna_column") for c in args.cknna_column]:
        if column not in header:
            raise HarnessError(f"{flag} {column!r}: not a column of {path} (columns: {', '.join(header)})")
    names = [r[label] for r in rows]
    if len(set(names)) != len(names):
        raise HarnessError(f"--label_column {label!r}: model names repeat in {path}")
    rates = {r[label]: number(r[args.success_column]) for r in rows}
    records = {c: success.correlate({r[label]: number(r[c]) for r in rows}, rates,
                                    args.draws, args.seed) for c in args.cknna_column}
    out = {"_meta": {"csv": str(path), "label_column": label, "success_column": args.success_column,
                     "method": "Spearman rank correlation (average ranks for ties); percentile "
                               "bootstrap interval resampling models with replacement",
                     "draws": args.draws, "seed": args.seed},
           "correlations": records}
    from harness.study.report.success import rho_text
    for column, record in records.items():
        left = f"; left out: {', '.join(record['left_out'])}" if record["left_out"] else ""
        print(f"{column} vs {args.success_column}: {rho_text(record)}{left}")
    if args.plot:
        from harness.study.report.success import success_vs_cknna
        success_vs_cknna(list(records.items()), args.plot, args.success_column)
    if args.output:
        write_json(args.output, out)
        print(f"[success] wrote {args.output}", file=sys.stderr)
    return 0
