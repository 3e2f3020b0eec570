"""Retrieval metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from b3.data import CandidateLists, Pairs
from b3.evaluation import (
    Ranks,
    candidate_metrics,
    candidate_ranks,
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


# --- candidate lists (MMEB's accuracy@1) ---------------------------------------------------------


def _pairs_with_lists(queries, positives, tasks, lists) -> Pairs:
    """Pairs whose row i has the candidate list lists[i] (None: no list), texts only."""
    rows = [i for i, texts in enumerate(lists) if texts for _ in texts]
    texts = [t for texts in lists if texts for t in texts]
    return Pairs(ids=np.array([str(i) for i in range(len(queries))], dtype=object),
                 queries=np.array(queries, dtype=object), positives=np.array(positives, dtype=object),
                 tasks=np.array(tasks, dtype=object), positive_group=np.arange(len(queries)), held_out=0,
                 candidates=CandidateLists(rows=np.array(rows, dtype=np.int64), texts=np.array(texts, dtype=object),
                                           images=None))  # fmt: skip


def test_candidate_accuracy_by_hand_with_the_positive_listed_first_as_in_mmeb():
    """q0 beats both others (its positive listed first, as MMEB lists it, counts once); q1's
    positive ties one candidate (the query's favour) and loses to another (rank 2); q2's list
    holds only candidates below it; q3 has no list. Candidates take the task's positive prompt,
    and each distinct one is embedded once."""
    pairs = _pairs_with_lists(
        queries=["q0", "q1", "q2", "q3"], positives=["p0", "p1", "p2", "p3"], tasks=["t", "t", "u", "u"],
        lists=[["p0", "x", "y"], ["tie", "p1", "high"], ["x", "y"], None])  # fmt: skip
    e = {"x": [0.0, 1.0], "y": [0.6, 0.8]}
    table = {"q0": [1.0, 0.0], "q1": [1.0, 0.0], "q2": [0.8, 0.6], "q3": [1.0, 0.0],
             "D: p0": [1.0, 0.0], "D: p1": [0.6, 0.8], "D: tie": [0.6, 0.8], "D: high": [0.8, 0.6],
             "U: p2": [0.8, 0.6], "U: p3": [1.0, 0.0], "U: x": e["x"], "U: y": [0.0, 1.0],
             "D: x": e["x"], "D: y": e["y"]}  # fmt: skip
    encoder = LookupEncoder({k: np.array(v) for k, v in table.items()})
    prompts = PromptsSpec(positive="D: ", by_task={"u": {"positive": "U: "}})
    q_emb = np.stack([encoder.table[q] for q in pairs.queries])
    ranks = candidate_ranks(encoder, pairs, q_emb, prompts)
    assert ranks.tolist() == [1, 2, 1, 0]
    assert sorted(encoder.seen) == sorted({"D: p0", "D: x", "D: y", "D: p1", "D: tie", "D: high", "U: p2", "U: x", "U: y"})
    m = candidate_metrics(ranks, pairs.tasks)
    assert m["queries"] == 3 and m["accuracy@1"] == pytest.approx(2 / 3)
    assert m["tasks"] == {"t": {"accuracy@1": 0.5, "queries": 2}, "u": {"accuracy@1": 1.0, "queries": 1}}
    assert m["macro"] == pytest.approx(0.75)  # MMEB's score: the mean over tasks


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_candidate_ranks_count_the_candidates_scoring_above_the_positive(data):
    """Against a brute force over rows: random documents, random lists (with repeats and the
    positive itself among them), random scores."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    n, docs = data.draw(st.integers(1, 6)), data.draw(st.integers(2, 8))
    names = [f"d{j}" for j in range(docs)]
    table = {name: rng.normal(size=3) for name in names} | {f"q{i}": rng.normal(size=3) for i in range(n)}
    positives = [names[data.draw(st.integers(0, docs - 1))] for _ in range(n)]
    lists = [data.draw(st.one_of(st.none(), st.lists(st.sampled_from(names), max_size=6))) for _ in range(n)]
    pairs = _pairs_with_lists([f"q{i}" for i in range(n)], positives, ["t"] * n, lists)
    encoder = LookupEncoder(table)
    q_emb = np.stack([table[f"q{i}"] for i in range(n)]).astype(np.float32)
    got = candidate_ranks(encoder, pairs, q_emb, None)
    for i in range(n):
        doc = {name: np.float32(q_emb[i] @ table[name].astype(np.float32)) for name in names}
        others = [c for c in (lists[i] or []) if c != positives[i]]
        expected = 0 if not lists[i] else 1 + sum(doc[c] > doc[positives[i]] for c in others)
        assert got[i] == expected, (i, lists[i], positives[i])
