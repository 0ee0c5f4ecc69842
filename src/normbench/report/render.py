"""Writing the report: the HTML page (self-contained: inline CSS, no script, images by relative path),
Markdown, and the CSV files (every run record; each table's numbers)."""

from __future__ import annotations

import csv
import html
import math
import os
from typing import Any

from normbench.record import Status
from normbench.report.records import ScanResult
from normbench.report.reference import STUDY_TITLES
from normbench.report.tables import (
    COLUMNS,
    MAX_HTML_ROWS,
    Table,
    display,
    mechanism_rows,
    pair_rows,
    records,
    table_title,
)

MAX_SKIPPED_LISTED = 1000

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
div.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td.cmp{min-width:22em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr.notrun td{color:#999}td.num{text-align:right;white-space:nowrap}
.verdict-differs{color:#0a6b0a}.verdict-noise{color:#8a5a00}.verdict-cannot{color:#777}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.8em;color:#555;max-width:700px}
.filters figure img{image-rendering:pixelated;width:160px}.filters figcaption{max-width:170px}
.note{font-size:.85em;color:#444}.flag{font-size:.85em;color:#7a3b00;background:#fff4e0;
border-left:3px solid #e0a040;padding:.2em .5em}.skipped td{font-size:.85em}code{background:#f4f4f4;padding:0 .2em}
nav ul{columns:2;font-size:.9em}
"""


STATS_NOTE_HTML = (
    "<p class=note>Cells pool runs that differ only in their seed: mean ± half-width of the 95% "
    "confidence interval of the mean (Student t, n−1 degrees of freedom); n counts completed runs. "
    "With fewer than 3 seeds a cell shows its mean and, for 2, both points instead of an interval. "
    "A comparison uses Welch's t-test at the 5% level: <b>differs</b> when p &lt; 0.05, "
    "<b>within noise</b> otherwise; with one seed on either side it cannot tell. "
    "⚠ marks where a study contradicts itself about the numbers beside it.</p>"
)


def _verdict_class(text: str) -> str:
    if "differs" in text:
        return "verdict-differs"
    if "within noise" in text:
        return "verdict-noise"
    if "cannot tell" in text or "not run" in text:
        return "verdict-cannot"
    return ""


def render_html(tables: list[Table], result: ScanResult, out: str, extra_warnings: list[str],
                title: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p id="summary">{e(result.summary_line())}</p>',
        "<p class=note>Sources: " + ", ".join(f"<code>{e(r)}</code>" for r in result.roots) + "</p>",
        STATS_NOTE_HTML,
    ]
    if tables:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{e(t.name)}">{e(table_title(t))}</a></li>'
                                             for t in tables) + "</ul></nav>")
    else:
        parts.append("<p><b>No finished runs to tabulate.</b></p>")
    for study in ("000", "002", None):
        group = [t for t in tables if (t.study.study if t.study else None) == study]
        if not group:
            continue
        parts.append(f"<h2>{e(STUDY_TITLES[study]) if study else 'Other runs'}</h2>")
        for table in group:
            parts.append(_html_table(table))
    parts.append('<h2 id="skipped">Skipped run records</h2>')
    if result.skipped:
        parts.append(f"<p>{len(result.skipped)} run record(s) were not used:</p>")
        parts.append('<table class="skipped"><tr><th>run dir</th><th>kind</th><th>reason</th></tr>')
        for s in result.skipped[:MAX_SKIPPED_LISTED]:
            parts.append(f"<tr><td><code>{e(s.path)}</code></td><td>{e(s.kind)}</td><td>{e(s.reason)}</td></tr>")
        parts.append("</table>")
        if len(result.skipped) > MAX_SKIPPED_LISTED:
            parts.append(f"<p class=note>… {len(result.skipped) - MAX_SKIPPED_LISTED} more in runs.csv.</p>")
    else:
        parts.append("<p>None.</p>")
    warnings = result.warnings + extra_warnings
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in warnings[:500]) + "</ul>")
    parts.append('<p class=note>Every run record: <a href="runs.csv">runs.csv</a>. '
                 'Tables as Markdown: <a href="report.md">report.md</a>.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    e = html.escape
    header, rows = display(table)
    out = [f'<h3 id="{e(table.name)}">{e(table_title(table))}</h3>']
    for note in table.notes:
        out.append(f"<p class=note>{e(note)}</p>")
    for flag in table.flags:
        out.append(f'<p class="flag">⚠ {e(flag)}</p>')
    if table.convergence_note:
        out.append(f"<p class=note>{e(table.convergence_note)}</p>")
    out.append(f'<div class="scroll"><table class="results" data-table="{e(table.name)}"><tr>'
               + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    numeric = {i for i, h in enumerate(header) if h in {c.title for c in COLUMNS} | {"n", "study", "ours − study"}}
    for row_obj, line in zip(table.rows, rows, strict=False):
        cls = ' class="notrun"' if row_obj.cell is None else ""
        cells = []
        for i, text in enumerate(line):
            attr = ' class="num"' if i in numeric else ""
            if i == len(line) - 1:
                attr = f' class="cmp {_verdict_class(text)}"'
            cells.append(f"<td{attr}>{e(text)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    if len(table.rows) > MAX_HTML_ROWS:
        out.append(f"<p class=note>Showing {MAX_HTML_ROWS} of {len(table.rows)} rows; all rows: "
                   f'<a href="tables/{e(table.name)}.csv">tables/{e(table.name)}.csv</a>.</p>')
    else:
        out.append(f'<p class=note>CSV: <a href="tables/{e(table.name)}.csv">tables/{e(table.name)}.csv</a></p>')
    if table.pairs:
        out.append(_html_pairs(table))
    if table.mechanism:
        out.append(_html_mechanism(table))
    for caption, path in table.figures:
        out.append(f'<figure><img src="{e(path)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    if table.filters:
        out.append('<div class="filters"><p class=note>First-layer convolution filters (one run per row):</p>')
        for caption, path in table.filters:
            out.append(f'<figure><img src="{e(path)}" alt="filters {e(caption)}">'
                       f"<figcaption>{e(caption)}</figcaption></figure>")
        out.append("</div>")
    return "\n".join(out)


def _html_small_table(note: str, css: str, name: str, header: list[str], rows: list[list[str]],
                      cell=lambda i, t: f"<td>{html.escape(t)}</td>") -> str:
    """A note and a plain table (the study's comparisons, the mechanism table); `cell(i, text)` renders a cell."""
    e = html.escape
    out = [f"<p class=note>{e(note)}</p>", f'<table class="{css}" data-table="{e(name)}"><tr>'
           + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(cell(i, t) for i, t in enumerate(line)) + "</tr>" for line in rows]
    out.append("</table>")
    return "\n".join(out)


def _html_pairs(table: Table) -> str:
    header, rows = pair_rows(table)
    return _html_small_table(
        "The study's own comparisons, each by Welch's t-test on our runs:", "pairs", f"{table.name}_pairs",
        header, rows, lambda i, t: (f'<td class="cmp {_verdict_class(t)}">{html.escape(t)}</td>' if i == 2
                                    else f"<td>{html.escape(t)}</td>"))


def _html_mechanism(table: Table) -> str:
    header, rows = mechanism_rows(table)
    return _html_small_table(
        "Optimisation mechanism per norm and learning rate over this table's runs (study 000 section 9; "
        "definitions in the README):", "mechanism", f"{table.name}_mechanism", header, rows)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(t) for t in line) + " |" for line in rows]
    return out


def render_markdown(tables: list[Table], result: ScanResult, title: str) -> str:
    lines = [f"# {title}", "", result.summary_line(), "",
             "Cells: mean ± 95% CI half-width (Student t) over seeds; comparisons: Welch's t-test at 5%.", ""]
    for table in tables:
        lines += [f"## {table_title(table)}", ""]
        notes = table.notes + [f"⚠ {f}" for f in table.flags] + ([table.convergence_note] if table.convergence_note else [])
        lines += [f"> {n}" for n in notes] + ([""] if notes else [])
        header, rows = display(table)
        lines += _md_table(header, rows) + [""]
        if len(table.rows) > MAX_HTML_ROWS:
            lines += [f"Showing {MAX_HTML_ROWS} of {len(table.rows)} rows; all in tables/{table.name}.csv.", ""]
        if table.pairs:
            lines += _md_table(*pair_rows(table)) + [""]
        if table.mechanism:
            lines += _md_table(*mechanism_rows(table)) + [""]
        for caption, path in table.figures:
            lines += [f"![{_md_escape(caption)}]({path})", ""]
    if result.skipped:
        lines += ["## Skipped run records", ""]
        lines += [f"- `{s.path}`: {s.kind}: {s.reason}" for s in result.skipped[:MAX_SKIPPED_LISTED]] + [""]
    return "\n".join(lines)


def write_runs_csv(result: ScanResult, path: str) -> None:
    choice_keys: list[str] = []
    metric_keys: list[str] = []
    seen_c, seen_m = set(), set()
    for run in result.runs:
        for k in run.choices:
            if k not in seen_c:
                seen_c.add(k)
                choice_keys.append(k)
        for k in run.metrics:
            if k not in seen_m:
                seen_m.add(k)
                metric_keys.append(k)
    header = (["path", "identity", "status", "experiment"] + [f"choice/{k}" for k in choice_keys]
              + ["overrides"] + [f"metric/{k}" for k in metric_keys]
              + ["objective", "epochs_done", "diverged_epoch", "error", "skipped", "skip_reason"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for run in result.runs:
            s = run.summary
            w.writerow([run.path, run.identity, run.status, run.experiment]
                       + [_csv_value(run.choices.get(k)) for k in choice_keys]
                       + [" ".join(run.overrides)]
                       + [_csv_value(run.metrics.get(k)) for k in metric_keys]
                       + [_csv_value(s.get("objective")), _csv_value(s.get("epochs_done")),
                          _csv_value(s.get("diverged_epoch")), _csv_value(s.get("error")), "", ""])
        blank = [""] * (len(choice_keys) + 1 + len(metric_keys) + 4)
        for sk in result.skipped:
            status = Status.RUNNING.value if sk.kind == "in progress" else ""
            w.writerow([sk.path, "", status, ""] + blank + [sk.kind, sk.reason])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return value


def write_table_csv(table: Table, path: str) -> None:
    header, rows = records(table)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for line in rows:
            w.writerow([_csv_value(v) for v in line])



def write_text(path: str, text: str) -> None:
    """Via a temp file + rename: a reader never sees half a page."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
