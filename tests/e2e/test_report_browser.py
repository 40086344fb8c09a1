"""report.html in a real headless Chromium: it shows the tables and every figure, with no
console errors. Needs Debian's `chromium` (`.ci/run` installs it) and websocket-client."""
from __future__ import annotations

import os

import pytest

from tests.browser import chromium_path, evaluate, open_page, screenshot
from tests.report_fixture import full_results

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium_path() is None and not os.environ.get(
                  "HARNESS_REQUIRE_BROWSER"), reason="no chromium on PATH: apt-get install "
                  "chromium (.ci/run does) to run the report browser test")]

PAGE_FACTS = """(() => ({
  tables: document.querySelectorAll('table').length,
  rows: document.querySelectorAll('tr').length,
  images: [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 100,
                                          w: i.naturalWidth, alt: i.alt,
                                          local: i.src.startsWith('data:image/png;base64,')})),
  headings: [...document.querySelectorAll('h2')].map(h => h.textContent),
  text: document.body.innerText,
  atChance: [...document.querySelectorAll('td.at-chance')].map(td => ({
    text: td.textContent, row: td.parentElement.firstElementChild.textContent,
    colour: getComputedStyle(td).color, italic: getComputedStyle(td).fontStyle})),
  verdicts: [...document.querySelectorAll('tr')].map(tr => [...tr.children].map(c => c.textContent))
            .filter(cells => cells.includes('above chance') || cells.includes('at chance')),
  external: [...document.querySelectorAll('[src],[href]')]
            .map(e => e.getAttribute('src') || e.getAttribute('href'))
            .filter(u => !u.startsWith('data:')),
}))()"""


def test_report_html_renders_tables_and_figures_without_errors(tmp_path):
    pytest.importorskip("websocket", reason="needs websocket-client (the test extra)")
    from PIL import Image

    from harness.study.report.markdown import write_report
    files = write_report(full_results(), tmp_path / "report")
    with open_page(files["html"].resolve().as_uri()) as page:
        facts = evaluate(page, PAGE_FACTS)
        shot = tmp_path / "report.png"
        screenshot(page, shot)
        errors = page.errors()
    assert errors == []
    # models-status (header only here), CKNNA, two pairwise (k=5, 10), one layer sweep
    # models-status (header only here), CKNNA (a row per model and k), two pairwise, layers
    assert facts["tables"] == 5 and facts["rows"] == 1 + 5 + 3 + 3 + 4
    assert len(facts["images"]) == 3
    assert all(i["ok"] and i["local"] for i in facts["images"]), facts["images"]
    assert facts["external"] == []
    assert "CKNNA against the states" in facts["headings"] and "Figures" in facts["headings"]
    assert "p < 1/31" in facts["text"] and "95% interval of CKNNA" in facts["text"]
    # A value at chance is marked as such (greyed, italic, the words 'at chance'); one
    # above chance is not.
    marked = facts["atChance"]
    assert marked and all("at chance" in m["text"] for m in marked)
    assert all(m["colour"] == "rgb(119, 119, 119)" and m["italic"] == "italic" for m in marked)
    assert {m["row"] for m in marked} == {"noise-model"}
    verdict = {(row[0], row[2]): row[8] for row in facts["verdicts"]}  # model, k: vs chance
    assert verdict[("noise-model", "10")] == "at chance"
    assert verdict[("related-model", "10")] == "above chance"
    image = Image.open(shot).convert("L")
    assert image.width >= 1000 and image.height > 1500  # the whole page, figures included
    low, high = image.getextrema()
    assert high - low > 200  # text and figures drawn, not a blank page


def test_the_error_check_sees_console_errors_and_broken_images(tmp_path):
    """The checks above can fail: a page with a console error, an uncaught exception and
    a missing image is caught."""
    pytest.importorskip("websocket", reason="needs websocket-client (the test extra)")
    page_file = tmp_path / "bad.html"
    page_file.write_text("<html><body><img src='missing.png'><script>console.error('boom');"
                         "undefined_function();</script></body></html>")
    with open_page(page_file.as_uri()) as page:
        images = evaluate(page, "[...document.images].map(i => i.naturalWidth)")
        errors = page.errors()
    assert images == [0]
    assert any("boom" in e for e in errors) and any("undefined_function" in e or
                                                    "Uncaught" in e for e in errors), errors
