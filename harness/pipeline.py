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
from dataclasses import dataclass, field
from pathlib import Path

from harness import data as data_mod
from harness.errors import HarnessError
from harness.features import FEATS, METADATA
from harness.io import load_features, write_json

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("spatialvla", "pi0_lerobot", "starvla", "hf")
REQUEST = "pipeline_request.json"
STAND_IN_NOTICE = ("These are tiny RANDOM-WEIGHT stand-ins of each model family on synthetic "
                   "data: the numbers exercise the pipeline and mean nothing about real models.")


@dataclass
class Model:
    """One row of the config: extract with `family`/`ckpt`, or reuse `feats`."""

    name: str
    family: str | None = None
    ckpt: str | None = None
    feats: Path | None = None
    python: str = sys.executable
    options: dict = field(default_factory=dict)

    def request(self, fingerprint: str) -> dict:
        return {"family": self.family, "ckpt": self.ckpt, "options": self.options,
                "dataset_fingerprint": fingerprint}


@dataclass
class Study:
    data_dir: Path
    output_dir: Path
    models: list[Model]
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])
    permutations: int = 200
    seed: int = 0
    zscore_states: bool = False
    drop_empty_tasks: bool = False
    synthetic: dict | None = None  # {"n": N, "seed": S}: build data_dir if absent
    stand_ins: bool = False
    config_path: Path | None = None
    group_by: str = "episode"  # per-sample groups from metadata ("none": samples independent)
    compare: bool = False  # paired model comparisons (200 shared subsets)

    @property
    def features_dir(self) -> Path:
        return self.output_dir / "features"


# ------------------------------------------------------------------ configuration

DEFAULT_MODELS = [
    Model("spatialvla-tiny", "spatialvla", "tiny"),
    Model("pi0-lerobot-tiny", "pi0_lerobot", "tiny"),
    Model("starvla-qwen2.5-vl-tiny", "starvla", "tiny:qwen2_5_vl"),
    Model("starvla-qwen3-vl-tiny", "starvla", "tiny:qwen3_vl"),
    Model("paligemma-tiny-layer-sweep", "hf", "tiny:paligemma", options={"layers": "all"}),
]


GROUP_BY = ("episode", "none")
COMPARE_DRAWS = 200


def default_study(output_dir: Path) -> Study:
    """The built-in demo: synthetic data and tiny stand-ins of every family, on CPU."""
    return Study(data_dir=output_dir / "data", output_dir=output_dir,
                 models=[Model(m.name, m.family, m.ckpt, options=dict(m.options))
                         for m in DEFAULT_MODELS],
                 permutations=100, synthetic={"n": 200, "seed": 0}, stand_ins=True)


def _path(base: Path, value, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise HarnessError(f"{where}: expected a path string, got {value!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else base / path


def load_config(path: str | os.PathLike, output_dir: Path | None = None) -> Study:
    """Read and check a study config; every problem names the config and the entry."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: config file not found")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise HarnessError(f"{path}: not valid TOML ({err})") from None
    base = path.resolve().parent
    known = {"data_dir", "output_dir", "k_values", "permutations", "seed", "zscore_states",
             "drop_empty_tasks", "models", "group_by", "compare"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise HarnessError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    if "data_dir" not in raw:
        raise HarnessError(f"{path}: missing data_dir")
    models = [_model(path, base, i, m) for i, m in enumerate(raw.get("models", []))]
    if not models:
        raise HarnessError(f"{path}: no [[models]] entries")
    names = [m.name for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise HarnessError(f"{path}: model names used twice: {dupes}")
    group_by = raw.get("group_by", "episode")
    if group_by not in GROUP_BY:
        raise HarnessError(f"{path}: group_by = {group_by!r}; choose from {list(GROUP_BY)}")
    if not isinstance(raw.get("compare", False), bool):
        raise HarnessError(f"{path}: compare must be true or false")
    out = output_dir or _path(base, raw.get("output_dir", "harness_out/study"), f"{path}: output_dir")
    return Study(data_dir=_path(base, raw["data_dir"], f"{path}: data_dir"), output_dir=out,
                 models=models, ks=list(raw.get("k_values", [5, 10, 20])),
                 permutations=int(raw.get("permutations", 200)), seed=int(raw.get("seed", 0)),
                 zscore_states=bool(raw.get("zscore_states", False)),
                 drop_empty_tasks=bool(raw.get("drop_empty_tasks", False)), config_path=path,
                 group_by=group_by, compare=raw.get("compare", False))


def _model(cfg: Path, base: Path, i: int, m: dict) -> Model:
    where = f"{cfg}: models[{i}]"
    if not isinstance(m, dict) or not m.get("name"):
        raise HarnessError(f"{where}: needs a name")
    where = f"{cfg}: model {m['name']!r}"
    unknown = sorted(set(m) - {"name", "family", "ckpt", "feats", "python", "options"})
    if unknown:
        raise HarnessError(f"{where}: unknown keys {unknown}")
    if "/" in m["name"] or m["name"].startswith("."):
        raise HarnessError(f"{where}: a name is a folder name; no '/' or leading '.'")
    if "feats" in m:
        return Model(m["name"], feats=_path(base, m["feats"], f"{where}: feats"))
    if m.get("family") not in FAMILIES:
        raise HarnessError(f"{where}: family must be one of {FAMILIES} (or give feats = PATH)")
    if not m.get("ckpt"):
        raise HarnessError(f"{where}: needs ckpt (a hub id, a local path, or tiny)")
    python = m.get("python", sys.executable)
    options = m.get("options", {})
    if not isinstance(options, dict):
        raise HarnessError(f"{where}: options must be a table")
    return Model(m["name"], m["family"], m["ckpt"], python=python, options=options)


def check_paths(study: Study) -> None:
    """Fail before any work on a path that cannot be right."""
    if study.synthetic is None and not study.data_dir.is_dir():
        raise HarnessError(f"data_dir {study.data_dir}: not a directory")
    for m in study.models:
        if m.feats is not None and not m.feats.is_file():
            raise HarnessError(f"model {m.name!r}: feats {m.feats}: no such file")
        if m.feats is None and not _runnable(m.python):
            raise HarnessError(f"model {m.name!r}: python {m.python}: not an executable")
        ckpt = m.ckpt or ""
        looks_local = ckpt.startswith((".", "/", "~")) or os.sep in ckpt and ckpt.count("/") > 1
        if looks_local and not Path(os.path.expanduser(ckpt)).exists():
            raise HarnessError(f"model {m.name!r}: ckpt {ckpt}: no such path")


def _runnable(python: str) -> bool:
    path = Path(python)
    if path.is_absolute() or os.sep in python:
        return path.is_file() and os.access(path, os.X_OK)
    from shutil import which
    return which(python) is not None


# ------------------------------------------------------------------ phases


def prepare_data(study: Study, log) -> None:
    """Build the synthetic set when asked (reused when present), then check the directory."""
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
            from harness.synth import generate
            log(f"data: generating {want['n']} synthetic samples (seed {want['seed']})")
            generate(study.data_dir, n=want["n"], seed=want["seed"])
    report = data_mod.validate(study.data_dir, images="decode")
    if not report.ok:
        raise HarnessError(f"{study.data_dir}: {len(report.problems)} data problem(s), first: "
                           f"{report.problems[0]}; see `python -m harness data check`")
    log(f"data: {report.n} samples checked, {report.empty_tasks} empty tasks, "
        f"{report.duplicate_states} duplicate states")


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
    with open(out / "extract.log", "w") as log_file:
        proc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                              cwd=os.getcwd())
    seconds = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        tail = (out / "extract.log").read_text(errors="replace").strip().splitlines()[-5:]
        log(f"extract {m.name}: FAILED (exit {proc.returncode}); see {out / 'extract.log'}")
        return {"status": "failed", "exit_code": proc.returncode, "seconds": seconds,
                "log": str(out / "extract.log"), "error": "\n".join(tail)}
    return {"status": "extracted", "seconds": seconds, "feats_A_path": str(out / FEATS)}


def _layer_files(feats_path: Path) -> dict[str, Path]:
    meta_path = feats_path.parent / METADATA
    if not meta_path.is_file():
        return {}
    files = json.loads(meta_path.read_text()).get("layer_files", [])
    return {f.removeprefix("feats_A_layer").removesuffix(".pt"): feats_path.parent / f
            for f in files if f != FEATS}


def run_study(study: Study, log=None) -> dict:
    """All phases; returns the results dict (also written under output_dir)."""
    import torch

    from harness.commands.cknna import normalised, standardised
    from harness.report import write_report
    from harness.results import Settings, compute

    log = log or (lambda msg: print(f"[run] {msg}", file=sys.stderr, flush=True))
    check_paths(study)
    prepare_data(study, log)
    data = data_mod.load(study.data_dir)
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
    states, zrecord = data.states, None
    if study.zscore_states:
        states, zrecord = standardised(study.data_dir / "feats_B.pt", states)
    models, layers = {}, {}
    for name, st in status.items():
        if "feats_A_path" not in st:
            continue
        path = Path(st["feats_A_path"])
        try:
            feats = data.take(load_features(path))
            models[name] = (str(path), normalised(path, feats))
            by_layer = {layer: normalised(p, data.take(load_features(p)))
                        for layer, p in _layer_files(path).items()}
        except HarnessError as err:
            status[name] = dict(st, status="failed", error=str(err))
            log(f"metrics {name}: FAILED: {err}")
            continue
        if by_layer:
            layers[name] = by_layer
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
                        subsample_draws=COMPARE_DRAWS if compare else 0)
    preprocessing = {"row_l2_normalised": True, "feats_B_zscored": zrecord is not None,
                     "feats_B_zscore": zrecord, "data_options": options}
    extra = {"study": {"config": str(study.config_path) if study.config_path else "built-in demo",
                       "data_dir": str(study.data_dir),
                       "dataset_fingerprint": fingerprint,
                       "stand_ins": study.stand_ins,
                       "notice": STAND_IN_NOTICE if study.stand_ins else None,
                       "models": status}}
    results = compute(models, normalised(study.data_dir / "feats_B.pt", states),
                      str(study.data_dir / "feats_B.pt"), settings, preprocessing, extra,
                      layers=layers)
    for name, entry in results["models"].items():
        entry["provenance"] = _provenance(Path(entry["feats_A_path"]))
    write_report(results, study.output_dir)
    return results


def _provenance(feats_path: Path) -> dict | None:
    """The extraction's own metadata, minus the per-sample index list."""
    meta_path = feats_path.parent / METADATA
    if not meta_path.is_file():
        return {"source": str(feats_path), "note": "computed elsewhere; no extraction metadata"}
    meta = json.loads(meta_path.read_text())
    meta.pop("sample_indices", None)
    return meta
