"""The mining stages as plain functions of a validated job: rank, partition, inspect.

Each stage reads its inputs, checks them before spending compute (DataError -> exit 2),
skips itself when its manifest records the fingerprint of the current spec, and otherwise
follows the protocol of `b3.artifacts` (manifest removed first, outputs atomic, manifest
last). The CLI and the stage programs in `jobs/` call these functions and nothing else.

Artifacts (the layout is `b3.artifacts`'):
    rank/embeddings.arrow   row, id, query, positive (fixed-size float16 vectors)
    rank/topk.parquet       row, id, task, group, positive_group, skip, window,
                            neighbors (p+m global rows, best first), scores
    partition/clusters.parquet  row, id, task, group, positive_group, cluster
    partition/stats.json    edge cut, community sizes, share of S-edges inside communities
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from b3 import graph as graphs
from b3 import stage_metrics
from b3.artifacts import Artifacts, read_embeddings, read_topk
from b3.batches import B3BatchSampler, RandomBatchSampler
from b3.data import DataError, Pairs, load_pairs
from b3.hardness import batch_hardness
from b3.progress import progress
from b3.ranking import assign_mining_groups, clamp_window, rank_groups
from b3.raycluster import use_ray
from b3.spec import B3Job
from b3.storage import WorkDir
from b3.teacher import embed_texts, pick_device, read_teacher_embeddings

log = logging.getLogger(__name__)
LOG_GROUP_ROWS = 100_000  # groups this large log each step of their partition

# --- rank --------------------------------------------------------------------------------


def _prompted(pairs: Pairs, job: B3Job) -> tuple[np.ndarray, np.ndarray]:
    prompts = job.spec.dataset.prompts
    if not job.spec.teacher.use_prompts:
        return pairs.queries, pairs.positives
    q_prefix, p_prefix = zip(*(prompts.for_task(t) for t in pairs.tasks), strict=True)
    return (
        np.asarray([a + b for a, b in zip(q_prefix, pairs.queries, strict=True)], dtype=object),
        np.asarray([a + b for a, b in zip(p_prefix, pairs.positives, strict=True)], dtype=object),
    )


def _rank_device(spec) -> str:
    """In-process ranking runs where the teacher runs; Ray workers on GPUs when they claim one."""
    if not use_ray(spec.rank.workers):
        return pick_device(spec.teacher.device).type
    return "cuda" if spec.rank.gpus_per_worker > 0 else "cpu"


def rank_stage(job: B3Job) -> dict:
    """Embed every training row with the teacher and keep its top p+m positives."""
    spec, started = job.spec, time.time()
    artifacts = Artifacts(spec)
    work = artifacts.work
    done = artifacts.done("rank")
    if done:
        return {**done, "skipped": True}
    pairs = load_pairs(spec.dataset, min_rows=spec.mining.batch_size)
    mining = spec.mining
    if len(pairs) - 1 <= mining.window:
        raise DataError(
            f"mining.p + mining.m ({mining.window}) must be smaller than the number of "
            f"candidates ({len(pairs) - 1} other training rows); lower mining.p or mining.m"
        )
    groups = assign_mining_groups(
        pairs.tasks, mining.per_task, mining.pool_below, mining.batch_size
    )
    reuse = artifacts.embeddings_current()
    given = None  # embeddings made elsewhere (a GPU job, VLM2Vec), checked before anything is written
    if spec.teacher.embeddings and not reuse:
        log.info("rank: reading the teacher's embeddings from %s", spec.teacher.embeddings)
        given = read_teacher_embeddings(spec.teacher.embeddings, pairs.ids)
    artifacts.begin("rank")
    if reuse:
        log.info("rank: reusing embeddings from %s", work.path("rank", "embeddings.arrow"))
        q_emb, p_emb = read_embeddings(work)
    else:
        if given is not None:
            q_emb, p_emb = given
        else:
            queries, positives = _prompted(pairs, job)
            rs = spec.rank
            q_emb = embed_texts(spec.teacher, queries, "embed queries", rs.workers, rs.gpus_per_worker, pairs.query_images)
            p_emb = embed_texts(spec.teacher, positives, "embed positives", rs.workers, rs.gpus_per_worker,
                                pairs.positive_images)  # fmt: skip
        artifacts.write_embeddings(pairs.ids, q_emb, p_emb)
        # rank on exactly what was stored, so the artifacts reproduce the ranking
        q_emb, p_emb = (
            q_emb.astype(np.float16).astype(np.float32),
            p_emb.astype(np.float16).astype(np.float32),
        )

    skip = np.zeros(len(pairs), dtype=np.int32)
    window = np.zeros(len(pairs), dtype=np.int32)
    clamped = []
    for g, name in enumerate(groups.names):
        rows = groups.rows(g)
        p_g, m_g = clamp_window(len(rows) - 1, mining.p, mining.m)
        skip[rows], window[rows] = p_g, m_g
        if (p_g, m_g) != (mining.p, mining.m):
            clamped.append(f"{name}: {len(rows)} rows, window p={p_g} m={m_g}")
    neighbors, scores = rank_groups(
        q_emb, p_emb, groups, pairs.positive_group, mining.window,
        budget_bytes=spec.rank.memory_budget_mib << 20,
        device=_rank_device(spec),
        workers=spec.rank.workers, gpus_per_worker=spec.rank.gpus_per_worker,
    )  # fmt: skip
    valid = neighbors >= 0
    offsets = np.concatenate([[0], np.cumsum(valid.sum(1))]).astype(np.int32)
    topk = pa.table(
        {
            "row": pa.array(np.arange(len(pairs)), pa.int64()),
            "id": pa.array(pairs.ids.tolist(), pa.string()),
            "task": pa.array(pairs.tasks.tolist(), pa.string()),
            "group": pa.array(
                np.asarray(groups.names, dtype=object)[groups.of_row].tolist(), pa.string()
            ),
            "positive_group": pa.array(pairs.positive_group, pa.int64()),
            "skip": pa.array(skip, pa.int32()),
            "window": pa.array(window, pa.int32()),
            # int32 rows (N < 2^31): half the bytes for the partition stage to read
            "neighbors": pa.ListArray.from_arrays(
                pa.array(offsets), pa.array(neighbors[valid].astype(np.int32))
            ),
            "scores": pa.ListArray.from_arrays(pa.array(offsets), pa.array(scores[valid])),
        }
    )
    work.write_parquet(topk, "rank", "topk.parquet")
    summary = {
        "rows": len(pairs),
        "held_out_rows": pairs.held_out,
        "groups": len(groups.names),
        "dim": int(q_emb.shape[1]),
        "notes": groups.notes + [f"window clamped in {len(clamped)} small groups"] * bool(clamped),
        "clamped": clamped,
    }
    return artifacts.finish("rank", summary, started)


# --- partition ---------------------------------------------------------------------------


def communities(
    neighbors: np.ndarray, of_row: np.ndarray, n_groups: int, skip: np.ndarray, window: np.ndarray,
    mining, done=lambda rows: None,
) -> tuple[np.ndarray, dict]:
    """Cut each group's S-graph (S = neighbours[:, p:p+m] of its rows) into communities of
    mining.clusterSize rows: (global community of each row, cut statistics).

    Args:
        neighbors: (N, w) ranked global rows per query, -1 padded (`read_topk`).
        of_row: (N,) group index of each row; skip, window: (N,) each row's p and m.
        mining: the MiningSpec (clusterSize, edges, partitioner, seed).
        done: called with each group's row count as it finishes (progress).
    """
    n = len(of_row)
    clusters = np.empty(n, dtype=np.int64)
    s_inside = s_total = cut = partitioner_cut = edges = next_id = 0
    partitioner_seconds = 0.0
    for g in range(n_groups):
        rows = np.flatnonzero(of_row == g)
        p_g, m_g = int(skip[rows[0]]), int(window[rows[0]])
        if len(rows) == n:  # one group: a view, not a copy
            s = neighbors[:, p_g : p_g + m_g]  # S = R[:, p:p+m]
        else:  # to the group's own numbering (ranking never leaves the group)
            s = neighbors[rows, p_g : p_g + m_g]
            local = np.full(n, -1, dtype=np.int64)
            local[rows] = np.arange(len(rows))
            s = np.where(s >= 0, local[np.maximum(s, 0)], -1)
        graph = graphs.build_graph(s, mutual=mining.edges == "mutual", threads=mining.partitioner_threads)
        big = len(rows) >= LOG_GROUP_ROWS  # the bar moves per group: say what a long one is doing
        if big:
            log.info("partition: group %d/%d, %d rows: graph of %d edges; %s with %d thread(s)", g + 1,
                     n_groups, len(rows), graph.edges, mining.partitioner, mining.partitioner_threads)  # fmt: skip
        partitioner_started = time.perf_counter()
        labels, g_cut = graphs.PARTITIONERS[mining.partitioner](
            graph, mining.cluster_size, mining.seed, mining.partitioner_threads
        )
        partitioner_seconds += time.perf_counter() - partitioner_started
        if big:
            log.info("partition: group %d/%d cut in %.1f s (edge cut %d); rebalancing and statistics",
                     g + 1, n_groups, time.perf_counter() - partitioner_started, g_cut)  # fmt: skip
        comm = graphs.rebalance(labels, graph, mining.cluster_size, mining.seed)
        clusters[rows] = comm + next_id
        next_id += int(comm.max()) + 1
        inside, named = graphs.window_inside(s, comm)
        s_inside, s_total = s_inside + inside, s_total + named
        cut += graphs.edge_cut(graph, comm)
        partitioner_cut += g_cut
        edges += graph.edges
        done(len(rows))
    return clusters, {
        "graph_edges": edges,
        "edge_cut": cut,
        "partitioner_edge_cut": partitioner_cut,  # before rebalancing to exactly K
        "edge_cut_share": cut / edges if edges else 0.0,
        "partitioner_seconds": round(partitioner_seconds, 3),
        "s_edges_inside_share": s_inside / s_total if s_total else 0.0,
    }


def partition_stage(job: B3Job) -> dict:
    """Cut each group's S-graph into communities of clusterSize rows (METIS or KaMinPar)."""
    spec, started = job.spec, time.time()
    artifacts = Artifacts(spec)
    work = artifacts.work
    done = artifacts.done("partition")
    if done:
        return {**done, "skipped": True}
    artifacts.require("rank")
    mining = spec.mining
    artifacts.begin("partition")

    meta = ["row", "id", "task", "group", "positive_group", "skip", "window"]
    table, neighbors = read_topk(work, meta)
    n = table.num_rows
    groups = pc.dictionary_encode(table.column("group").combine_chunks())
    group_names, of_row = groups.dictionary.to_pylist(), groups.indices.to_numpy()
    skip = table.column("skip").to_numpy()
    window = table.column("window").to_numpy()
    with progress(n, "partition", unit="row") as bar:
        clusters, cut_stats = communities(neighbors, of_row, len(group_names), skip, window, mining, bar.update)

    sizes = np.bincount(clusters)
    stats = {
        "rows": n,
        "groups": len(group_names),
        "communities": len(sizes),
        "cluster_size": mining.cluster_size,
        "community_size": {
            "min": int(sizes.min()),
            "mean": float(sizes.mean()),
            "max": int(sizes.max()),
        },
        "communities_of_size_k": int((sizes == mining.cluster_size).sum()),
        "edges": mining.edges,
        "partitioner": mining.partitioner,
        **cut_stats,
    }
    out = pa.table(
        {
            "row": table.column("row"),
            "id": table.column("id"),
            "task": table.column("task"),
            "group": table.column("group"),
            "positive_group": table.column("positive_group"),
            "cluster": pa.array(clusters, pa.int64()),
        }
    )
    work.write_parquet(out, "partition", "clusters.parquet")
    work.write_json(stats, "partition", "stats.json")
    if stage_metrics.active_job() is not None:
        _publish_partition_metrics(job, work, out, stats)
    return artifacts.finish("partition", stats, started)


def _publish_partition_metrics(job: B3Job, work: WorkDir, clusters: pa.Table, stats: dict) -> None:
    """Partition quality and epoch-0 batch hardness (B3 vs random) for the stage's metrics."""
    name, mining = job.name, job.spec.mining
    stage_metrics.EDGE_CUT.labels(name).set(stats["edge_cut_share"])
    stage_metrics.INSIDE.labels(name).set(stats["s_edges_inside_share"])
    stage_metrics.COMMUNITIES.labels(name).set(stats["communities"])
    by_kind = hardness_by_batches(work, clusters, mining, mining.cluster_size, 0, ("b3", "random"))
    for kind, hardness in by_kind.items():
        stage_metrics.HARDNESS.labels(name, kind).set(hardness["topk_negative"])


def epoch_batches(clusters: pa.Table, mining, epoch: int, kinds: tuple[str, ...]) -> dict[str, list]:
    """One epoch's batches of each kind: b3 (mined communities), random_same_task (random
    within each mining group), random (over the whole split); what the trainer would draw."""
    groups = clusters.column("group").to_numpy(zero_copy_only=False)
    samplers = {
        "b3": lambda: B3BatchSampler(clusters.column("cluster").to_numpy(), mining.batch_size, groups,
                                     mix_tasks=mining.mix_tasks, seed=mining.seed),
        "random_same_task": lambda: RandomBatchSampler(len(groups), mining.batch_size, groups, seed=mining.seed),
        "random": lambda: RandomBatchSampler(len(groups), mining.batch_size, mix_tasks=True, seed=mining.seed),
    }  # fmt: skip
    return {kind: samplers[kind]().batches(epoch) for kind in kinds}


def hardness_by_batches(
    work: WorkDir, clusters: pa.Table, mining, top_k: int, epoch: int, kinds: tuple[str, ...]
) -> dict[str, dict]:
    """`batch_hardness` of one epoch's batches of each kind (`epoch_batches`), with their count."""
    q_emb, p_emb = read_embeddings(work)
    pos_group = clusters.column("positive_group").to_numpy()
    return {
        kind: {"count": len(batches), **batch_hardness(batches, q_emb, p_emb, pos_group, top_k)}
        for kind, batches in epoch_batches(clusters, mining, epoch, kinds).items()
    }


# --- inspect -----------------------------------------------------------------------------


def inspect_stage(job: B3Job, top_k: int | None = None, epoch: int = 0) -> dict:
    """Hardness of mined batches against random batches of the same size (one epoch)."""
    spec = job.spec
    artifacts = Artifacts(spec)
    artifacts.require("rank")
    artifacts.require("partition")
    work = artifacts.work
    clusters = work.read_parquet("partition", "clusters.parquet")
    mining = spec.mining
    k = top_k or mining.cluster_size
    batches = hardness_by_batches(
        work, clusters, mining, k, epoch, ("b3", "random_same_task", "random")
    )
    result = {"batch_size": mining.batch_size, "top_k": k, "epoch": epoch, "batches": batches}
    b3, rnd = batches["b3"]["topk_negative"], batches["random"]["topk_negative"]
    result["hardness_ratio_vs_random"] = b3 / rnd if rnd else float("inf")
    result["hardness_ratio_vs_random_same_task"] = b3 / batches["random_same_task"]["topk_negative"]
    return result
