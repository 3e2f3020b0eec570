"""The `b3` command: run mining stages from a B3Job manifest and inspect their output.

    b3 run       job.yaml     rank, partition, train and eval in order; finished stages are skipped
                              (--from STAGE / --force: run that stage and later ones / all again)
    b3 validate  job.yaml     check a manifest, print a summary (--json: the resolved spec)
    b3 rank      job.yaml     teacher embeddings + top p+m positives per query
    b3 partition job.yaml     communities of clusterSize rows (KaMinPar or METIS)
    b3 inspect   job.yaml     batch hardness, and whether B3 can help: mined vs random batches
    b3 train     job.yaml     LoRA training on the mined batches (torchrun when several processes)
    b3 eval      job.yaml     retrieval metrics on the held-out split: teacher, untrained, trained
    b3 embed     MODEL --input texts.txt --output emb.npy
    b3 schema                 the B3Job spec as a CRD OpenAPI v3 schema (JSON)

Every command that takes a manifest also takes KEY=VALUE overrides of its spec, validated like
the manifest: `b3 run job.yaml training.steps=100 mining.clusterSize=32`.

Exit codes: 0 done (or already done), 2 bad input (manifest or data; the message names the
problem and, inside a pod, also goes to the termination log), 75 a network or object-store
fault that outlasted its retries (the input may be fine: a Job retries it), 143 training
stopped by SIGTERM after writing a checkpoint (a rerun resumes there), 1 anything else (a
training failure's message goes to the termination log too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable

from b3 import preflight
from b3.data import EXIT_BAD_INPUT, DataError
from b3.errors import TrainingError, TrainingStopped, TransientError
from b3.spec import (
    B3Job,
    SpecError,
    load_manifest,
    manifest_to_dict,
    spec_openapi_schema,
    spec_to_dict,
)

log = logging.getLogger("b3")

TERMINATION_LOG = "/dev/termination-log"


def write_termination_message(message: str) -> None:
    """Kubernetes shows this file's content as the container's termination message."""
    path = os.environ.get("B3_TERMINATION_LOG", TERMINATION_LOG)
    if os.path.exists(os.path.dirname(path) or ".") and (
        os.path.exists(path) or "B3_TERMINATION_LOG" in os.environ
    ):
        try:
            with open(path, "w") as f:
                f.write(message[-4096:])  # the kubelet keeps at most 4 KiB
        except OSError:
            pass


def _print_record(stage: str, record: dict) -> None:
    if record.get("skipped"):
        print(f"{stage}: up to date (fingerprint {record['fingerprint'][:12]}), skipped")
        return
    summary = record["summary"]
    print(f"{stage}: done in {record['seconds']:.1f}s")
    for key, value in summary.items():
        if key in ("notes", "clamped"):
            for line in value:
                print(f"  note: {line}")
        else:
            print(f"  {key}: {value}")


def _print_inspect(result: dict) -> None:
    print(
        f"batch hardness, |B|={result['batch_size']}, top-K={result['top_k']} (teacher cosine, higher = harder)"
    )
    print(f"  {'batches':<18}{'count':>7}{'top-K neg':>11}{'top-1 neg':>11}{'mean neg':>10}"
          f"{'neg > pos':>11}")  # fmt: skip
    for name, row in result["batches"].items():
        print(
            f"  {name:<18}{row['count']:>7}{row['topk_negative']:>11.4f}"
            f"{row['top1_negative']:>11.4f}{row['mean_negative']:>10.4f}{row['above_positive']:>11.2%}"
        )
    print(
        "  (neg > pos: queries with an in-batch negative the teacher scores above their positive)"
    )
    print(
        f"  b3 / random (top-K): {result['hardness_ratio_vs_random']:.2f}x; "
        f"b3 / random same task: {result['hardness_ratio_vs_random_same_task']:.2f}x"
    )


def sweep_command(job, args) -> int:
    """`b3 inspect --sweep`: the grid's batch statistics as a table (or JSON), saved to
    inspect/sweep.json in the work dir, optionally plotted."""
    from b3 import sweep
    from b3.artifacts import Artifacts

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise DataError("--plot needs matplotlib: pip install matplotlib (or b3-operator[bench])")
    batch_size = job.spec.mining.batch_size
    k = args.k or [k for k in (8, 16, 32) if batch_size % k == 0] or [job.spec.mining.cluster_size]
    grid = sweep.Grid(p=args.p, m=args.m, k=k, edges=args.edges, scopes=args.scope)
    result = sweep.sweep(job, grid, top_k=args.top_k or job.spec.mining.cluster_size)
    work = Artifacts(job.spec).work
    if work.local:
        work.write_json(result, "inspect", "sweep.json")
    if args.plot:
        sweep.plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else sweep.table(result))
    return 0


def _stage_runner(name: str) -> Callable:
    # heavy imports (torch, transformers, peft) only for commands that need them
    if name == "train":
        from b3.train import train_stage

        return train_stage
    from b3 import stages

    return {"rank": stages.rank_stage, "partition": stages.partition_stage}[name]


def exit_code(err: Exception) -> int:
    """The exit-code contract above, for the errors a stage reports rather than crashes on."""
    if isinstance(err, (TrainingStopped, TransientError)):
        return err.exit_code
    return 1 if isinstance(err, TrainingError) else EXIT_BAD_INPUT


def run_stage(name: str, manifest: str) -> int:
    """Run one stage from a manifest with the exit-code contract above."""
    try:
        job = load_manifest(manifest)
        preflight.check(job, [name])  # what this stage loads, reads and writes, before compute
        record = _stage_runner(name)(job)
    except (SpecError, DataError, TrainingError, TrainingStopped, TransientError) as err:
        message = f"{name}: {err}"
        print(message, file=sys.stderr)
        write_termination_message(message)
        return exit_code(err)
    if record:  # processes other than rank 0 of a training gang report nothing
        _print_record(name, record)
    return 0


def train_command(manifest: str) -> int:
    """One process trains here; several on this node go through torchrun's launcher."""
    job = load_manifest(manifest)
    t = job.spec.training
    if t.nodes > 1:
        print("train: training.nodes > 1 runs on Kubernetes (one torchrun per node); locally use "
              "nodes: 1 and processesPerNode", file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    if t.processes_per_node == 1:
        return run_stage("train", manifest)
    import subprocess

    cmd = [sys.executable, "-m", "b3_jobs.launch", "--standalone",  # torchrun, keeping exit code 2
           f"--nproc-per-node={t.processes_per_node}", "-m", "b3_jobs.train", manifest]  # fmt: skip
    return subprocess.run(cmd, check=False).returncode


def _st_config(model: str, name: str) -> dict:
    path = os.path.join(model, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def embed_command(model: str, input_path: str, output: str, batch_size: int,
                  max_length: int | None, prompt_name: str | None) -> int:  # fmt: skip
    """Embed one text per line of `input_path` with a trained (or any) model; save .npy. A
    sentence-transformers folder's pooling, max length and prompts apply as
    `SentenceTransformer(model).encode(texts, prompt_name=...)` would apply them."""
    import numpy as np

    from b3.pooling import ST_POOLING_KEYS
    from b3.teacher import TextEncoder

    modes = _st_config(model, os.path.join("1_Pooling", "config.json"))
    pooling = next((name for name, key in ST_POOLING_KEYS.items() if modes.get(key)), "mean")
    if max_length is None:
        max_length = _st_config(model, "sentence_bert_config.json").get("max_seq_length", 128)
    config = _st_config(model, "config_sentence_transformers.json")
    prompts = config.get("prompts") or {}
    prompt_name = prompt_name or config.get("default_prompt_name")
    if prompt_name is not None and prompt_name not in prompts:
        print(f"embed: --prompt-name {prompt_name!r}: the model has prompts "
              f"{', '.join(prompts) or 'none'}", file=sys.stderr)  # fmt: skip
        return EXIT_BAD_INPUT
    prompt = prompts.get(prompt_name, "") if prompt_name else ""
    with open(input_path) if input_path != "-" else sys.stdin as f:
        texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        print(f"embed: {input_path} holds no text", file=sys.stderr)
        return EXIT_BAD_INPUT
    encoder = TextEncoder(model, pooling=pooling, max_length=max_length, batch_size=batch_size)
    emb = encoder.encode([prompt + text for text in texts])
    np.save(output, emb)
    used = f", prompt {prompt_name!r}" if prompt_name else ""
    print(f"embed: {len(texts)} texts -> {output} ({emb.shape[1]} dims, {pooling} pooling, "
          f"max length {max_length}{used})")  # fmt: skip
    return 0


def stage_main(name: str, argv: list[str] | None = None) -> int:
    """Entry point of a stage program in a pod: the manifest from argv or $B3_MANIFEST."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    argv = sys.argv[1:] if argv is None else argv
    manifest = argv[0] if argv else os.environ.get("B3_MANIFEST", "/etc/b3/job.yaml")
    port = os.environ.get("B3_METRICS_PORT")
    if port and name != "train":  # the trainer serves its own metrics on that port
        import contextlib

        from b3 import stage_metrics

        with contextlib.suppress(SpecError):  # run_stage reports the manifest's problem
            stage_metrics.serve(load_manifest(manifest).name, int(port))
    code = run_stage(name, manifest)
    if port and name != "train":
        stage_metrics.linger()
    return code


def eval_command(
    manifest: str, models: list[str], as_json: bool, baseline: str | None = None, show_tasks: bool = False
) -> int:
    """Retrieval metrics of several models on the held-out split (mixed corpus and per task,
    and MMEB's accuracy@1 over candidate lists where the dataset has them), each model's
    nDCG@10 difference from the baseline with its paired bootstrap interval; the report goes to
    eval/results.json and every query's ranks to eval/ranks.parquet."""
    import pyarrow as pa

    from b3.artifacts import Artifacts
    from b3.data import load_pairs
    from b3.evaluation import compare, rank_encoder
    from b3.teacher import TextEncoder

    job = load_manifest(manifest)
    preflight.check(job, ["eval"])
    spec = job.spec
    artifacts = Artifacts(spec)
    t = spec.training
    prompts = spec.dataset.prompts
    # name -> (model, pooling, max length, prompts, pixel budget); given models embed as the student
    teacher_pixels, student_pixels = (spec.teacher.min_pixels, spec.teacher.max_pixels), (t.min_pixels, t.max_pixels)
    encoders = {"teacher": (spec.teacher.model, spec.teacher.pooling, spec.teacher.max_length,
                              prompts if spec.teacher.use_prompts else None, teacher_pixels),
                  "student (untrained)": (t.student, t.pooling, t.max_length, prompts, student_pixels)}  # fmt: skip
    if spec.teacher.embeddings:  # the teacher's embeddings were made elsewhere: no model to score
        del encoders["teacher"]
    trained = artifacts.trained_model()  # only a model trained with this spec
    if trained is not None:
        encoders["student (trained)"] = (trained, t.pooling, t.max_length, prompts, student_pixels)
    elif artifacts.out.exists("train", "final"):
        log.warning("eval: %s was trained with another spec or did not finish; not evaluated "
                    "(run `b3 train`)", artifacts.out.path("train", "final"))  # fmt: skip
    for entry in models:
        name, _, path = entry.rpartition("=")
        encoders[name or path] = (path, t.pooling, t.max_length, prompts, student_pixels)
    baseline = baseline or "student (untrained)"
    if baseline not in encoders:
        raise DataError(f"--baseline {baseline!r} is not one of the models: {', '.join(encoders)}")
    pairs = load_pairs(spec.dataset, min_rows=1, split="test")
    ranks, by_config, config_of = {}, {}, {}
    for name, config in encoders.items():
        model, pooling, max_length, model_prompts, (min_pixels, max_pixels) = config
        no_prompts = model_prompts is None or model_prompts == type(model_prompts)()
        key = (model, pooling, max_length, None if no_prompts else model_prompts.model_dump_json(), min_pixels, max_pixels)
        if key not in by_config:  # e.g. the untrained student is the teacher: embed once
            encoder = TextEncoder(model, pooling=pooling, max_length=max_length, batch_size=spec.teacher.batch_size,
                                  min_pixels=min_pixels, max_pixels=max_pixels)  # fmt: skip
            by_config[key] = rank_encoder(encoder, pairs, model_prompts)
        ranks[name], config_of[name] = by_config[key], key
    comparisons = {name: compare(ranks[baseline], r) for name, r in ranks.items()
                   if config_of[name] != config_of[baseline]}  # fmt: skip
    report = {
        "split": spec.dataset.split.model_dump(by_alias=True),
        "dataset": spec.dataset.uri,
        "models": {name: r.summary() for name, r in ranks.items()},
        "baseline": baseline,
        "comparisons": comparisons,  # nDCG@10 of the model minus the baseline's
    }
    if artifacts.work.local:
        artifacts.work.write_json(report, "eval", "results.json")
        columns = {"id": pa.array(pairs.ids.tolist(), pa.string()),
                   "task": pa.array([str(x) for x in pairs.tasks], pa.string())}  # fmt: skip
        for name, r in ranks.items():
            columns[f"{name}/mixed"], columns[f"{name}/task"] = pa.array(r.mixed), pa.array(r.task)
            if r.candidate is not None:  # 0: the query has no candidate list
                columns[f"{name}/candidates"] = pa.array(r.candidate)
        artifacts.work.write_parquet(pa.table(columns), "eval", "ranks.parquet")
    if trained is not None:  # the model card carries the table
        _add_eval_to_card(trained, report)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    _print_eval(report, show_tasks)
    return 0


def _print_eval(report: dict, show_tasks: bool) -> None:
    results = report["models"]
    first = next(iter(results.values()))
    listed = first.get("candidates")  # MMEB's accuracy@1 over candidate lists, where the data has them
    print(f"retrieval on the test split ({first['queries']} queries; mixed: {first['corpus']} documents, "
          f"per task: each query against its own task's documents, {first['per_task']['macro']['tasks']} tasks"
          + (f"; candidates: {listed['queries']} queries against their own candidate lists" if listed else "") + ")")  # fmt: skip
    print(f"  {'':<22}{'mixed corpus':^33}{'per task (nDCG@10)':^20}" + (f"{'candidates (acc@1)':^20}" if listed else ""))
    print(f"  {'model':<22}{'nDCG@10':>9}{'R@1':>8}{'R@10':>8}{'MRR@10':>8}{'micro':>10}{'macro':>10}"
          + (f"{'micro':>10}{'macro':>10}" if listed else ""))  # fmt: skip
    for name, m in results.items():
        pt, c = m["per_task"], m.get("candidates")
        print(f"  {name:<22}{m['ndcg@10']:>9.4f}{m['recall@1']:>8.4f}{m['recall@10']:>8.4f}{m['mrr@10']:>8.4f}"
              f"{pt['micro']['ndcg@10']:>10.4f}{pt['macro']['ndcg@10']:>10.4f}"
              + (f"{c['accuracy@1']:>10.4f}{c['macro']:>10.4f}" if c else ""))  # fmt: skip
    if report["comparisons"]:
        headers = {"mixed": "mixed", "per_task_micro": "per task micro", "per_task_macro": "per task macro",
                   "candidates_accuracy@1_macro": "candidates acc@1 macro"}  # fmt: skip
        shown = list(next(iter(report["comparisons"].values())))
        print(f"nDCG@10 (candidates: accuracy@1) minus {report['baseline']}'s, x100, 95% paired bootstrap interval:"
              if listed else f"nDCG@10 minus {report['baseline']}'s, x100, 95% paired bootstrap interval:")  # fmt: skip
        print(f"  {'model':<22}" + "".join(f"{headers[key]:>24}" for key in shown))
        for name, c in report["comparisons"].items():
            cells = "".join(f"{100 * d['difference']:>+8.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                            .rjust(24) for d in c.values())  # fmt: skip
            print(f"  {name:<22}{cells}")
    if show_tasks:
        names = list(results)
        print("per task nDCG@10 (own task's documents)" + (", accuracy@1 over candidate lists" if listed else "") + ":")
        print(f"  {'task':<16}{'queries':>8}" + "".join(f"{n[:20]:>22}" for n in names))
        for task, m in first["per_task"]["tasks"].items():
            cells = "".join(f"{results[n]['per_task']['tasks'][task]['ndcg@10']:>22.4f}" for n in names)
            print(f"  {task:<16}{m['queries']:>8}{cells}")
        for task, m in (listed or {"tasks": {}})["tasks"].items():
            cells = "".join(f"{results[n]['candidates']['tasks'][task]['accuracy@1']:>22.4f}" for n in names)
            print(f"  {task[:11] + ' acc@1':<16}{m['queries']:>8}{cells}")


STAGES = ["rank", "partition", "train"]


def _add_eval_to_card(model: str, report: dict) -> None:
    """Replace the Evaluation section of the trained model's README.md with `report`'s table."""
    from b3.model_card import eval_table
    from b3.storage import WorkDir

    path = os.path.join(model, "README.md")
    if not os.path.exists(path):
        return
    with open(path) as f:
        card = f.read()
    head, found, _ = card.partition("## Evaluation\n")
    if found:
        WorkDir(model).write_bytes((head + found + "\n" + eval_table(report) + "\n").encode(), "README.md")


def run_command(manifest: str, start: str | None = None) -> int:
    """Every stage of a job on this machine, in order, stopping at the first failure; from
    `start` on, stages run again even when up to date."""
    import time

    from b3.artifacts import Artifacts

    job = load_manifest(manifest)
    steps = [("rank", lambda: run_stage("rank", manifest)), ("partition", lambda: run_stage("partition", manifest)),
             ("train", lambda: train_command(manifest))]  # fmt: skip
    if job.spec.dataset.split is not None:
        steps.append(("eval", lambda: eval_command(manifest, [], as_json=False)))
    preflight.check(job, [name for name, _ in steps])  # every stage's needs, before the first
    forced = STAGES[STAGES.index(start):] if start else []
    timings = []
    for name, step in steps:
        if name in forced:
            Artifacts(job.spec).invalidate(name)
        started = time.time()
        code = step()
        timings.append((name, time.time() - started, code))
        if code != 0:
            break
    print(f"run {job.name}: " + ", ".join(f"{name} {seconds:.1f}s" + ("" if code == 0 else f" (exit {code})")
                                         for name, seconds, code in timings))  # fmt: skip
    if timings[-1][2] != 0:
        return timings[-1][2]
    print(f"  model: {os.path.join(job.spec.train_dir, 'train', 'final', 'model')}")
    return 0


def effective_manifest(manifest: str, overrides: list[str]) -> str:
    """The manifest file the stages read: the given one, or with overrides a resolved copy
    (absolute paths, so it reads the same from anywhere), removed at exit."""
    if not overrides:
        return manifest
    import atexit
    import tempfile

    import yaml

    job = load_manifest(manifest, overrides)
    fd, path = tempfile.mkstemp(prefix=f"b3-{job.name}-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(manifest_to_dict(job), f, sort_keys=False)
    atexit.register(_remove, path)
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _print_summary(job: B3Job, overrides: list[str]) -> None:
    """What `b3 validate` shows: the settings that decide what a run computes."""
    s, m, t = job.spec, job.spec.mining, job.spec.training
    columns = s.dataset.columns
    split = f"bucket {s.dataset.split.test_bucket} of {s.dataset.split.buckets} by {s.dataset.split.key}" if s.dataset.split else "none"
    length = f"{t.steps} steps" if t.steps is not None else f"{t.epochs or 1} epoch(s)"
    lora = f"LoRA r={t.lora.r} alpha={t.lora.alpha} on {', '.join(t.lora.target_modules) if t.lora.target_modules else 'the family default'}"
    images = "".join(f" {name}={column}" for name, column in (("queryImage", columns.query_image),
                                                                ("positiveImage", columns.positive_image),
                                                                ("candidates", columns.candidates),
                                                                ("candidateImages", columns.candidate_images)) if column)  # fmt: skip
    teacher = (f"embeddings from {s.teacher.embeddings} (no teacher model runs)" if s.teacher.embeddings
               else f"{s.teacher.model} ({s.teacher.pooling} pooling, maxLength {s.teacher.max_length})")  # fmt: skip
    rows = [
        ("dataset", f"{s.dataset.uri} ({s.dataset.format}); query={columns.query} positive={columns.positive} "
                    f"task={columns.task or '-'} id={columns.id or '-'}{images}"),
        ("test split", split),
        ("teacher", teacher),
        ("mining", f"p={m.p} m={m.m} clusterSize={m.cluster_size} batchSize={m.batch_size} edges={m.edges} "
                   f"perTask={str(m.per_task).lower()} mixTasks={str(m.mix_tasks).lower()} hardNegatives={m.hard_negatives}"),
        ("training", f"{t.student}: {t.sampler} batches, {length}, lr {t.learning_rate}, temperature {t.temperature}, "
                     f"{lora}; {t.nodes} node(s) x {t.processes_per_node} process(es)"),
        ("workDir", s.work_dir),
        ("model", os.path.join(s.train_dir, "train", "final", "model")),
    ]  # fmt: skip
    print(f"{job.name}: valid" + (f" (with {' '.join(overrides)})" if overrides else ""))
    for name, value in rows:
        print(f"  {name + ':':<12}{value}")


def _overrides(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="override a spec field, e.g. training.steps=100 (a YAML value)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="b3", description="B3 smart batch mining.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in [
        ("run", "run rank, partition, train and eval in order (finished stages are skipped)"),
        ("validate", "check a manifest and print the resolved spec"),
        ("rank", "embed with the teacher and rank positives per query"),
        ("partition", "partition the rank graph into communities (KaMinPar or METIS)"),
        (
            "inspect",
            "batch hardness of mined and random batches, and whether B3 can help on this data",
        ),
        ("train", "train the student with LoRA on the mined batches"),
    ]:
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("manifest", help="B3Job manifest (YAML)")
        _overrides(cmd)
        if name == "run":
            cmd.add_argument("--from", dest="start", choices=STAGES,
                             help="run this stage and the later ones again, even when up to date "
                             "(train: from step 0, this config's checkpoints removed)")  # fmt: skip
            cmd.add_argument("--force", action="store_true", help="run every stage again (--from rank)")
        if name == "validate":
            cmd.add_argument("--json", action="store_true", help="print the resolved spec as JSON")
            cmd.add_argument("--preflight", action="store_true",
                             help="also check, without compute, what `b3 run` would load, read and write: the "
                             "models resolve, the dataset opens with its columns, the folders are writable")  # fmt: skip
        if name == "inspect":
            cmd.add_argument(
                "--top-k", type=int, default=None, help="K of H_B^K (default: clusterSize)"
            )
            cmd.add_argument("--epoch", type=int, default=0, help="epoch whose batches to measure")
            cmd.add_argument("--json", action="store_true", help="print JSON instead of a table")
            sweep = cmd.add_argument_group("mining sweep (needs the rank stage only; see b3.sweep)")
            sweep.add_argument("--sweep", action="store_true",
                               help="measure the batches of every grid point below instead of the partition's")
            sweep.add_argument("--p", type=int, nargs="+", default=[0, 10, 30], help="skipped ranks p")
            sweep.add_argument("--m", type=int, nargs="+", default=[50, 100], help="window m")
            sweep.add_argument("--k", type=int, nargs="+",
                               help="community size K (default: those of 8, 16, 32 that divide batchSize)")
            sweep.add_argument("--edges", nargs="+", default=["mutual", "union"], help="mutual, union")
            sweep.add_argument("--scope", nargs="+", default=["per-task", "whole-set"],
                               help="per-task, whole-set")
            sweep.add_argument("--plot", metavar="PNG", help="also plot hardness against neg > pos")  # fmt: skip
    ev = sub.add_parser("eval", help="retrieval metrics on the held-out split")
    ev.add_argument("manifest", help="B3Job manifest (YAML)")
    _overrides(ev)
    ev.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH", help="another model to compare"
    )
    ev.add_argument("--baseline", metavar="NAME",
                    help="model the others are compared with (default: student (untrained))")  # fmt: skip
    ev.add_argument("--tasks", action="store_true", help="also print nDCG@10 of every task")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    embed = sub.add_parser("embed", help="embed texts (one per line) with a model folder")
    embed.add_argument("model", help="model folder, e.g. <workDir>/train/final/model")
    embed.add_argument(
        "--input", required=True, help="text file, one text per line ('-' for stdin)"
    )
    embed.add_argument("--output", required=True, help="where to save the (n, d) float32 .npy")
    embed.add_argument("--batch-size", type=int, default=64)
    embed.add_argument("--max-length", type=int, default=None,
                       help="tokens per text (default: the folder's max_seq_length, else 128)")
    embed.add_argument("--prompt-name", default=None,
                       help="a prompt of the folder's config_sentence_transformers.json, e.g. query "
                       "(default: its default_prompt_name)")  # fmt: skip
    sub.add_parser("schema", help="print the spec's OpenAPI v3 schema (for the CRD)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # overrides may follow options too (`b3 validate job.yaml --json training.steps=5`)
    args, extra = parser.parse_known_args(argv)
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.command == "schema":
        print(json.dumps(spec_openapi_schema(), indent=2))
        return 0
    try:
        if hasattr(args, "manifest"):
            args.manifest = effective_manifest(args.manifest, args.overrides)
    except SpecError as err:
        print(f"{args.command}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command in ("rank", "partition"):
        return run_stage(args.command, args.manifest)  # writes the termination log itself
    try:  # bad input (and a lasting network fault) is reported here, once, for every command
        return _dispatch(args)
    except (SpecError, DataError, TransientError) as err:
        print(f"{args.command}: {err}", file=sys.stderr)
        return exit_code(err)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "train":
        return train_command(args.manifest)
    if args.command == "run":
        return run_command(args.manifest, "rank" if args.force else args.start)
    if args.command == "eval":
        return eval_command(args.manifest, args.model, args.json, args.baseline, args.tasks)
    if args.command == "embed":
        return embed_command(args.model, args.input, args.output, args.batch_size, args.max_length,
                             args.prompt_name)  # fmt: skip
    job = load_manifest(args.manifest)
    if args.command == "validate" and args.json:
        print(json.dumps({"name": job.name, "spec": spec_to_dict(job.spec)}, indent=2))
        return 0
    if args.command == "validate":
        _print_summary(job, args.overrides)
        if args.preflight:
            stages = ["rank", "partition", "train"] + ["eval"] * (job.spec.dataset.split is not None)
            report = preflight.check(job, stages)
            print(f"preflight of {', '.join(stages)}: ok")
            for field_name, located in report.models.items():
                print(f"  {field_name + ':':<18}{located.source}, {located.path}")
        return 0
    if args.sweep:
        return sweep_command(job, args)
    from b3 import diagnosis
    from b3.artifacts import Artifacts
    from b3.stages import inspect_stage

    result = inspect_stage(job, top_k=args.top_k, epoch=args.epoch)
    result["diagnosis"] = diagnosis.diagnose(job, epoch=args.epoch)
    work = Artifacts(job.spec).work
    if work.local:
        work.write_json(result["diagnosis"], "inspect", "diagnosis.json")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_inspect(result)
        print(diagnosis.table_text(result["diagnosis"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
