"""Retrieval metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from b3.data import Pairs
from b3.evaluation import evaluate_encoder, metrics_from_ranks, relevant_ranks
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

    def encode(self, texts, desc=""):
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
