"""The HTML report: one self-contained file (plots embedded as data URIs, no network),
every value escaped, tables sortable by clicking a header (a few lines of plain script),
details folded under <details>."""
from __future__ import annotations

import base64
import html
from pathlib import Path

STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;cursor:pointer;user-select:none}
th:first-child,td:first-child{text-align:left}
th.asc::after{content:" \\25B2"}th.desc::after{content:" \\25BC"}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}
img{max-width:100%}p.note{max-width:70em;font-size:13px;color:#444}"""

# Click a header: sort that table's rows by the column (numbers by value: the first number
# in the cell, so "+0.23 ±0.07 (n=6)" sorts by 0.23; text otherwise); click again: reverse.
SCRIPT = """function qbCell(row,i){var t=row.cells[i]?row.cells[i].textContent.trim():"";
var m=t.replace(/^~/,"").match(/^[+-]?\\d+(\\.\\d+)?(e[+-]?\\d+)?/i);return m?[0,parseFloat(m[0])]:[1,t];}
document.querySelectorAll("table.sortable th").forEach(function(th){th.addEventListener("click",function(){
var table=th.closest("table"),body=table.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
var desc=th.classList.contains("asc");table.querySelectorAll("th").forEach(function(h){h.classList.remove("asc","desc");});
th.classList.add(desc?"desc":"asc");var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=qbCell(a,i),y=qbCell(b,i);var c=x[0]-y[0]||(x[1]<y[1]?-1:x[1]>y[1]?1:0);return desc?-c:c;});
rows.forEach(function(r){body.appendChild(r);});});});"""


def image_tag(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(frame, table_id: str) -> str:
    shown = frame.astype(object).where(frame.notna(), "-")
    return shown.to_html(index=False, escape=True, border=0, classes="sortable", table_id=table_id,
                         float_format=lambda v: f"{v:.4g}")


def render_html(sections, heatmap: Path | None, plots: list[Path]) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>qbench report</title>',
             f"<style>{STYLE}</style></head><body>", "<h1>qbench report</h1>"]
    for n, section in enumerate(sections):
        body = []
        if section.table is not None:
            body.append(table_html(section.table, "matrix" if n == 0 else f"t{n}"))
        if section.text:
            body += [f'<p class="note">{html.escape(par)}</p>' for par in section.text.split("\n\n")]
        if n == 0 and heatmap is not None:
            body.append(image_tag(heatmap, "headline matrix heatmap"))
        title = html.escape(section.title)
        if section.fold:
            parts.append(f"<details><summary>{title}</summary>{''.join(body)}</details>")
        else:
            parts += [f"<h2>{title}</h2>", *body]
    if plots:
        parts.append("<details><summary>Plots</summary>"
                     + "".join(image_tag(p, p.stem) for p in plots) + "</details>")
    parts += [f"<script>{SCRIPT}</script>", "</body></html>"]
    return "\n".join(parts)
