"""PNG plots of `funnelqa score` results, after the paper's figures.

- ``curves.png``: BLEU, ROUGE-L and tag recall against the number of questions (Fig. 4);
- ``systems.png``: BLEU and ROUGE-L per system, and the unanswered rate (Fig. 3a, 3b);
- ``weighted_rank_<system>.png``: weighted rank of the most frequent concepts (Fig. 7).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

# Concepts shown in a weighted-rank plot: the most frequently revealed ones, as in Fig. 7.
TOP_CONCEPTS = 15


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
    bars = scores_axis.bar([p - width / 2 for p in positions], bleu, width, label="BLEU")
    scores_axis.bar_label(bars, fmt="%.2f", fontsize="small")
    bars = scores_axis.bar([p + width / 2 for p in positions], rouge, width, label="ROUGE-L")
    scores_axis.bar_label(bars, fmt="%.2f", fontsize="small")
    scores_axis.set_title("(a) elicited vs. target profile")
    scores_axis.set_ylim(0, 1)
    scores_axis.legend()
    unanswered = [100 * (result["unanswered_rate"] or 0.0) for result in results]
    bars = unanswered_axis.bar(list(positions), unanswered, 0.6, color="tab:red")
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


def write_plots(results: Sequence[dict], directory: Path) -> list[Path]:
    """Every plot of a ``score`` run into ``directory`` (made if missing): curves.png, systems.png,
    and weighted_rank_<slug(system)>.png per system that revealed a concept. Returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = [plot_curves(results, directory / "curves.png"), plot_systems(results, directory / "systems.png")]
    for result in results:
        if result["weighted_rank"]:
            written.append(plot_weighted_rank(result, directory / f"weighted_rank_{slug(result['system'])}.png"))
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
