"""`python -m harness run` end to end, at the CLI level, in temporary directories."""
import contextlib
import io
import json
import re

import pytest
import torch

from harness.cli import main
from harness.data.states import l2_rows
from harness.data.synth import generate
from tests.dense_reference import dense_cknna, dense_shared_scores

DEMO_MODELS = {"spatialvla-tiny", "pi0-lerobot-tiny", "starvla-qwen2.5-vl-tiny",
               "starvla-qwen3-vl-tiny", "paligemma-tiny-layer-sweep",
               "openvla-tiny", "smolvla-tiny", "pi05-tiny", "pi0-fast-tiny", "groot-tiny"}
ACTION_MODELS = ("pi0-lerobot-tiny", "openvla-tiny", "smolvla-tiny")  # the demo's action_repr rows


def unit_rows(x):
    return torch.nn.functional.normalize(x.float(), dim=1)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = main(["run", "--output_dir", str(out)])
    return out, code


@pytest.fixture(scope="module")
def demo_console(demo):
    """stdout and stderr of a second run (features reused) and of the first one's log."""
    out, _ = demo
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["run", "--output_dir", str(out)])
    return code, stdout.getvalue(), stderr.getvalue()


def test_run_prints_where_every_file_is(demo, demo_console):
    out, _ = demo
    code, stdout, _ = demo_console
    assert code == 0
    for label, name in [("report", "report.md"), ("report (HTML, figures embedded)", "report.html"),
                        ("results", "results.json"), ("figure", "cknna_vs_k.png"),
                        ("figure", "heatmap.png"), ("figure", "layers.png"),
                        ("figure", "views.png"),
                        ("figure", "cknna_vs_horizon.png")]:
        assert f"{label}: {out / name}\n" in stdout, name
        assert (out / name).is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "RANDOM-WEIGHT" in html
    res = json.loads((out / "results.json").read_text())
    above = sum(r["above_chance"] for _, _, r in cknna_values(res))
    assert f"above chance: {above} of {len(list(cknna_values(res)))} CKNNA values" in stdout


def test_extraction_progress_is_logged_for_every_model(demo):
    out, _ = demo
    for name in DEMO_MODELS:
        log = (out / "features" / name / "extract.log").read_text()
        assert re.search(r"^progress: 200/200 samples, [\d.]+/s, 0s left$", log, re.M), name


def test_demo_writes_a_consistent_report(demo, capsys):
    out, code = demo
    assert code == 0
    for name in ("results.json", "report.md", "heatmap.png", "cknna_vs_k.png", "layers.png"):
        assert (out / name).is_file(), name
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == DEMO_MODELS
    assert res["_meta"]["study"]["stand_ins"] is True
    report = (out / "report.md").read_text()
    assert "RANDOM-WEIGHT stand-ins" in report
    states = torch.load(out / "data" / "feats_B.pt", weights_only=True)
    for name, entry in res["models"].items():
        feats = torch.load(entry["feats_A_path"], weights_only=True)
        assert feats.shape[0] == res["_meta"]["N"] == states.shape[0]
        # The JSON's number is what the definition gives on the written features (two
        # rows of one model have k-th place similarities 3e-8 apart, below float32
        # precision: tied, so the shared-tie definition, not plain top-k)...
        assert entry["cknna_k10"] == pytest.approx(
            dense_shared_scores(l2_rows(feats), l2_rows(states), 10)[0], abs=1e-6)
        # ...and the markdown table shows the same number.
        table = report.split("## CKNNA against the states")[1]
        row = next(line for line in table.splitlines()
                   if line.startswith(f"| {name} | {entry['feats_A_dim']} | 10 |"))
        assert f"{entry['cknna_k10']:.4f}" in row
        assert entry["provenance"]["dataset_fingerprint"] == res["_meta"]["study"]["dataset_fingerprint"]
    sweep = res["layers"]["paligemma-tiny-layer-sweep"]
    assert len(sweep) >= 2 and all(set(v) == {"k5", "k10", "k20", "chance"} for v in sweep.values())
    labels = res["pairwise"]["labels"]
    assert len(res["pairwise"]["cknna_k10"]) == len(labels) == len(DEMO_MODELS)


def test_demo_shows_the_modality_split_action_views_and_every_familys_layers(demo):
    """Issue 14: full / image / text against the states and pairwise for every demo
    model, Pi0's action features against the states and feats_A, layer curves for all."""
    out, _ = demo
    res = json.loads((out / "results.json").read_text())
    states = l2_rows(torch.load(out / "data" / "feats_B.pt", weights_only=True))
    assert set(res["layers"]) == DEMO_MODELS
    assert set(res["views"]) == DEMO_MODELS
    for name, views in res["views"].items():
        folder = out / "features" / name
        load = lambda f: l2_rows(torch.load(folder / f, weights_only=True))  # noqa: E731
        files = {"full": "feats_A.pt", "image": "feats_A_img.pt", "text": "feats_A_txt.pt"}
        if name in ACTION_MODELS:
            files["action"] = "feats_action.pt"
        assert views["views"] == list(files)
        text = torch.load(folder / files["text"], weights_only=True)
        has_task = torch.isfinite(text).all(dim=1)  # empty tasks: NaN rows, left out
        assert 0 < int(has_task.sum()) == views["samples"]["text"] < len(text)
        for view, f in files.items():  # each number is the formula on the written file
            rows = has_task if view == "text" else slice(None)
            assert views["against_states"][view]["k10"] == pytest.approx(
                dense_shared_scores(load(f)[rows] if view != "text" else l2_rows(text[rows]),
                                    states[rows], 10)[0], abs=1e-6), (name, view)
        assert views["pairs"]["full~image"]["k10"] == pytest.approx(
            dense_shared_scores(load(files["full"]), load(files["image"]), 10)[0], abs=1e-6)
        assert views["text_fallback_samples"] > 0  # the synthetic set has empty tasks
    assert "full~action" in res["views"]["pi0-lerobot-tiny"]["pairs"]
    report = (out / "report.md").read_text()
    assert "## Modality split and action representations" in report
    assert "| pi0-lerobot-tiny | full (feats_A) vs action expert |" in report
    assert "| pi0-lerobot-tiny | action expert [state in input] |" in report  # the real state
    assert "samples that have a task" in report


def test_rerun_reuses_features(demo, capsys):
    out, _ = demo
    feats = sorted((out / "features").glob("*/feats_A.pt"))
    before = {p: p.stat().st_mtime_ns for p in feats}
    assert main(["run", "--output_dir", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {s["status"] for s in res["_meta"]["study"]["models"].values()} == {"reused"}
    assert {p: p.stat().st_mtime_ns for p in feats} == before


def write_config(path, data_dir, models, **extra):
    lines = [f'data_dir = "{data_dir}"', 'output_dir = "out"', "permutations = 20",
             "k_values = [5, 10]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    for m in models:
        lines.append("[[models]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in m.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    generate(root / "data", n=40, seed=3)
    return root / "data"


def test_a_failing_model_leaves_the_others_complete(tmp_path, small_data, capsys):
    elsewhere = tmp_path / "Qwen-GR00T-Bridge"
    elsewhere.mkdir()
    external = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    torch.save(external, elsewhere / "feats_A.pt")
    cfg = write_config(tmp_path / "study.toml", small_data, [
        {"name": "good", "family": "hf", "ckpt": "tiny:paligemma"},
        {"name": "broken", "family": "hf", "ckpt": "tiny:no_such_family"},
        {"name": "Qwen-GR00T-Bridge", "feats": str(elsewhere / "feats_A.pt")},
    ], zscore_states=True)
    assert main(["run", str(cfg)]) == 1
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    status = res["_meta"]["study"]["models"]
    assert status["good"]["status"] == "extracted"
    assert status["broken"]["status"] == "failed" and "no_such_family" in status["broken"]["error"]
    assert status["Qwen-GR00T-Bridge"]["status"] == "external"
    assert set(res["models"]) == {"good", "Qwen-GR00T-Bridge"}
    states = torch.load(small_data / "feats_B.pt", weights_only=True)
    z = (states - states.mean(0)) / states.std(0)
    assert res["models"]["Qwen-GR00T-Bridge"]["cknna_k5"] == pytest.approx(
        dense_cknna(unit_rows(external), unit_rows(z), 5), abs=1e-6)
    assert res["_meta"]["preprocessing"]["feats_B_zscored"] is True
    report = (out / "report.md").read_text()
    assert re.search(r"\| broken \| failed \|.*no_such_family", report)
    console = capsys.readouterr()
    assert "failed models: broken" in console.out
    # The extraction's progress reached the console, named by model, as it went.
    assert re.search(r"^\[run\] extract good: progress: 40/40 samples, [\d.]+/s, 0s left$",
                     console.err, re.M), console.err


@pytest.mark.parametrize("problem", ["data_dir", "feats", "python"])
def test_a_bad_path_fails_before_any_work(tmp_path, small_data, capsys, problem):
    bad = tmp_path / "nowhere" / "x"
    models = [{"name": "good", "family": "hf", "ckpt": "tiny:paligemma"}]
    data_dir = small_data
    if problem == "data_dir":
        data_dir = bad
    elif problem == "feats":
        models.append({"name": "ext", "feats": str(bad)})
    else:
        models[0]["python"] = str(bad)
    cfg = write_config(tmp_path / "study.toml", data_dir, models)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err
    assert not (tmp_path / "out").exists()


def test_config_errors_name_the_file(tmp_path, capsys):
    cfg = tmp_path / "study.toml"
    cfg.write_text('data_dir = "d"\n[[models]]\nname = "m"\nfamily = "nope"\nckpt = "x"\n')
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert str(cfg) in err and "family" in err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "missing.toml" in capsys.readouterr().err


def test_episode_groups_and_comparisons_in_the_report(tmp_path, small_data):
    from harness import cknna as C

    meta = json.loads((small_data / "metadata.json").read_text())
    episodes = torch.tensor(meta["episode_indices"])
    states = torch.load(small_data / "feats_B.pt", weights_only=True)
    models = []
    for i, name in enumerate(["near", "far"]):
        (tmp_path / name).mkdir()
        g = torch.Generator().manual_seed(i)
        feats = torch.cat([states * (3.0 if name == "near" else 0.1), torch.randn(40, 8, generator=g)], 1)
        torch.save(feats, tmp_path / name / "feats_A.pt")
        models.append({"name": name, "feats": str(tmp_path / name / "feats_A.pt")})
    cfg = write_config(tmp_path / "study.toml", small_data, models, compare=True)
    assert main(["run", str(cfg)]) == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    assert res["_meta"]["groups"]["n_groups"] == len(episodes.unique())
    near = res["models"]["near"]
    a = l2_rows(torch.load(tmp_path / "near" / "feats_A.pt"))  # the pipeline's normalisation
    assert near["other_same_group_setting"]["cknna_k5"] == pytest.approx(
        C.cknna(a, l2_rows(states), 5, groups=episodes), abs=1e-12)
    assert near["cknna_k5"] == pytest.approx(C.cknna(a, l2_rows(states), 5), abs=1e-12)
    [row] = res["comparisons"]["k10"]
    assert (row["a"], row["b"], row["n_draws"], row["whole_groups"]) == ("near", "far", 200, True)
    report = (out / "report.md").read_text()
    assert "## With and without same-episode neighbours" in report
    assert "Ranking by CKNNA, k=10" in report and "| 1 | near |" in report
    none = write_config(tmp_path / "none.toml", small_data, models, group_by="none")
    assert main(["run", str(none)]) == 0
    assert json.loads((out / "results.json").read_text())["_meta"]["groups"] is None
    bad = write_config(tmp_path / "bad.toml", small_data, models, group_by="task")
    assert main(["run", str(bad)]) == 2


# ------------------------------------------------------------ chance levels (issue 18)


def cknna_values(res):
    """(where, CKNNA value, its chance record) for every CKNNA value against the states in a
    results file, found by walking the documented layout (not harness.cknna.chance.records)."""
    ks = res["_meta"]["k_values"]
    for label, m in res["models"].items():
        for k in ks:
            yield f"{label} k={k}", m[f"cknna_k{k}"], {
                "chance": m[f"chance_k{k}"], "excess": m[f"excess_k{k}"],
                "p_value": m[f"p_value_k{k}"], "p_adjusted": m[f"p_adjusted_k{k}"],
                "above_chance": m[f"above_chance_k{k}"]}
            other = m["other_same_group_setting"]
            yield f"{label} other k={k}", other[f"cknna_k{k}"], other["chance"][f"k{k}"]
            for h, entry in m["horizons"].items():
                yield f"{label} {h} k={k}", entry[f"cknna_k{k}"], entry["chance"][f"k{k}"]
    for label, by_layer in res["layers"].items():
        for name, entry in by_layer.items():
            for k in ks:
                yield f"{label} layer {name} k={k}", entry[f"k{k}"], entry["chance"][f"k{k}"]
    for label, v in res["views"].items():
        for view, entry in v["against_states"].items():
            for k in ks:
                yield f"{label} {view} k={k}", entry[f"k{k}"], entry["chance"][f"k{k}"]


def test_every_value_has_its_chance_level_in_the_json_and_the_html(demo):
    import html as html_mod

    from harness.study.report.figures import fmt
    out, _ = demo
    res = json.loads((out / "results.json").read_text())
    page = html_mod.unescape((out / "report.html").read_text())
    found = list(cknna_values(res))
    n_layers = sum(len(by_layer) for by_layer in res["layers"].values())
    views = 3 * len(DEMO_MODELS) + len(ACTION_MODELS)  # full, image, text (+ action)
    # models x k x (main, other setting, 5 horizons), views x k, layers x k
    assert len(found) == len(DEMO_MODELS) * 3 * (2 + 5) + views * 3 + n_layers * 3
    mt = res["_meta"]["multiple_testing"]
    assert mt["method"] == "Benjamini-Hochberg" and mt["family_size"] == len(found)
    for where, value, rec in found:
        assert rec["excess"] == pytest.approx(value - rec["chance"], abs=1e-12), where
        assert 0 < rec["p_value"] <= rec["p_adjusted"] <= 1, where
        assert rec["above_chance"] == (rec["p_adjusted"] < 0.05 and rec["excess"] > 0), where
        excess = fmt(rec["excess"]) if rec["excess"] < 0 else "+" + fmt(rec["excess"])
        mark = " at chance" if not rec["above_chance"] else ""
        if " " not in where.split(" k=")[0]:  # the main table: one column each
            label, k = where.split(" k=")
            cells = [fmt(value), fmt(rec["chance"]), excess]
            row = "</td><td class=\"num\">".join(cells)
            assert f"<td class=\"num\">{k}</td><td class=\"num\">{row}</td>" in page, where
            continue
        cell = f"{fmt(value)} (chance {fmt(rec['chance'])}, {excess}; "
        assert cell in page, where
        start = page.index(cell)
        assert page[start:page.index("</td>", start)].endswith(f"{fmt(rec['p_adjusted'])}){mark}"), where


def test_the_interval_contains_the_full_sample_value_on_the_demo(demo, tmp_path, capsys):
    out, _ = demo
    feats = sorted(str(p) for p in (out / "features").glob("*/feats_A.pt"))
    data = out / "data"
    target = tmp_path / "r.json"
    assert main(["cknna", "--feats_A", *feats, "--feats_B", str(data / "feats_B.pt"),
                 "--topk", "5", "10", "20", "--groups", str(data), "--subsample", "40",
                 "--output", str(target)]) == 0
    res = json.loads(target.read_text())
    assert res["_meta"]["groups"]["n_groups"] == len(set(json.loads(
        (data / "metadata.json").read_text())["episode_indices"]))
    for label, m in res["models"].items():
        for k in (5, 10, 20):
            sub = m["details"][f"k{k}"]["subsample"]
            assert sub["low"] < m[f"cknna_k{k}"] < sub["high"], (label, k)


def test_cknna_groups_from_a_data_directory_or_its_metadata(demo, tmp_path, capsys):
    out, _ = demo
    feats = str(out / "features" / "pi0-lerobot-tiny" / "feats_A.pt")
    data = out / "data"
    episodes = json.loads((data / "metadata.json").read_text())["episode_indices"]
    (tmp_path / "groups.json").write_text(json.dumps(episodes))
    results = {}
    for name, groups in (("dir", str(data)), ("meta", str(data / "metadata.json")),
                         ("list", str(tmp_path / "groups.json"))):
        target = tmp_path / f"{name}.json"
        assert main(["cknna", "--feats_A", feats, "--feats_B", str(data / "feats_B.pt"),
                     "--groups", groups, "--permutations", "20", "--output", str(target)]) == 0
        results[name] = json.loads(target.read_text())["models"]["pi0-lerobot-tiny"]
    assert results["dir"]["chance_k10"] == results["meta"]["chance_k10"] == results["list"]["chance_k10"]
    capsys.readouterr()
    target = tmp_path / "none.json"
    assert main(["cknna", "--feats_A", feats, "--feats_B", str(data / "feats_B.pt"),
                 "--permutations", "20", "--output", str(target)]) == 0
    captured = capsys.readouterr()
    none = json.loads(target.read_text())
    assert none["_meta"]["samples"].startswith("samples treated as independent")
    assert f"--groups {data}" in none["_meta"]["groups_available"]
    assert "samples treated as independent" in captured.err and f"--groups {data}" in captured.err
    assert "samples treated as independent" in captured.out  # under the printed table
    # the seed-compatible numbers do not depend on groups; the chance level does
    assert none["models"]["pi0-lerobot-tiny"]["cknna_k10"] == results["dir"]["cknna_k10"]
    assert none["models"]["pi0-lerobot-tiny"]["chance_k10"] < results["dir"]["chance_k10"]
