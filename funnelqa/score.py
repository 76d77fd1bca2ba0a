"""`funnelqa score`: how much of each target profile the interviews recovered, and in what order.

Texts compared (Algorithm 2, line 7: an answer takes the corresponding value of P_n):
- elicited profile: the contents of the revealed tags, in the order they were revealed, joined by spaces;
- target profile: the contents of all target tags, in the target's (general to specific) order.

One session file is one system. Each gets BLEU and ROUGE-1/2/L, tag recall, unanswered rate,
questions asked, every metric after 1..T questions (paper Fig. 4), the weighted rank of each
concept (Eq. 11, Fig. 7), and the Spearman correlation between the position at which a tag is
revealed and its generality (its index in the ranked target list), and the share of asked
questions that repeat an earlier one of the same interview (funnelqa.repeats).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path

from funnelqa import metrics
from funnelqa.errors import InputError, UsageError
from funnelqa.repeats import repeated_turns
from funnelqa.records import Record, RecordWriter, check_session, load_records, source_name


def profile_text(tags: Sequence[dict]) -> str:
    return " ".join(tag["content"] for tag in tags)


def first_reveals(session: Record) -> list[tuple[str, int]]:
    """(tag name, 1-based question position) for each target tag, at the turn that first revealed it."""
    target = {tag["tag"] for tag in session["target"]}
    seen: dict[str, int] = {}
    for position, turn in enumerate(session["turns"], start=1):
        for name in turn["tags"]:
            if name in target and name not in seen:
                seen[name] = position
    return list(seen.items())


def elicited_after(session: Record, questions: int) -> list[dict]:
    """The elicited profile after the first ``questions`` turns, in revealed order."""
    content = {tag["tag"]: tag for tag in session["target"]}
    revealed: list[dict] = []
    names: set[str] = set()
    for turn in session["turns"][:questions]:
        for name in turn["tags"]:
            if name in content and name not in names:
                names.add(name)
                revealed.append(content[name])
    return revealed


def tag_recall(elicited: Sequence[dict], target: Sequence[dict]) -> float:
    target_names = {tag["tag"] for tag in target}
    return len({tag["tag"] for tag in elicited} & target_names) / len(target_names) if target_names else 0.0


def text_scores(
    elicited: Sequence[Sequence[dict]], targets: Sequence[Sequence[dict]], *, seed: int, cache: metrics.RougeCache, interval: bool = False
) -> dict:
    predictions = [profile_text(tags) for tags in elicited]
    references = [profile_text(tags) for tags in targets]
    scores = {"bleu": metrics.bleu(predictions, references)["bleu"]}
    scores.update(metrics.rouge(predictions, references, seed=seed, cache=cache, with_interval=interval))
    scores["tag_recall"] = metrics.mean(tag_recall(e, t) for e, t in zip(elicited, targets))
    return scores


def funnel_correlation(sessions: Sequence[Record]) -> dict:
    """Spearman rho between reveal position and generality, pooled over every revealed tag.

    Generality of a tag = its index in its target list / (m - 1): 0 the most general, 1 the most
    specific. A funnel questioner reveals general tags first, so rho > 0.
    """
    positions: list[float] = []
    generality: list[float] = []
    for session in sessions:
        index = {tag["tag"]: i for i, tag in enumerate(session["target"])}
        span = max(1, len(index) - 1)
        for name, position in first_reveals(session):
            positions.append(position)
            generality.append(index[name] / span)
    return {"rho": metrics.spearman(positions, generality), "pairs": len(positions)}


def concept_ranks(sessions: Sequence[Record]) -> list[dict]:
    """Weighted rank (Eq. 11) of each concept, i.e. tag name, from where it is first revealed."""
    positions: dict[str, list[int]] = collections.defaultdict(list)
    for session in sessions:
        for name, position in first_reveals(session):
            positions[name].append(position)
    ranks = metrics.weighted_ranks(positions)
    rows = [{"concept": name, "wr": wr, "sessions": len(positions[name])} for name, wr in ranks.items()]
    return sorted(rows, key=lambda row: (row["wr"], -row["sessions"], row["concept"]))


def score_sessions(sessions: Sequence[Record], *, seed: int = 0, cache: metrics.RougeCache | None = None) -> dict:
    """Every number of one system (one session file)."""
    if not sessions:
        raise UsageError("no sessions to score")
    cache = cache or metrics.RougeCache()
    targets = [session["target"] for session in sessions]
    finals = [session["elicited"] for session in sessions]
    turns = [turn for session in sessions for turn in session["turns"]]
    horizon = max(max(session.get("max_questions") or 0, len(session["turns"])) for session in sessions)

    summary: dict = text_scores(finals, targets, seed=seed, cache=cache, interval=True)
    # Which tokenizer scored ROUGE: "default" numbers equal evaluate's, "unicode" ones do not.
    summary["rouge_tokenizer"] = "+".join(sorted({cache.tokenizer_for(profile_text(e), profile_text(t))
                                                   for e, t in zip(finals, targets)}))
    summary["unanswered_rate"] = sum(not turn["answered"] for turn in turns) / len(turns) if turns else None
    summary["questions_asked"] = metrics.mean(len(session["turns"]) for session in sessions)
    summary["complete_rate"] = metrics.mean(float(tag_recall(e, t) == 1.0) for e, t in zip(finals, targets))
    asked = [[turn["question"] for turn in session["turns"] if turn["question"].strip()] for session in sessions]
    summary["repeat_rate"] = sum(map(repeated_turns, asked)) / max(1, sum(map(len, asked)))

    curve: dict[str, list] = {"questions": list(range(1, horizon + 1))}
    for questions in curve["questions"]:
        point = text_scores([elicited_after(s, questions) for s in sessions], targets, seed=seed, cache=cache)
        for name, value in point.items():
            curve.setdefault(name, []).append(value)
    summary["curve"] = curve
    summary["funnel_spearman"] = funnel_correlation(sessions)
    summary["weighted_rank"] = concept_ranks(sessions)
    return summary


def _short_spec(spec: str) -> str:
    """`hf:/long/path/base+runs/q-lora` -> `hf:base+q-lora`: names for a table, not for loading."""
    name, colon, arg = spec.partition(":")
    if not colon:
        return spec
    parts = [Path(part.rstrip("/")).name or part for part in arg.split("+")]
    return f"{name}:{'+'.join(parts)}"


def system_name(sessions: Sequence[Record], source: str) -> str:
    first = sessions[0]
    keys = ("questioner", "simulator", "profile_form")
    stem = Path(source).stem if source != "<stdin>" else "stdin"
    if not all(first.get(key) for key in keys):
        return stem
    if any(session.get(key) != first.get(key) for session in sessions for key in keys):
        return stem  # a mixed file: its own name says more than its first line
    return f"{_short_spec(first['questioner'])} / {_short_spec(first['simulator'])} / {first['profile_form']}"


def score_file(path: str, *, seed: int = 0, cache: metrics.RougeCache | None = None) -> dict:
    sessions = load_records(path, check_session)
    sessions = [session for session in sessions if "error" not in session]
    if not sessions:
        raise InputError(source_name(path), None, "holds no sessions")
    first = sessions[0]
    result = {
        "system": system_name(sessions, source_name(path)),
        "source": source_name(path),
        "questioner": first.get("questioner"),
        "simulator": first.get("simulator"),
        "profile_form": first.get("profile_form"),
        "sessions": len(sessions),
    }
    result.update(score_sessions(sessions, seed=seed, cache=cache))
    return result


def _unique_names(results: list[dict]) -> None:
    counts = collections.Counter(result["system"] for result in results)
    for result in results:
        if counts[result["system"]] > 1:
            result["system"] = f"{result['system']} [{Path(result['source']).stem}]"


def print_table(results: Sequence[dict]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from funnelqa.console import stderr

    table = Table(title="funnelqa score", title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column("system", overflow="fold")
    for column in ("n", "BLEU", "R-1", "R-2", "R-L", "recall", "unansw.", "repeat", "asked", "rho"):
        table.add_column(column, justify="right", no_wrap=True)

    def fmt(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    for result in results:
        table.add_row(
            result["system"],
            str(result["sessions"]),
            fmt(result["bleu"]),
            fmt(result["rouge1"]),
            fmt(result["rouge2"]),
            fmt(result["rougeL"]),
            fmt(result["tag_recall"]),
            fmt(result["unanswered_rate"]),
            fmt(result["repeat_rate"]),
            f"{result['questions_asked']:.1f}",
            fmt(result["funnel_spearman"]["rho"]),
        )
    # A log file is not a terminal: give long system names room instead of folding them to bits.
    console = stderr if stderr.is_terminal else Console(stderr=True, width=160)
    console.print(table)
    console.print("recall: share of target tags revealed; unansw.: share of questions answered 'No preference'; "
                 "repeat: share of questions repeating an earlier one; asked: questions per user; rho: Spearman(reveal position, tag generality), > 0 = funnel order")


def score_files(
    paths: Sequence[str], *, plots_dir: Path | None = None, out: Path | None = None, seed: int = 0,
    rouge_tokenizer: str = "auto",
) -> list[dict]:
    """`funnelqa score`: one result per session file, a table on stderr, JSONL on stdout or ``out``.

    ``rouge_tokenizer``: see ``metrics.RougeCache``; each result names the one that scored it.
    """
    if not paths:
        raise UsageError("give at least one session file")
    if sum(str(path) == "-" for path in paths) > 1:
        raise UsageError("stdin ('-') can be given once")
    if rouge_tokenizer not in metrics.ROUGE_TOKENIZERS:
        raise UsageError(f"unknown ROUGE tokenizer {rouge_tokenizer!r}; use one of {', '.join(metrics.ROUGE_TOKENIZERS)}")
    cache = metrics.RougeCache(tokenizer=rouge_tokenizer)
    results = [score_file(path, seed=seed, cache=cache) for path in paths]
    _unique_names(results)
    print_table(results)
    # Scores take seconds to recompute: a re-run starts over rather than resuming.
    with RecordWriter(Path(out) if out is not None else None, resume=False) as writer:
        writer.write_many(results)
    if plots_dir is not None:
        from funnelqa.console import stderr
        from funnelqa.plots import write_plots

        for path in write_plots(results, Path(plots_dir)):
            stderr.print(f"wrote {path}")
    return results
