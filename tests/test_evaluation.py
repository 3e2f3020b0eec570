"""Retrieval metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from b3.data import Pairs
from b3.evaluation import (
    Ranks,
    compare,
    evaluate_encoder,
    metrics_from_ranks,
    paired_bootstrap,
    per_task_metrics,
    relevant_ranks,
    task_ranks,
)
from b3.spec import PromptsSpec


def test_metrics_by_hand():
    m = metrics_from_ranks([1, 2, 11])
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 0) / 3)
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@10"] == pytest.approx(2 / 3)
    assert m["mrr@10"] == pytest.approx((1 + 0.5 + 0) / 3)


def test_ranks_count_strictly_better_documents():
    corpus = np.eye(4)
    queries = np.array([[1, 0, 0, 0], [0.9, 0.5, 0, 0], [0.5, 0.5, 0, 0]])
    ranks = relevant_ranks(queries, corpus, np.array([0, 1, 1]), block=2)
    assert ranks.tolist() == [1, 2, 1]  # a tie with document 0 counts in the query's favour


class LookupEncoder:
    """Embeds a text as a fixed vector from a table (to test the plumbing, not a model)."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def encode(self, texts, desc="", images=None):
        self.seen.extend(texts)
        return np.stack([self.table[t] for t in texts])


def test_evaluate_encoder_dedups_the_corpus_and_applies_prompts():
    pairs = Pairs(
        ids=np.array(["a", "b", "c"], dtype=object),
        queries=np.array(["q1", "q2", "q3"], dtype=object),
        positives=np.array(["same", "same", "other"], dtype=object),
        tasks=np.array(["t", "t", "u"], dtype=object),
        positive_group=np.array([0, 0, 1]),
        held_out=0,
    )
    table = {"Q: q1": np.array([1.0, 0]), "Q: q2": np.array([0.0, 1]), "Q: q3": np.array([0.0, 1]),
             "D: same": np.array([1.0, 0]), "U: other": np.array([0.0, 1])}  # fmt: skip
    prompts = PromptsSpec(query="Q: ", positive="D: ", by_task={"u": {"positive": "U: "}})
    encoder = LookupEncoder(table)
    m = evaluate_encoder(encoder, pairs, prompts)
    assert m["corpus"] == 2 and m["queries"] == 3
    assert m["recall@1"] == pytest.approx(2 / 3)  # q2's relevant "same" loses to "other"
    assert set(encoder.seen) == set(table)


def test_per_task_ranks_ignore_other_tasks_documents():
    # documents: 0 (task t), 1 (task u), 2 (task t); query 0 prefers u's document to its own
    corpus = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    queries = np.array([[0.6, 0.8], [0.0, 1.0], [0.6, 0.8]])
    relevant = np.array([0, 1, 2])
    tasks = np.array(["t", "u", "t"], dtype=object)
    assert relevant_ranks(queries, corpus, relevant).tolist() == [3, 1, 1]
    # query 0 against t's documents {0, 2}: only document 2 beats document 0
    assert task_ranks(queries, corpus, relevant, tasks).tolist() == [2, 1, 1]


def test_micro_and_macro_averages_by_hand():
    ranks = np.array([1, 2, 11, 1])
    tasks = np.array(["big", "big", "big", "small"], dtype=object)
    m = per_task_metrics(ranks, tasks)
    big = (1 + 1 / math.log2(3) + 0) / 3
    assert m["tasks"]["big"]["ndcg@10"] == pytest.approx(big)
    assert m["tasks"]["small"]["ndcg@10"] == pytest.approx(1.0)
    assert m["micro"]["ndcg@10"] == pytest.approx((3 * big + 1) / 4)
    assert m["macro"]["ndcg@10"] == pytest.approx((big + 1) / 2)
    assert m["macro"]["tasks"] == 2 and m["micro"]["queries"] == 4


def test_bootstrap_of_a_constant_difference_is_that_constant():
    base = np.array([0.1, 0.5, 0.9, 0.3])
    r = paired_bootstrap(base, base + 0.25, resamples=500)
    assert r["difference"] == pytest.approx(0.25)
    assert r["low"] == pytest.approx(0.25) and r["high"] == pytest.approx(0.25)


def test_bootstrap_matches_the_exact_resampling_distribution():
    """n = 3 differences [0, 0, 1]: the 27 equally likely resamples have means 0 (8 of 27),
    1/3 (12), 2/3 (6) and 1 (1); so P(mean <= 0) = 0.296 > 2.5% and P(mean < 1) = 0.963 < 97.5%:
    the exact 95% interval is [0, 1]."""
    base = np.zeros(3)
    other = np.array([0.0, 0.0, 1.0])
    r = paired_bootstrap(base, other, resamples=20_000, seed=1)
    assert r["difference"] == pytest.approx(1 / 3)
    assert r["low"] == 0.0 and r["high"] == 1.0
    # and the pairing matters: the same values unpaired would give a wide interval around 0
    paired = paired_bootstrap(np.array([0.2, 0.5, 0.8]), np.array([0.3, 0.6, 0.9]), resamples=2000)
    assert paired["low"] == pytest.approx(0.1) and paired["high"] == pytest.approx(0.1)


def test_macro_bootstrap_keeps_each_task_weight():
    """Task a: 99 queries with difference 0; task b: 1 query with difference 1. The macro mean is
    0.5 on every stratified resample (each task keeps its weight); micro is 0.01 with an interval
    that reaches 0."""
    base = np.zeros(100)
    other = np.r_[np.zeros(99), 1.0]
    strata = np.array(["a"] * 99 + ["b"], dtype=object)
    macro = paired_bootstrap(base, other, strata=strata, resamples=1000)
    assert macro["difference"] == macro["low"] == macro["high"] == pytest.approx(0.5)
    micro = paired_bootstrap(base, other, resamples=1000)
    assert micro["difference"] == pytest.approx(0.01) and micro["low"] == 0.0


def test_compare_reports_all_three_views_and_refuses_other_queries():
    tasks = np.array(["t", "t", "u"], dtype=object)
    base = Ranks(mixed=np.array([2, 1, 3]), task=np.array([1, 1, 1]), tasks=tasks, corpus=3)
    better = Ranks(mixed=np.array([1, 1, 1]), task=np.array([1, 1, 1]), tasks=tasks, corpus=3)
    c = compare(base, better, resamples=200)
    gain = ((1 - 1 / math.log2(3)) + (1 - 1 / math.log2(4))) / 3
    assert c["mixed"]["difference"] == pytest.approx(gain)
    assert c["per_task_micro"]["difference"] == 0 and c["per_task_macro"]["high"] == 0
    with pytest.raises(ValueError, match="same queries"):
        compare(base, Ranks(mixed=np.array([1]), task=np.array([1]), tasks=tasks[:1], corpus=1))
