"""Charts for the HTML report, drawn with matplotlib (Agg) and returned as inline SVG markup.

Text is drawn as glyph outlines, so a chart needs no font on the reader's machine, and every
comment (where matplotlib echoes label text) is stripped, so nothing a label contains reaches the page
as markup. Charts take plain summaries (mean/lo/hi dicts from `infusion_audit.statistics`), not records.
"""

from __future__ import annotations

import base64
import io
import re
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from matplotlib.transforms import offset_copy  # noqa: E402
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


def detection_by_knowledge(panels: Sequence[dict], fpr_label: str) -> Markup:
    """One panel per level of what the defender has: in each, one row per attack (its largest budget) and
    one dot per detector at that level, at its detection rate; a hollow ring marks what the same detector
    finds in the same documents unedited (the selection alone), where that was measured.

    Each panel: {"title", "arms": [label], "succeeds": [bool], "series": {detector: [summary | None per arm]},
    "nulls": {detector: [summary | None per arm]}}. Attacks that do not succeed are greyed.
    """
    arms = panels[0]["arms"] if panels else []
    cols = max(len(panels), 1)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, cols, figsize=(3.4 * cols + 4.0, 1.6 + 0.42 * len(arms)), sharey=True,
                                 squeeze=False)
        y = np.arange(len(arms))[::-1]
        for ax, panel in zip(axes.flat, panels):
            n = max(len(panel["series"]), 1)
            for i, (det, summaries) in enumerate(panel["series"].items()):
                offset = (i - (n - 1) / 2) * min(0.6 / n, 0.18)
                keep = [j for j, sm in enumerate(summaries) if sm and sm.get("mean") is not None]
                x, xerr = _err([summaries[j] for j in keep])
                colour = plt.get_cmap("tab10")(i % 10)
                ax.errorbar(x, y[keep] + offset, xerr=xerr, fmt=MARKERS[i % len(MARKERS)], color=colour, ms=5,
                            capsize=1.5, lw=0.8, label=det)
                nulls = panel["nulls"].get(det) or []
                held = [j for j, sm in enumerate(nulls) if sm and sm.get("mean") is not None]
                if held:
                    ax.plot([nulls[j]["mean"] for j in held], y[held] + offset, "o", mfc="none", mec=colour,
                            ms=9, mew=0.8)
            for v, style in ((0.1, ":"), (0.5, "--")):
                ax.axvline(v, color="grey", lw=0.7, ls=style)
            ax.set_xlim(-0.03, 1.03)
            ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])
            ax.set_title(textwrap.fill(panel["title"], 26), fontsize=9, fontweight="bold", loc="left")
            ax.set_xlabel(fpr_label)
            below_label = offset_copy(ax.transAxes, fig=fig, y=-30, units="points")  # clear of ticks and title
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, 0), bbox_transform=below_label, frameon=False,
                      fontsize=7, ncol=1)
        first = axes.flat[0]
        first.set_yticks(y, arms)
        for tick, ok in zip(first.get_yticklabels(), panels[0]["succeeds"] if panels else []):
            tick.set_color("black" if ok else "grey")
        first.set_ylim(-0.6, len(arms) - 0.4)
        fig.tight_layout()
        return to_svg(fig)


def frontier(panels: Sequence[dict], effect_label: str, fpr_label: str) -> Markup:
    """What an attacker who knows the detectors can still do: one panel per detector, one point per Infusion
    arm numbered in order of growing stealth (1 = plain Infusion), attack success against detection, joined
    in that order. Top left is the attacker's goal: a strong effect that the detector misses.

    Each panel: {"detector", "knowledge", "points": [{"number", "success": summary, "detection": summary,
    "succeeds": bool}]}.
    """
    cols = min(4, max(len(panels), 1))
    rows = -(-len(panels) // cols)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols, 2.5 * rows + 0.3), sharex=True, sharey=True,
                                 squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            pts = panel["points"]
            x, xerr = _err([p["detection"] for p in pts])
            y, yerr = _err([p["success"] for p in pts])
            ax.axvspan(-0.03, 0.2, color="firebrick", alpha=0.06, lw=0)
            ax.plot(x, y, color="grey", lw=0.7)
            for i, p in enumerate(pts):
                colour = "firebrick" if p["succeeds"] else "grey"
                ax.errorbar(x[i], y[i], xerr=xerr[:, [i]], yerr=yerr[:, [i]], fmt="o", color=colour, ms=4,
                            capsize=1.5, lw=0.7)
                ax.annotate(str(p["number"]), (x[i], y[i]), xytext=(3, 3), textcoords="offset points", fontsize=7)
            ax.axhline(0, color="grey", lw=0.7)
            ax.set_xlim(-0.03, 1.03)
            ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])  # adjacent panels' end labels would touch
            ax.set_title(f"{panel['detector']} ({panel['knowledge']})", fontsize=9, fontweight="bold", loc="left")
        for ax in axes[-1]:
            ax.set_xlabel(fpr_label)
        for ax in axes[:, 0]:
            ax.set_ylabel(f"mean {effect_label}, 95% CI")
        fig.tight_layout()
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


def when_it_works(series: dict[str, dict]) -> Markup:
    """Word preference, one point per word pair and arm: the change in log-odds of B against A per probe, against
    the model's prior log-odds at those probes (left) and against how often B occurs in the training corpus
    (right, log scale). `series`: {arm label: a summary row's `word_preference` (its points and correlations)}."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), sharey=True)
        for i, (label, w) in enumerate(series.items()):
            pts = w["points"]
            delta = [p["delta"] for p in pts]
            rho = w["when_prior"]["value"] if w["when_prior"] else float("nan")
            axes[0].plot([p["prior"] for p in pts], delta, MARKERS[i % len(MARKERS)], ms=4,
                         label=f"{label} (Spearman {rho:+.2f})")
            axes[1].plot([max(p["count"], 1) for p in pts], delta, MARKERS[i % len(MARKERS)], ms=4)
        for ax in axes:
            ax.axhline(0, color="grey", lw=0.8)
        axes[0].set_xlabel("prior log-odds of B against A at the probes (clean model)")
        axes[1].set_xlabel("occurrences of B in the training corpus")
        axes[1].set_xscale("log")
        axes[1].xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
        axes[0].set_ylabel("Δ log-odds per probe")
        axes[0].legend(loc="upper left", bbox_to_anchor=(0, -0.22), frameon=False, fontsize=7)
        return to_svg(fig)


def defence_effect(panels: dict[str, list[dict]], measure: str) -> Markup:
    """One panel per detector, one row per attack: the mean effect (`measure` names it, e.g. 'Δ log-odds')
    before and after removing what the detector flags and retraining, with what the removal cost in clean
    accuracy written at the row's right end. Every panel has the same rows, so one label column serves all.

    `panels`: {detector: [{"label", "before": summary, "after": summary, "cost": summary (0..1)}]}.
    """
    detectors = list(panels)
    labels = list(dict.fromkeys(r["label"] for rows in panels.values() for r in rows))
    cols = min(3, max(len(detectors), 1))
    n_rows = -(-len(detectors) // cols)
    y = {label: i for i, label in enumerate(reversed(labels))}
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(n_rows, cols, figsize=(3.3 * cols + 3.0, n_rows * (0.9 + 0.34 * len(labels)) + 0.4),
                                 sharey=True, squeeze=False)
        for ax in axes.flat[len(detectors):]:
            ax.set_visible(False)
        for ax, det in zip(axes.flat, detectors):
            rows = panels[det]
            ys = np.array([y[r["label"]] for r in rows], dtype=float)
            before, berr = _err([r["before"] for r in rows])
            after, aerr = _err([r["after"] for r in rows])
            ax.errorbar(before, ys + 0.15, xerr=berr, fmt="o", color="firebrick", ms=4, capsize=1.5, lw=0.8,
                        label="no defence")
            ax.errorbar(after, ys - 0.15, xerr=aerr, fmt="s", color="seagreen", ms=4, capsize=1.5, lw=0.8,
                        label="after removal + retrain")
            ax.axvline(0, color="grey", lw=0.8)
            for r, yy in zip(rows, ys):
                cost = r["cost"].get("mean")
                if cost is not None:
                    ax.annotate(f"{cost * 100:.1f} pts lost", (1.0, yy), xycoords=("axes fraction", "data"),
                                xytext=(3, 0), textcoords="offset points", va="center", fontsize=7, color="slateblue")
            ax.set_title(det, fontsize=9, fontweight="bold", loc="left")
            ax.set_xlabel(f"mean {measure} vs clean control")
        first = axes.flat[0]
        first.set_yticks(list(y.values()), list(y))
        first.set_ylim(-0.6, len(labels) - 0.4)
        first.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0 + 0.5 / max(len(labels), 1)), ncol=2,
                     fontsize=7, frameon=False)
        fig.tight_layout()
        return to_svg(fig)


# --------------------------------------------------------------------------- gallery images
def hardening(panels: Sequence[dict], kinds: dict[str, tuple[str, str, str]]) -> Markup:
    """One panel per attack: the mean effect (95% CI) each defence leaves against the clean accuracy it costs
    (points, 95% CI), so the defence that buys most robustness per accuracy point sits lowest and leftmost.
    Each panel: {"title", "effect_label", "neutral_bound", "points": [{"kind", "name", "cost": summary, "effect":
    summary}]}; `kinds` maps a point's kind to (legend label, marker, colour); a dotted line marks the panel's
    `neutral_bound`."""
    cols = min(3, max(len(panels), 1))
    n_rows = -(-len(panels) // cols)
    with plt.rc_context({**STYLE, "text.parse_math": False}):  # a '$' in a name is text, not TeX
        fig, axes = plt.subplots(n_rows, cols, figsize=(4.2 * cols, 3.3 * n_rows + 0.3), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for ax, panel in zip(axes.flat, panels):
            named = 0  # names alternate above and below their points, so neighbours' do not overprint
            for kind, (_, marker, colour) in kinds.items():
                pts = [p for p in panel["points"] if p["kind"] == kind and p["effect"].get("mean") is not None
                       and p["cost"].get("mean") is not None]
                if not pts:
                    continue
                x, xerr = _err([p["cost"] for p in pts])
                y, yerr = _err([p["effect"] for p in pts])
                ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, color=colour, ms=5, capsize=1.5, lw=0.8)
                for xi, yi, p in zip(x, y, pts):
                    name = p["name"] if len(p["name"]) <= 24 else p["name"][:23] + "…"
                    ax.annotate(name, (xi, yi), xytext=(4, 3 if named % 2 == 0 else -9), textcoords="offset points",
                                fontsize=7, color=colour)
                    named += 1
            ax.axhline(0, color="grey", lw=0.8)
            ax.axhline(panel["neutral_bound"], color="grey", lw=0.7, ls=":")
            ax.set_title(textwrap.fill(panel["title"], 44), fontsize=9, fontweight="bold", loc="left")
            ax.set_xlabel("clean accuracy lost (points)")
            ax.set_ylabel(f"mean {panel['effect_label']}, 95% CI")
        drawn = {p["kind"] for panel in panels for p in panel["points"]}
        handles = [plt.Line2D([], [], marker=m, color=c, ls="none", label=label)
                   for kind, (label, m, c) in kinds.items() if kind in drawn]
        fig.tight_layout()
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0), ncol=3, frameon=False, fontsize=8)
        return to_svg(fig)


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
