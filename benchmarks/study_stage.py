"""The whole study's metric stage against the seed-style dense computation of ONE model,
timed in the same run, and the stage's peak extra memory.

    python benchmarks/study_stage.py                     # the issue's setting, N = 5000
    python benchmarks/study_stage.py --n 1000            # quick

The stage is one `python -m harness cknna` call, as a user runs it: 5 models (D_A = 2304
and 4 x 2048), D_B = 7, k = 5, 10, 20, mutual kNN, pairwise, 1000 permutations and
--compare with 200 paired subsets. Its time is the call's wall time minus the same
call on a tiny input with 1 permutation and 2 subsets (CLI start-up: interpreter,
imports, file reads). The baseline is
the dense reference formula (tests/dense_reference.py, float32 like the seed) for the
2304-D model at k = 5, 10, 20 with mutual kNN, in this process. Peak extra memory is
the call's peak resident set minus the tiny call's and minus the features it reads.
Prints one JSON object; nothing is asserted."""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.dense_reference import dense_cknna, dense_mutual_knn  # noqa: E402

KS = (5, 10, 20)
DIMS_A = (2304, 2048, 2048, 2048, 2048)


def make_inputs(root: Path, n: int, dims_a, dim_b: int, seed: int) -> list[Path]:
    """States and models with a little shared structure (model i sees the states with
    weight 1 / (i + 1)), written like the seed's folders."""
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(n, dim_b, generator=g)
    torch.save(states, root / "feats_B.pt")
    paths = []
    for i, d in enumerate(dims_a):
        mix = torch.randn(dim_b, d, generator=g) / (i + 1)
        feats = states @ mix + torch.randn(n, d, generator=g)
        (root / f"model{i}").mkdir()
        torch.save(feats, root / f"model{i}" / "feats_A.pt")
        paths.append(root / f"model{i}" / "feats_A.pt")
    return paths


def stage_command(root: Path, paths, permutations: int, draws: int) -> list[str]:
    return [sys.executable, "-m", "harness", "cknna", "--feats_A", *map(str, paths),
            "--feats_B", str(root / "feats_B.pt"), "--topk", *map(str, KS), "--also_mutual_knn",
            "--pairwise", "--permutations", str(permutations), "--compare",
            "--subsample", str(draws), "--output", str(root / "results.json")]


def timed_call(cmd) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"stage failed: {proc.stderr.strip().splitlines()[-1:]}")
    return seconds, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def dense_one_model(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {k: (dense_cknna(a, b, k, torch.float32), dense_mutual_knn(a, b, k, torch.float32))
            for k in KS}


def run(n: int = 5000, permutations: int = 1000, draws: int = 200, dims_a=DIMS_A,
        dim_b: int = 7, seed: int = 0, dense: bool = True) -> dict:
    out = {"n": n, "dims_a": list(dims_a), "dim_b": dim_b, "k": list(KS),
           "permutations": permutations, "compare_draws": draws,
           "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tiny_root, full_root = Path(tmp, "tiny"), Path(tmp, "full")
        tiny_root.mkdir()
        full_root.mkdir()
        # 100: the --compare f/2 = 0.25 subsets must hold more than k = 20 samples.
        tiny = make_inputs(tiny_root, 100, dims_a, dim_b, seed)
        full = make_inputs(full_root, n, dims_a, dim_b, seed)
        # Tiny first: RUSAGE_CHILDREN keeps the largest child so far.
        # Start-up: the same flags on 100 samples with 1 permutation and 2 subsets
        # (interpreter, imports, file reads, every code path once; no real work). Called twice:
        # the first call may compile and cache the numba kernels (a one-time cost per
        # install, reported as `first_call_s`), the second is the start-up every run pays.
        out["first_call_s"], _ = timed_call(stage_command(tiny_root, tiny, 1, 2))
        out["startup_s"], out["startup_peak_mb"] = timed_call(stage_command(tiny_root, tiny, 1, 2))
        wall, peak = timed_call(stage_command(full_root, full, permutations, draws))
        out["stage_wall_s"], out["stage_peak_mb"] = wall, peak
        out["stage_s"] = wall - out["startup_s"]
        inputs_mb = (sum(p.stat().st_size for p in full) + (full_root / "feats_B.pt").stat().st_size) / 2**20
        out["inputs_mb"] = inputs_mb
        out["stage_extra_mb"] = peak - out["startup_peak_mb"] - inputs_mb
        out["command"] = " ".join(stage_command(Path("DIR"), ["DIR/modelI/feats_A.pt"], permutations, draws)[1:])
        if dense:
            a = torch.load(full[0], weights_only=True)
            b = torch.load(full_root / "feats_B.pt", weights_only=True)
            a, b = (torch.nn.functional.normalize(x, dim=1) for x in (a, b))
            start = time.perf_counter()
            dense_one_model(a, b)
            out["dense_one_model_s"] = time.perf_counter() - start
            out["speedup_vs_dense_one_model"] = out["dense_one_model_s"] / out["stage_s"]
    return out


def parser(doc: str, n: int) -> argparse.ArgumentParser:
    """The options this benchmark and benchmarks/study_50k.py share."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=n)
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--draws", type=int, default=200, help="--compare subsets")
    p.add_argument("--seed", type=int, default=0)
    return p


def main() -> None:
    p = parser(__doc__, 5000)
    p.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    args = p.parse_args()
    result = run(args.n, args.permutations, args.draws, seed=args.seed, dense=not args.no_dense)
    print(json.dumps(result, indent=1))
    if "speedup_vs_dense_one_model" in result:
        print(f"whole study stage {result['stage_s']:.2f} s vs dense one model "
              f"{result['dense_one_model_s']:.2f} s: {result['speedup_vs_dense_one_model']:.2f}x; "
              f"peak extra {result['stage_extra_mb']:.0f} MB", file=sys.stderr)


if __name__ == "__main__":
    main()
