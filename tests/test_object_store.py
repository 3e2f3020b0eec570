"""A network or object-store fault is not bad input: against a real S3-compatible server
(moto's server mode, tests/cluster/s3_server.py) whose network drops mid-read, the stage
retries and finishes with the outputs of an undisturbed run; with the server down for good it
exits 75 (which the stage Job retries), never 2. The dataset's identity on the store is the
store's hash of its content, so an identical re-upload keeps every stage's outputs."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_pairs, write_manifest

from b3 import retry
from b3.cli import main
from b3.data import dataset_identity
from b3.errors import TransientError
from b3.retry import is_transient, retrying
from b3.spec import DatasetSpec

# --- which errors are transient: messages as pyarrow's S3 client and Python give them --------

TRANSIENT = [
    OSError("When reading information for key 'p.parquet' in bucket 'b': AWS Error NETWORK_CONNECTION during "
            "HeadObject operation: curlCode: 7, Could not connect to server"),
    OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving data "
            "from the peer"),
    OSError("AWS Error SLOW_DOWN during PutObject operation: Please reduce your request rate."),
    OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation: Service Unavailable"),
    OSError("AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
]  # fmt: skip
NOT_TRANSIENT = [
    OSError("When reading information for key 'p.parquet' in bucket 'b': AWS Error ACCESS_DENIED during "
            "HeadObject operation: No response body."),
    OSError("Bucket 'nope' not found"),
    FileNotFoundError(2, "No such file or directory"),
    ValueError("Parquet magic bytes not found in footer. Either the file is corrupted or this is not a parquet file."),
    OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: The specified bucket does not exist"),
]  # fmt: skip


@pytest.mark.parametrize("err", TRANSIENT, ids=lambda e: str(e)[:40])
def test_network_and_store_faults_are_transient(err):
    assert is_transient(err)


@pytest.mark.parametrize("err", NOT_TRANSIENT, ids=lambda e: str(e)[:40])
def test_faults_that_would_repeat_are_not(err):
    assert not is_transient(err)


def test_retrying_tries_again_then_gives_up_with_a_transient_error_and_passes_other_errors_at_once(
    monkeypatch,
):
    clock = [0.0]  # a fault that fails at once: only the pauses spend the budget
    monkeypatch.setattr(retry.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(retry.time, "sleep", lambda s: clock.__setitem__(0, round(clock[0] + s, 6)))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("Connection reset by peer")
        return "read"

    assert retrying("read x", flaky) == "read" and len(calls) == 3
    clock[0] = 0.0
    with pytest.raises(TransientError, match=r"read x: still failing after 7 attempts over 30 s"):
        retrying("read x", lambda: (_ for _ in ()).throw(TimeoutError("timed out")))
    assert clock[0] == 30.0  # the last try at the end of the budget: 1+2+4+8+8 s, then the rest
    seen = []

    def missing():
        seen.append(1)
        raise FileNotFoundError(2, "No such file or directory")

    with pytest.raises(FileNotFoundError):
        retrying("read x", missing)
    assert len(seen) == 1  # not retried


# --- against the real server ------------------------------------------------------------------


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server


def _spec(tiny_model_dir: str, dataset: str, work: str) -> dict:
    return {
        "dataset": {"uri": dataset, "columns": {"task": "task", "id": "id"}},
        "teacher": {"model": tiny_model_dir, "maxLength": 32, "batchSize": 32},
        "mining": {"p": 2, "m": 8, "clusterSize": 4, "batchSize": 16, "seed": 0},
        "training": {"student": tiny_model_dir, "outputDir": "out"},
        "workDir": work,
    }


def _parquet_bytes(table) -> bytes:
    import io

    buffer = io.BytesIO()
    pq.write_table(table, buffer, row_group_size=60)  # several column chunks: several reads
    return buffer.getvalue()


def test_a_connection_dropped_mid_read_is_retried_and_the_stages_finish_with_the_same_outputs(
    tmp_path, tiny_model_dir, s3_env, s3_network, caplog
):
    data = _parquet_bytes(make_pairs(240))
    s3_env.put("faults/pairs.parquet", data)
    (tmp_path / "pairs.parquet").write_bytes(data)
    calm = write_manifest(tmp_path, _spec(tiny_model_dir, str(tmp_path / "pairs.parquet"), "calm"), "calm")
    assert main(["rank", str(calm)]) == 0 and main(["partition", str(calm)]) == 0

    # dataset and artifacts on the store; the first response past 2 KiB is cut, and the server
    # then refuses connections for 20 s: longer than pyarrow's own client rides out (its S3
    # client retried for 9-15 s here), so b3's retry must carry the read
    faulty = write_manifest(tmp_path, _spec(tiny_model_dir, s3_env.uri("faults/pairs.parquet"),
                                            s3_env.uri("faults/work")), "faulty")  # fmt: skip
    s3_network.cut_next_response(after=2048, down_for=20)
    with caplog.at_level(logging.WARNING, logger="b3.retry"):
        assert main(["rank", str(faulty)]) == 0
    assert s3_network.cuts == 1 and "dataset" in caplog.text and "retrying in" in caplog.text
    caplog.clear()
    # a second outage, as the partition stage starts: its checks look the bucket up first, and
    # 25 s is more than pyarrow's client rides out (it gives up at once on some runs)
    s3_network.down(25)
    with caplog.at_level(logging.WARNING, logger="b3.retry"):
        assert main(["partition", str(faulty)]) == 0
    assert "faults/work" in caplog.text and "retrying in" in caplog.text

    store = s3_env.filesystem()
    for stage, name in [("rank", "topk.parquet"), ("partition", "clusters.parquet")]:
        remote = pq.read_table(f"faults/work/{stage}/{name}", filesystem=store)
        local = pq.read_table(tmp_path / "calm" / stage / name)
        assert remote.equals(local), name


def test_a_store_down_for_good_exits_75_not_2_and_spends_no_compute(tmp_path, tiny_model_dir, s3_env, s3_network):
    s3_env.put("down/pairs.parquet", _parquet_bytes(make_pairs(240)))
    manifest = write_manifest(tmp_path, _spec(tiny_model_dir, s3_env.uri("down/pairs.parquet"), "work"))
    s3_network.down()
    started = time.time()
    b3 = Path(sys.executable).with_name("b3")  # the command users run
    ran = subprocess.run([str(b3), "rank", str(manifest)], capture_output=True, text=True,
                         env={**os.environ, **s3_env.env}, timeout=300)  # fmt: skip
    assert ran.returncode == 75, ran.stderr[-2000:]
    assert re.search(r"still failing after \d+ attempts over \d+ s", ran.stderr), ran.stderr[-2000:]
    assert "transient fault" in ran.stderr
    assert "embed queries" not in ran.stderr  # the teacher never ran
    assert not (tmp_path / "work").exists()
    assert time.time() - started < 120


def test_the_datasets_identity_on_the_store_is_its_content_hash(s3_env):
    table = make_pairs(40)
    s3_env.put("identity/pairs.parquet", _parquet_bytes(table))
    spec = DatasetSpec(uri=s3_env.uri("identity/pairs.parquet"))
    first = dataset_identity(spec)
    assert first["content"].startswith("etag:") and "mtime_ns" not in first
    time.sleep(1.1)  # a later modification time
    s3_env.put("identity/pairs.parquet", _parquet_bytes(table))  # the same content again
    assert dataset_identity(spec) == first
    reversed_queries = pa.array(table.column("query").to_pylist()[::-1])
    s3_env.put("identity/pairs.parquet", _parquet_bytes(table.set_column(1, "query", reversed_queries)))
    assert dataset_identity(spec) != first


def test_local_files_keep_size_and_modification_time(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(make_pairs(20), path)
    identity = dataset_identity(DatasetSpec(uri=str(path)))
    assert identity == {"size": path.stat().st_size, "mtime_ns": path.stat().st_mtime_ns}
