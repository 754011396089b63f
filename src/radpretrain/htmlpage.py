"""Self-contained HTML pages: the evaluation report, the run report and the compare view share these.

Every page opens offline: the style sheet is inline, figures are base64 PNG data URIs, there is
no script and no external asset.  Tables take rows of cells; a cell may be ``(css_class, text)``
(``better`` / ``worse`` colour a significant difference).  Everything is escaped here, so callers
pass plain text; only :class:`Markup` (what :func:`link` returns) goes in as it is.
"""

from __future__ import annotations

import base64
import html
import io
from urllib.parse import quote

import numpy as np

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;
color:#222;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
h3{font-size:1.05em;margin-bottom:.3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f3f3f3}
td.l,th.l{text-align:left}.better{color:#1a7f37;font-weight:600}.worse{color:#b42318;font-weight:600}
.verdict{background:#f6f8fa;border-left:4px solid #1f77b4;padding:.6em 1em;margin:1em 0}
img{max-width:100%;height:auto}.small{color:#666;font-size:.85em}code{background:#f3f3f3;padding:0 .2em}
img.preview{image-rendering:pixelated;border:1px solid #ddd;margin:.2em 0}
pre{background:#f6f8fa;padding:.6em 1em;overflow-x:auto;font-size:.85em}
"""


class Markup(str):
    """Text that is already HTML (a link): tables put it in as it is instead of escaping it."""


def esc(text) -> str:
    return text if isinstance(text, Markup) else html.escape(str(text))


def link(href: str, text: str) -> Markup:
    """A link to a file beside the page (``href`` relative, e.g. ``../runs/seed1/report.html``)."""
    return Markup(f"<a href='{html.escape(quote(href, safe='/.-_~'))}'>{html.escape(str(text))}</a>")


def fmt(v, digits: int = 3) -> str:
    """A number with ``digits`` decimals; an en dash for None / NaN / inf."""
    if v is None:
        return "–"
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not np.isfinite(f):
        return "–"
    return f"{f:.{digits}f}"


def fmt_p(p) -> str:
    if p is None or not np.isfinite(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def duration(seconds) -> str:
    """``42 s``, ``8.6 min``, ``2.3 h``; an en dash when unknown."""
    if seconds is None or not np.isfinite(float(seconds)):
        return "–"
    s = float(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def count(n) -> str:
    """``1,234,567``; an en dash when unknown."""
    if n is None or (isinstance(n, float) and not np.isfinite(n)):
        return "–"
    return f"{int(n):,}"


def png_bytes(fig, dpi: int = 100) -> bytes:
    """A matplotlib ``Figure`` as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def img(data: bytes, alt: str, css_class: str = "", mime: str = "image/png", width: int | None = None) -> str:
    """An ``<img>`` whose picture is inside the page (a base64 data URI); ``width``: shown that many px wide."""
    cls = f" class='{esc(css_class)}'" if css_class else ""
    size = f" width='{int(width)}'" if width else ""
    return f"<img{cls}{size} alt='{esc(alt)}' src='data:{mime};base64,{base64.b64encode(data).decode()}'>"


def png_width(data: bytes) -> int | None:
    """The width in pixels of PNG bytes (from the IHDR chunk), or None when they are not a PNG."""
    if len(data) >= 24 and data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big")
    return None


def html_table(head, rows, left: int = 3) -> str:
    """A table; the first ``left`` columns are left-aligned (labels), the others right-aligned (numbers)."""
    h = "".join(f"<th class='l'>{esc(x)}</th>" if i < left else f"<th>{esc(x)}</th>" for i, x in enumerate(head))
    body = []
    for r in rows:
        cells = []
        for i, x in enumerate(r):
            cls = "l" if i < left else ""
            if isinstance(x, tuple):
                cls += f" {x[0]}" if x[0] else ""
                x = x[1]
            cells.append(f"<td class='{cls.strip()}'>{esc(x)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{h}</tr>{''.join(body)}</table>"


def kv_table(items) -> str:
    """A two-column table of (name, text) pairs (setup, compute, versions)."""
    return "<table>" + "".join(f"<tr><th class='l'>{esc(k)}</th><td class='l'>{esc(v)}</td></tr>"
                               for k, v in items) + "</table>"


def md_table(head, rows) -> str:
    lines = ["| " + " | ".join(str(h) for h in head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for x in r:
            if isinstance(x, tuple):
                x = f"**{x[1]}**" if x[0] else x[1]
            cells.append(str(x))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def page(title: str, body) -> str:
    """A whole HTML document: ``title`` as the heading, then the ``body`` fragments (already HTML)."""
    return "\n".join([f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
                      f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1>", *body, "</body></html>"])
