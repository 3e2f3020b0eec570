"""The exported model's conventions: its prompts and its model card (README.md).

`st_prompts(prompts)` names the training prompts the way sentence-transformers does: `query`
and `document` (what `encode_query` / `encode_document` apply), and `query_<task>` /
`document_<task>` for per-task prompts. `model_card(...)` is the Hugging Face model card of
`train/final/model`: metadata, what the model was trained on and how it was mined, and the
`b3 eval` table once `b3 eval` has run (it rewrites the card).
"""

from __future__ import annotations

import os

import yaml

from b3.spec import B3Job, PromptsSpec


def st_prompts(prompts: PromptsSpec) -> dict[str, str]:
    """The training prompts as sentence-transformers prompt names -> prefixes (non-empty only)."""
    named = {"query": prompts.query, "document": prompts.positive}
    for task in sorted(prompts.by_task):
        query, document = prompts.for_task(task)
        named[f"query_{task}"], named[f"document_{task}"] = query, document
    return {name: text for name, text in named.items() if text}


def _hub_id(model: str) -> str | None:
    """A model reference as a Hub id (org/name), or None for a local folder."""
    return None if os.path.isabs(model) or os.path.exists(model) or model.count("/") != 1 else model


def eval_table(report: dict) -> str:
    """`b3 eval`'s results as a Markdown table."""
    first = next(iter(report["models"].values()))
    split = report["split"]
    lines = [f"`b3 eval`: retrieval on the held-out split (bucket {split['testBucket']} of {split['buckets']} by "
             f"`{split['key']}`: {first['queries']} queries, {first['corpus']} documents):", "",
             "| model | nDCG@10 | R@1 | R@10 | MRR@10 | nDCG@10 per task (micro / macro) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for name, m in report["models"].items():
        pt = m["per_task"]
        lines.append(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@1']:.4f} | {m['recall@10']:.4f} | {m['mrr@10']:.4f} "
                     f"| {pt['micro']['ndcg@10']:.4f} / {pt['macro']['ndcg@10']:.4f} |")  # fmt: skip
    lines += ["", "Mixed: every query against all held-out documents; per task: against its own task's "
              "documents only (micro: mean over queries, macro: mean over tasks)."]
    if "candidates" in first:  # MMEB-style: each query against its own candidate list
        lines += ["", f"Candidates (MMEB): {first['candidates']['queries']} queries, each right when its positive scores "
                  "above every other candidate on its list:", "",
                  "| model | accuracy@1 (micro) | accuracy@1 (macro over tasks) |", "|---|---|---|"]  # fmt: skip
        lines += [f"| {name} | {m['candidates']['accuracy@1']:.4f} | {m['candidates']['macro']:.4f} |"
                  for name, m in report["models"].items()]  # fmt: skip
    return "\n".join(lines)


def model_card(job: B3Job, train: dict, prompts: dict[str, str], evaluation: dict | None = None) -> str:
    """README.md of the exported model. `train`: steps, epochs, rows, tasks, world size."""
    s, m, t = job.spec, job.spec.mining, job.spec.training
    base = _hub_id(t.student)
    meta = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
            "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction", "b3"]}  # fmt: skip
    if t.finetuning == "lora":
        meta["tags"].append("lora")
    if base:
        meta["base_model"] = base
    targets = ", ".join(t.lora.target_modules) if t.lora.target_modules else "the family default"
    how = "with LoRA" if t.finetuning == "lora" else "in full (every weight trained)"
    weights = (f"LoRA r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout} on {targets}; merged into the weights"
               if t.finetuning == "lora" else "full fine-tuning: every weight trained")  # fmt: skip
    length = f"{train['steps']} steps ({train['epochs']} full epochs)"
    batches = ("B3 mined batches" if t.sampler == "b3" else "random batches (the baseline)") + (
        f" with {m.hard_negatives} hard negatives per query (B3++)" if m.hard_negatives else "")
    prompt_rows = "\n".join(f"| `{name}` | `{text}` |" for name, text in prompts.items())
    usage_prompts = ("model.encode_query(queries)  # the `query` prompt is applied\n"
                     "model.encode_document(documents)" if "query" in prompts
                     else "model.encode(texts)")  # fmt: skip
    sections = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---",
        f"# {job.name}",
        f"A sentence embedding model fine-tuned from `{t.student}` {how} on {batches}, by "
        "b3-operator (B3, *Breaking the Batch "
        "Barrier*, Thirukovalluru et al., 2025): a teacher ranks every positive for every query, "
        "ranks [p, p+m) become a graph, a partitioner cuts it into communities of K rows, and each batch "
        "is |B|/K communities, so that its members are strong negatives for one another.",
        "## Usage\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n"
        f'model = SentenceTransformer("path/to/model")\n{usage_prompts}\n```',
        "## Model\n\n"
        f"- base model: `{t.student}`, {t.pooling} pooling, L2-normalised, cosine similarity\n"
        f"- max sequence length: {t.max_length} tokens\n"
        f"- {weights}",
        "## Training data\n\n"
        f"- dataset: `{s.dataset.uri}` (query column `{s.dataset.columns.query}`, positive column "
        f"`{s.dataset.columns.positive}`)\n"
        f"- {train['rows']} training pairs in {train['tasks']} task(s)"
        + (f"; held out: bucket {s.dataset.split.test_bucket} of {s.dataset.split.buckets} by `{s.dataset.split.key}`"
           if s.dataset.split else ""),
        "## Mining\n\n"
        f"- teacher: `{s.teacher.model}`\n"
        f"- p={m.p} (skipped top ranks), m={m.m} (ranks kept), {m.edges} edges, "
        f"{'per task' if m.per_task else 'across tasks'}\n"
        f"- communities of K={m.cluster_size}, batches of |B|={m.batch_size}"
        f"{', tasks mixed in a batch' if m.mix_tasks else ', one task per batch'}; seed {m.seed}",
        "## Training\n\n"
        f"- {length}, learning rate {t.learning_rate} (warmup {t.warmup_ratio}), temperature {t.temperature}, "
        f"InfoNCE{' (symmetric)' if t.symmetric else ''} over in-batch negatives"
        f"{' gathered across processes' if t.gather_across_devices else ''}; {train['world']} process(es)\n"
        f"- false negatives: {t.false_negatives}",
    ]  # fmt: skip
    if prompts:
        sections.append("## Prompts\n\nPrefixed to the texts in training; saved in "
                        "`config_sentence_transformers.json`:\n\n| name | prompt |\n|---|---|\n" + prompt_rows)  # fmt: skip
    sections.append("## Evaluation\n\n" + (eval_table(evaluation) if evaluation else
                                           "Not evaluated yet: `b3 eval` writes its table here."))  # fmt: skip
    return "\n\n".join(sections) + "\n"
