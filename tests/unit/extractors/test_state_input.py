"""`state_in_input`: recorded per feature file at extraction, read back and marked by the
`cknna` and `run` reports (markdown, HTML, console, JSON)."""
import json

import torch

from harness.extractors.engine import state_input
from harness.cli import main
from harness.study.report.markdown import markdown_table, views_markdown
from harness.study.report.html import markdown_to_html

N = 40


def _model(root, name, file, flag):
    folder = root / name
    folder.mkdir()
    torch.save(torch.randn(N, 6, generator=torch.Generator().manual_seed(len(name))), folder / file)
    (folder / "extraction_metadata.json").write_text(json.dumps({"state_in_input": {file: flag}}))
    return folder / file


def test_cknna_marks_rows_whose_features_had_the_state_as_input(tmp_path, capsys):
    torch.save(torch.randn(N, 7, generator=torch.Generator().manual_seed(0)), tmp_path / "feats_B.pt")
    leaky = _model(tmp_path, "pi0-action", "feats_action.pt", True)
    clean = _model(tmp_path, "spatialvla", "feats_A.pt", False)
    out = tmp_path / "r.json"
    assert main(["cknna", "--feats_A", str(leaky), str(clean), "--feats_B",
                 str(tmp_path / "feats_B.pt"), "--topk", "5", "--output", str(out)]) == 0
    console = capsys.readouterr().out
    assert "| pi0-action [state in input] |" in console
    assert "| spatialvla |" in console and state_input.NOTE in console
    models = json.loads(out.read_text())["models"]
    assert models["pi0-action"]["state_in_input"] is True
    assert models["spatialvla"]["state_in_input"] is False


def test_views_rows_and_html_and_run_console_carry_the_mark(tmp_path):
    results = {"_meta": {"k_values": [5], "N": N},
               "models": {"pi0": {"cknna_k5": 0.1, "feats_A_dim": 6, "state_in_input": False}},
               "views": {"pi0": {"against_states": {"full": {"k5": 0.1}, "action": {"k5": 0.3}},
                                 "pairs": {}, "state_in_input": {"full": False, "action": True}}}}
    text = views_markdown(results)
    assert "| pi0 | action expert [state in input] |" in text
    assert "| pi0 | full (feats_A) |" in text and state_input.NOTE in text
    assert "[state in input]" not in markdown_table(results)
    assert "[state in input]" in markdown_to_html(text, tmp_path, "r")
    assert state_input.console_lines(results) == [
        "state in input (CKNNA against the state is not a measure of learning): pi0: action"]


def test_lookup_reads_the_file_flag_and_layer_files_follow_feats_A(tmp_path):
    (tmp_path / "extraction_metadata.json").write_text(json.dumps(
        {"state_in_input": {"feats_A.pt": True, "feats_action.pt": False}}))
    assert state_input.lookup(tmp_path / "feats_A_layer3.pt") is True
    assert state_input.lookup(tmp_path / "feats_action.pt") is False
    assert state_input.lookup(tmp_path / "other" / "feats_A.pt") is None
