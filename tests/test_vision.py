"""A vision-language student (a tiny random Qwen2-VL): rows of text, image or both as one input,
GradCache chunks that carry exactly their rows' patches, and embeddings that see the pixels."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from b3.loss import InfoNCELoss
from b3.model import build_student, export_sentence_transformer
from b3.spec import LoraSpec
from b3.teacher import TextEncoder
from b3.train import compute_gradients
from b3.vision import encode_rows, is_dual_encoder, slice_rows, truncate

LORA = LoraSpec(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


def picture(seed: int, height: int = 56, width: int = 56) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")  # lossless: the same pixels
    return out.getvalue()


@pytest.fixture(scope="module")
def student(tiny_qwen2_vl_dir):
    return _vision_student(tiny_qwen2_vl_dir)


@pytest.fixture(params=["qwen2-vl", "clip"])
def model_dir(request) -> str:
    """Each kind of model that takes images: a vision-language decoder and a dual encoder."""
    return request.getfixturevalue({"qwen2-vl": "tiny_qwen2_vl_dir", "clip": "tiny_clip_dir"}[request.param])


@pytest.fixture
def any_student(model_dir):
    return _vision_student(model_dir)


# rows of both kinds, images of different sizes (so of different patch counts) in between
TEXTS = ["a red cat", "text only, no image", "<|image_1|>\nRepresent the given image.", "", "one more text", "a dog"]
IMAGES = [picture(0), None, picture(1, 84, 56), picture(2, 56, 112), None, picture(3)]


def grads_of(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_rows_become_one_input_with_each_image_owned_by_its_row(student):
    inputs = student.tokenize(TEXTS, IMAGES)
    assert inputs["image_rows"].tolist() == [0, 2, 3, 5]
    grid = inputs["image_grid_thw"]
    assert grid.tolist()[1] == [1, 6, 4] and grid.tolist()[2] == [1, 4, 8]  # 84x56 and 56x112 pixels
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    image_token = student.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    per_row = (inputs["input_ids"] == image_token).sum(1).tolist()  # one token per 2x2 patches
    assert per_row == [4, 0, 6, 8, 0, 4]
    assert not any("<|image_1|>" in student.processor.tokenizer.decode(row) for row in inputs["input_ids"])


def test_text_is_truncated_but_an_image_never_is(student):
    long = " ".join(["word"] * 100)
    inputs = encode_rows(student.processor, [long], [picture(0)], max_length=8)
    tokens = student.processor.tokenizer
    assert truncate(tokens, long, 8) == " ".join(["word"] * 8)
    image_token = tokens.convert_tokens_to_ids("<|image_pad|>")
    assert int((inputs["input_ids"] == image_token).sum()) == 4  # all of the image's tokens
    assert int(inputs["attention_mask"].sum()) == 8 + 4 + 2 + 2  # text, image, vision start/end, [CLS]/[SEP]


@settings(max_examples=60, deadline=None)
@given(has_image=st.lists(st.booleans(), min_size=1, max_size=9), patches=st.data(), chunk=st.integers(1, 5))
def test_slices_of_rows_carry_exactly_their_rows_patches(has_image, patches, chunk):
    """Any pattern of rows with and without images, any chunk size: each chunk holds its rows'
    images and exactly their patches, and the chunks put back together are the whole input."""
    n = len(has_image)
    image_rows = [r for r in range(n) if has_image[r]]
    grid = torch.tensor([[1, 2 * patches.draw(st.integers(1, 3)), 2] for _ in image_rows], dtype=torch.int64).reshape(-1, 3)
    owner = torch.repeat_interleave(torch.tensor(image_rows, dtype=torch.int64), grid.prod(-1)) if image_rows else torch.zeros(0)
    inputs = {"input_ids": torch.arange(n).unsqueeze(1).repeat(1, 3), "attention_mask": torch.ones(n, 3, dtype=torch.int64),
              "pixel_values": owner.float().unsqueeze(1).repeat(1, 5),  # each patch says which row owns it
              "image_grid_thw": grid, "image_rows": torch.tensor(image_rows, dtype=torch.int64)}  # fmt: skip
    chunks = [slice_rows(inputs, i, i + chunk) for i in range(0, n, chunk)]
    for i, part in zip(range(0, n, chunk), chunks, strict=True):
        rows = part["input_ids"][:, 0].tolist()
        assert rows == list(range(i, min(i + chunk, n)))
        assert (part["image_rows"] + i).tolist() == [r for r in rows if has_image[r]]
        if "pixel_values" in part:
            assert part["pixel_values"].shape[0] == int(part["image_grid_thw"].prod(-1).sum())
            assert set(part["pixel_values"][:, 0].long().tolist()) == {r for r in rows if has_image[r]}
        else:
            assert not any(has_image[r] for r in rows)
    with_images = [c for c in chunks if "pixel_values" in c]
    if with_images:
        torch.testing.assert_close(torch.cat([c["pixel_values"] for c in with_images]), inputs["pixel_values"])
        torch.testing.assert_close(torch.cat([c["image_grid_thw"] for c in with_images]), grid)


def test_chunked_embeddings_equal_the_full_batch(any_student):
    inputs = any_student.tokenize(TEXTS, IMAGES)
    with torch.no_grad():
        full = any_student(inputs)
        for size in (1, 2, 4):
            chunked = torch.cat([any_student(slice_rows(inputs, i, i + size)) for i in range(0, len(TEXTS), size)])
            torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


def test_an_image_s_pixels_change_its_row_s_embedding_only(any_student):
    changed = list(IMAGES)
    changed[2] = picture(99, 84, 56)  # same size, other pixels
    with torch.no_grad():
        before = any_student(any_student.tokenize(TEXTS, IMAGES))
        after = any_student(any_student.tokenize(TEXTS, changed))
    moved = (before - after).abs().amax(1)
    assert moved[2] > 1e-3
    torch.testing.assert_close(torch.cat([after[:2], after[3:]]), torch.cat([before[:2], before[3:]]), rtol=0, atol=1e-5)
    with torch.no_grad():  # and the image is not ignored: the same text without it embeds otherwise
        text_only = any_student(any_student.tokenize(TEXTS[:1], [None]))
    assert (text_only[0] - before[0]).abs().max() > 1e-3


def test_gradcache_gives_the_plain_gradients_with_images(any_student):
    """GradCache in chunks of 2 rows (images of several patch counts split across chunks) gives the
    plain loss and gradients; slicing pixel_values by row, as for text, would not."""
    item = {"query": any_student.tokenize(TEXTS, IMAGES), "positive": any_student.tokenize(POSITIVES, POSITIVE_IMAGES),
            "groups": torch.arange(len(TEXTS))}  # fmt: skip
    any_student.zero_grad()
    plain_loss, _, _ = compute_gradients(any_student, InfoNCELoss(scale=20.0), item, None, 1)
    plain = grads_of(any_student)
    any_student.zero_grad()
    cached_loss, _, _ = compute_gradients(any_student, InfoNCELoss(scale=20.0), item, 2, 1)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    for name, grad in plain.items():
        torch.testing.assert_close(grads_of(any_student)[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    any_student.zero_grad()


def _vision_student(model_dir: str):
    torch.manual_seed(0)  # the same LoRA weights in every process
    model = build_student(model_dir, "last_token", 32, LORA)
    for name, weight in model.named_parameters():  # LoRA's B starts at 0, which leaves A no gradient
        if "lora_B" in name:
            weight.data.normal_(0, 0.1)
    return model.eval()  # no dropout: two forwards of the same rows are the same function


POSITIVES = ["a cat photo", "<|image_1|>", "an image of a tree", "a blue square", "<|image_1|> a dog", "text"]
POSITIVE_IMAGES = [None, picture(10), picture(11, 56, 84), None, picture(12), None]


def _gloo_worker(rank: int, world: int, init_file, model_dir: str, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    student = _vision_student(model_dir)
    rows = np.array_split(np.arange(len(TEXTS)), world)[rank].tolist()
    item = {"query": student.tokenize([TEXTS[r] for r in rows], [IMAGES[r] for r in rows]),
            "positive": student.tokenize([POSITIVES[r] for r in rows], [POSITIVE_IMAGES[r] for r in rows]),
            "groups": torch.as_tensor(rows)}  # fmt: skip
    loss, accuracy, _ = compute_gradients(student, InfoNCELoss(scale=20.0), item, 2, world)
    if rank == 0:
        torch.save({"grads": grads_of(student), "loss": loss, "accuracy": accuracy}, out)
    dist.destroy_process_group()


def test_two_gloo_processes_with_all_gather_give_the_single_process_gradients(tmp_path, model_dir):
    """Each process embeds its half of the rows (their images only, in GradCache chunks), the loss
    gathers every embedding: the averaged gradients are one process's on the whole batch."""
    import multiprocessing as mp

    student = _vision_student(model_dir)
    item = {"query": student.tokenize(TEXTS, IMAGES), "positive": student.tokenize(POSITIVES, POSITIVE_IMAGES),
            "groups": torch.arange(len(TEXTS))}  # fmt: skip
    loss, accuracy, _ = compute_gradients(student, InfoNCELoss(scale=20.0), item, None, 1)
    expected = grads_of(student)
    ctx, out = mp.get_context("spawn"), tmp_path / "rank0.pt"
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, tmp_path / "init", model_dir, out)) for r in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(180)
    assert [proc.exitcode for proc in procs] == [0, 0]
    got = torch.load(out)
    assert got["loss"] == pytest.approx(loss, rel=1e-5) and got["accuracy"] == pytest.approx(accuracy)
    assert expected.keys() == got["grads"].keys() and all(g.abs().sum() > 0 for g in expected.values())
    for name, grad in expected.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_export_loads_with_automodel_and_autoprocessor_and_embeds_as_the_student(tmp_path, any_student):
    """The exported folder (LoRA merged in, the processor beside it) embeds every row, text, image
    or both, as the trained student did; b3's teacher reads it through AutoModel / AutoProcessor."""
    export_sentence_transformer(any_student, str(tmp_path / "model"))
    with torch.no_grad():
        expected = any_student(any_student.tokenize(TEXTS, IMAGES)).numpy()
    cells = [None if image is None else png_bytes(image) for image in IMAGES]
    reloaded = TextEncoder(str(tmp_path / "model"), pooling="last_token", max_length=32, dtype="float32")
    np.testing.assert_allclose(reloaded.encode(TEXTS, images=cells), expected, rtol=0, atol=1e-5)
    assert reloaded.processor.image_processor.to_dict() == any_student.processor.image_processor.to_dict()


def sentence_transformers_inputs(texts: list[str], images: list) -> list:
    """Rows as sentence-transformers takes them: a text, an image, or both in a dict."""
    return [text if image is None else image if not text else {"image": image, "text": text}
            for text, image in zip(texts, images, strict=True)]  # fmt: skip


def test_sentence_transformers_loads_the_export_and_embeds_every_row_as_the_student(tmp_path, any_student):
    """`SentenceTransformer(folder)` on the export: a Qwen2-VL one through its own Transformer,
    Pooling (last token) and Normalize modules, its inputs rendered by the chat template that
    reproduces training's (image prompt first, the `<|image_1|>` placeholder dropped, the
    prompt before the text), texts, images and both in one call, with and without the query
    prompt; a CLIP one as sentence-transformers reads CLIP folders (one call per modality)."""
    from sentence_transformers import SentenceTransformer

    prompt = "Find the matching picture: "
    export_sentence_transformer(any_student, str(tmp_path / "model"), prompts={"query": prompt})
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    with torch.no_grad():
        expected = any_student(any_student.tokenize(TEXTS, IMAGES)).numpy()
        prompted = any_student(any_student.tokenize([prompt + text for text in TEXTS], IMAGES)).numpy()
    if is_dual_encoder(any_student.processor):
        got = np.concatenate([st.encode([TEXTS[1]]), st.encode([IMAGES[3]])])  # one call per modality
        got /= np.linalg.norm(got, axis=1, keepdims=True)  # its CLIP module leaves them unnormalised
        np.testing.assert_allclose(got, expected[[1, 3]], rtol=0, atol=1e-5)
        return
    rows = sentence_transformers_inputs(TEXTS, IMAGES)
    np.testing.assert_allclose(st.encode(rows), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(st.encode_query(rows), prompted, rtol=0, atol=1e-5)
    np.testing.assert_allclose(st.encode(rows[3:4]), expected[3:4], rtol=0, atol=1e-5)  # an image alone
    assert not np.allclose(expected, prompted, atol=1e-3)  # the prompt is seen: the comparison can fail


def test_a_pixel_budget_bounds_each_image_and_is_saved_with_the_export(tmp_path, tiny_qwen2_vl_dir):
    """training.maxPixels / minPixels resize each image into the budget (fewer or more image
    tokens than the processor's own), and the exported processor keeps the budget, so the
    reloaded model and sentence-transformers embed as the student did."""
    from sentence_transformers import SentenceTransformer

    from b3.vision import pixel_budget

    default = build_student(tiny_qwen2_vl_dir, "last_token", 32, LORA)  # its processor: 4 to 16 merged patches
    small = build_student(tiny_qwen2_vl_dir, "last_token", 32, LORA, max_pixels=4 * 28 * 28)
    large = build_student(tiny_qwen2_vl_dir, "last_token", 32, LORA, min_pixels=16 * 28 * 28)
    merged_patches = {name: int(s.tokenize([""], [picture(0, 112, 112)])["image_grid_thw"].prod()) // 4
                      for name, s in (("default", default), ("small", small))}  # fmt: skip
    assert merged_patches == {"default": 16, "small": 4}
    assert int(large.tokenize([""], [picture(0, 28, 28)])["image_grid_thw"].prod()) // 4 == 16
    assert int(default.tokenize([""], [picture(0, 28, 28)])["image_grid_thw"].prod()) // 4 == 4

    export_sentence_transformer(small, str(tmp_path / "model"))
    with torch.no_grad():
        expected = small(small.tokenize(TEXTS, IMAGES)).numpy()
    reloaded = TextEncoder(str(tmp_path / "model"), pooling="last_token", max_length=32, dtype="float32")
    assert pixel_budget(reloaded.processor) == (4 * 28 * 28, 4 * 28 * 28)
    cells = [None if image is None else png_bytes(image) for image in IMAGES]
    np.testing.assert_allclose(reloaded.encode(TEXTS, images=cells), expected, rtol=0, atol=1e-5)
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(st.encode(sentence_transformers_inputs(TEXTS, IMAGES)), expected, rtol=0, atol=1e-5)


def test_lora_on_a_vision_language_model_needs_its_targets_named(tiny_qwen2_vl_dir):
    with pytest.raises(ValueError, match="training.lora.targetModules: peft has no default for 'qwen2_vl'"):
        build_student(tiny_qwen2_vl_dir, "last_token", 32, LoraSpec())


def test_lora_targets_the_language_model_only(student):
    adapted = {n.split(".lora_A")[0] for n, p in student.named_parameters() if p.requires_grad and "lora_A" in n}
    assert adapted and all(".language_model." in n for n in adapted)


def test_a_text_student_refuses_images_and_embeds_text_as_before(tiny_model_dir):
    text_student = build_student(tiny_model_dir, "mean", 32, LORA.model_copy(update={"target_modules": None}))
    assert text_student.processor is None
    assert set(text_student.tokenize(["a text"])) == {"input_ids", "token_type_ids", "attention_mask"}
    with pytest.raises(ValueError, match="embeds text only"):
        text_student.tokenize(["a text"], [picture(0)])


# --- a job on image rows, end to end -------------------------------------------------------------

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")


def drawing(color: str, shape: str, size: int) -> bytes:
    from PIL import ImageDraw

    image = Image.new("RGB", (56, 56), "white")
    draw, box = ImageDraw.Draw(image), (28 - size, 28 - size, 28 + size, 28 + size)
    {"square": draw.rectangle, "circle": draw.ellipse}.get(shape, lambda b, fill: draw.polygon(
        [(b[0], b[3]), (b[2], b[3]), (28, b[1])], fill=fill))(box, fill=COLORS[color])  # fmt: skip
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def image_text_pairs(folder) -> pa.Table:
    """Two tasks as in MMEB: text -> image (positives as PNG bytes) and image -> text (queries as
    files under the dataset's folder); 96 rows, split by drawing."""
    (folder / "img").mkdir()
    rows = {"id": [], "task": [], "source": [], "query": [], "query_image": [], "positive": [], "positive_image": []}
    for i, (color, shape, size) in enumerate((c, s, z) for c in COLORS for s in SHAPES for z in (8, 12, 16, 20)):
        for task in ("t2i", "i2t"):
            name = f"{color} {shape} of size {size}"
            rows["id"].append(f"{task}-{i}")
            rows["task"].append(task)
            rows["source"].append(f"drawing{i}")
            if task == "t2i":
                rows["query"] += [f"a {name}"]
                rows["query_image"] += [None]
                rows["positive"] += [""]
                rows["positive_image"] += [{"bytes": drawing(color, shape, size), "path": None}]
            else:
                (folder / "img" / f"{i}.png").write_bytes(drawing(color, shape, size))
                rows["query"] += ["<|image_1|> What is drawn here?"]
                rows["query_image"] += [f"img/{i}.png"]
                rows["positive"] += [f"a {name}"]
                rows["positive_image"] += [None]
    return pa.table(rows)


def test_b3_run_mines_trains_and_evaluates_a_vision_language_student_on_image_rows(tmp_path, model_dir, capsys):
    from conftest import write_manifest

    from b3.cli import main
    from b3.storage import WorkDir
    from b3.teacher import TextEncoder

    pq.write_table(image_text_pairs(tmp_path), tmp_path / "pairs.parquet")
    model = {"model": model_dir, "pooling": "last_token", "maxLength": 32, "batchSize": 16}
    spec = {"dataset": {"uri": "pairs.parquet", "split": {"key": "source"},
                        "columns": {"task": "task", "id": "id", "queryImage": "query_image", "positiveImage": "positive_image"}},
            "teacher": model,
            "mining": {"p": 2, "m": 6, "clusterSize": 4, "batchSize": 8, "seed": 0},
            "training": {"student": model_dir, "pooling": "last_token", "maxLength": 32, "steps": 3,
                         "miniBatchSize": 4, "lora": {"targetModules": ["q_proj", "v_proj"]}},
            "workDir": "work"}  # fmt: skip
    assert main(["run", str(write_manifest(tmp_path, spec))]) == 0
    out = capsys.readouterr().out
    assert "train: done" in out and "student (trained)" in out
    report = WorkDir(str(tmp_path / "work")).read_json("eval", "results.json")
    test_rows = report["models"]["teacher"]["queries"]
    assert set(report["models"]) == {"teacher", "student (untrained)", "student (trained)"}
    assert report["models"]["teacher"]["corpus"] == test_rows  # every positive is distinct
    # the exported model takes images: its processor is saved with it, and training moved it
    final = str(tmp_path / "work" / "train" / "final" / "model")
    image = drawing("red", "circle", 12)
    trained = TextEncoder(final, pooling="last_token", max_length=32, dtype="float32").encode([""], images=[image])
    untrained = TextEncoder(model_dir, pooling="last_token", max_length=32, dtype="float32").encode([""], images=[image])
    assert trained.shape == untrained.shape and np.abs(trained - untrained).max() > 1e-4


def test_training_on_image_rows_killed_and_resumed_equals_straight_through(tmp_path, model_dir):
    """SIGKILL the train stage right after its step-4 checkpoint; the rerun resumes there (its
    loader workers decoding the same images in the same order) and ends with the weights of a
    run that was never interrupted. With B3++ hard negatives (positives with their images) and
    the top-p false-negative mask, through GradCache."""
    import os
    import shutil
    import subprocess
    import sys

    from conftest import write_manifest
    from safetensors.torch import load_file

    from b3.artifacts import Artifacts
    from b3.cli import main
    from b3.spec import load_manifest

    pq.write_table(image_text_pairs(tmp_path), tmp_path / "pairs.parquet")
    model = {"model": model_dir, "pooling": "last_token", "maxLength": 32, "batchSize": 16}
    spec = {"dataset": {"uri": str(tmp_path / "pairs.parquet"),
                        "columns": {"task": "task", "id": "id", "queryImage": "query_image", "positiveImage": "positive_image"}},
            "teacher": model, "mining": {"p": 2, "m": 6, "clusterSize": 4, "batchSize": 8, "seed": 0, "hardNegatives": 1},
            "training": {"student": model_dir, "pooling": "last_token", "maxLength": 32, "steps": 8, "falseNegatives": "top-p",
                         "checkpointEvery": 4, "miniBatchSize": 4, "lora": {"targetModules": ["q_proj", "v_proj"]}}}  # fmt: skip
    mined = write_manifest(tmp_path, {**spec, "workDir": str(tmp_path / "mined")}, "mine")
    assert main(["rank", str(mined)]) == 0 and main(["partition", str(mined)]) == 0
    runs = {}
    for name in ("straight", "resumed"):
        shutil.copytree(tmp_path / "mined", tmp_path / name)
        runs[name] = str(write_manifest(tmp_path, {**spec, "workDir": str(tmp_path / name)}, name))

    def train(manifest: str, **env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "b3_jobs.train", manifest], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=300)  # fmt: skip

    assert train(runs["straight"]).returncode == 0
    assert train(runs["resumed"], B3_FAULT_AT_STEP="4").returncode == -9
    again = train(runs["resumed"])
    assert again.returncode == 0 and "resumed from" in again.stderr and "step 4" in again.stderr, again.stderr[-2000:]
    straight, resumed = (load_file(os.path.join(Artifacts(load_manifest(runs[name]).spec).checkpoint_root(), "step-0000008",
                                                "adapter_model.safetensors")) for name in ("straight", "resumed"))  # fmt: skip
    assert straight.keys() == resumed.keys() and straight
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_text_model_given_image_rows_is_bad_input_where_preflight_cannot_look(tmp_path, tiny_qwen2_vl_dir, tiny_model_dir):
    """Preflight refuses a local text model by name; a hub model is only known once loaded, so the
    teacher and the trainer refuse image rows for a text model themselves, as bad input (exit 2)."""
    from conftest import write_manifest

    from b3.cli import main
    from b3.data import DataError
    from b3.spec import load_manifest
    from b3.teacher import TextEncoder
    from b3.train import Dist, Trainer

    with pytest.raises(DataError, match="embeds text only"):
        TextEncoder(tiny_model_dir, max_length=32).encode(["a text"], images=[png_bytes(picture(0))])
    pq.write_table(image_text_pairs(tmp_path), tmp_path / "pairs.parquet")
    spec = {"dataset": {"uri": "pairs.parquet",
                        "columns": {"task": "task", "id": "id", "queryImage": "query_image", "positiveImage": "positive_image"}},
            "teacher": {"model": tiny_qwen2_vl_dir, "pooling": "last_token", "maxLength": 32},
            "mining": {"p": 2, "m": 6, "clusterSize": 4, "batchSize": 8},
            "training": {"student": tiny_model_dir, "steps": 1, "lora": {"targetModules": ["query", "value"]}}, "workDir": "work"}  # fmt: skip
    manifest = write_manifest(tmp_path, spec)
    assert main(["rank", str(manifest)]) == 0 and main(["partition", str(manifest)]) == 0
    with pytest.raises(DataError, match=f"training.student: {tiny_model_dir} embeds text only"):
        Trainer(load_manifest(manifest), Dist()).setup()
