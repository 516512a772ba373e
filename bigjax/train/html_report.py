"""report.html: one self-contained page of a prediction run (every image inline as base64, no network).

It shows the run's settings, the metrics with their 95 % intervals when labels exist (QWK/accuracy
or accuracy/AUC), the confusion matrix, the ROC curve of a binary task, the localisation of tumour
by each tile score kind when masks exist, and a table of slides (thumbnail, heatmap, prediction,
confidence, label) that sorts by any column when its header is clicked (a few lines of inline JavaScript).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
from pathlib import Path

import numpy as np
from PIL import Image

from bigjax.train import heatmap

THUMB = 160  # px, the slide table's thumbnails
HEAT = 360  # px, the slide table's heatmaps

_STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#eee;cursor:pointer}th.sorted{background:#cde}.num{text-align:right}
img{display:block}details{margin:.5em 0}"""

_SORT = """function sortBy(th){const t=th.closest('table'),i=[...th.parentNode.children].indexOf(th);
const rows=[...t.tBodies[0].rows],up=th.dataset.dir!=='asc';th.dataset.dir=up?'asc':'desc';
const key=r=>{const v=r.cells[i].dataset.sort??r.cells[i].textContent;const n=parseFloat(v);return isNaN(n)?v:n};
rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*(up?1:-1)});
rows.forEach(r=>t.tBodies[0].appendChild(r));[...th.parentNode.children].forEach(h=>h.classList.remove('sorted'));
th.classList.add('sorted')}"""


def data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    """The image as a data: URI (base64), embedded in the page."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def write(path: Path, run, summary: dict, rows, results, labels: np.ndarray, images: dict) -> Path:
    """Write the report of ``summary`` (from ``prediction_files.write_outputs``) to ``path``."""
    names = summary["classes"]
    parts = [f"<h1>Predictions of {html.escape(str(run.workdir))}</h1>",
             f"<p>Best checkpoint: step {run.best_step}; {len(rows)} slides; tile score drawn: "
             f"<b>{html.escape(summary['score'])}</b>.</p>",
             _settings(run), _metrics(summary), _confusion(labels, results, names)]
    if len(names) == 2 and len(set(labels[labels >= 0])) == 2:
        parts.append(_roc(labels, results))
    parts.append(_slide_table(rows, results, labels, names, images))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>bigjax predictions</title>"
            f"<style>{_STYLE}</style><script>{_SORT}</script></head><body>{''.join(parts)}</body></html>")
    path.write_text(page, encoding="utf-8")
    return path


def _settings(run) -> str:
    fields = dataclasses.asdict(run.config)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in fields.items())
    tiling = ", ".join(f"{k}={v}" for k, v in run.tiling.items())
    return (f"<h2>Settings</h2><p>Tiling (the run's own): {html.escape(tiling)}</p>"
            f"<details><summary>Training configuration</summary><table>{rows}</table></details>")


def _metrics(summary: dict) -> str:
    lines = [f"<li>{name} {m['value']:.3f} [95% CI {m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]</li>"
             for name, m in summary["metrics"].items()]
    if not lines:
        lines = ["<li>no labels: no metrics</li>"]
    return "<h2>Metrics</h2><ul>" + "".join(lines) + "</ul>" + _localisation(summary.get("localisation", {}))


def _localisation(found: dict) -> str:
    """One row per tile-score kind: its localisation AUC against the tumour masks, with its interval."""
    if not found:
        return ""
    rows = "".join(f"<tr><td>{html.escape(kind)}</td><td class='num'>{loc['auc']:.3f}</td>"
                   f"<td class='num'>{loc['ci95'][0]:.3f} – {loc['ci95'][1]:.3f}</td>"
                   f"<td class='num'>{loc['slides']} of {loc['slides_with_mask']}</td></tr>"
                   for kind, loc in found.items())
    return ("<h2>Localisation of tumour</h2><p>Per slide, the ROC AUC of the tile score for &ldquo;tile is "
            "&ge; 50 % tumour&rdquo; in the label mask, over its tissue tiles; mean over the slides that have "
            "tumour and non-tumour tiles, 95 % bootstrap interval over slides.</p><table><tr><th>tile score</th>"
            f"<th>AUC</th><th>95 % CI</th><th>slides</th></tr>{rows}</table>")


def _confusion(labels: np.ndarray, results, names) -> str:
    known = labels >= 0
    if not known.any():
        return ""
    preds = np.array([int(np.argmax(r.probs)) for r in results])
    matrix = np.zeros((len(names), len(names)), int)
    np.add.at(matrix, (labels[known], preds[known]), 1)
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    body = "".join(f"<tr><th>{html.escape(n)}</th>" + "".join(f"<td class='num'>{v}</td>" for v in row) + "</tr>"
                   for n, row in zip(names, matrix))
    return (f"<h2>Confusion matrix</h2><p>rows: label, columns: prediction</p>"
            f"<table><tr><th></th>{head}</tr>{body}</table>")


def _roc(labels: np.ndarray, results) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    known = labels >= 0
    fpr, tpr, _ = roc_curve(labels[known], np.array([r.probs[1] for r in results])[known])
    fig, ax = plt.subplots(figsize=(3.2, 3.2), dpi=100)
    ax.plot(fpr, tpr)
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return f"<h2>ROC</h2><img alt='ROC' src='{data_uri(Image.open(buffer))}'>"


def _slide_table(rows, results, labels, names, images: dict) -> str:
    head = "".join(f"<th onclick='sortBy(this)'>{h}</th>" for h in
                   ("thumbnail", "heatmap", "slide", "prediction", "confidence", "label", "correct", "tiles"))
    body = []
    order = np.argsort([-r.probs.max() for r in results], kind="stable")
    for i in order:
        row, r = rows[i], results[i]
        thumb = Image.fromarray(heatmap.thumbnail(row.source, THUMB)[0])
        heat = ""
        if row.slide_id in images:
            picture = Image.open(images[row.slide_id])
            picture.thumbnail((HEAT, HEAT * 4))
            heat = f"<img alt='heatmap {html.escape(row.slide_id)}' src='{data_uri(picture)}'>"
        pred, known = int(np.argmax(r.probs)), labels[i] >= 0
        cells = [f"<img alt='slide {html.escape(row.slide_id)}' src='{data_uri(thumb, 'JPEG')}'>", heat,
                 html.escape(row.slide_id), names[pred], f"{r.probs.max():.3f}",
                 names[labels[i]] if known else "", str(int(pred == labels[i])) if known else "", str(len(r.coords))]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (f"<h2>Slides</h2><p>Click a column header to sort.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
