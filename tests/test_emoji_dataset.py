"""The emoji image-text set (examples/emoji/build_dataset.py), built from the Debian packages
`.ci/run` installs: its pairs, its images, its split key, and that it rebuilds byte for byte."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("build_dataset", ROOT / "examples" / "emoji" / "build_dataset.py")
emoji_set = sys.modules["build_dataset"] = importlib.util.module_from_spec(spec)  # dataclasses look it up
spec.loader.exec_module(emoji_set)


@pytest.fixture(autouse=True)
def packages():
    """Skip without the packages, except in CI, where `.ci/run` installs them."""
    missing = [package for package, (path, _) in emoji_set.PACKAGES.items() if not Path(path).exists()]
    if missing:
        message = f"needs the Debian packages {' '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_pairs_share_one_image_per_emoji_and_skin_tones_share_a_source(tmp_path):
    out = tmp_path / "emoji"
    assert emoji_set.main(["--out", str(out), "--groups", "hand-fingers-closed", "Flags", "--size", "32"]) == 0
    rows = pq.read_table(out / "emoji.parquet").to_pylist()
    summary = json.loads((out / "emoji.json").read_text())
    assert summary["rows"] == len(rows) and set(summary["tasks"]) == set(emoji_set.TASKS)
    assert summary["packages"]["fonts-noto-color-emoji"]["licence"] == "OFL-1.1"
    by_id = {r["id"]: r for r in rows}
    assert len(by_id) == len(rows)  # ids are unique
    for r in rows:  # each side is a text or an image, never both, never neither
        assert (r["query"] is None) != (r["query_image"] is None), r
        assert (r["positive"] is None) != (r["positive_image"] is None), r
    # 👍 and its five skin tones: one source, five distinct images, every image 32x32 RGB
    thumbs = [r for r in rows if r["task"] == "image-to-name" and r["source"] == "👍"]
    assert sorted(r["positive"] for r in thumbs)[:2] == ["thumbs up", "thumbs up: dark skin tone"]
    assert len(thumbs) == 6 and len({(out / r["query_image"]).read_bytes() for r in thumbs}) == 6
    for r in thumbs:
        image = Image.open(out / r["query_image"])
        assert (image.size, image.mode) == ((32, 32), "RGB")
    # the same emoji's image on both sides of its tasks; its texts from CLDR
    name_to_image = by_id["name-to-image/1F44D"]
    assert name_to_image["query"] == "thumbs up" and name_to_image["positive_image"] == by_id["image-to-name/1F44D"]["query_image"]
    assert by_id["image-to-name-de/1F44D"]["positive"] == "Daumen hoch"
    keywords = by_id["keywords-to-image/1F44D"]["query"]
    assert "+1" in keywords.split(", ") and "thumbs up" not in keywords.split(", ")  # the name is left out
    assert by_id["image-to-category/1F44D"]["positive"] == "People & Body: hand fingers closed"
    # candidate lists as MMEB's: the positive first, then distinct other positives of the same task
    positives = {}
    for r in rows:
        positives.setdefault(r["task"], set()).add((r["positive"], r["positive_image"]))
    for r in rows:
        listed = list(zip(r["candidates"], r["candidate_images"], strict=True))
        assert listed[0] == (r["positive"], r["positive_image"]) and len(set(listed)) == len(listed), r
        assert set(listed) <= positives[r["task"]]
        assert len(listed) == min(len(positives[r["task"]]), emoji_set.CANDIDATES), r  # a few: all of them


def test_a_rebuild_is_byte_identical(tmp_path):
    for name in ("a", "b"):
        assert emoji_set.main(["--out", str(tmp_path / name), "--groups", "country-flag", "--size", "24"]) == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")


def test_bad_input_exits_2_naming_the_problem_before_drawing(tmp_path, monkeypatch, capsys):
    assert emoji_set.main(["--out", str(tmp_path / "x"), "--groups", "Smileys"]) == 2
    assert "no emoji group or subgroup Smileys" in capsys.readouterr().err
    assert emoji_set.main(["--out", str(tmp_path / "x"), "--size", "4"]) == 2
    monkeypatch.setitem(emoji_set.PACKAGES, "fonts-noto-color-emoji", ("/nonexistent/NotoColorEmoji.ttf", "OFL-1.1"))
    assert emoji_set.main(["--out", str(tmp_path / "x")]) == 2
    assert "needs the Debian package fonts-noto-color-emoji" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing drawn


def test_b3_reads_the_set_with_its_image_columns_and_keeps_skin_tones_apart(tmp_path):
    """load_pairs reads the set as built (image paths under the dataset's folder): image-only
    sides have no text, every image decodes, and two skin tones of one emoji are different
    positives while the rows of one category text are the same positive."""
    from b3.data import load_pairs
    from b3.spec import DatasetSpec

    out = tmp_path / "emoji"
    assert emoji_set.main(["--out", str(out), "--groups", "hand-fingers-closed", "--size", "24"]) == 0
    spec = DatasetSpec.model_validate({"uri": str(out / "emoji.parquet"), "columns": {
        "id": "id", "task": "task", "queryImage": "query_image", "positiveImage": "positive_image"}})  # fmt: skip
    pairs = load_pairs(spec, min_rows=1)
    rows = {id_: i for i, id_ in enumerate(pairs.ids)}
    thumbs = rows["image-to-name/1F44D"]
    assert pairs.queries[thumbs] == "" and pairs.query_images[thumbs] == f"{out}/images/noto/1F44D.png"
    tones = [rows["name-to-image/1F44D"], rows["name-to-image/1F44D-1F3FF"]]
    assert len({pairs.positive_group[i] for i in tones}) == 2
    category = [i for i, t in enumerate(pairs.tasks) if t == "image-to-category"]
    assert len({pairs.positive_group[i] for i in category}) == 1  # one subgroup: one category text


def test_the_emoji_example_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    """`b3 run examples/emoji/tiny.yaml` as its first line says, from a copy of the repository's
    layout: the whole set built from the packages, a tiny random Qwen2-VL, then rank, partition,
    train (GradCache over image patches) and eval with every evaluation: mixed, per task and
    MMEB's accuracy@1 over each test query's candidate list."""
    import shutil

    from b3.cli import main
    from b3.storage import WorkDir

    tiny = importlib.util.spec_from_file_location("tiny_qwen2_vl", ROOT / "examples" / "emoji" / "tiny_qwen2_vl.py")
    tiny_qwen2_vl = importlib.util.module_from_spec(tiny)
    tiny.loader.exec_module(tiny_qwen2_vl)
    monkeypatch.chdir(tmp_path)
    first_line = (ROOT / "examples" / "emoji" / "tiny.yaml").read_text().splitlines()[0]
    assert first_line == ("# python examples/emoji/build_dataset.py --out runs/emoji && python "
                          "examples/emoji/tiny_qwen2_vl.py --out runs/tiny-qwen2-vl && b3 run examples/emoji/tiny.yaml")  # fmt: skip
    assert emoji_set.main(["--out", "runs/emoji"]) == 0
    assert tiny_qwen2_vl.main(["--out", "runs/tiny-qwen2-vl"]) == 0
    (tmp_path / "examples" / "emoji").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "emoji" / "tiny.yaml", tmp_path / "examples" / "emoji")
    assert main(["run", "examples/emoji/tiny.yaml"]) == 0
    out = capsys.readouterr().out
    assert "rank: done" in out and "partition: done" in out and "train: done" in out
    rows = json.loads((tmp_path / "runs" / "emoji" / "emoji.json").read_text())["rows"]
    report = WorkDir(str(tmp_path / "runs" / "emoji-tiny")).read_json("eval", "results.json")
    trained = report["models"]["student (trained)"]
    assert set(trained["per_task"]["tasks"]) == set(emoji_set.TASKS)
    assert 0.05 * rows < trained["queries"] < 0.2 * rows  # the test bucket: one source in ten
    assert 0 <= trained["ndcg@10"] <= 1 and 0 <= trained["per_task"]["micro"]["ndcg@10"] <= 1
    listed = trained["candidates"]
    assert listed["queries"] == trained["queries"] and set(listed["tasks"]) == set(emoji_set.TASKS)
    assert 0 <= listed["accuracy@1"] <= 1 and "candidates_accuracy@1_macro" in report["comparisons"]["student (trained)"]
    assert "candidates (acc@1)" in out
    assert (tmp_path / "runs" / "emoji-tiny" / "train" / "final" / "model" / "processor_config.json").exists()
