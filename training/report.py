"""A self-contained HTML evaluation report: recall curves by K, slices and systems side by side.

Plots are drawn with matplotlib (Agg) and embedded as base64 PNGs, so the file opens anywhere.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

KS = (10, 100, 1000)
SLICES = ("all", "head", "torso", "tail", "with_history", "without_history")


def _png(fig: plt.Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def recall_curves(metrics: dict) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, slices in metrics.items():
        ax.plot(KS, [slices["all"][f"recall@{k}"] for k in KS], marker="o", label=system)
    ax.set(xscale="log", xlabel="K", ylabel="purchase recall@K", title="Recall by K (test window)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def slice_bars(metrics: dict, metric: str = "recall@100") -> str:
    systems = list(metrics)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        values = [metrics[system].get(s, {}).get(metric, 0.0) for s in SLICES]
        ax.bar([x + i * width for x in range(len(SLICES))], values, width, label=system)
    ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(SLICES))], SLICES, fontsize=8)
    ax.set(ylabel=metric, title=f"{metric} by slice")
    ax.legend(fontsize=7)
    return _png(fig)


def write_report(metrics: dict, out: Path, title: str, extra: dict | None = None) -> Path:
    """Write the HTML report: plots, then one table per slice with every system's metrics."""
    rows = []
    for s in SLICES:
        present = [m for m in metrics.values() if s in m]
        if not present:
            continue
        rows.append(f"<h3>{html.escape(s)}</h3><table><tr><th>system</th><th>n</th>"
                    + "".join(f"<th>{c}</th>" for c in ("recall@10", "recall@100", "recall@1000", "ndcg@10"))
                    + "</tr>")
        for system, slices in metrics.items():
            if s in slices:
                m = slices[s]
                rows.append(f"<tr><td>{html.escape(system)}</td><td>{m['n']}</td>"
                            + "".join(f"<td>{m[c]:.3f}</td>" for c in ("recall@10", "recall@100", "recall@1000",
                                                                          "ndcg@10")) + "</tr>")
        rows.append("</table>")
    details = f"<pre>{html.escape(json.dumps(extra, indent=2))}</pre>" if extra else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head>
<body><h1>{html.escape(title)}</h1>
<img alt="recall by K" src="data:image/png;base64,{recall_curves(metrics)}">
<img alt="recall@100 by slice" src="data:image/png;base64,{slice_bars(metrics)}">
{''.join(rows)}{details}</body></html>"""
    out.write_text(page)
    return out
