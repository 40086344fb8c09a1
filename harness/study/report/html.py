"""report.html: the markdown report as one self-contained HTML page (figures embedded as
base64 PNG), so a researcher can send a single file. No scripts, no external resources.

It converts only the markdown `harness.study.report.markdown` writes: headings, paragraphs, bullet
lists, pipe tables, images on their own line, `code` and **bold**."""
from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from harness.cknna.chance import MARK

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em;
       color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; }
th { background: #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; }
code { background: #f3f3f3; padding: 0 0.2em; }
td.at-chance { color: #777; background: #f1f1f1; font-style: italic; }
"""
_IMAGE = re.compile(r"^!\[(?P<alt>[^\]]*)\]\((?P<src>[^)]+)\)$")


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(rows: list[str]) -> list[str]:
    header, align, body = _cells(rows[0]), _cells(rows[1]), [_cells(r) for r in rows[2:]]
    numeric = [a.endswith(":") for a in align]
    out = ["<table>", "<tr>" + "".join(f"<th>{_inline(h)}</th>" for h in header) + "</tr>"]
    for row in body:
        out.append("<tr>" + "".join(_cell(c, i < len(numeric) and numeric[i])
                                    for i, c in enumerate(row)) + "</tr>")
    return out + ["</table>"]


def _cell(text: str, numeric: bool) -> str:
    """A table cell; one holding a value not above chance is marked (class at-chance)."""
    classes = (["num"] if numeric else []) + (["at-chance"] if MARK in text else [])
    attr = f' class="{" ".join(classes)}"' if classes else ""
    title = ' title="not above its chance level (adjusted p-value)"' if MARK in text else ""
    return f"<td{attr}{title}>{_inline(text)}</td>"


def _figure(alt: str, src: str, base: Path) -> str:
    data = base64.b64encode((base / src).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


def markdown_to_html(markdown: str, base: Path, title: str) -> str:
    """The page; images are read from `base` and embedded."""
    body, lines, i = [], markdown.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            j = i
            while j < len(lines) and lines[j].startswith("|"):
                j += 1
            body += _table(lines[i:j])
            i = j
            continue
        if line.startswith("- "):
            body.append("<ul>")
            while i < len(lines) and lines[i].startswith("- "):
                body.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            body.append("</ul>")
            continue
        heading = re.match(r"^(#{1,6}) (.*)$", line)
        image = _IMAGE.match(line.strip())
        if heading:
            level = len(heading[1])
            body.append(f"<h{level}>{_inline(heading[2])}</h{level}>")
        elif image:
            body.append(_figure(image["alt"], image["src"], base))
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
