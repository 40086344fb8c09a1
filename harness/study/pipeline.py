"""The whole study: data check -> extraction per model (own process) -> metrics -> report.

Replaces the seed's run_cknna_simplerenv.sh. Each model is extracted by
`python -m harness extract ...` in a subprocess run by that model's interpreter, because
the real checkpoints need different transformers versions. A model whose features exist
with the same request and dataset is reused; a failing model is recorded and the study
goes on with the others. Everything is checked before any work starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from harness.cknna import chance
from harness.study import config as config_mod
from harness.study.checks import cuda_problem, k_problems, quick_n
from harness import data as data_mod
from harness.cknna import horizons as horizons_mod
from harness import locks
from harness import progress
from harness import provenance as prov
from harness.study import success
from harness.extractors.engine import state_input
from harness.data import states as states_mod
from harness import threads as threads_mod
from harness.cknna import views as views_mod
from harness.study.config import LaxPath, ModelEntry, StudyConfig
from harness.errors import HarnessError
from harness.cknna.significance import fraction_for
from harness.extractors.engine.registry import families
from harness.extractors.engine.features import FEATS, METADATA
from harness.io import check_output_dir, load_features, write_json

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REQUEST = "pipeline_request.json"
COMPARE_DRAWS = 200  # shared subsets behind the paired model comparisons
STAND_IN_NOTICE = ("These are tiny RANDOM-WEIGHT stand-ins of each model family on synthetic "
                   "data: the numbers exercise the pipeline and mean nothing about real models.")


Model = ModelEntry  # one [[models]] row (kept under its old name)


class Study(StudyConfig):
    """A checked config plus what only the built-in demo sets."""

    synthetic: Optional[dict] = None  # {"n": N, "seed": S}: build data_dir if absent
    stand_ins: bool = False
    config_path: Optional[LaxPath] = None

    @property
    def ks(self) -> list[int]:
        return self.k_values

    @property
    def features_dir(self) -> Path:
        return self.output_dir / "features"


# ------------------------------------------------------------------ configuration

def default_study(output_dir: Path) -> Study:
    """The built-in demo: synthetic data and every family's tiny stand-ins, on CPU."""
    models = [ModelEntry(name=name, family=spec.name, ckpt=ckpt, options=dict(options))
              for spec in families().values() for name, ckpt, options in spec.demo]
    return Study(data_dir=output_dir / "data", output_dir=output_dir, models=models,
                 permutations=400, synthetic={"n": 200, "seed": 0}, stand_ins=True)


def load_config(path: str | os.PathLike, output_dir: Path | None = None) -> Study:
    """Read and type-check a study config (`harness.study.config`); every problem at once,
    `k_values` against the data's N included."""
    try:
        config = config_mod.load(path)
    except config_mod.ConfigError as err:
        raw, base = err.raw, Path(path).resolve().parent
        data_dir, ks = raw.get("data_dir"), raw.get("k_values", [5, 10, 20])
        drop_empty = raw.get("drop_empty_tasks") is True
        n = quick_n(base / os.path.expanduser(data_dir), drop_empty) \
            if isinstance(data_dir, str) else None
        if n is None or not isinstance(ks, list):
            raise
        told = " ".join(err.problems)  # a k the schema already refused is not listed twice
        problems = err.problems + [p for p in k_problems(ks, n, drop_empty)
                                   if p.split(" =")[0] + ":" not in told]
        raise HarnessError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems)) from None
    fields = dict(config)
    if output_dir is not None:
        fields["output_dir"] = Path(output_dir)
    return Study(**fields, config_path=Path(path))


def check_paths(study: Study) -> None:
    """Fail before any work on a path that cannot be right, naming every such path."""
    problems = []
    try:
        check_output_dir(study.output_dir, "output_dir")
    except HarnessError as err:
        problems.append(str(err))
    if study.synthetic is None and not study.data_dir.is_dir():
        problems.append(f"data_dir {study.data_dir}: not a directory")
    for i, m in enumerate(study.models):
        where = f"models[{i}] ({m.name!r})"
        if m.feats is not None and not m.feats.is_file():
            problems.append(f"{where}.feats {m.feats}: no such file")
        if m.feats is None and not _runnable(m.python):
            problems.append(f"{where}.python {m.python}: not an executable")
        ckpt = m.ckpt or ""
        looks_local = ckpt.startswith((".", "/", "~")) or os.sep in ckpt and ckpt.count("/") > 1
        if looks_local and not Path(os.path.expanduser(ckpt)).exists():
            problems.append(f"{where}.ckpt {ckpt}: no such path")
        device = str(m.options.get("device", "auto"))
        if m.feats is None and device.startswith("cuda") and _runnable(m.python):
            problems += [f"{where}.options.device = {device!r}: {why}"
                         for why in [cuda_problem(m.python, device)] if why]
    if study.synthetic is None:
        n = quick_n(study.data_dir, study.drop_empty_tasks)
        problems += k_problems(study.k_values, n, study.drop_empty_tasks) if n else []
    _raise(study, problems)


def check_against_data(study: Study, n: int) -> None:
    """Checks that need N, the number of samples the metrics will see."""
    problems = k_problems(study.k_values, n, study.drop_empty_tasks)
    if n < 4:
        problems.insert(0, f"data_dir {study.data_dir}: N = {n} samples; CKNNA needs at least 4")
    _raise(study, problems)


def _raise(study: Study, problems: list[str]) -> None:
    if problems:
        where = study.config_path or "built-in demo"
        raise HarnessError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems))


def _runnable(python: str) -> bool:
    path = Path(python)
    if path.is_absolute() or os.sep in python:
        return path.is_file() and os.access(path, os.X_OK)
    from shutil import which
    return which(python) is not None


# ------------------------------------------------------------------ phases


def prepare_data(study: Study, log) -> int:
    """Build the synthetic set when asked (reused when present), check the directory and
    return N, the number of samples the metrics will see."""
    if study.synthetic is not None:
        meta_path = study.data_dir / "metadata.json"
        want = study.synthetic
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if not (meta.get("synthetic") and meta.get("num_samples") == want["n"]
                    and meta.get("seed") == want["seed"]):
                raise HarnessError(f"{study.data_dir}: holds other data than the synthetic "
                                   f"set asked for (n={want['n']}, seed={want['seed']})")
            log(f"data: reusing synthetic set at {study.data_dir}")
        else:
            from harness.data.synth import generate
            log(f"data: generating {want['n']} synthetic samples (seed {want['seed']})")
            generate(study.data_dir, n=want["n"], seed=want["seed"])
    report = data_mod.validate(study.data_dir, images="decode")
    if not report.ok:
        raise HarnessError(f"{study.data_dir}: {len(report.problems)} data problem(s), first: "
                           f"{report.problems[0]}; see `python -m harness data check`")
    log(f"data: {report.n} samples checked, {report.empty_tasks} empty tasks, "
        f"{report.duplicate_states} duplicate states")
    return report.n - (report.empty_tasks if study.drop_empty_tasks else 0)


def _flags(options: dict) -> list[str]:
    """{batch_size: 8, resume: true} -> ['--batch_size', '8', '--resume']."""
    out = []
    for key, value in options.items():
        flag = f"--{key}"
        if value is True:
            out.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            out += [flag, *map(str, value)]
        else:
            out += [flag, str(value)]
    return out


def extract_model(study: Study, m: Model, fingerprint: str, log) -> dict:
    """Extract (or reuse) one model's features; returns its status record."""
    out = study.features_dir / m.name
    request = m.request(fingerprint)
    request_path = out / REQUEST
    done = (out / FEATS).is_file() and (out / METADATA).is_file()
    if done and request_path.is_file() and json.loads(request_path.read_text()) == request:
        log(f"extract {m.name}: reusing {out / FEATS}")
        return {"status": "reused", "feats_A_path": str(out / FEATS)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(request_path, request)
    cmd = [m.python, "-m", "harness", "extract", m.family, "--ckpt", m.ckpt,
           "--data_dir", str(study.data_dir), "--output_dir", str(out), "--resume",
           *_flags(m.options)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(PROJECT_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    log(f"extract {m.name}: {' '.join(cmd[1:])}")
    start = time.perf_counter()
    returncode = run_logged(cmd, env, out / "extract.log",
                            lambda line: log(f"extract {m.name}: {line}"))
    seconds = round(time.perf_counter() - start, 1)
    if returncode != 0:
        attempt = (out / "extract.log").read_text(errors="replace").rsplit("===== attempt", 1)[-1]
        tail = attempt.strip().splitlines()[1:][-5:]
        log(f"extract {m.name}: FAILED (exit {returncode}); see {out / 'extract.log'}")
        return {"status": "failed", "exit_code": returncode, "seconds": seconds,
                "log": str(out / "extract.log"), "error": "\n".join(tail)}
    return {"status": "extracted", "seconds": seconds, "feats_A_path": str(out / FEATS)}


def run_logged(cmd: list[str], env: dict, log_path: Path, relay) -> int:
    """Run `cmd`, appending all its output to `log_path` as it comes, after a header line
    per attempt (an earlier attempt's log is kept), and passing its progress and resume
    lines (`harness.progress`) to `relay`; returns the exit status."""
    with open(log_path, "a") as log_file, subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=os.getcwd(),
            text=True, errors="replace", bufsize=1) as proc:
        log_file.write(attempt_header(cmd))
        log_file.flush()
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if progress.relayed(line):
                relay(line.strip())
    return proc.returncode


def attempt_header(cmd: list[str]) -> str:
    """One line, so the attempts in a log are easy to find (`grep '^=====' extract.log`)."""
    command = " ".join(" ".join(cmd).split())
    return f"===== attempt started {prov.now()}: {command}\n"


def _layer_files(feats_path: Path) -> dict[str, Path]:
    meta_path = feats_path.parent / METADATA
    if not meta_path.is_file():
        return {}
    files = json.loads(meta_path.read_text()).get("layer_files", [])
    return {f.removeprefix("feats_A_layer").removesuffix(".pt"): feats_path.parent / f
            for f in files if f != FEATS}


def run_study(study: Study, log=None) -> dict:
    """All phases; returns the results dict (also written under output_dir)."""
    log = log or (lambda msg: print(f"[run] {msg}", file=sys.stderr, flush=True))
    check_paths(study)  # before the 0.2 s CPU sample: a refused config pays nothing
    threads = threads_mod.apply(threads_mod.choose(study.threads, "threads setting"))
    check_against_data(study, prepare_data(study, log))
    data = data_mod.load(study.data_dir)
    seq, horizons = future_states(study, data.metadata["num_samples"])
    with locks.output_lock(study.output_dir, "output_dir", note=log):  # one run per folder
        return _locked_run(study, log, data, seq, horizons, threads)


def _locked_run(study: Study, log, data, seq, horizons, threads) -> dict:
    """The work of `run_study` once every check has passed and the folder is ours."""
    import torch

    from harness.study.report.markdown import write_report
    from harness.study.results import Settings, compute

    clear_previous_report(study.output_dir, log)
    log(f"threads: {threads.describe()}")
    fingerprint = data_mod.fingerprint(study.data_dir)
    status = {}
    for m in study.models:
        if m.feats is not None:
            status[m.name] = {"status": "external", "feats_A_path": str(m.feats)}
        else:
            status[m.name] = extract_model(study, m, fingerprint, log)

    options = []
    if study.drop_empty_tasks:
        data, record = data_mod.drop_empty_tasks(data)
        options.append(record)
    states_path = study.data_dir / "feats_B.pt"
    states, zrecord = data.states, None
    if study.zscore_states:
        states, zrecord = states_mod.zscore(states, data.metadata.get("state_keys"))
    models, layers, views, view_masks = {}, {}, {}, {}
    for name, st in status.items():
        if "feats_A_path" not in st:
            continue
        path = Path(st["feats_A_path"])
        try:
            models[name] = (str(path), _rows(path, data))
            by_layer = {layer: _rows(p, data) for layer, p in _layer_files(path).items()}
            by_view, view_masks[name] = views_mod.load_views(path, data, _rows)
        except HarnessError as err:
            status[name] = dict(st, status="failed", error=str(err))
            log(f"metrics {name}: FAILED: {err}")
            continue
        if by_layer:
            layers[name] = by_layer
        if by_view:
            views[name] = {"full": models[name][1], **by_view}
    if not models:
        raise HarnessError("no model produced features; see the extract.log files under "
                           f"{study.features_dir}")
    groups = None
    if study.group_by == "episode" and data.episodes:
        groups = torch.tensor(data.episodes, dtype=torch.long)
        log(f"metrics: {len(set(data.episodes))} episodes; permutations and subsets move whole "
            "episodes; CKNNA also without same-episode neighbours")
    compare = study.compare and len(models) > 1
    settings = Settings(ks=study.ks, permutations=study.permutations, seed=study.seed,
                        pairwise=len(models) > 1, groups=groups,
                        groups_source="metadata.json episode_indices" if groups is not None else None,
                        side_by_side=groups is not None, compare=compare,
                        subsample_draws=COMPARE_DRAWS if compare else 0,
                        subsample_fraction=fraction_for(len(states), max(study.ks)))
    preprocessing = states_mod.record(zrecord, options)
    extra = {"study": {"config": str(study.config_path) if study.config_path else "built-in demo",
                       "data_dir": str(study.data_dir),
                       "dataset_fingerprint": fingerprint,
                       "stand_ins": study.stand_ins,
                       "threads": threads.record(),
                       "notice": STAND_IN_NOTICE if study.stand_ins else None,
                       "models": status}}
    states_l2 = states_mod.normalised(states_path, states)
    results = compute(models, states_l2, str(states_path), settings, preprocessing, extra,
                      layers=layers)
    if views:
        results["views"] = compare_all_views(views, states_l2, study, status, view_masks,
                                             groups)
        chance.adjust(results)
    for name, entry in results["models"].items():
        entry["provenance"] = _provenance(Path(entry["feats_A_path"]))
    state_input.annotate(results)
    if seq is not None:
        log(f"metrics: CKNNA against future states, horizons {horizons}")
        horizons_mod.add_to_results(results, models, data.take(seq), horizons, settings,
                                    study.zscore_states, study.data_dir / horizons_mod.SEQ_FILE)
    rates = {m.name: m.success_rate for m in study.models if m.success_rate is not None}
    if rates:
        results["success"] = success.study_section(results, rates, seed=study.seed)
    write_report(results, study.output_dir)
    return results


PREVIOUS_REPORT = ("report.md", "report.html", "results.json")


def clear_previous_report(out_dir: Path, log) -> None:
    """A new run removes the last run's report first: interrupted later, it would look
    current. The new one is written (atomically) only when the metrics are done."""
    gone = []
    for name in PREVIOUS_REPORT:
        path = Path(out_dir) / name
        if path.is_file():
            path.unlink()
            gone.append(name)
    if gone:
        log(f"removed the previous run's {', '.join(gone)} (rewritten when this run ends)")


def _rows(path: Path, data) -> "torch.Tensor":
    """A feature file's rows for the samples the metrics see, L2-normalised."""
    return states_mod.normalised(path, data.take(load_features(path)))


def compare_all_views(views: dict, states_l2, study: Study, status: dict,
                      masks: dict | None = None, groups=None) -> dict:
    """Modality split and action features of every model that has them (harness.cknna.views),
    each view against the states with its chance level (shuffles move whole `groups`)."""
    out = {}
    for name, by_view in views.items():
        out[name] = views_mod.compare_views(by_view, states_l2, study.ks,
                                            defined=(masks or {}).get(name),
                                            permutations=study.permutations, seed=study.seed,
                                            groups=groups)
        out[name]["text_fallback_samples"] = views_mod.text_fallback_count(
            Path(status[name]["feats_A_path"]))
    return out


def future_states(study: Study, n: int):
    """(seq, horizons) when data_dir has feats_B_seq.pt and horizons are wanted, else
    (None, None); checked before any extraction."""
    path = study.data_dir / horizons_mod.SEQ_FILE
    if study.horizons == []:
        return None, None
    if not path.is_file():
        if study.horizons:
            _raise(study, [f"horizons = {study.horizons}: {path} does not exist (write it with "
                           "`harness data build --horizon_max H`)"])
        return None, None
    seq = horizons_mod.load(path, n)
    top = seq.shape[1] - 1
    wanted = study.horizons or [a for a in horizons_mod.DEFAULT_HORIZONS if a <= top]
    _raise(study, [f"horizons[{i}] = {a}: beyond H = {top} of {path}"
                   for i, a in enumerate(wanted) if a > top])
    return seq, sorted(set(wanted))


def _provenance(feats_path: Path) -> dict | None:
    """The extraction's own metadata, minus the per-sample index list."""
    meta_path = feats_path.parent / METADATA
    if not meta_path.is_file():
        return {"source": str(feats_path), "note": "computed elsewhere; no extraction metadata"}
    meta = json.loads(meta_path.read_text())
    meta.pop("sample_indices", None)
    return meta
