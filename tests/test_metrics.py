import math
import random

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer, scoring

from funnelqa import metrics

WORDS = "the user likes enjoys crime comedy films , . dark old westerns and avoids musicals".split()


def random_texts(seed: int, count: int, longest: int = 30) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(0, longest))) for _ in range(count)]


# ---- BLEU ----

def test_bleu_of_identical_text_is_one():
    assert metrics.bleu(["The user enjoys crime films."], ["The user enjoys crime films."])["bleu"] == 1.0


def test_bleu_by_hand_with_equal_lengths():
    # 1..4-gram precisions 4/5, 3/4, 2/3, 1/2; equal lengths: no brevity penalty.
    result = metrics.bleu(["a b c d e"], ["a b c d f"])
    assert result["precisions"] == [4 / 5, 3 / 4, 2 / 3, 1 / 2]
    assert result["brevity_penalty"] == 1.0
    assert result["bleu"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-12)


def test_bleu_brevity_penalty_by_hand():
    result = metrics.bleu(["a b c d"], ["a b c d e f"])
    assert result["length_ratio"] == pytest.approx(4 / 6)
    assert result["bleu"] == pytest.approx(math.exp(1 - 6 / 4), abs=1e-12)


def test_bleu_is_corpus_level_and_zero_without_a_four_gram_match():
    # Each pair alone has no 4-gram match (BLEU 0); pooled, the first pair supplies one.
    assert metrics.bleu(["x y"], ["x y"])["bleu"] == 0.0
    pooled = metrics.bleu(["a b c d", "x y"], ["a b c d", "x z"])
    assert pooled["precisions"] == [5 / 6, 3 / 4, 2 / 2, 1 / 1]
    assert pooled["bleu"] == pytest.approx((5 / 6 * 3 / 4) ** 0.25)


def test_bleu_tokenizes_punctuation_as_13a():
    assert metrics.tokenize_13a("films, westerns.") == ["films", ",", "westerns", "."]
    assert metrics.bleu(["films."], ["films"])["translation_length"] == 2


def test_bleu_of_empty_prediction_is_zero():
    assert metrics.bleu([""], ["a b c d"])["bleu"] == 0.0


def test_bleu_equals_sacrebleu_without_smoothing():
    predictions = random_texts(1, 40)
    references = [text or "films" for text in random_texts(2, 40)]
    expected = sacrebleu.corpus_bleu(predictions, [references], smooth_method="none", tokenize="13a").score / 100
    assert expected > 0
    assert metrics.bleu(predictions, references)["bleu"] == pytest.approx(expected, abs=1e-9)


# ---- ROUGE ----

def test_rouge_by_hand_for_one_pair():
    result = metrics.rouge(["the cat sat"], ["the cat sat on the mat"])
    # ROUGE-1: P 3/3, R 3/6; ROUGE-2: P 2/2, R 2/5; ROUGE-L: LCS 3 as ROUGE-1.
    assert result["rouge1"] == pytest.approx(2 / 3)
    assert result["rouge2"] == pytest.approx(4 / 7)
    assert result["rougeL"] == pytest.approx(2 / 3)


def test_rouge_ignores_case_and_punctuation():
    assert metrics.rouge(["The user, likes FILMS."], ["the user likes films"])["rouge1"] == 1.0


def test_lcs_matches_rouge_score_on_random_pairs():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    cache = metrics.RougeCache()
    predictions, references = random_texts(3, 300), random_texts(4, 300)
    for prediction, reference in zip(predictions, references):
        assert cache.score(prediction, reference)["rougeL"] == scorer.score(reference, prediction)["rougeL"]


def evaluate_rouge(predictions, references, seed):
    """The body of evaluate's metrics/rouge/rouge.py `_compute` (defaults), with numpy seeded."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    aggregator = scoring.BootstrapAggregator()
    for reference, prediction in zip(references, predictions):
        aggregator.add_scores(scorer.score(reference, prediction))
    np.random.seed(seed)
    return {key: value.mid.fmeasure for key, value in aggregator.aggregate().items()}


def test_rouge_equals_evaluates_bootstrap_aggregation():
    predictions, references = random_texts(5, 60), random_texts(6, 60)
    expected = evaluate_rouge(predictions, references, seed=11)
    result = metrics.rouge(predictions, references, seed=11)
    for key in metrics.ROUGE_TYPES:
        assert result[key] == expected[key]
    # The bootstrap median is close to, but not the same as, the plain mean.
    cache = metrics.RougeCache()
    plain = np.mean([cache.score(p, r)["rougeL"].fmeasure for p, r in zip(predictions, references)])
    assert result["rougeL"] == pytest.approx(plain, abs=0.02)


def test_rouge_is_reproducible_and_leaves_numpys_rng_alone():
    predictions, references = random_texts(7, 20), random_texts(8, 20)
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    first = metrics.rouge(predictions, references, seed=3, with_interval=True)
    assert np.random.random() == before
    assert metrics.rouge(predictions, references, seed=3, with_interval=True) == first
    low, high = first["rouge1_ci95"]
    assert low <= first["rouge1"] <= high


# ---- funnel analyses ----

def test_weighted_rank_is_the_expected_position():
    ranks = metrics.weighted_ranks({"Genre": [1, 1, 2, 1], "Tone": [3], "Era": [2, 4], "Never": []})
    # Genre: p(1) = 3/4, p(2) = 1/4 -> 1 * 0.75 + 2 * 0.25.
    assert ranks == {"Genre": pytest.approx(1.25), "Tone": 3.0, "Era": 3.0}


def test_spearman_by_hand():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties take average ranks: y ranks 1.5, 1.5, 3.5, 3.5; cov 4, var 5 and 4.
    assert metrics.spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(4 / math.sqrt(20))
    assert metrics.spearman([1, 2, 3], [5, 5, 5]) is None
    assert metrics.spearman([1], [1]) is None


def test_average_ranks_share_ties():
    assert metrics.average_ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
