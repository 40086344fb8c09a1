"""The whole study's metric stage at N = 50,000 against the time of its own kNN searches.

    python benchmarks/study_50k.py                    # the issue's setting (tens of minutes)
    python benchmarks/study_50k.py --n 5000           # quick
    python benchmarks/study_50k.py --output benchmarks/results/study_50k.json

The study as `harness cknna` runs it (`results.compute`): 5 models (D_A = 2304 and
4 x 2048, the features of `benchmarks/study_stage.py`), D_B = 7, k = 5, 10, 20, mutual
kNN, pairwise, 1000 permutations over episode groups (episodes of 20 to 80 samples),
--compare with 200 paired subsets of whole episodes. Times the searches (every
`knn` call the stage makes) and the stage; peak memory is the process's VmHWM, reset
just before the stage, over the resident set the inputs already hold (an N x N float32
matrix at 50k would be 10 GB). Prints one JSON object; nothing is asserted."""
from __future__ import annotations

import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import study_stage  # noqa: E402
from large_study import rss_mb  # noqa: E402

from harness.cknna import core as cknna  # noqa: E402
from harness.study.results import Settings, compute  # noqa: E402
from harness.data.states import l2_rows  # noqa: E402
from harness.io import write_json  # noqa: E402


def episodes(n: int, seed: int) -> torch.Tensor:
    """Episode labels of random lengths 20..80, in sample order."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 81, (n // 20 + 1,), generator=g)
    return torch.repeat_interleave(torch.arange(len(lengths)), lengths)[:n]


def run(n: int, permutations: int, draws: int, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        paths = study_stage.make_inputs(Path(tmp), n, study_stage.DIMS_A, 7, seed)
        models = {p.parent.name: (str(p), l2_rows(torch.load(p, weights_only=True))) for p in paths}
        states = l2_rows(torch.load(Path(tmp) / "feats_B.pt", weights_only=True))
    groups = episodes(n, seed)
    settings = Settings(ks=list(study_stage.KS), permutations=permutations, subsample_draws=draws,
                        seed=seed, pairwise=True, compare=True, groups=groups,
                        groups_source="synthetic episodes")
    searched = [0.0]
    search = cknna.knn

    def timed_knn(*args, **kwargs):
        start = time.perf_counter()
        try:
            return search(*args, **kwargs)
        finally:
            searched[0] += time.perf_counter() - start

    cknna.knn = timed_knn
    before = rss_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        compute(models, states, "feats_B.pt", settings, {})
    stage = time.perf_counter() - start
    cknna.knn = search
    return {"n": n, "models": len(models), "k": list(study_stage.KS), "permutations": permutations,
            "compare_draws": draws, "episodes": int(groups.max()) + 1,
            "threads": torch.get_num_threads(), "stage_s": stage, "knn_searches_s": searched[0],
            "stage_over_searches": stage / searched[0],
            "peak_extra_mb": rss_mb("VmHWM") - before}


def main() -> None:
    p = study_stage.parser(__doc__, 50_000)
    p.add_argument("--output", help="also write the JSON here (atomically), e.g. "
                                    "benchmarks/results/study_50k.json")
    args = p.parse_args()
    result = run(args.n, args.permutations, args.draws, args.seed)
    print(json.dumps(result, indent=1))
    if args.output:
        write_json(args.output, result)
    print(f"N={args.n}: stage {result['stage_s']:.1f} s, its kNN searches {result['knn_searches_s']:.1f} s "
          f"({result['stage_over_searches']:.2f}x); peak extra {result['peak_extra_mb']:.0f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
