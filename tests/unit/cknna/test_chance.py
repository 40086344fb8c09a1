"""Chance level beside every value: the null mean under the grouping in force, the excess,
the Benjamini-Hochberg adjustment across a report, and the 'at chance' mark."""
import pytest
import torch

from harness.cknna import chance
from harness import cknna as C
from harness.study.report import markdown as report
from harness.cknna import significance as S
from harness.study.report.html import markdown_to_html
from harness.study.results import Settings, compute
from harness.data.states import l2_rows

pytestmark = pytest.mark.unit


def test_benjamini_hochberg_by_hand():
    # sorted p: 0.01, 0.02, 0.03, 0.5 (m = 4): p * m / rank = 0.04, 0.04, 0.04, 0.5
    assert chance.benjamini_hochberg([0.03, 0.5, 0.01, 0.02]) == pytest.approx(
        [0.04, 0.5, 0.04, 0.04])
    # step-up: a later smaller ratio pulls earlier ones down; never above 1
    assert chance.benjamini_hochberg([0.04, 0.05]) == pytest.approx([0.05, 0.05])
    assert chance.benjamini_hochberg([0.9, 0.95, 0.99]) == pytest.approx([0.99, 0.99, 0.99])
    out = chance.benjamini_hochberg([float("nan"), 0.2])
    assert out[0] != out[0] and out[1] == pytest.approx(0.2)


def grouped_data(seed=0, n=120):
    g = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) // 6
    episode = torch.randn(n // 6, 4, generator=g)[groups]
    b = episode + 0.2 * torch.randn(n, 4, generator=g)
    related = torch.cat([episode, 0.5 * torch.randn(n, 6, generator=g)], 1)
    return l2_rows(b), {"related": ("r/feats_A.pt", l2_rows(related)),
                        "noise": ("n/feats_A.pt", l2_rows(torch.randn(n, 10, generator=g)))}, groups


def test_chance_is_the_null_mean_under_the_grouping_in_force():
    b, models, groups = grouped_data()
    for g in (None, groups):
        res = compute(models, b, "b.pt", Settings(ks=[5], permutations=40, seed=2, groups=g), {})
        for label, (_, a) in models.items():
            sa, sb = C.Space(a, 5), C.Space(b, 5)
            null = S.null_draws(sa, sb, C.space_scores(sa, sb, 5), 40, seed=2, groups=g)
            entry = res["models"][label]
            assert entry["chance_k5"] == pytest.approx(null.mean().item(), abs=1e-12)
            assert entry["excess_k5"] == pytest.approx(entry["cknna_k5"] - null.mean().item())
    # with episodes the null is much higher: shuffling whole episodes keeps their structure
    grouped = compute(models, b, "b.pt", Settings(ks=[5], permutations=40, groups=groups), {})
    free = compute(models, b, "b.pt", Settings(ks=[5], permutations=40), {})
    assert grouped["models"]["related"]["chance_k5"] > free["models"]["related"]["chance_k5"] + 0.05
    assert free["_meta"]["samples"].startswith("samples treated as independent")


def test_the_adjustment_spans_every_value_of_the_results():
    b, models, groups = grouped_data(1)
    layers = {"related": {"0": models["related"][1], "1": models["noise"][1]}}
    res = compute(models, b, "b.pt", Settings(ks=[5, 10], permutations=30, groups=groups,
                                              side_by_side=True), {}, layers=layers)
    found = list(chance.records(res))
    assert len(found) == 2 * 2 * 2 + 2 * 2  # models x k x (with, without) + layers x k
    raw = [rec["p_value"] for _, rec in found]
    assert [rec["p_adjusted"] for _, rec in found] == pytest.approx(chance.benjamini_hochberg(raw))
    assert res["_meta"]["multiple_testing"]["family_size"] == len(found)


def test_values_at_chance_are_marked_in_markdown_and_html(tmp_path):
    b, models, _ = grouped_data(2)
    res = compute(models, b, "b.pt", Settings(ks=[5], permutations=99), {})
    assert res["models"]["related"]["above_chance_k5"] is True
    assert res["models"]["noise"]["above_chance_k5"] is False
    table = report.markdown_table(res)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()
            if line.startswith("| related") or line.startswith("| noise")}
    assert "| above chance |" in rows["related"] and f"| {chance.MARK} |" in rows["noise"]
    page = markdown_to_html(table, tmp_path, "t")
    assert page.count('class="at-chance"') == 1  # the noise model's verdict cell only
    noise_row = next(r for r in page.splitlines() if "<td>noise</td>" in r)
    assert f'class="at-chance" title="not above its chance level (adjusted p-value)">{chance.MARK}' in noise_row
    # a compact cell carries the whole record and the mark
    cell = report.chance_cell(0.2, {"chance": 0.21, "excess": -0.01, "p_value": 0.7,
                                    "p_adjusted": 0.8, "above_chance": False,
                                    "n_permutations": 99})
    assert cell == "0.2000 (chance 0.2100, -0.0100; p 0.7000, adj. 0.8000) at chance"
