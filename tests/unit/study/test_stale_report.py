"""Issue 21, point 4: once a new run has passed its checks, the previous run's report is
gone, so an interrupted metric stage cannot leave an old report that looks current; a
run refused by its checks leaves the old report alone."""
import json

import pytest
import torch

from harness.study import pipeline
from harness.study.config import ModelEntry
from harness.errors import HarnessError
from harness.data.synth import generate

OLD = ("report.md", "report.html", "results.json")


@pytest.fixture
def study(tmp_path):
    generate(tmp_path / "data", n=12, seed=0, horizon_max=0)
    feats = tmp_path / "feats.pt"
    torch.save(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), feats)
    out = tmp_path / "out"
    out.mkdir()
    for name in OLD:
        (out / name).write_text("previous run\n")
    return pipeline.Study(data_dir=tmp_path / "data", output_dir=out, k_values=[2],
                          permutations=0, models=[ModelEntry(name="m", feats=feats)])


def test_an_interrupted_metric_stage_leaves_no_old_report(study, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("harness.study.results.compute", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_study(study, log=lambda msg: None)
    assert [n for n in OLD if (study.output_dir / n).exists()] == []


def test_a_run_refused_by_its_checks_keeps_the_old_report(study):
    study.k_values = [50]
    with pytest.raises(HarnessError, match="k_values"):
        pipeline.run_study(study, log=lambda msg: None)
    assert all((study.output_dir / n).read_text() == "previous run\n" for n in OLD)


def test_the_new_report_replaces_it_when_the_run_ends(study):
    pipeline.run_study(study, log=lambda msg: None)
    assert (study.output_dir / "report.md").read_text() != "previous run\n"
    meta = json.loads((study.output_dir / "results.json").read_text())["_meta"]
    assert meta["study"]["threads"]["threads"] >= 1  # recorded (issue 21, point 6)
