"""Charts for the HTML report, drawn with matplotlib (Agg) and returned as inline SVG markup.

Text is drawn as glyph outlines, so a chart needs no font on the reader's machine, and every
comment (where matplotlib echoes label text) is stripped, so nothing a label contains reaches the page
as markup. Charts take plain summaries (mean/lo/hi dicts from `infusion_audit.stats`), not records.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from markupsafe import Markup  # noqa: E402
from PIL import Image  # noqa: E402

STYLE = {"svg.fonttype": "path", "svg.hashsalt": "infusion-audit", "font.size": 9, "axes.grid": True,
         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False}
MARKERS = "osD^vP*Xh<>"
_PREAMBLE = re.compile(r"^.*?(?=<svg)", re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>", re.S)


def to_svg(fig: plt.Figure) -> Markup:
    """Serialise a figure to bare inline <svg> markup (no XML preamble, metadata or comments) and close it."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    svg = _METADATA.sub("", _COMMENT.sub("", _PREAMBLE.sub("", buf.getvalue(), count=1)))
    return Markup(svg.replace("<svg ", '<svg role="img" class="chart" ', 1))


def _err(summaries: Sequence[dict], key: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Centres and asymmetric error bars from CI summaries (zero-length bars where a CI is missing)."""
    centre = np.array([s.get(key) if s.get(key) is not None else np.nan for s in summaries], dtype=float)
    lo = np.array([s["lo"] if s.get("lo") is not None else c for s, c in zip(summaries, centre)], dtype=float)
    hi = np.array([s["hi"] if s.get("hi") is not None else c for s, c in zip(summaries, centre)], dtype=float)
    return centre, np.vstack([np.maximum(centre - lo, 0), np.maximum(hi - centre, 0)])


def detection_vs_success(points: Sequence[dict], fpr_label: str) -> Markup:
    """One point per attack x budget per detector: attack success (mean Δ log-odds) against detection rate.

    Each point: {"attack", "budget", "detector", "success": mean_ci summary, "detection": mean_ci summary}.
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 4.6))
        detectors = sorted({p["detector"] for p in points})
        attacks = sorted({p["attack"] for p in points})
        colours = plt.get_cmap("tab10")
        for di, det in enumerate(detectors):
            for ai, att in enumerate(attacks):
                sel = [p for p in points if p["detector"] == det and p["attack"] == att]
                if not sel:
                    continue
                x, xerr = _err([p["success"] for p in sel])
                y, yerr = _err([p["detection"] for p in sel])
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=MARKERS[di % len(MARKERS)], color=colours(ai % 10),
                            ms=7, capsize=2, lw=0.8, alpha=0.9)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel("attack success: mean Δ log-odds of the target (poisoned − clean control), 95% CI")
        ax.set_ylabel(f"detection: {fpr_label}, 95% CI")
        ax.set_ylim(-0.03, 1.03)
        handles = [plt.Line2D([], [], color=colours(i % 10), marker="s", ls="", label=a) for i, a in enumerate(attacks)]
        handles += [plt.Line2D([], [], color="black", marker=MARKERS[i % len(MARKERS)], ls="", label=d)
                    for i, d in enumerate(detectors)]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False,
                  title="colour: attack · marker: detector", title_fontsize=8)
        ax.set_title("Top right: strong attacks that are caught. Bottom right: strong attacks that are missed.",
                     fontsize=9, loc="left")
        return to_svg(fig)


def roc_curves(curves_by_detector: dict[str, list[dict]]) -> Markup:
    """One panel per detector, one mean ROC curve per attack x budget: {"label", "fpr", "tpr", "auroc"}.

    A label keeps its colour in every panel and the legend is shared below the panels, so the curves stay visible.
    """
    detectors = list(curves_by_detector)
    labels = list(dict.fromkeys(c["label"] for curves in curves_by_detector.values() for c in curves))
    colours = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    colour = {label: colours(i % colours.N) for i, label in enumerate(labels)}
    cols = min(3, len(detectors))
    rows = -(-len(detectors) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.0 * rows + 0.25 * len(labels) / min(cols, 2)),
                                 squeeze=False)
        for ax in axes.flat[len(detectors):]:
            ax.set_visible(False)
        for ax, det in zip(axes.flat, detectors):
            for c in curves_by_detector[det]:
                ax.plot(c["fpr"], c["tpr"], color=colour[c["label"]], lw=1.3)
                if c.get("auroc") is not None and len(labels) == 1:
                    ax.text(0.98, 0.04, f"AUROC {c['auroc']:.3f}", ha="right", transform=ax.transAxes)
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=0.8)
            ax.axvline(0.01, color="firebrick", lw=0.6, ls="--")
            ax.set_xscale("symlog", linthresh=0.01)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_title(det, fontsize=10, fontweight="bold")
            ax.set_xlabel("false positive rate (dashed: 1%)")
            ax.set_ylabel("true positive rate")
        handles = [plt.Line2D([], [], color=colour[label], lw=2, label=label) for label in labels]
        fig.tight_layout()
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=min(2, cols), frameon=False)
        return to_svg(fig)


def success_vs_budget(series: dict[str, list[tuple[str, dict]]], ticks: list[str], xlabel: str) -> Markup:
    """Mean Δ log-odds with CI against budget, one line per attack: {attack: [(tick, summary), ...]};
    `ticks` orders the x axis from the smallest budget to the largest."""
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.5, 3.8))
        n = max(len(series), 1)
        for i, (attack, pts) in enumerate(series.items()):
            x = np.array([ticks.index(b) for b, _ in pts], dtype=float) + (i - (n - 1) / 2) * 0.04
            y, yerr = _err([s for _, s in pts])
            ax.errorbar(x, y, yerr=yerr, marker=MARKERS[i % len(MARKERS)], capsize=3, lw=1.2, label=attack)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(ticks)), ticks, rotation=20 if len(ticks) > 3 else 0)
        ax.set_xlim(-0.5, len(ticks) - 0.5)  # a single budget keeps the attacks' small offsets small
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean Δ log-odds of the target, 95% CI")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
        return to_svg(fig)


def defence_effect(rows: Sequence[dict], measure: str) -> Markup:
    """Two panels per attack x budget and detector: the residual mean effect (`measure` names it, e.g.
    'Δ log-odds'), and the clean-accuracy cost.

    Each row: {"label", "before": summary, "after": summary, "cost": summary} (cost in accuracy points, 0..1).
    """
    with plt.rc_context(STYLE):
        height = 0.9 + 0.32 * len(rows)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9.5, height), sharey=True)
        y = np.arange(len(rows))[::-1]
        before, berr = _err([r["before"] for r in rows])
        after, aerr = _err([r["after"] for r in rows])
        a1.errorbar(before, y + 0.15, xerr=berr, fmt="o", color="firebrick", capsize=2, label="no defence")
        a1.errorbar(after, y - 0.15, xerr=aerr, fmt="s", color="seagreen", capsize=2, label="after removal + retrain")
        a1.axvline(0, color="grey", lw=0.8)
        a1.set_yticks(y, [r["label"] for r in rows])
        a1.set_xlabel(f"mean {measure} vs clean control, 95% CI")
        a1.legend(loc="lower right", fontsize=7, frameon=False)
        cost, cerr = _err([r["cost"] for r in rows])
        a2.errorbar(cost * 100, y, xerr=cerr * 100, fmt="D", color="slateblue", capsize=2)
        a2.axvline(0, color="grey", lw=0.8)
        a2.set_xlabel("clean accuracy lost, percentage points, 95% CI")
        fig.tight_layout()
        return to_svg(fig)


# --------------------------------------------------------------------------- gallery images
def _to_rgb(x: np.ndarray) -> np.ndarray:
    """(C,H,W) in [0,1] -> (H,W,3) uint8."""
    x = np.clip(x, 0, 1)
    rgb = np.repeat(x, 3, axis=0) if x.shape[0] == 1 else x[:3]
    return np.round(rgb.transpose(1, 2, 0) * 255).astype(np.uint8)


def png_data_uri(rgb: np.ndarray, min_side: int = 96) -> str:
    """A small PNG as a data: URI, scaled up by an integer factor (nearest neighbour) so pixels stay sharp."""
    scale = max(1, -(-min_side // min(rgb.shape[:2])))
    buf = io.BytesIO()
    Image.fromarray(rgb).resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.NEAREST).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def document_triptych(original: np.ndarray, poisoned: np.ndarray) -> dict:
    """Original, poisoned and the difference amplified to full contrast (blue = darker, red = brighter)."""
    lo, hi = float(min(original.min(), poisoned.min())), float(max(original.max(), poisoned.max()))
    if lo < 0 or hi > 1:  # not a [0,1] image: show both on their common range
        span = hi - lo or 1.0
        original, poisoned = (original - lo) / span, (poisoned - lo) / span
    diff = (poisoned - original).mean(0)
    peak = float(np.abs(diff).max())
    coloured = plt.get_cmap("RdBu_r")(0.5 + 0.5 * diff / (peak or 1.0))[..., :3]
    return {"original": png_data_uri(_to_rgb(original)), "poisoned": png_data_uri(_to_rgb(poisoned)),
            "diff": png_data_uri(np.round(coloured * 255).astype(np.uint8)),
            "gain": (1.0 / peak) if peak > 0 else None}
