"""`funnelqa score`: how much of each target profile the interviews recovered, and in what order.

Texts compared (Algorithm 2, line 7: an answer takes the corresponding value of P_n):
- elicited profile: the contents of the revealed tags, in the order they were revealed, joined by spaces;
- target profile: the contents of all target tags, in the target's (general to specific) order.

One session file is one system. Each gets BLEU and ROUGE-1/2/L, tag recall, unanswered rate,
questions asked, every metric after 1..T questions (paper Fig. 4), the weighted rank of each
concept (Eq. 11, Fig. 7), and the Spearman correlation between the position at which a tag is
revealed and its generality (its index in the ranked target list), and the share of asked
questions that repeat an earlier one of the same interview (funnelqa.repeats).

Beyond the paper: a seeded bootstrap 95 % interval over users for every metric, paired
differences between systems interviewed on the same users (funnelqa.uncertainty), the questioner's
behaviour (exact repeats, non-questions, questions about concepts the user has) and, from oracle
sessions, the simulator's fidelity to the teacher's tags T_i (funnelqa.fidelity).
"""

from __future__ import annotations

import collections
from array import array
from collections.abc import Iterable, Sequence
from pathlib import Path

from rich.markup import escape

from funnelqa import fidelity, metrics, uncertainty
from funnelqa.backends import ModelSpec
from funnelqa.errors import InputError, UsageError
from funnelqa.questioners import REFERENCE_QUESTIONERS
from funnelqa.records import Record, RecordWriter, check_session, read_records, source_name
from funnelqa.fidelity import OracleMap

# The session fields that name a system: one file of sessions is one system when they agree.
_SYSTEM_FIELDS = ("questioner", "simulator", "profile_form")
# BLEU's n-gram orders, and the additive counts one pair contributes (``_bleu_stats``): matches and
# possible n-grams per order, then reference and translation length.
_ORDER = metrics.BLEU_MAX_ORDER
_BLEU_STATS = 2 * _ORDER + 2
# Per-user columns kept for the bootstrap: the final ROUGE F1s, recall and completeness of each
# user, then fidelity's counts. Each system metric is a ratio of two of them, summed over users.
USER_COLUMNS = ("users", "rouge1", "rouge2", "rougeL", "recall", "complete", *fidelity.COUNT_COLUMNS)
SYSTEM_RATIOS = {
    "rouge1": ("rouge1", "users"),
    "rouge2": ("rouge2", "users"),
    "rougeL": ("rougeL", "users"),
    "tag_recall": ("recall", "users"),
    "complete_rate": ("complete", "users"),
    "questions_asked": ("turns", "users"),
    "unanswered_rate": ("unanswered", "turns"),
    "repeat_rate": ("repeated", "asked"),
    **fidelity.BEHAVIOUR_RATIOS,
}
_NEEDS_ORACLE = ("answerable_rate", "unanswered_absent_rate", "unanswered_missed_rate")


def profile_text(tags: Sequence[dict]) -> str:
    """The tags' contents joined by single spaces, in list order: the text BLEU and ROUGE compare."""
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
    """Share (0-1) of the target's tag names found in ``elicited``; 0.0 for an empty target."""
    target_names = {tag["tag"] for tag in target}
    return len({tag["tag"] for tag in elicited} & target_names) / len(target_names) if target_names else 0.0


def _bleu_stats(prediction: str, reference: tuple[int, collections.Counter]) -> list[int]:
    """One pair's additive BLEU counts: matches[4], possible[4], reference and translation length.

    The per-pair half of ``metrics.bleu``, so a corpus BLEU can be summed over a stream of pairs.
    ``reference`` is ``_bleu_reference(text)``, made once per session. N-gram counts are not
    kept between sessions: an unbounded number of profiles' counts is what held memory before.
    """
    tokens = metrics.tokenize_13a(prediction)
    length = len(tokens)
    overlap = metrics._ngrams(tokens, _ORDER) & reference[1]
    stats = [0] * (2 * _ORDER) + [reference[0], length]
    for ngram, count in overlap.items():
        stats[len(ngram) - 1] += count
    for order in range(1, _ORDER + 1):
        if length - order + 1 > 0:
            stats[_ORDER + order - 1] += length - order + 1
    return stats


class _GrowingBleu:
    """``_bleu_stats`` for a session's texts after 1, 2, ... questions, each extending the last.

    When the tokens of a text start with the tokens of the previous one, only the n-grams that
    end in the new tokens are counted; a match counts while the prediction holds fewer copies of
    the n-gram than the reference (the clipped counts of ``Counter &``). Otherwise it starts over.
    """

    def __init__(self, reference: tuple[int, collections.Counter]):
        self.reference_length, self.reference = reference
        self.tokens: list[str] = []
        self.counts: collections.Counter = collections.Counter()
        self.matches = [0] * _ORDER

    def stats(self, prediction: str) -> list[int]:
        tokens = metrics.tokenize_13a(prediction)
        if tokens[: len(self.tokens)] != self.tokens:
            self.tokens, self.matches = [], [0] * _ORDER
            self.counts.clear()
        for end in range(len(self.tokens), len(tokens)):
            for order in range(1, min(_ORDER, end + 1) + 1):
                ngram = tuple(tokens[end - order + 1 : end + 1])
                wanted = self.reference.get(ngram)
                if wanted:
                    if self.counts[ngram] < wanted:
                        self.matches[order - 1] += 1
                    self.counts[ngram] += 1
        self.tokens = tokens
        length = len(tokens)
        possible = [max(0, length - order + 1) for order in range(1, _ORDER + 1)]
        return self.matches + possible + [self.reference_length, length]


def _bleu_reference(text: str) -> tuple[int, collections.Counter]:
    tokens = metrics.tokenize_13a(text)
    return len(tokens), metrics._ngrams(tokens, _ORDER)


class _SessionRouge(metrics.RougeCache):
    """ROUGE F1 of one session's texts against its target, tokenising each tag's content once.

    The rouge tokenizer maps characters to tokens locally, so the tokens of texts joined by
    spaces are the tokens of the parts, joined: the target is tokenised once per session, not
    once per question position. The formulas are rouge_score's (n-grams) and ``RougeCache``'s (L).
    """

    def start(self, target: Sequence[dict]) -> None:
        from rouge_score import rouge_scorer

        # An elicited text is made of the target's contents: the target's script decides the tokenizer.
        reference = profile_text(target)
        name = self.tokenizer_for(reference, reference)
        self.used.add(name)
        self._tokenizer = self._tokenizers[name]
        self._tokens = {tag["content"]: self._tokenizer.tokenize(tag["content"]) for tag in target}
        self._target = [token for tag in target for token in self._tokens[tag["content"]]]
        self._target_ngrams = {n: rouge_scorer._create_ngrams(self._target, n) for n in (1, 2)}

    def f1(self, elicited: Sequence[dict]) -> tuple[float, float, float]:
        from rouge_score import rouge_scorer, scoring

        predicted = [token for tag in elicited
                     for token in self._tokens.get(tag["content"]) or self._tokenizer.tokenize(tag["content"])]
        scores = [rouge_scorer._score_ngrams(self._target_ngrams[n], rouge_scorer._create_ngrams(predicted, n)).fmeasure
                  for n in (1, 2)]
        if not predicted or not self._target:
            return scores[0], scores[1], 0
        common = metrics.lcs_length(self._target, predicted)
        precision, recall = common / len(predicted), common / len(self._target)
        return scores[0], scores[1], scoring.fmeasure(precision, recall)


def _drop_tokenizer_caches() -> None:
    # sacrebleu memoises up to 65,536 tokenised texts per tokenizer (and metrics 8,192 more):
    # texts of profiles do not repeat across sessions, so these would only grow with the input.
    from sacrebleu.tokenizers import tokenizer_13a, tokenizer_re

    for cached in (metrics._tokens_13a, tokenizer_13a.Tokenizer13a.__call__, tokenizer_re.TokenizerRegexp.__call__):
        clear = getattr(cached, "cache_clear", None)
        if clear is not None:
            clear()


def _bleu_from_stats(stats: Sequence[int]) -> float:
    """Corpus BLEU from summed ``_bleu_stats``, by ``metrics.bleu``'s own arithmetic."""
    matches, possible = stats[:_ORDER], stats[_ORDER : 2 * _ORDER]
    return metrics.bleu_from_counts(matches, possible, stats[2 * _ORDER], stats[2 * _ORDER + 1])["bleu"]


def _add(total: list[int], stats: Sequence[int]) -> None:
    for i, value in enumerate(stats):
        total[i] += value


class _StoredRouge:
    """Hands ``metrics.rouge`` per-pair scores computed earlier: the "pairs" are indexes into a list.

    Only F1 is kept (precision and recall stored as 0): the bootstrap treats each measure as
    its own column, so the F1 numbers come out as they would with the full scores.
    """

    def __init__(self, scores: Sequence[Sequence[float]]):
        self.scores = scores
        self.rouge_types = metrics.ROUGE_TYPES

    def score(self, index: int, _reference) -> dict:
        from rouge_score.scoring import Score

        return {t: Score(0.0, 0.0, f) for t, f in zip(self.rouge_types, self.scores[index])}


class SessionScorer:
    """Every number of one system, from sessions fed one at a time (``add``), in O(1) memory per turn.

    Per session it keeps only numbers: three ROUGE F1 and a tag recall per question position up
    to the session's length (later positions repeat the last), the first-reveal positions, and
    additive BLEU counts; per user, one float per ``USER_COLUMNS`` and its final BLEU counts, for
    the bootstrap. ``oracle`` (``fidelity.OracleMap``) decides which questions are about concepts
    the user has; ``resamples`` (0: none) and ``seed`` drive the bootstrap. ``result()`` gives the
    numbers, the same as scoring all sessions at once.
    """

    def __init__(self, *, seed: int = 0, rouge_tokenizer: str = "auto", oracle: OracleMap | None = None,
                 resamples: int = uncertainty.RESAMPLES):
        self.seed = seed
        self.oracle = oracle
        self.resamples = resamples
        # One row of small numbers per user: what the bootstrap resamples (funnelqa.uncertainty).
        self.users = uncertainty.UserTable(USER_COLUMNS)
        self.counts = dict.fromkeys(fidelity.COUNT_COLUMNS, 0.0)
        self.rouge = _SessionRouge(tokenizer=rouge_tokenizer)
        self.questions = self.repeated = 0
        self.sessions = 0
        self.first: Record | None = None
        self.mixed = False
        self.turns = self.unanswered = self.complete = 0
        self.horizon = 0
        self.final_bleu = [0] * _BLEU_STATS
        self.final_rouge: list[tuple[float, ...]] = []
        self.final_recall: list[float] = []
        self.lengths = array("i")  # per session: question positions scored (at least 1)
        self.rouge_points = array("d")  # per session, per position: rouge1, rouge2, rougeL F1
        self.recall_points = array("d")
        self.bleu_at: list[list[int]] = []  # BLEU counts at position q of sessions at least q long
        self.bleu_after: list[list[int]] = []  # [L]: counts of sessions L long, for every later position
        self.positions: list[float] = []
        self.generality: list[float] = []
        self.concepts: dict[str, list[int]] = collections.defaultdict(list)

    def add(self, session: Record) -> None:
        """Fold one session (a ``check_session``-valid record) into the totals; its texts are not kept.

        The first session's questioner, simulator and profile_form are kept in ``first``; a later
        session with other values sets ``mixed``.
        """
        if self.first is None:
            self.first = {key: session.get(key) for key in _SYSTEM_FIELDS}
        elif any(session.get(key) != self.first[key] for key in _SYSTEM_FIELDS):
            self.mixed = True
        self.sessions += 1
        turns = session["turns"]
        target = session["target"]
        reference = profile_text(target)
        self.turns += len(turns)
        self.unanswered += sum(not turn["answered"] for turn in turns)
        self.horizon = max(self.horizon, session.get("max_questions") or 0, len(turns))
        counts = fidelity.session_counts(session, self.oracle)
        for name, value in counts.items():
            self.counts[name] += value
        self.questions += int(counts["asked"])
        self.repeated += int(counts["repeated"])
        self.rouge.start(target)
        rouge_f1 = self.rouge.f1
        bleu_reference = _bleu_reference(reference)

        final = session["elicited"]
        final_bleu = _bleu_stats(profile_text(final), bleu_reference)
        _add(self.final_bleu, final_bleu)
        final_rouge = rouge_f1(final)
        self.final_rouge.append(final_rouge)
        recall = tag_recall(final, target)
        self.final_recall.append(recall)
        self.complete += recall == 1.0
        self.users.add(session["id"], {"users": 1, "rouge1": final_rouge[0], "rouge2": final_rouge[1],
                                       "rougeL": final_rouge[2], "recall": recall, "complete": recall == 1.0, **counts},
                       final_bleu)

        length = max(1, len(turns))
        self.lengths.append(length)
        while len(self.bleu_at) < length:
            self.bleu_at.append([0] * _BLEU_STATS)
            self.bleu_after.append([0] * _BLEU_STATS)
        growing = _GrowingBleu(bleu_reference)
        for questions in range(1, length + 1):
            elicited = elicited_after(session, questions)
            stats = growing.stats(profile_text(elicited))
            _add(self.bleu_at[questions - 1], stats)
            if questions == length:
                _add(self.bleu_after[length - 1], stats)
            self.rouge_points.extend(rouge_f1(elicited))
            self.recall_points.append(tag_recall(elicited, target))

        if self.sessions % 256 == 0:
            _drop_tokenizer_caches()

        index = {tag["tag"]: i for i, tag in enumerate(target)}
        span = max(1, len(index) - 1)
        for name, position in first_reveals(session):
            self.positions.append(position)
            self.generality.append(index[name] / span)
            self.concepts[name].append(position)

    def _point(self, questions: int) -> dict:
        """text_scores of every session after ``questions`` questions, from the stored numbers."""
        rouge_scores: list[tuple[float, ...]] = []
        recalls: list[float] = []
        start = 0
        for length in self.lengths:
            at = start + min(questions, length) - 1
            rouge_scores.append(tuple(self.rouge_points[3 * at : 3 * at + 3]))
            recalls.append(self.recall_points[at])
            start += length
        bleu = [0] * _BLEU_STATS
        if questions <= len(self.bleu_at):
            _add(bleu, self.bleu_at[questions - 1])
        for length in range(1, min(questions - 1, len(self.bleu_after)) + 1):
            _add(bleu, self.bleu_after[length - 1])
        return self._text_scores(bleu, rouge_scores, recalls)

    def _text_scores(self, bleu: list[int], rouge_scores, recalls, interval: bool = False) -> dict:
        scores = {"bleu": _bleu_from_stats(bleu)}
        indexes = list(range(len(rouge_scores)))
        scores.update(metrics.rouge(indexes, indexes, seed=self.seed, cache=_StoredRouge(rouge_scores), with_interval=interval))
        scores["tag_recall"] = metrics.mean(recalls)
        return scores

    def result(self) -> dict:
        """The system's numbers, all shares and scores in 0-1 unless named otherwise.

        ``bleu``; ``rouge1``, ``rouge2``, ``rougeL`` (F1, bootstrap median) each with ``*_ci95``
        [low, high]; ``tag_recall``; ``unanswered_rate`` (of turns; None without turns);
        ``questions_asked`` (turns per session); ``complete_rate``; ``repeat_rate`` (of asked
        questions, ``funnelqa.repeats``); ``rouge_tokenizer``; ``curve``: ``questions`` [1..T] and
        bleu, rouge1/2/L and tag_recall after each number of questions (Fig. 4);
        ``funnel_spearman`` {rho, pairs}: Spearman's rho of each tag's first-reveal position against
        its generality (index in the target / (m - 1)), > 0 for a funnel order; ``weighted_rank``
        [{concept, wr, sessions}] sorted by wr (Eq. 11, Fig. 7). Raises UsageError when no session
        was added. ``analysis()`` has the numbers beyond the paper's.
        """
        if not self.sessions:
            raise UsageError("no sessions to score")
        summary = self._text_scores(self.final_bleu, self.final_rouge, self.final_recall, interval=True)
        summary["unanswered_rate"] = self.unanswered / self.turns if self.turns else None
        summary["questions_asked"] = self.turns / self.sessions
        summary["complete_rate"] = self.complete / self.sessions
        summary["repeat_rate"] = self.repeated / self.questions if self.questions else 0.0
        # Which tokenizer scored ROUGE: "default" numbers equal evaluate's, "unicode" ones do not.
        summary["rouge_tokenizer"] = "+".join(sorted(self.rouge.used))
        curve: dict[str, list] = {"questions": list(range(1, self.horizon + 1))}
        for questions in curve["questions"]:
            for name, value in self._point(questions).items():
                curve.setdefault(name, []).append(value)
        summary["curve"] = curve
        summary["funnel_spearman"] = {"rho": metrics.spearman(self.positions, self.generality), "pairs": len(self.positions)}
        ranks = metrics.weighted_ranks(self.concepts)
        rows = [{"concept": name, "wr": wr, "sessions": len(self.concepts[name])} for name, wr in ranks.items()]
        summary["weighted_rank"] = sorted(rows, key=lambda row: (row["wr"], -row["sessions"], row["concept"]))
        return summary

    def analysis(self) -> dict:
        """The numbers beyond the paper's, all shares in 0-1 (definitions: docs/evaluation.md).

        Questioner behaviour (``fidelity``): ``exact_repeat_rate`` (of asked questions),
        ``non_question_rate`` (of turns), ``mapped_rate`` (turns whose T_i an oracle decides),
        ``answerable_rate`` (of mapped turns: T_i names a tag the user has; None when none mapped),
        ``unanswered_absent_rate``/``unanswered_missed_rate`` (of turns: unanswered and mapped,
        with T_i naming none/some of the user's tags). ``simulator_fidelity``: None, or for a file
        with oracle sessions that record T_i ``{sessions, turns, tag_precision, tag_recall, tag_f1,
        false_no_preference_rate, invented_rate, invented_turn_rate, grounding, counts, ci95}``.
        With ``resamples`` > 0, ``ci95`` {metric: [low, high] | None} for bleu and every
        ``SYSTEM_RATIOS`` metric (percentile bootstrap over users, ``uncertainty.intervals``; for
        ROUGE an interval of the mean F1, beside the ``rouge*_ci95`` of evaluate's aggregator) and
        ``bootstrap`` {resamples, seed, users}. Raises UsageError when no session was added.
        """
        if not self.sessions:
            raise UsageError("no sessions to score")
        summary: dict = fidelity.ratios(self.counts, fidelity.BEHAVIOUR_RATIOS)
        summary["simulator_fidelity"] = self._fidelity()
        if self.resamples:
            summary["ci95"] = uncertainty.intervals(self.users, SYSTEM_RATIOS, resamples=self.resamples, seed=self.seed)
            summary["bootstrap"] = {"resamples": self.resamples, "seed": self.seed, "users": len(self.users)}
        if not self.counts["mapped"]:
            # No oracle decided any question: "none absent, none missed" would claim what is unknown.
            for name in _NEEDS_ORACLE:
                summary[name] = None
                if "ci95" in summary:
                    summary["ci95"][name] = None
        return summary

    def _fidelity(self) -> dict | None:
        if not self.counts["f_turns"]:
            return None
        counts = {name: self.counts[name] for name in fidelity.FIDELITY_COUNTS}
        sessions = int(self.users.matrix()[:, self.users.columns.index("f_turns")].astype(bool).sum())
        result = {"sessions": sessions, "turns": int(counts["f_turns"]), **fidelity.ratios(counts, fidelity.FIDELITY_RATIOS),
                  "counts": counts}
        if self.resamples:
            table = uncertainty.UserTable(fidelity.FIDELITY_COUNTS, with_bleu=False)
            data = self.users.matrix()
            columns = [self.users.columns.index(name) for name in fidelity.FIDELITY_COUNTS]
            for user, row in zip(self.users.ids, data[:, columns].tolist()):
                if row[0]:  # f_turns: an oracle session
                    table.add(user, dict(zip(fidelity.FIDELITY_COUNTS, row)))
            result["ci95"] = uncertainty.intervals(table, fidelity.FIDELITY_RATIOS, resamples=self.resamples, seed=self.seed)
        return result


def score_sessions(sessions: Iterable[Record], *, seed: int = 0) -> dict:
    """``SessionScorer.result()`` of ``sessions`` (one system), which may be a one-pass stream."""
    scorer = SessionScorer(seed=seed)
    for session in sessions:
        scorer.add(session)
    return scorer.result()


def _short_spec(text: str) -> str:
    """`hf:/long/path/base+runs/q-lora` -> `hf:base+q-lora`: names for a table, not for loading.

    ``text`` is a session's questioner or simulator: a model spec, or anything else (``oracle``,
    a spec this version does not read), which is its own name.
    """
    try:
        spec = ModelSpec.parse(text)
    except UsageError:
        return text
    short = spec.backend + (f":{_last_part(spec.model)}" if spec.model else "")
    return short + (f"+{_last_part(str(spec.adapter))}" if spec.adapter else "")


def _last_part(path: str) -> str:
    return Path(path.rstrip("/")).name or path


def system_name(first: Record, source: str, *, mixed: bool = False) -> str:
    """A system's name in the table and the plots: "QUESTIONER / SIMULATOR / FORM" from the
    ``first`` session's fields, specs shortened (``hf:/m/base+/runs/q`` -> ``hf:base+q``).

    ``source`` is the file as ``records.source_name`` gives it. Its stem ("stdin" for stdin) is the
    name instead when one of the three fields is missing, or the file is ``mixed`` (its sessions
    disagree on them): then the file's own name says more than its first line.
    """
    if mixed or not all(first.get(key) for key in _SYSTEM_FIELDS):
        return Path(source).stem if source != "<stdin>" else "stdin"
    return f"{_short_spec(first['questioner'])} / {_short_spec(first['simulator'])} / {first['profile_form']}"


def score_file(path: str, *, seed: int = 0, rouge_tokenizer: str = "auto", oracle: OracleMap | None = None,
               resamples: int = uncertainty.RESAMPLES) -> dict:
    """Score one session file, streaming: memory holds one session plus the numbers kept per session.

    Sessions carrying an ``error`` are left out. Returns ``system`` (``system_name``), ``source``,
    ``questioner``, ``simulator``, ``profile_form`` (the first session's), ``sessions`` (how many
    were scored) and ``SessionScorer.result()``'s fields (``oracle`` and ``resamples`` as there).
    Raises InputError for a line that is not a session (``check_session``) or a file with no
    session left to score.
    """
    return _score_file(path, seed=seed, rouge_tokenizer=rouge_tokenizer, oracle=oracle, resamples=resamples)[0]


def _score_file(path: str, *, seed: int, rouge_tokenizer: str, oracle: OracleMap | None,
                resamples: int) -> tuple[dict, SessionScorer]:
    scorer = SessionScorer(seed=seed, rouge_tokenizer=rouge_tokenizer, oracle=oracle, resamples=resamples)
    for session in read_records(path, check_session):
        if "error" not in session:
            scorer.add(session)
    if not scorer.sessions:
        raise InputError(source_name(path), None, "holds no sessions")
    first = scorer.first
    result = {
        "system": system_name(first, source_name(path), mixed=scorer.mixed),
        "source": source_name(path),
        "questioner": first.get("questioner"),
        "simulator": first.get("simulator"),
        "profile_form": first.get("profile_form"),
        "sessions": scorer.sessions,
    }
    result.update(scorer.result())
    result.update(scorer.analysis())
    return result, scorer


def oracle_map(paths: Sequence[str]) -> OracleMap:
    """The ``fidelity.OracleMap`` of every oracle session (T_i recorded) in the files ``paths``.

    A file whose first session is not from a reference questioner is not read further; stdin
    ("-") is skipped, as it cannot be read a second time. Raises InputError as ``read_records``.
    """
    mapping = OracleMap()
    for path in paths:
        if str(path) == "-":
            continue
        for session in read_records(path, check_session):
            if session.get("questioner") not in REFERENCE_QUESTIONERS:
                break
            if "error" not in session:
                mapping.add(session)
    return mapping


def compare_systems(results: Sequence[dict], tables: Sequence[uncertainty.UserTable], *,
                    resamples: int = uncertainty.RESAMPLES, seed: int = 0) -> list[dict]:
    """One record per pair of results that share users, in argument order (A before B):
    ``{"a": system, "a_source": file, "b": ..., "b_source": ..., "users": n, "diff": {metric:
    {value, ci95, p, significant}}}``, A minus B on the users both interviewed
    (``uncertainty.paired``, each pair resampled once, seeded). ``tables[i]`` is ``results[i]``'s
    per-user table."""
    pairs = []
    for i in range(len(results)):
        for j in range(i + 1, len(results)):
            comparison = uncertainty.paired(tables[i], tables[j], SYSTEM_RATIOS, resamples=resamples, seed=seed)
            if comparison is not None:
                pairs.append({"a": results[i]["system"], "a_source": results[i]["source"],
                              "b": results[j]["system"], "b_source": results[j]["source"], **comparison})
    return pairs


def pairs_path(out: Path) -> Path:
    """Where ``score --out FILE`` writes its paired differences: FILE's name with ``.pairs`` before
    the suffix (``scores.jsonl`` -> ``scores.pairs.jsonl``), beside it."""
    return out.with_name(f"{out.stem}.pairs{out.suffix or '.jsonl'}")


def _unique_names(results: list[dict]) -> None:
    counts = collections.Counter(result["system"] for result in results)
    for result in results:
        if counts[result["system"]] > 1:
            result["system"] = f"{result['system']} [{Path(result['source']).stem}]"


def print_table(results: Sequence[dict], pairs: Sequence[dict] = ()) -> None:
    """The comparison table on stderr: per result n, BLEU, ROUGE-1/2/L, recall, unanswered and
    repeat rates, questions asked and Spearman rho (3 decimals, "-" for None), then a legend; then
    the questioner-behaviour table, the ``pairs`` (``compare_systems``; * = significant) and one
    simulator-fidelity row per simulator."""
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
            escape(result["system"]),
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
    _print_behaviour(console, results)
    _print_pairs(console, pairs)
    _print_fidelity(console, results)


# The metrics the paired-difference table shows (all are in the JSON).
PAIR_COLUMNS = (("bleu", "BLEU"), ("rougeL", "R-L"), ("tag_recall", "recall"), ("unanswered_rate", "unansw."),
                ("repeat_rate", "repeat"))


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _new_table(title: str, columns: Sequence[str]):
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1))
    table.add_column(columns[0], overflow="fold")
    for column in columns[1:]:
        table.add_column(column, justify="right", no_wrap=True)
    return table


def _print_behaviour(console, results: Sequence[dict]) -> None:
    table = _new_table("questioner behaviour", ("system", "repeat", "exact", "non-q", "mapped", "answerable",
                                                 "unansw. absent", "unansw. missed"))
    for result in results:
        table.add_row(escape(result["system"]), *(_fmt(result.get(key)) for key in (
            "repeat_rate", "exact_repeat_rate", "non_question_rate", "mapped_rate", "answerable_rate",
            "unanswered_absent_rate", "unanswered_missed_rate")))
    console.print(table)
    console.print("exact: share of questions copying an earlier one; non-q: turns without a question mark; mapped: turns "
                  "whose teacher tags T_i an oracle session decides; answerable: mapped turns about a tag the user has; "
                  "unansw. absent/missed: turns unanswered with T_i naming none / some of the user's tags")


def _print_pairs(console, pairs: Sequence[dict]) -> None:
    if not pairs:
        return
    table = _new_table("paired differences (A - B, same users; * p < 0.05)", ("A - B", "users", *(label for _, label in PAIR_COLUMNS)))
    for entry in pairs:
        cells = []
        for key, _ in PAIR_COLUMNS:
            row = entry["diff"].get(key)
            if row is None or row["value"] is None:
                cells.append("-")
            else:
                cells.append(f"{row['value']:+.3f}{'*' if row['significant'] else ' '}")
        table.add_row(escape(f"{entry['a']}  -  {entry['b']}"), str(entry["users"]), *cells)
    console.print(table)


def fidelity_by_simulator(results: Sequence[dict]) -> dict[str, dict]:
    """{simulator spec: ``fidelity.pool_fidelity`` of every result with a ``simulator_fidelity``
    and that simulator}, in first-seen order: one row per simulator, over all its oracle files."""
    groups: dict[str, list[dict]] = {}
    for result in results:
        if result.get("simulator_fidelity"):
            groups.setdefault(str(result.get("simulator")), []).append(result["simulator_fidelity"])
    return {simulator: fidelity.pool_fidelity(rows) for simulator, rows in groups.items()}


def _print_fidelity(console, results: Sequence[dict]) -> None:
    pooled = fidelity_by_simulator(results)
    if not pooled:
        return
    table = _new_table("simulator fidelity (oracle sessions, against the teacher's T_i)",
                       ("simulator", "sessions", "turns", "P", "R", "F1", "false NP", "invented", "grounding"))
    for simulator, row in pooled.items():
        table.add_row(escape(_short_spec(simulator)), str(row["sessions"]), str(row["turns"]), *(_fmt(row[key]) for key in (
            "tag_precision", "tag_recall", "tag_f1", "false_no_preference_rate", "invented_rate", "grounding")))
    console.print(table)
    console.print("false NP: turns with T_i non-empty that revealed nothing; invented: revealed tags not in T_i; "
                  "grounding: share of an answer's content words found in its revealed tags' contents")


def score_files(
    paths: Sequence[str], *, plots_dir: Path | None = None, out: Path | None = None, seed: int = 0,
    rouge_tokenizer: str = "auto", resamples: int = uncertainty.RESAMPLES, pairs_out: Path | None = None,
) -> list[dict]:
    """`funnelqa score`: one result per session file, tables on stderr, JSONL on stdout or ``out``.

    ``rouge_tokenizer``: see ``metrics.RougeCache``; each result names the one that scored it.
    ``resamples`` bootstrap resamples (seeded by ``seed``) give every result ``ci95`` and the
    paired differences between files that share users (``compare_systems``), written as JSONL to
    ``pairs_out``, else with ``out`` to ``pairs_path(out)``, and shown on stderr; 0 leaves both
    out. A system's line stays one line per file, comparable on its own. Oracle files are read
    once more first, for the ``fidelity.OracleMap`` that maps every file's questions to T_i.
    Raises UsageError for bad options, InputError for a bad file.
    """
    if not paths:
        raise UsageError("give at least one session file")
    if sum(str(path) == "-" for path in paths) > 1:
        raise UsageError("stdin ('-') can be given once")
    if rouge_tokenizer not in metrics.ROUGE_TOKENIZERS:
        raise UsageError(f"unknown ROUGE tokenizer {rouge_tokenizer!r}; use one of {', '.join(metrics.ROUGE_TOKENIZERS)}")
    if resamples < 0:
        raise UsageError("--bootstrap must be 0 (no intervals) or more")
    mapping = oracle_map(paths)
    # No ROUGE cache shared across files: it would keep every pair of every file in memory.
    scored = [_score_file(path, seed=seed, rouge_tokenizer=rouge_tokenizer, oracle=mapping if len(mapping) else None,
                          resamples=resamples) for path in paths]
    results = [result for result, _ in scored]
    _unique_names(results)
    pairs = compare_systems(results, [scorer.users for _, scorer in scored], resamples=resamples, seed=seed) if resamples else []
    print_table(results, pairs)
    # Scores take seconds to recompute: a re-run starts over rather than resuming.
    with RecordWriter(Path(out) if out is not None else None, resume=False) as writer:
        writer.write_many(results)
    target = Path(pairs_out) if pairs_out is not None else (pairs_path(Path(out)) if out is not None else None)
    if target is not None and resamples:
        with RecordWriter(target, resume=False) as writer:
            writer.write_many(pairs)
    if plots_dir is not None:
        from funnelqa.console import stderr
        from funnelqa.plots import write_plots

        for path in write_plots(results, Path(plots_dir)):
            stderr.print(f"wrote {path}")
    return results
