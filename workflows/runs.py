"""One model at a time: train a stage one or a stage-two head, evaluate a stage one, re-rank a
split, import an external stage one. Every training run writes ``run.json`` in its run directory
before it starts: the command and options that reproduce it (``--config run.json``) and the
trainer's resolved config."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from core.errors import UsageError
from core.fileio import write_json
from core.metrics import retrieval_metrics, write_report
from core.split import check_complete
from core.urls import redact_urls
from heads.evaluation.external import import_stage_one, split_ids_from_store
from heads.evaluation.postprocess import (DEFAULT_DSL_TEMPERATURE, check_querybank_split, dual_softmax_metrics,
                                          qb_norm_metrics)
from heads.evaluation.rerank import RerankResult, rerank, write_outputs
from heads.evaluation.similarity import querybanks
from heads.evaluation.sources import load_head, stage_one_scores
from heads.stage_one.config import StageOneTrainConfig
from heads.stage_one.train import train_stage_one
from heads.stage_two.scoring import pair_scorer
from heads.stage_two.config import StageTwoTrainConfig
from heads.stage_two.qformer_pretrain import BLIP2_ITM_NEGATIVES, QFORMER_SHAPE, itm_negatives_key, pretrain_qformer
from heads.stage_two.tokenizer import build_word_tokenizer, caption_tokenizer, with_caption_ids
from heads.stage_two.train import train_stage_two
from pipeline.store import CacheStore
from workflows.data import caption_texts
from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

RUN_JSON = "run.json"


def write_run_record(out_dir: Path, config: Any, record: dict | None = None, splits: Any = ()) -> Path:
    """``out_dir/run.json``: ``record`` (the command and its options), the trainer's config and how each
    of ``splits`` reads its large arrays (``reads``: in place or staged). URLs (``--store``) are written
    without credentials or signed queries (``core.urls.redact_url``): a run read back with ``--config``
    needs such a store given again."""
    out_dir.mkdir(parents=True, exist_ok=True)
    reads = {s.split: s.access for s in splits if s is not None and getattr(s, "access", None)}
    return write_json(out_dir / RUN_JSON, redact_urls({**(record or {}), "config": asdict(config),
                                                       **({"reads": reads} if reads else {})}))


def once_per_node(device: str, fn: Any) -> Any:
    """``fn()`` (staging a split) under torchrun: local rank 0 of each machine first, the other
    ranks after a barrier (they then reopen what it staged); one process: just ``fn()``."""
    from heads.training.distributed import context

    d = context(device)
    if not d.enabled:
        return fn()
    result = fn() if d.local_rank == 0 else None
    d.barrier()
    return result if d.local_rank == 0 else fn()


def is_main_process() -> bool:
    from core.torchrun import torchrun_ranks

    return torchrun_ranks()[0] == 0


def train_stage_one_run(work: WorkDir, store: str, config: StageOneTrainConfig, out: str | Path | None = None,
                        reuse: bool = True, record: dict | None = None) -> Path:
    """Stage ``store``'s train (and val) split and train a stage-one head; returns the checkpoint
    (default run dir ``<work>/runs/stage1-<head>``). Under torchrun every rank trains its part
    (``heads.training.distributed``); rank 0 writes run.json and the checkpoint."""
    train, val = once_per_node(config.device, lambda: work.stage_train_val(store))
    out_dir = Path(out) if out else work.run_dir(1, config.head)
    if is_main_process():
        write_run_record(out_dir, config, record, (train, val))
    return train_stage_one(train, val, out_dir, config, reuse=reuse)


def train_head(work: WorkDir, store: str, stage_one: str | Path, config: StageTwoTrainConfig | None = None,
               out: str | Path | None = None, resume: bool = True, record: dict | None = None,
               manifest: str | Path | None = None) -> Path:
    """Stage ``store``'s train (and val) split with tokens and train a stage-two head on them;
    returns the checkpoint (default run dir ``<work>/runs/stage2-<head>``). A head reading caption
    ids gets the captions' text from the store's manifest (``manifest`` or the work dir's)."""
    config = (config or StageTwoTrainConfig()).resolved()
    train, val = once_per_node(config.device, lambda: work.stage_train_val(store, STAGE_TWO_ARRAYS))
    if config.reads_caption_ids():
        tokenizer = caption_tokenizer(config.tokenizer or config.init_from)
        train, val = (None if s is None else with_caption_ids(s, tokenizer, caption_texts(work, s, manifest),
                                                               config.text_len) for s in (train, val))
    out_dir = Path(out) if out else work.run_dir(2, config.head)
    if is_main_process():
        write_run_record(out_dir, config, record, (train, val))
    return train_stage_two(train, val, stage_one, out_dir, config, resume=resume)


def best_stage_one(work: WorkDir) -> Path:
    """The stage-one checkpoint under ``<work>/runs/stage1-*`` with the best val score (val only)."""
    found = work.stage_one_runs()
    if not found:
        raise UsageError(f"give --stage-one: no stage-one checkpoint under {work.runs_dir()} "
                         f"(run `python cli.py demo` or `train-stage-one` first)")

    def val_score(p: Path) -> float:
        hist = torch.load(p, map_location="cpu", weights_only=True).get("history", {}) or {}
        score = hist.get("best_score")
        return -math.inf if score is None else float(score)

    return max(found, key=val_score)


def evaluate_stage_one(work: WorkDir, store: str, stage_one: str | None, *, split: str = "test",
                       out: str | Path | None = None, dsl: bool = False, dsl_temperature: float | None = None,
                       qb_norm: bool = False, qb_bank: str = "val", qb_k: int = 1, qb_beta: float = 20.0,
                       device: str = "cpu", allow_incomplete: bool = False) -> tuple[Path, str]:
    """T2V / V2T metrics of a stage one (checkpoint, external import, or ``None`` for the untrained
    meanP baseline) on ``split``, optionally with DSL and QB-Norm; returns (JSON report, table).
    Refuses a split with videos missing from the store unless ``allow_incomplete``."""
    data = work.stage(store, split)
    coverage = check_complete(data, allow_incomplete)
    s1 = stage_one_scores(stage_one, data, device=device)
    cv = data.caption_video
    results = {s1.name: retrieval_metrics(s1.sim, cv)}
    if dsl:
        t = DEFAULT_DSL_TEMPERATURE if dsl_temperature is None else dsl_temperature
        results[f"{s1.name} +DSL(t={t:g})"] = dual_softmax_metrics(s1.sim, cv, temperature=t)
    if qb_norm:
        if s1.head is None:
            raise UsageError("--qb-norm needs our own stage-one head (its querybank is encoded from the "
                             f"{qb_bank!r} split); an external stage one brings no querybank")
        try:
            check_querybank_split(qb_bank, split)
        except ValueError as exc:
            raise UsageError(f"--qb-bank: {exc}") from exc
        text_bank, video_bank = querybanks(s1.head, data, work.stage(store, qb_bank), device=device)
        results[f"{s1.name} +QB-Norm({qb_bank}, k={qb_k}, beta={qb_beta:g})"] = qb_norm_metrics(
            s1.sim, cv, text_bank, video_bank, k=qb_k, beta=qb_beta)
    return write_report(results, Path(out) if out else work.reports_dir(split), split=coverage)


def rerank_split(work: WorkDir, store: str, stage_one: str | Path, stage_two: str | Path, split: str = "test",
                 candidates: int = 15, dsl: bool = False, dsl_temperature: float | None = None,
                 out: str | Path | None = None, device: str = "cpu", batch_size: int = 64, sim: Any = None,
                 progress: bool = True, allow_incomplete: bool = False,
                 manifest: str | Path | None = None, index: str | Path | None = None,
                 nprobe: int | None = None, ef_search: int | None = None) -> tuple[dict[str, Path], str, RerankResult]:
    """Stage ``split`` with tokens, re-rank every query's stage-one top ``candidates`` (K) with the head
    ``stage_two`` (a checkpoint) and write the outputs (default ``<work>/reports/rerank-<split>``); returns (paths, table, result).

    ``sim`` (optional) is a precomputed stage-one similarity of that split (the ablation reuses
    one). Encoder identities are checked: ``StoreMismatchError`` names the differences. ``index``
    (an ``index build`` directory of this split and stage one): the T2V candidate lists come from its
    search (``nprobe`` / ``ef_search``: an approximate index's width); the full stage-one similarity
    still gives the metrics, and run.json records how many of the exact top K the index found.
    """
    data = work.stage(store, split, STAGE_TWO_ARRAYS)
    coverage = check_complete(data, allow_incomplete)
    head, head_info, data = load_head(stage_two, data, captions=lambda: caption_texts(work, data, manifest))
    s1_info: dict = {"path": str(stage_one)}
    s1_head = None
    if sim is None:
        s1 = stage_one_scores(stage_one, data, device=device)
        sim, s1_info, s1_head = s1.sim, s1.info, s1.head
    cand, index_info = None, None
    if index is not None:
        from heads.evaluation.index import recall_at
        from heads.evaluation.rerank import top_k
        from heads.evaluation.similarity import encode_texts
        from heads.stage_one.checkpoint import load_stage_one
        from heads.training.common import evaluating
        from workflows.search import open_index, stage_one_file

        vi = open_index(work, store, stage_one, split, index, data, nprobe=nprobe, ef_search=ef_search,
                        device=device)
        if s1_head is None:  # a similarity given: the stage one's text encoder from its checkpoint
            s1_head = load_stage_one(stage_one_file(stage_one), expect_encoder_identity=data.encoder_identity).head
        with evaluating(s1_head):
            texts = encode_texts(s1_head, data, device=device).float().cpu().numpy()
        _, cand = vi.search(texts, candidates)
        short = int((cand < 0).any(axis=1).sum())
        if short:
            raise UsageError(f"the {vi.kind} index {vi.path} found fewer than {candidates} videos for {short} queries: "
                             f"search wider (--nprobe / --ef-search) or use the exact index")
        index_info = {"path": str(vi.path), "kind": vi.kind, "params": vi.meta.get("params"),
                      "recall@K vs exact": recall_at(cand, top_k(sim, candidates), candidates)}
    scorer = pair_scorer(head, data, batch_size=batch_size, device=device, progress=progress)
    res = rerank(sim, data, scorer, k=candidates, dsl=dsl, dsl_temperature=dsl_temperature,
                 t2v_candidates=cand)
    out_dir = Path(out) if out else work.reports_dir(f"rerank-{split}")
    meta = {"store": str(store), "store_fingerprint": data.store_fingerprint, "stage_one": s1_info,
            "head": head_info, "device": device, "batch_size": batch_size, "reads": data.access}
    if index_info:
        meta["t2v_candidates_from_index"] = index_info
    title = f"{split}: stage one vs re-ranked top {candidates}" + (" (DSL)" if dsl else "")
    paths, table = write_outputs(res, data, out_dir, meta=meta, title=title, coverage=coverage)
    if index_info:
        table = (f"T2V candidates from the {index_info['kind']} index {index}: "
                 f"{100 * index_info['recall@K vs exact']:.1f}% of the exact top {candidates}\n{table}")
    return paths, table, res


def import_external(work: WorkDir, store: str, split: str, out: str | Path | None = None,
                    allow_incomplete: bool = False, **files: Any) -> tuple[Any, Any, str]:
    """Import an external stage one (``files``: ``video_emb`` + ``text_emb``, or ``similarity``;
    ``normalize``, ``name``) checked against ``split`` of ``store``; writes the import and its
    metrics report (default ``<work>/external/<split>``). Returns (import, split ids, table)."""
    if files.get("similarity") is None and (files.get("video_emb") is None or files.get("text_emb") is None):
        raise UsageError("give --video-emb and --text-emb, or --similarity")
    if files.get("similarity") is not None and (files.get("video_emb") or files.get("text_emb")):
        raise UsageError("give either embeddings (--video-emb/--text-emb) or --similarity, not both")
    out_dir = Path(out) if out else work.external_dir(split)
    ids = split_ids_from_store(CacheStore.open(store), split)
    coverage = check_complete(ids, allow_incomplete)
    ext = import_stage_one(ids, out_dir, **files)
    results = {f"external {ext.name}": retrieval_metrics(ext.similarity(), ids.caption_video)}
    _, table = write_report(results, out_dir, name="report", split=coverage)
    return ext, ids, table


def pretrain_qformer_run(work: WorkDir, store: str, out: str | Path | None = None, steps: int = 2000,
                         batch_size: int = 64, lr: float = 5e-4, seed: int = 0, text_len: int = 32,
                         itm_negatives: int = BLIP2_ITM_NEGATIVES, device: str = "cpu",
                         manifest: str | Path | None = None,
                         options: dict | None = None, progress: bool = True, num_threads: int | None = None) -> Path:
    """BLIP-2's first-stage pre-training (ITC + ITM on single frames) of a Q-Former on ``store``'s
    train split, with a word tokenizer built from the train captions; saved as a BLIP-2 checkpoint
    directory (default ``<work>/encoders/qformer-<hash>``) for ``train-head --init-from``."""
    train = work.stage(store, "train", STAGE_TWO_ARRAYS)
    texts = caption_texts(work, train, manifest)
    tokenizer = build_word_tokenizer(texts)
    train = with_caption_ids(train, tokenizer, texts, text_len)
    opts = {**QFORMER_SHAPE, **(options or {}), "vocab_size": tokenizer.vocab_size}
    if out is None:
        key = json.dumps({"store": train.store_fingerprint, "opts": opts, "steps": steps, "batch": batch_size,
                          "lr": lr, "seed": seed, "text_len": text_len, **itm_negatives_key(itm_negatives)},
                         sort_keys=True)
        out = work.qformer_dir(hashlib.sha256(key.encode()).hexdigest()[:12])
    return pretrain_qformer(train, out, opts, tokenizer, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                            device=device, num_threads=num_threads, progress=progress, itm_negatives=itm_negatives)
