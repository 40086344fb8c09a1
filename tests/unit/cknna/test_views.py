"""harness.cknna.views and its report section: every view against the states and every pair,
checked against the dense CKNNA definition; the markdown shows the same numbers."""
from __future__ import annotations

import json

import pytest
import torch

from harness.study.report import markdown as report
from harness.cknna import views
from harness.data.states import l2_rows
from tests.dense_reference import dense_cknna

N, KS = 60, [5, 10]


def make_views():
    g = torch.Generator().manual_seed(0)
    states = l2_rows(torch.randn(N, 7, generator=g))
    full = torch.randn(N, 16, generator=g)
    return states, {"full": l2_rows(full), "image": l2_rows(full + torch.randn(N, 16, generator=g)),
                    "text": l2_rows(torch.randn(N, 16, generator=g)),
                    "action": l2_rows(torch.randn(N, 8, generator=g))}


def test_compare_views_against_the_dense_definition():
    states, by_view = make_views()
    out = views.compare_views(dict(reversed(list(by_view.items()))), states, KS)
    assert out["views"] == ["full", "image", "text", "action"]  # fixed order
    assert len(out["pairs"]) == 6
    for k in KS:
        for v, x in by_view.items():
            assert out["against_states"][v][f"k{k}"] == pytest.approx(
                dense_cknna(x, states, k), abs=1e-6)
        assert out["pairs"]["full~image"][f"k{k}"] == pytest.approx(
            dense_cknna(by_view["full"], by_view["image"], k), abs=1e-6)
        assert out["pairs"]["text~action"][f"k{k}"] == pytest.approx(
            dense_cknna(by_view["text"], by_view["action"], k), abs=1e-6)


def test_view_files_read_the_extraction_metadata(tmp_path):
    (tmp_path / "feats_A.pt").write_bytes(b"")
    assert views.view_files(tmp_path / "feats_A.pt") == {}
    (tmp_path / "extraction_metadata.json").write_text(json.dumps(
        {"extra_files": ["feats_A_img.pt", "feats_A_txt.pt"],
         "txt_fallback": {"count": 3}}))
    assert views.view_files(tmp_path / "feats_A.pt") == {
        "image": tmp_path / "feats_A_img.pt", "text": tmp_path / "feats_A_txt.pt"}
    assert views.text_fallback_count(tmp_path / "feats_A.pt") == 3


def test_report_section_and_figure(tmp_path):
    states, by_view = make_views()
    entry = views.compare_views(by_view, states, KS)
    entry["text_fallback_samples"] = 4
    results = {"_meta": {"k_values": KS, "N": N}, "views": {"m": entry}}
    text = report.views_markdown(results)
    value = entry["against_states"]["image"]["k10"]
    assert f"| m | image tokens | {entry['against_states']['image']['k5']:.4f} | {value:.4f} |" in text
    assert "| m | full (feats_A) vs action expert |" in text
    assert "4 of 60 samples have no task tokens" in text
    fig = report.views_figure(results)
    assert fig.axes[0].get_title().startswith("CKNNA against the states by representation, k=10")
    assert report.views_markdown({"_meta": {"k_values": KS}}) == ""
