"""The report a researcher reads: tables, figures, report.md and the self-contained HTML."""
from __future__ import annotations

import base64
import re

import matplotlib
import pytest

matplotlib.use("Agg")

from harness.study.report import markdown as report  # noqa: E402
from tests.report_fixture import full_results  # noqa: E402

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def results():
    return full_results()


def test_smallest_p_value_is_shown_as_a_bound():
    assert report.p_text(1 / 101, 100) == "p < 1/101"
    assert report.p_text(2 / 101, 100) == "0.0198"
    assert report.p_text(1.0, 100) == "1.0000"
    assert report.p_text(None, None) == ""


def test_table_has_intervals_cka_and_p_floor(results):
    table = report.markdown_table(results)
    header = table.splitlines()[0]
    for column in ("95% interval of CKNNA", "CKA (unbiased)", "CKA (biased)", "p",
                   "chance (null mean)", "excess", "p adj. (BH)", "vs chance"):
        assert f"| {column} |" in header, column
    row = next(x for x in table.splitlines() if x.startswith("| related-model | 12 | 10 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    by_header = dict(zip([c.strip() for c in header.strip("|").split("|")], cells))
    entry = results["models"]["related-model"]
    sub = entry["details"]["k10"]["subsample"]
    assert by_header["95% interval of CKNNA"] == f"[{sub['low']:.4f}, {sub['high']:.4f}]"
    assert by_header["CKA (unbiased)"] == f"{entry['cka_unbiased']:.4f}"
    # States scaled into the features: no shuffle comes close, so p is at its floor.
    assert entry["p_value_k10"] == pytest.approx(1 / 31)
    assert by_header["p"] == "p < 1/31"
    assert by_header["vs chance"] == "above chance"
    assert "'p < 1/31' means no shuffle" in table


def test_printed_cknna_table_shows_intervals_and_cka(tmp_path, capsys):
    import torch

    from harness.cli import main
    g = torch.Generator().manual_seed(1)
    torch.save(torch.randn(40, 7, generator=g), tmp_path / "b.pt")
    (tmp_path / "m").mkdir()
    torch.save(torch.randn(40, 6, generator=g), tmp_path / "m" / "feats_A.pt")
    assert main(["cknna", "--feats_A", str(tmp_path / "m" / "feats_A.pt"), "--feats_B",
                 str(tmp_path / "b.pt"), "--topk", "5", "--subsample", "8", "--also_cka"]) == 0
    out = capsys.readouterr().out
    assert "95% interval of CKNNA" in out and "CKA (unbiased)" in out
    assert "samples treated as independent" in out
    assert re.search(r"\| \[-?\d\.\d{4}, -?\d\.\d{4}\] \|", out)


def contrast(a, b) -> float:
    """WCAG contrast ratio of two colours."""
    from matplotlib.colors import to_rgb

    def lum(c):
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in to_rgb(c)]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_heatmap_annotations_are_readable_on_every_cell():
    matrix = [[1.0, 0.5, 0.0], [0.2, 1.0, 0.8], [0.65, 0.35, 1.0]]
    fig = report.heatmap_figure(matrix, ["a", "b", "c"], "t")
    ax = fig.axes[0]
    image = ax.images[0]
    assert len(ax.texts) == 9
    for text in ax.texts:
        j, i = (round(v) for v in text.get_position())
        cell = image.cmap(image.norm(matrix[i][j]))
        assert contrast(text.get_color(), cell) >= 4.5, (text.get_text(), text.get_color())


def test_cknna_vs_k_shows_each_chance_band_and_interval(results):
    from matplotlib.collections import PolyCollection
    fig = report.cknna_vs_k_figure(results)
    ax = fig.axes[0]
    ks = results["_meta"]["k_values"]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(results["models"])
    for band, m in zip(bands, results["models"].values()):
        ys = band.get_paths()[0].vertices[:, 1]
        for k in ks:
            null = m["details"][f"k{k}"]["permutation"]
            assert min(abs(ys - (null["chance"] - 1.96 * null["null_std"]))) < 1e-9
            assert min(abs(ys - (null["chance"] + 1.96 * null["null_std"]))) < 1e-9
    # error bars: the interval of the full-sample value, around the value itself
    bars = [c for c in ax.containers]
    assert len(bars) == len(results["models"])
    for bar, m in zip(bars, results["models"].values()):
        segments = bar.lines[2][0].get_segments()
        for seg, k in zip(segments, ks):
            sub = m["details"][f"k{k}"]["subsample"]
            assert sorted(seg[:, 1]) == pytest.approx([sub["low"], sub["high"]])
    fig.canvas.draw()  # the legend is outside the plotting area: it hides no line
    box, axes_box = ax.get_legend().get_window_extent(), ax.get_window_extent()
    assert box.x0 >= axes_box.x1


def test_layers_figure_has_a_title_naming_its_band(results):
    fig = report.layer_curves_figure(results)
    title = fig.axes[0].get_title()
    assert title.startswith("CKNNA of each layer against the states") and "chance" in title


def test_report_md_links_figures_and_html_embeds_them(results, tmp_path):
    files = report.write_report(results, tmp_path)
    assert set(files) == {"json", "markdown", "html", "cknna_vs_k", "heatmap", "layers"}
    assert all(p.is_file() for p in files.values())
    markdown = files["markdown"].read_text()
    linked = re.findall(r"!\[[^\]]+\]\(([^)]+)\)", markdown)
    assert linked == ["cknna_vs_k.png", "heatmap.png", "layers.png"]
    html = files["html"].read_text()
    images = re.findall(r'<img src="([^"]+)"', html)
    assert len(images) == 3
    for src, name in zip(images, linked):  # the very bytes of each figure
        assert base64.b64decode(src.removeprefix("data:image/png;base64,")) == (
            tmp_path / name).read_bytes()
    text = re.sub(r"data:image/png;base64,[^\"]+", "", html)  # base64 may hold any letters
    assert "<script" not in text and "http" not in text.lower().replace("http-equiv", "")
    separators = [line for line in markdown.splitlines() if line.startswith("|---")]
    assert html.count("<table>") == len(separators) == 5 and "p &lt; 1/31" in html
