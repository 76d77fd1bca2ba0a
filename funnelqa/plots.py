"""PNG plots of `funnelqa score` results, after the paper's figures.

- ``curves.png``: BLEU, ROUGE-L and tag recall against the number of questions (Fig. 4);
- ``systems.png``: BLEU and ROUGE-L per system, and the unanswered rate (Fig. 3a, 3b), with the
  bootstrap 95 % intervals over users as error bars when the results carry ``ci95``;
- ``weighted_rank_<system>.png``: weighted rank of the most frequent concepts (Fig. 7);
- ``compare/weighted_rank_side_by_side.png``: Fig. 7 for the oracle and every other system in one
  figure, the oracle's concepts in the oracle's order in every panel (in ``compare/``, the folder of
  figures across systems).
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

# Concepts shown in a weighted-rank plot: the most frequently revealed ones, as in Fig. 7.
TOP_CONCEPTS = 15
# Fig. 7 of every system in one figure, under the plots folder.
SIDE_BY_SIDE = "compare/weighted_rank_side_by_side.png"


def slug(name: str) -> str:
    """``name`` fit for a file name: each run of characters other than ASCII letters, digits, '.',
    '_' and '-' becomes one '_', and '_' is trimmed from both ends ("system" when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "system"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: Sequence[dict], path: Path) -> Path:
    """Fig. 4: BLEU, ROUGE-L and tag recall (0-1) against the number of questions, one line per
    system of ``results`` (``score_file``'s, with their ``curve``); a 120-dpi PNG at ``path``, returned."""
    plt = _pyplot()
    panels = (("bleu", "BLEU"), ("rougeL", "ROUGE-L"), ("tag_recall", "tag recall"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for axis, (key, label) in zip(axes, panels):
        for result in results:
            curve = result["curve"]
            axis.plot(curve["questions"], curve[key], marker="o", markersize=3, label=result["system"])
        axis.set_xlabel("number of questions")
        axis.set_ylabel(label)
        axis.set_ylim(0, 1)
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(2, len(labels)), fontsize="small")
    fig.suptitle("Scores vs. number of questions")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def error_bars(results: Sequence[dict], key: str, scale: float = 1.0) -> list[list[float]] | None:
    """matplotlib ``yerr`` ([below], [above], each >= 0) from each result's ``ci95[key]`` around
    its ``key`` (times ``scale``); None when no result has an interval. A missing interval, or a
    point outside its interval (ROUGE's point is the aggregator's median, the interval that of the
    mean), gives 0 on that side."""
    intervals = [(result.get("ci95") or {}).get(key) for result in results]
    if not any(intervals):
        return None
    below, above = [], []
    for result, interval in zip(results, intervals):
        value = result.get(key)
        if interval is None or value is None:
            below.append(0.0)
            above.append(0.0)
        else:
            below.append(max(0.0, scale * (value - interval[0])))
            above.append(max(0.0, scale * (interval[1] - value)))
    return [below, above]


def plot_systems(results: Sequence[dict], path: Path) -> Path:
    """Fig. 3a/3b: each system's final BLEU and ROUGE-L (bars, 0-1) and its unanswered rate (%);
    a 120-dpi PNG at ``path``, returned."""
    plt = _pyplot()
    names = [result["system"] for result in results]
    positions = range(len(results))
    width = 0.38
    fig, (scores_axis, unanswered_axis) = plt.subplots(
        1, 2, figsize=(max(9, 2.2 * len(results) + 5), 4.5), constrained_layout=True, width_ratios=(2, 1)
    )
    bleu = [result["bleu"] for result in results]
    rouge = [result["rougeL"] for result in results]
    bars = scores_axis.bar([p - width / 2 for p in positions], bleu, width, label="BLEU", yerr=error_bars(results, "bleu"),
                           capsize=3)
    scores_axis.bar_label(bars, fmt="%.2f", fontsize="small")
    bars = scores_axis.bar([p + width / 2 for p in positions], rouge, width, label="ROUGE-L",
                           yerr=error_bars(results, "rougeL"), capsize=3)
    scores_axis.bar_label(bars, fmt="%.2f", fontsize="small")
    scores_axis.set_title("(a) elicited vs. target profile")
    scores_axis.set_ylim(0, 1)
    scores_axis.legend()
    unanswered = [100 * (result["unanswered_rate"] or 0.0) for result in results]
    bars = unanswered_axis.bar(list(positions), unanswered, 0.6, color="tab:red",
                               yerr=error_bars(results, "unanswered_rate", scale=100), capsize=3)
    unanswered_axis.bar_label(bars, fmt="%.0f%%", fontsize="small")
    unanswered_axis.set_title("(b) unanswered questions (%)")
    unanswered_axis.set_ylim(0, 100)
    for axis in (scores_axis, unanswered_axis):
        axis.set_xticks(list(positions), names, rotation=20, ha="right", fontsize="small")
        axis.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_weighted_rank(result: dict, path: Path) -> Path:
    """Fig. 7 for one system: the weighted rank (Eq. 11: mean question position of the first
    reveal) of its TOP_CONCEPTS most often revealed concepts, earliest on top, each labelled with
    its number of sessions; a 120-dpi PNG at ``path``, returned."""
    plt = _pyplot()
    rows = sorted(result["weighted_rank"], key=lambda row: -row["sessions"])[:TOP_CONCEPTS]
    rows.sort(key=lambda row: row["wr"])
    fig, axis = plt.subplots(figsize=(7, 0.35 * max(4, len(rows)) + 1.5), constrained_layout=True)
    labels = [f"{row['concept']} (n={row['sessions']})" for row in rows]
    bars = axis.barh(range(len(rows)), [row["wr"] for row in rows], color="tab:blue")
    axis.bar_label(bars, fmt="%.1f", fontsize="small", padding=2)
    axis.set_yticks(range(len(rows)), labels, fontsize="small")
    axis.invert_yaxis()  # earliest concept on top, like reading a conversation
    axis.set_xlabel("weighted rank (mean question position when first revealed)")
    horizon = len(result["curve"]["questions"])
    axis.set_xlim(0, max(1, horizon) + 0.5)
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(f"Weighted rank of concepts: {result['system']}", fontsize="medium")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def reference_result(results: Sequence[dict]) -> dict:
    """The system the side-by-side Fig. 7 orders its concepts by: the first whose questioner is
    ``oracle`` (the teacher's funnel), else the first ``oracle-shuffled``, else the first result."""
    for name in ("oracle", "oracle-shuffled"):
        found = next((result for result in results if result.get("questioner") == name and result["weighted_rank"]), None)
        if found is not None:
            return found
    return results[0]


def plot_weighted_rank_side_by_side(results: Sequence[dict], path: Path) -> Path:
    """Fig. 7 side by side: one panel per system (``reference_result`` first), each the weighted
    rank (Eq. 11) of the reference's TOP_CONCEPTS most often revealed concepts, in the reference's
    order (earliest on top) on every panel, so a learned funnel shows as the same staircase; a
    concept a system never revealed has no bar ("-"). A 120-dpi PNG at ``path``, returned."""
    plt = _pyplot()
    reference = reference_result(results)
    ordered = [reference, *(result for result in results if result is not reference)]
    rows = sorted(reference["weighted_rank"], key=lambda row: -row["sessions"])[:TOP_CONCEPTS]
    concepts = [row["concept"] for row in sorted(rows, key=lambda row: row["wr"])]
    horizon = max(1, *(len(result["curve"]["questions"]) for result in ordered))
    fig, axes = plt.subplots(1, len(ordered), figsize=(2.8 * len(ordered) + 2, 0.35 * max(4, len(concepts)) + 2),
                             sharey=True, constrained_layout=True, squeeze=False)
    for axis, result in zip(axes[0], ordered):
        ranks = {row["concept"]: row for row in result["weighted_rank"]}
        values = [ranks[name]["wr"] if name in ranks else 0.0 for name in concepts]
        color = "tab:green" if result is reference else "tab:blue"
        bars = axis.barh(range(len(concepts)), values, color=color)
        axis.bar_label(bars, labels=[f"{ranks[name]['wr']:.1f}" if name in ranks else "-" for name in concepts],
                       fontsize="x-small", padding=2)
        axis.set_xlim(0, horizon + 1)
        axis.grid(axis="x", alpha=0.3)
        # Long system names would run into the next panel's title: wrapped to the panel's width.
        axis.set_title(textwrap.fill(result["system"], 34), fontsize="small")
        axis.set_xlabel("weighted rank")
    axes[0][0].set_yticks(range(len(concepts)), concepts, fontsize="small")
    axes[0][0].invert_yaxis()  # shared: the reference's earliest concept on top in every panel
    fig.suptitle(f"Weighted rank of the concepts, in the order of {reference['system']}", fontsize="medium")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: Sequence[dict], directory: Path) -> list[Path]:
    """Every plot of a ``score`` run into ``directory`` (made if missing): curves.png, systems.png,
    weighted_rank_<slug(system)>.png per system that revealed a concept, and, with two or more
    results and a reference that revealed one, ``SIDE_BY_SIDE``. Returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(results, directory / "curves.png"), plot_systems(results, directory / "systems.png")]
    for result in results:
        if result["weighted_rank"]:
            written.append(plot_weighted_rank(result, directory / f"weighted_rank_{slug(result['system'])}.png"))
    if len(results) > 1 and reference_result(results)["weighted_rank"]:
        (directory / SIDE_BY_SIDE).parent.mkdir(exist_ok=True)
        written.append(plot_weighted_rank_side_by_side(results, directory / SIDE_BY_SIDE))
    return written


def plot_eval_loss(cards: dict[str, dict], path: Path) -> Path:
    """Eval loss against optimizer step for each training run (``cards``: label -> run card)."""
    plt = _pyplot()
    fig, axis = plt.subplots(figsize=(6, 4), constrained_layout=True)
    for label, card in cards.items():
        points = [(step, loss) for step, loss in card.get("eval_history", []) if loss is not None]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=f"{label} ({card.get('layout', 'steps')})")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("eval loss (mean per target token)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize="small")
    fig.suptitle("Held-out loss during training")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
