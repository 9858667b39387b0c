"""Retrieval-evaluation reports people read: ``report.md`` and one self-contained ``report.html`` per run.

    from dualenc.report import compare_reports, write_report

    write_report("eval/vidla/")                       # reads eval/vidla/metrics.json (from `dualenc eval`)
    compare_reports(["eval/meanp/", "eval/vidla/"], "eval/compare/", labels=["meanP", "VidLA"])

``report.html`` needs nothing beside it: plots are base64 PNGs drawn with matplotlib's Agg canvas,
thumbnails are read from the files ``metrics["examples"][*]["top"][*]["thumb"]`` names (relative to the
report directory) and embedded as ``data:`` URIs, the CSS is inline and there is no script. Every text
from the metrics (captions are user data) is HTML-escaped. Sections absent from ``metrics.json``
(curves, histograms, examples, bootstrap intervals, ...) are named as absent rather than failing.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DIRECTIONS = ("text_to_video", "video_to_text")
NAMES = {"text_to_video": "text → video", "video_to_text": "video → text"}
SHORT = {"text_to_video": "t2v", "video_to_text": "v2t"}
SUBTITLE = ("model", "videos", "texts", "captions", "index")  # protocol fields under the title
PLOTS = ("curves", "rank_histogram", "similarity")
OPTIONAL = (*PLOTS, "examples", "ci95", "approximate")
RECALL_KEY = re.compile(r"(text_to_video|video_to_text)_R@(\d+)")
SHARD_HASH = "shards_sha256"  # the protocol field that says whether two runs saw the same evaluation data
LIST_ITEMS = 12
MIME = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}
CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:24px 28px 48px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:18px;margin:32px 0 10px;border-bottom:1px solid #e3e6eb;padding-bottom:4px}
.sub,.note{color:#5b6474}.note{font-style:italic}
.warn{background:#fff4e0;border-left:4px solid #e08a00;padding:8px 12px}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #dde1e7;padding:5px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5}td{overflow-wrap:anywhere}
td.num{text-align:right;white-space:nowrap;overflow-wrap:normal;font-variant-numeric:tabular-nums}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{max-width:100%;border:1px solid #e3e6eb}
.ex{border:1px solid #e3e6eb;border-radius:6px;padding:10px 12px;margin:12px 0}
.q{margin-bottom:8px}.dir{background:#e8ecf3;border-radius:4px;padding:1px 6px;font-size:13px;margin-right:6px}
.key{font-family:ui-monospace,monospace;font-size:12px;color:#5b6474;overflow-wrap:anywhere}
.top{display:flex;gap:10px;flex-wrap:wrap}
figure{margin:0;border:3px solid #dde1e7;border-radius:6px;padding:4px;text-align:center}
figure img,.nothumb{height:64px;width:auto;max-width:240px;display:block;background:#eef0f3;border-radius:3px}
.nothumb{width:140px;line-height:64px;color:#8a93a3;font-size:13px}figcaption{font-size:13px;margin-top:4px}
figure.ok{border-color:#1f9d3a;background:#eefaf0}.ok b{color:#1f7a30}
.proto td:first-child{white-space:nowrap;font-weight:600}.proto dl{margin:0}.proto dt{font-weight:600}
.proto dd{margin:0 0 4px 16px}
"""


# --------------------------------------------------------------------------- reading and formatting

def _load(run_dir: str | Path) -> dict:
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"no such report directory: {path}")
    if not (path / "metrics.json").is_file():
        raise FileNotFoundError(f"no metrics.json in {path} (write it with `dualenc eval`)")
    return json.loads((path / "metrics.json").read_text())


def _ks(runs: Sequence[dict]) -> list[int]:
    """Every K with an R@K metric in any run, ascending."""
    found = {int(m.group(2)) for run in runs for key in run if (m := RECALL_KEY.fullmatch(key))}
    return sorted(found) or [1, 5, 10]


def _percent(metrics: dict, key: str) -> str:
    value = metrics.get(key)
    if value is None:
        return "–"
    ci = (metrics.get("ci95") or {}).get(key)
    return f"{100 * value:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def _rank(value) -> str:
    if value is None:
        return "–"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def _scalar(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):  # a long shard list stays readable: the first few and a count
        shown = ", ".join(_scalar(v) for v in value[:LIST_ITEMS])
        return shown + (f", … (+{len(value) - LIST_ITEMS} more)" if len(value) > LIST_ITEMS else "")
    return str(value)


def _cells(metrics: dict, direction: str, ks: Sequence[int], mean_rank: bool = True) -> list[str]:
    """One direction's metric cells: R@K (percent, with CI) for every K, MdR, and MnR if asked."""
    cells = [_percent(metrics, f"{direction}_R@{k}") for k in ks] + [_rank(metrics.get(f"{direction}_MdR"))]
    return cells + ([_rank(metrics.get(f"{direction}_MnR"))] if mean_rank else [])


def _metric_table(metrics: dict) -> tuple[list[str], list[list[str]]]:
    ks = _ks([metrics])
    header = ["direction", *(f"R@{k} (%)" for k in ks), "MdR", "MnR"]
    return header, [[NAMES[d], *_cells(metrics, d, ks)] for d in DIRECTIONS]


def _ci_note(metrics: dict) -> str:
    if metrics.get("ci95"):
        return "brackets: 95% bootstrap confidence interval."
    return "no bootstrap confidence intervals (bootstrap was off)."


def _absent(metrics: dict) -> list[str]:
    return [name for name in OPTIONAL if not metrics.get(name)]


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# --------------------------------------------------------------------------- markdown

def _md(text) -> str:
    return html.escape(_scalar(text), quote=False).replace("|", "\\|")


def _table_md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(_md(c) for c in line) + " |" for line in lines)


def _tree_md(d: dict, depth: int = 0) -> list[str]:
    lines = []
    for key, value in d.items():
        pad, name = "  " * depth, f"**{_md(key)}**" if depth == 0 else f"*{_md(key)}*"
        if isinstance(value, dict) and value:
            lines += [f"{pad}- {name}:", *_tree_md(value, depth + 1)]
        else:
            lines.append(f"{pad}- {name}: {_md(value)}")
    return lines


def _examples_md(examples: Sequence[dict]) -> list[str]:
    lines = []
    for i, ex in enumerate(examples, 1):
        direction = NAMES.get(ex.get("direction"), ex.get("direction", "?"))
        lines.append(f"{i}. {_md(direction)}: “{_md(ex.get('query', ''))}” (`{_md(ex.get('query_key', '?'))}`), "
                     f"correct at rank {_md(ex.get('rank'))}")
        hits = [(f"**`{_md(h.get('key'))}` {h.get('score', 0):.3f} ✓ correct**" if h.get("correct")
                 else f"`{_md(h.get('key'))}` {h.get('score', 0):.3f}") for h in ex.get("top", [])]
        lines.append("   - top: " + ", ".join(hits))
    return lines


def _report_md(metrics: dict) -> str:
    parts = [f"# Retrieval report{' — ' + _md(metrics['label']) if metrics.get('label') else ''}", "",
             _table_md(*_metric_table(metrics)), ""]
    parts += [f"R@K in percent; {_ci_note(metrics)}", ""]
    if metrics.get("approximate"):
        parts += [f"## Approximate index ({_md(metrics['approximate'].get('index', '?'))})", "",
                  *_tree_md(metrics["approximate"]), ""]
    parts += ["## Example queries", ""]
    parts += _examples_md(metrics["examples"]) if metrics.get("examples") else ["_No example queries._"]
    parts += ["", "## Protocol", "", *(_tree_md(metrics["protocol"]) if metrics.get("protocol") else ["_None._"])]
    if metrics.get("seconds"):
        parts += ["", "## Seconds", "", *_tree_md(metrics["seconds"])]
    if _absent(metrics):
        parts += ["", f"_Absent from metrics.json: {', '.join(_absent(metrics))}._"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- html

def _esc(text) -> str:
    return html.escape(_scalar(text))


def _table_html(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: bool = True) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    td = '<td class="num">' if numeric else "<td>"
    body = "".join(f"<tr><th>{_esc(row[0])}</th>" + "".join(f"{td}{_esc(c)}</td>" for c in row[1:]) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tree_html(value) -> str:
    if isinstance(value, dict) and value and all(not isinstance(v, dict) for v in value.values()):
        inline = "; ".join(f"{k}: {_scalar(v)}" for k, v in value.items())
        if len(inline) <= 80:  # {"text_to_video": 400, "video_to_text": 400} reads best on one line
            return _esc(inline)
    if isinstance(value, dict) and value:
        return "<dl>" + "".join(f"<dt>{_esc(k)}</dt><dd>{_tree_html(v)}</dd>" for k, v in value.items()) + "</dl>"
    return _esc(value)


def _kv_html(d: dict) -> str:
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{_tree_html(v)}</td></tr>" for k, v in d.items())
    return f'<table class="proto"><tbody>{rows}</tbody></table>'


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><link rel="icon" href="data:,">'
            f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n")


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _thumb(report_dir: Path, rel) -> str | None:
    """The thumbnail as a data URI, or None when it is null, missing, not an image or outside the report dir."""
    if not rel:
        return None
    path = (report_dir / rel).resolve()
    mime = MIME.get(path.suffix.lower())
    if mime is None or not path.is_file() or not path.is_relative_to(report_dir.resolve()):
        return None
    return _data_uri(path.read_bytes(), mime)


def _image_html(report_dir: Path, rel, alt) -> str:
    uri = _thumb(report_dir, rel)
    return f'<img src="{uri}" alt="{_esc(alt)}">' if uri else '<div class="nothumb">no thumbnail</div>'


def _hit_html(hit: dict, position: int, report_dir: Path) -> str:
    ok = bool(hit.get("correct"))
    text = f"<br>{_esc(hit['text'])}" if hit.get("text") else ""  # a video → text hit may carry its caption
    return (f'<figure class="{"ok" if ok else "hit"}">{_image_html(report_dir, hit.get("thumb"), hit.get("key"))}'
            f'<figcaption>#{position} <span class="key">{_esc(hit.get("key"))}</span>'
            f'<br>score {hit.get("score", 0):.3f}{text}{"<br><b>✓ correct</b>" if ok else ""}</figcaption></figure>')


def _gallery_html(examples: Sequence[dict], report_dir: Path) -> str:
    cards = []
    for ex in examples:
        top = ex.get("top", [])
        where = f"correct at rank {_rank(ex.get('rank'))}"
        if not any(h.get("correct") for h in top):
            where += f" (not in the top {len(top)})"
        query = (f'<div class="q"><span class="dir">{_esc(NAMES.get(ex.get("direction"), ex.get("direction")))}'
                 f'</span><strong>“{_esc(ex.get("query", ""))}”</strong> '
                 f'<span class="key">{_esc(ex.get("query_key"))}</span> · {where}</div>')
        if ex.get("query_thumb"):  # a video → text query is a clip
            query += f'<div class="top">{_image_html(report_dir, ex["query_thumb"], ex.get("query_key"))}</div>'
        hits = "".join(_hit_html(hit, i, report_dir) for i, hit in enumerate(top, 1))
        cards.append(f'<div class="ex">{query}<div class="top">{hits}</div></div>')
    return "".join(cards)


# --------------------------------------------------------------------------- plots

def _figure(ncols: int = 1) -> tuple[Figure, list]:
    fig = Figure(figsize=(5.4 * ncols, 3.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _log_x(ax, top: float) -> None:
    """Log x-axis with plain tick labels (1, 2, 5, 10, 20, ...) rather than powers of ten."""
    ticks = [m * 10**e for e in range(len(str(int(top))) + 1) for m in (1, 2, 5) if m * 10**e <= top * 1.5]
    ax.set_xscale("log")
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()


def _figure_png(fig: Figure) -> str:
    """The figure as a ``data:image/png;base64,...`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return _data_uri(buf.getvalue(), "image/png")


def _curves_png(panels: dict[str, list[tuple[str, dict]]]) -> str:
    """Recall@K curves, log-x: one axes per panel title, one line per (label, {"k", "recall"}) in it."""
    fig, axes = _figure(len(panels))
    for ax, (title, series) in zip(axes, panels.items()):
        for label, curve in series:
            ax.plot(curve["k"], [100 * r for r in curve["recall"]], marker=".", markersize=4, label=label)
        _log_x(ax, max((max(c["k"]) for _, c in series), default=10))
        ax.set(ylim=(0, 100), xlabel="K", ylabel="recall@K (%)", title=title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _figure_png(fig)


def _hist_png(series: dict[str, dict], title: str, xlabel: str, log_x: bool, density: bool) -> str:
    """Overlaid step histograms of {label: {"bin_edges", "counts", optional "mean"}}, normalised to compare."""
    fig, (ax,) = _figure()
    for i, (label, h) in enumerate(series.items()):
        edges, counts = h["bin_edges"], h["counts"]
        total = sum(counts) or 1
        heights = [c / total / ((b - a) if density else 1) for c, a, b in zip(counts, edges, edges[1:])]
        ax.stairs(heights, edges, fill=True, alpha=0.35, color=f"C{i}", label=label)
        ax.stairs(heights, edges, color=f"C{i}")
        if h.get("mean") is not None:
            ax.axvline(h["mean"], color=f"C{i}", linestyle="--", linewidth=1)
    if log_x:
        _log_x(ax, max(max(h["bin_edges"]) for h in series.values()))
    ax.set(title=title, xlabel=xlabel, ylabel="density" if density else "fraction of queries")
    ax.legend(fontsize=8)
    return _figure_png(fig)


def _plots_html(metrics: dict) -> str:
    images = []
    if metrics.get("curves"):
        images.append(_curves_png({"recall@K": [(NAMES.get(d, d), c) for d, c in metrics["curves"].items()]}))
    if metrics.get("rank_histogram"):
        images.append(_hist_png({NAMES.get(d, d): h for d, h in metrics["rank_histogram"].items()},
                                "rank of the correct item", "rank", log_x=True, density=False))
    if metrics.get("similarity"):
        images.append(_hist_png({k if h.get("mean") is None else f"{k} (mean {h['mean']:.3f})": h
                                 for k, h in metrics["similarity"].items()},
                                "similarity of positive and negative pairs", "score", log_x=False, density=True))
    return "".join(f'<img src="{uri}" alt="plot">' for uri in images)


def _report_html(metrics: dict, report_dir: Path) -> str:
    label = metrics.get("label")
    proto = metrics.get("protocol") or {}
    sub = " · ".join(f"{k} {_scalar(proto[k])}" for k in SUBTITLE if k in proto)
    body = [f"<h1>Retrieval report{' — ' + _esc(label) if label else ''}</h1><div class='sub'>{_esc(sub)}</div>",
            "<h2>Metrics</h2>", _table_html(*_metric_table(metrics)),
            f"<p class='note'>R@K in percent; {_ci_note(metrics)}</p>"]
    if metrics.get("approximate"):
        body += [f"<h2>Approximate index ({_esc(metrics['approximate'].get('index', '?'))})</h2>",
                 _kv_html(metrics["approximate"])]
    if any(metrics.get(p) for p in PLOTS):
        body += ["<h2>Plots</h2>", f"<div class='plots'>{_plots_html(metrics)}</div>"]
    body.append("<h2>Example queries</h2>")
    if metrics.get("thumbnails"):
        body.append(f"<p class='note'>{_esc(metrics['thumbnails'])}</p>")
    body.append(_gallery_html(metrics["examples"], report_dir) if metrics.get("examples")
                else "<p class='note'>No example queries in metrics.json.</p>")
    body += ["<h2>Protocol</h2>", _kv_html(proto)]
    if metrics.get("seconds"):
        body += ["<h2>Seconds</h2>", _kv_html(metrics["seconds"])]
    if _absent(metrics):
        body.append(f"<p class='note'>Absent from metrics.json: {_esc(', '.join(_absent(metrics)))}.</p>")
    return _page(f"Retrieval report {label or ''}".strip(), "".join(body))


def write_report(report_dir: str | Path, metrics: dict | None = None) -> dict[str, Path]:
    """Writes ``report.md`` and the self-contained ``report.html`` of one evaluation.

    Args:
        report_dir: the report directory; thumbnails are resolved relative to it (paths leading outside it
            are shown as "no thumbnail").
        metrics: the evaluation result; default: read from ``report_dir/metrics.json``.

    Returns:
        ``{"md": path of report.md, "html": path of report.html}``.

    Raises:
        FileNotFoundError: ``metrics`` is None and the directory or its metrics.json does not exist.
    """
    report_dir = Path(report_dir)
    if metrics is None:
        metrics = _load(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": report_dir / "report.md", "html": report_dir / "report.html"}
    paths["md"].write_text(_report_md(metrics), encoding="utf-8")
    paths["html"].write_text(_report_html(metrics, report_dir), encoding="utf-8")
    return paths


# --------------------------------------------------------------------------- comparing runs

def _labels(run_dirs: Sequence[Path], runs: Sequence[dict], labels: Sequence[str] | None) -> list[str]:
    if labels is not None and len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs")
    wanted = list(labels) if labels is not None else [
        m.get("label") or d.resolve().name for d, m in zip(run_dirs, runs)]
    out: list[str] = []
    for label in map(str, wanted):
        name, n = label, 1
        while name in out:
            n += 1
            name = f"{label} ({n})"
        out.append(name)
    return out


def _differences(protocols: Sequence[dict]) -> dict[str, list]:
    """The protocol fields (nested ones dotted: ``queries.text_to_video``) whose values are not all equal."""
    flat = [_flatten(p) for p in protocols]
    fields = dict.fromkeys(f for p in flat for f in p)
    return {f: [p.get(f) for p in flat] for f in fields
            if len({json.dumps(p.get(f), sort_keys=True) for p in flat}) > 1}


def _shard_warnings(names: Sequence[str], runs: Sequence[dict]) -> list[str]:
    hashes = [(run.get("protocol") or {}).get(SHARD_HASH) for run in runs]
    if None in hashes:
        missing = ", ".join(n for n, h in zip(names, hashes) if h is None)
        return [f"{SHARD_HASH} is missing for {missing}: whether the runs saw the same evaluation shards is unknown."]
    if len(set(hashes)) > 1:
        return [f"The evaluation shards differ ({SHARD_HASH}): these runs are not comparable."]
    return []


def compare_reports(run_dirs: Sequence[str | Path], out_dir: str | Path,
                    labels: Sequence[str] | None = None) -> dict[str, Path]:
    """Compares evaluations: one table, overlaid recall@K curves and the protocol fields that differ.

    Args:
        run_dirs: report directories, each holding a ``metrics.json``; rows keep this order.
        out_dir: where ``comparison.json``, ``report.md`` and ``report.html`` go (created if missing).
        labels: one name per run; default: each run's ``metrics["label"]``, else its directory's name.
            Duplicates get " (2)", " (3)", ... appended.

    Returns:
        ``{"json": ..., "md": ..., "html": ...}``, the paths written.

    Raises:
        FileNotFoundError: a run directory or its metrics.json does not exist (the message names it).
        ValueError: ``labels`` is not one per run.
    """
    dirs = [Path(d) for d in run_dirs]
    runs = [_load(d) for d in dirs]
    names = _labels(dirs, runs, labels)
    ks = _ks(runs)
    keys = [f"{d}_{m}" for d in DIRECTIONS for m in (*(f"R@{k}" for k in ks), "MdR", "MnR")]
    differ = _differences([run.get("protocol") or {} for run in runs])
    warnings = _shard_warnings(names, runs)
    summary = {"labels": names, "runs": [str(d) for d in dirs],
               "metrics": {k: [run.get(k) for run in runs] for k in keys},
               "ci95": {k: [(run.get("ci95") or {}).get(k) for run in runs] for k in keys if "R@" in k},
               "protocol_differences": differ, "warnings": warnings}
    header = ["run", *(f"{SHORT[d]} {c}" for d in DIRECTIONS for c in (*(f"R@{k} (%)" for k in ks), "MdR"))]
    rows = [[name, *(c for d in DIRECTIONS for c in _cells(run, d, ks, mean_rank=False))]
            for name, run in zip(names, runs)]
    diff_header, diff_rows = ["field", *names], [[field, *values] for field, values in differ.items()]
    note = "R@K in percent; brackets: 95% bootstrap confidence interval where present."

    md = ["# Retrieval comparison", "", *(f"> **Warning:** {_md(w)}" for w in warnings), "",
          _table_md(header, rows), "", note, "", "## Protocol differences", "",
          _table_md(diff_header, diff_rows) if diff_rows else "_The protocols are identical._"]
    curves = {NAMES[d]: [(n, run["curves"][d]) for n, run in zip(names, runs) if d in (run.get("curves") or {})]
              for d in DIRECTIONS}
    curves = {title: series for title, series in curves.items() if series}
    no_curves = [n for n, run in zip(names, runs) if not run.get("curves")]
    body = ["<h1>Retrieval comparison</h1>", *(f"<p class='warn'><b>Warning:</b> {_esc(w)}</p>" for w in warnings),
            "<h2>Metrics</h2>", _table_html(header, rows), f"<p class='note'>{_esc(note)}</p>"]
    if curves:
        body += ["<h2>Recall@K</h2>", f'<div class="plots"><img src="{_curves_png(curves)}" alt="recall curves"></div>']
    if no_curves:
        body.append(f"<p class='note'>No recall curves for: {_esc(', '.join(no_curves))}.</p>")
    body += ["<h2>Protocol differences</h2>", _table_html(diff_header, diff_rows, numeric=False)
             if diff_rows else "<p class='note'>The protocols are identical.</p>"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "comparison.json", "md": out / "report.md", "html": out / "report.html"}
    paths["json"].write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    paths["md"].write_text("\n".join(md) + "\n", encoding="utf-8")
    paths["html"].write_text(_page("Retrieval comparison", "".join(body)), encoding="utf-8")
    return paths
