"""Offline metrics with the same numbers as Hugging Face ``evaluate``, plus the funnel analyses.

``evaluate.load("rouge")`` and ``evaluate.load("bleu")`` fetch their code from a hub at run time,
so the two are reproduced here from the libraries they wrap:

- ROUGE: rouge_score's ``RougeScorer(use_stemmer=False)`` per pair; the corpus number is
  evaluate's default aggregation, ``BootstrapAggregator().aggregate()[type].mid.fmeasure`` (the
  median of 1000 bootstrap means of the per-pair F1). evaluate leaves numpy's global RNG
  unseeded; here it is seeded (and restored afterwards), so a score is reproducible and equals
  ``np.random.seed(seed); evaluate.load("rouge").compute(...)``.
  rouge_score keeps only the letters a-z and digits, so text in another script scores 0 against
  itself; ``RougeCache(tokenizer="unicode")`` keeps the letters of every script, and "auto" (the
  default) uses it just for the pairs that hold letters outside the Latin script, so Latin-text
  numbers stay equal to evaluate's.
- BLEU: evaluate's ``bleu`` is tensorflow/nmt ``compute_bleu`` (corpus level, max order 4,
  no smoothing) over sacrebleu's 13a tokenizer, ported below line for line.
"""

from __future__ import annotations

import collections
import functools
import math
import unicodedata
from collections.abc import Iterable, Sequence

import regex

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
ROUGE_TOKENIZERS = ("auto", "default", "unicode")
# evaluate's default max_order: BLEU over 1- to 4-grams.
BLEU_MAX_ORDER = 4

# Letters (with their combining marks, as in Devanagari) and digits of any script.
_WORD = regex.compile(r"[\p{L}\p{M}\p{N}]+")
# Scripts written without spaces between words: each character is a token.
_UNSPACED = regex.compile(r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}]")
_NON_LATIN_LETTER = regex.compile(r"(?=\p{L})[^\p{Latin}]")


def unicode_tokens(text: str) -> list[str]:
    """Case-folded words of any script (NFKC); scripts without word spaces give one token per character."""
    tokens: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
        if _UNSPACED.search(word):
            tokens.extend(part for part in regex.split(r"(\p{Han}|\p{Hiragana}|\p{Katakana}|\p{Thai}|\p{Lao}|\p{Khmer}|\p{Myanmar})", word) if part)
        else:
            tokens.append(word)
    return tokens


def needs_unicode(text: str) -> bool:
    """Whether ``text`` has letters outside the Latin script, which rouge_score's tokenizer drops."""
    return _NON_LATIN_LETTER.search(text) is not None


class UnicodeTokenizer:
    """rouge_score tokenizer interface over ``unicode_tokens`` (no stemming)."""

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``, as rouge_score's ``Tokenizer.tokenize`` returns them: ``unicode_tokens``."""
        return unicode_tokens(text)


# ---- BLEU ----

@functools.lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


@functools.lru_cache(maxsize=8192)
def _tokens_13a(text: str) -> tuple[str, ...]:
    return tuple(_tokenizer_13a()(text).split())


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokenizer, split into tokens as evaluate's copy of it does."""
    return list(_tokens_13a(text))


@functools.lru_cache(maxsize=8192)
def _text_ngrams(text: str, max_order: int) -> collections.Counter:
    """Shared between calls (a curve scores the same texts again): callers must not mutate it."""
    return _ngrams(_tokens_13a(text), max_order)


def _ngrams(tokens: Sequence[str], max_order: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for order in range(1, max_order + 1):
        for start in range(len(tokens) - order + 1):
            counts[tuple(tokens[start : start + order])] += 1
    return counts


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict:
    """Corpus BLEU as ``evaluate.load("bleu").compute(predictions, references)`` (max order 4, no smoothing).

    ``references`` holds one text or a list of texts per prediction. Returns ``bleu_from_counts``'s
    dict. Raises ValueError when the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    max_order = BLEU_MAX_ORDER
    matches = [0] * max_order
    possible = [0] * max_order
    reference_length = translation_length = 0
    for prediction, refs in zip(predictions, references):
        refs = [refs] if isinstance(refs, str) else list(refs)
        length = len(tokenize_13a(prediction))
        reference_length += min(len(tokenize_13a(r)) for r in refs)
        translation_length += length
        merged: collections.Counter = collections.Counter()
        for ref in refs:
            merged |= _text_ngrams(ref, max_order)
        overlap = _text_ngrams(prediction, max_order) & merged
        for ngram, count in overlap.items():
            matches[len(ngram) - 1] += count
        for order in range(1, max_order + 1):
            if length - order + 1 > 0:
                possible[order - 1] += length - order + 1
    return bleu_from_counts(matches, possible, reference_length, translation_length)


def bleu_from_counts(matches: Sequence[int], possible: Sequence[int], reference_length: int,
                     translation_length: int) -> dict:
    """Corpus BLEU from its additive counts, summed over pairs (tensorflow/nmt ``compute_bleu``).

    ``matches``/``possible``: clipped matching and candidate n-grams per order 1..4; lengths in
    13a tokens. Returns ``bleu`` (0-1), ``precisions`` (one per order), ``brevity_penalty``,
    ``length_ratio`` (translation / reference; 0.0 when either is empty, and then bleu is 0),
    ``translation_length`` and ``reference_length``.
    """
    max_order = len(matches)
    precisions = [matches[i] / possible[i] if possible[i] > 0 else 0.0 for i in range(max_order)]
    geo_mean = math.exp(sum(math.log(p) / max_order for p in precisions)) if min(precisions) > 0 else 0.0
    if reference_length == 0 or translation_length == 0:
        ratio, brevity_penalty = 0.0, 0.0
    else:
        ratio = translation_length / reference_length
        brevity_penalty = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return {
        "bleu": geo_mean * brevity_penalty,
        "precisions": precisions,
        "brevity_penalty": brevity_penalty,
        "length_ratio": ratio,
        "translation_length": translation_length,
        "reference_length": reference_length,
    }


# ---- ROUGE ----

def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel (Hyyro 2004).

    rouge_score fills the full dynamic-programming table in pure Python, which dominates the run
    time of a curve; this gives the same integer in O(len(b)) big-integer steps.
    """
    if not a or not b:
        return 0
    positions: dict[str, int] = {}
    for i, token in enumerate(a):
        positions[token] = positions.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    row = full
    for token in b:
        matched = row & positions.get(token, 0)
        row = ((row + matched) | (row - matched)) & full
    return len(a) - row.bit_count()


class RougeCache:
    """Per-pair ROUGE scores as rouge_score's RougeScorer(use_stemmer=False) gives them, each pair once.

    ROUGE-N comes from rouge_score itself; ROUGE-L uses rouge_score's tokens and formula with a
    faster LCS (tests check both against RougeScorer). ``tokenizer``: "default" (rouge_score's,
    as evaluate), "unicode" (letters of every script), or "auto": "unicode" for a pair whose texts
    hold non-Latin letters, else "default". ``used`` collects the tokenizers that scored.
    Raises ValueError for an unknown tokenizer.
    """

    # What ``rouge`` reads from its cache: the types it reports, in the order evaluate adds them.
    rouge_types = ROUGE_TYPES

    def __init__(self, tokenizer: str = "auto"):
        from rouge_score import rouge_scorer, tokenizers

        if tokenizer not in ROUGE_TOKENIZERS:
            raise ValueError(f"unknown ROUGE tokenizer {tokenizer!r}; use one of {', '.join(ROUGE_TOKENIZERS)}")
        self.tokenizer = tokenizer
        self.used: set[str] = set()
        self._tokenizers = {"default": tokenizers.DefaultTokenizer(use_stemmer=False), "unicode": UnicodeTokenizer()}
        self._scorers = {
            name: rouge_scorer.RougeScorer(["rouge1", "rouge2"], use_stemmer=False, tokenizer=self._tokenizers[name])
            for name in self._tokenizers
        }
        self._scores: dict[tuple[str, str], dict] = {}

    def tokenizer_for(self, prediction: str, reference: str) -> str:
        """The tokenizer that scores this pair: the one asked for, or under "auto" "unicode" when
        either text holds non-Latin letters, else "default"."""
        if self.tokenizer != "auto":
            return self.tokenizer
        return "unicode" if needs_unicode(reference) or needs_unicode(prediction) else "default"

    def _rouge_l(self, prediction: str, reference: str, tokenizer):
        from rouge_score import scoring

        predicted = tokenizer.tokenize(prediction)
        target = tokenizer.tokenize(reference)
        if not predicted or not target:
            return scoring.Score(precision=0, recall=0, fmeasure=0)
        common = lcs_length(target, predicted)
        precision, recall = common / len(predicted), common / len(target)
        return scoring.Score(precision=precision, recall=recall, fmeasure=scoring.fmeasure(precision, recall))

    def score(self, prediction: str, reference: str) -> dict:
        """``{"rouge1", "rouge2", "rougeL": rouge_score.scoring.Score(precision, recall, fmeasure)}``
        (each 0-1) of one pair, computed once and kept. The prediction comes first, as in
        evaluate; rouge_score's own ``score`` takes the reference first."""
        key = (prediction, reference)
        if key not in self._scores:
            name = self.tokenizer_for(prediction, reference)
            self.used.add(name)
            scores = dict(self._scorers[name].score(reference, prediction))
            scores["rougeL"] = self._rouge_l(prediction, reference, self._tokenizers[name])
            self._scores[key] = {rouge_type: scores[rouge_type] for rouge_type in self.rouge_types}
        return self._scores[key]


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    *,
    seed: int = 0,
    cache: RougeCache | None = None,
    with_interval: bool = False,
) -> dict:
    """Corpus ROUGE F1 as ``evaluate.load("rouge").compute(predictions, references)`` (bootstrap mid).

    ``with_interval`` adds ``{type}_ci95: [low, high]`` from the same bootstrap.
    """
    import numpy as np
    from rouge_score import scoring

    if len(predictions) != len(references):
        raise ValueError("predictions and references differ in length")
    if not predictions:
        return {}
    cache = cache or RougeCache()
    aggregator = scoring.BootstrapAggregator()
    for prediction, reference in zip(predictions, references):
        # Types in the order evaluate adds them: the bootstrap draws from one RNG stream, type by type.
        aggregator.add_scores(cache.score(prediction, reference))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        aggregate = aggregator.aggregate()
    finally:
        np.random.set_state(state)
    result: dict = {}
    for rouge_type in cache.rouge_types:
        result[rouge_type] = float(aggregate[rouge_type].mid.fmeasure)
        if with_interval:
            result[f"{rouge_type}_ci95"] = [float(aggregate[rouge_type].low.fmeasure), float(aggregate[rouge_type].high.fmeasure)]
    return result


# ---- funnel analyses ----

def weighted_ranks(positions: dict[str, Sequence[int]]) -> dict[str, float]:
    """Eq. 11 per concept: WR = sum_i i * p(i), p(i) = the share of the concept's occurrences at position i.

    ``positions`` maps a concept to the (1-based) question positions where it occurred, pooled
    over sessions. p is normalised over the concept's own occurrences, so WR is the mean position
    at which the concept comes up, given that it comes up at all.
    """
    ranks = {}
    for concept, seen in positions.items():
        if not seen:
            continue
        counts = collections.Counter(seen)
        total = sum(counts.values())
        ranks[concept] = sum(i * count / total for i, count in counts.items())
    return ranks


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks; ties share the mean of the ranks they span (as scipy.stats.rankdata)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho with tie correction (Pearson's r of average ranks); None when undefined."""
    if len(x) != len(y):
        raise ValueError("x and y differ in length")
    if len(x) < 2:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def mean(values: Iterable[float]) -> float | None:
    """The arithmetic mean of ``values`` (any iterable, read once); None when there are none."""
    values = list(values)
    return sum(values) / len(values) if values else None
