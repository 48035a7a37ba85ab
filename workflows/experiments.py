"""The multi-model runs: the demo (the synthetic benchmark end to end), the stage-one comparison and
the stage-two ablation. Each prints its progress through ``echo`` and writes its tables as files."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from core.errors import RunMismatchError, UsageError
from core.fileio import write_text
from core.metrics import metrics_to_json, write_report
from core.options import parse_key_values
from core.split import check_complete
from core.urls import redact_url
from heads.evaluation.similarity import evaluate, untrained_baseline
from heads.evaluation.sources import load_head, stage_one_scores
from heads.registry import list_heads, supports
from heads.stage_one.checkpoint import load_stage_one
from heads.stage_one.config import StageOneTrainConfig
from heads.stage_two.config import ABLATION_VARIANTS, ITC_DEFAULTS, StageTwoTrainConfig
from reports.inputs import load_manifest_info
from synthetic.head_groups import group_queries, head_group_accuracy
from workflows.data import caption_texts, extract_stores, make_manifest, synthetic_encoder, synthetic_qformer
from workflows.reports import demo_runs, retrieval_report
from workflows.runs import best_stage_one, rerank_split, train_head, train_stage_one_run
from workflows.workdir import STAGE_TWO_ARRAYS, WorkDir

Echo = Callable[[str], None]
DEMO_STAGE_ONE = ("meanP", "seqTransf")
DEMO_CANDIDATES = 15
# The demo's re-ranker starts from the world's pre-trained Q-Former (1,000 steps) and keeps the head's
# own contrastive phase on whole videos (the trainer's default): that split of the first demo's time
# beat 2,000 pre-training steps without the phase on test (docs/benchmarks/qformer.md, fourth round).
DEMO_ITC_STEPS = ITC_DEFAULTS["itc_steps"]


def demo_stage_two_config(work: WorkDir, store: str, seed: int = 0, device: str = "cpu", echo: Echo | None = None,
                          qformer_options: dict | None = None, **options: Any) -> StageTwoTrainConfig:
    """The demo's stage-two recipe on the synthetic ``store``: the CrossTVR head started from the
    world's Q-Former (pre-trained once on the train frames, ``synthetic.qformer``, reused after),
    its word tokenizer as the text side, the head's contrastive phase on whole videos, then ITM.
    ``qformer_options``: the Q-Former's ``QFormerSettings``; ``options``: other
    ``StageTwoTrainConfig`` fields, which win."""
    from manifests import Manifest

    t0 = time.time()
    manifest = Manifest.read(work.manifest_dir("synthetic"))
    qformer = str(synthetic_qformer(work, manifest, store, qformer_options, device=device))
    if echo is not None:
        echo(f"      the world's Q-Former: {qformer}  ({time.time() - t0:.0f}s)")
    base = {"seed": seed, "device": device, "init_from": qformer, "tokenizer": qformer, "itc_steps": DEMO_ITC_STEPS}
    return StageTwoTrainConfig(**{**base, **options})


def train_own_head(work: WorkDir, store: str, stage_one: str | Path, config: StageTwoTrainConfig,
                   out: str | Path | None = None, echo: Echo = print) -> Path:
    """``train_head`` into a run directory the caller owns (the demo's head, the ablation's runs): a
    run there made with other arguments is started again, with a line saying why."""
    try:
        return train_head(work, store, stage_one, config, out=out)
    except RunMismatchError as exc:
        echo(f"      {exc}: training the head again")
        return train_head(work, store, stage_one, config, out=out, resume=False)


def demo(work: WorkDir, seed: int = 0, device: str = "cpu", echo: Echo = print,
         qformer_options: dict | None = None) -> Path:
    """The synthetic benchmark end to end: generate, pretrain the encoder, extract, train stage one
    and stage two, evaluate stage one and the re-ranked top 15 on the test split, and write the HTML
    report of it (``<work>/reports/rerank-test/report.html``). Returns the re-ranking metrics file.
    ``qformer_options``: the world's Q-Former settings (``QFormerSettings`` fields), checked first."""
    from synthetic.qformer import QFormerSettings

    QFormerSettings.from_options(qformer_options)  # a bad setting fails now, not after the encoders
    t0 = time.time()
    echo("[1/6] synthetic benchmark")
    m = make_manifest(work, "synthetic", options={"seed": seed})
    echo(f"      {m.videos.num_rows} videos, {m.captions.num_rows} captions  ({time.time() - t0:.0f}s)")
    echo("[2/6] frozen encoder (pretrained once on train-split frame captions)")
    encoder = synthetic_encoder(work, m)
    echo(f"      {encoder}  ({time.time() - t0:.0f}s)")
    echo("[3/6] extraction into the token cache")
    report, (store,) = extract_stores(work, m, [encoder], device=device)
    echo(f"      {report.summary()}  ({time.time() - t0:.0f}s)")
    echo("[4/6] stage-one training")
    test = work.stage(store, "test")
    coverage = check_complete(test)
    results = {"meanP (untrained)": evaluate(untrained_baseline(test.frame_emb.shape[-1]), test, device=device)}
    for head in DEMO_STAGE_ONE:
        ckpt = train_stage_one_run(work, store, StageOneTrainConfig(head=head, seed=seed, device=device))
        trained = load_stage_one(ckpt, expect_encoder_identity=test.encoder_identity)
        results[f"{head} (trained)"] = evaluate(trained.head, test, device=device)
    echo(f"      ({time.time() - t0:.0f}s)")
    json_path, table = write_report(results, work.reports_dir("demo"), split=coverage)
    echo(table)
    echo(f"report: {json_path}")
    echo("[5/6] stage-two training: the world's Q-Former (BLIP-2's first stage on train frames and their "
         "captions, made once), then the CrossTVR head started from it (contrast on whole videos, then ITM "
         "with hard negatives from stage one)")
    stage_one = best_stage_one(work)
    config = demo_stage_two_config(work, store, seed=seed, device=device, echo=echo,
                                   qformer_options=qformer_options)
    stage_two = train_own_head(work, store, stage_one, config, echo=echo)
    echo(f"      stage one {stage_one.parent.name} (best val), head {stage_two}  ({time.time() - t0:.0f}s)")
    echo(f"[6/6] test split: stage one vs its top {DEMO_CANDIDATES} re-ranked")
    test = work.stage(store, "test", STAGE_TWO_ARRAYS)
    s1 = stage_one_scores(stage_one, test, device=device)
    paths, table, _ = rerank_split(work, store, stage_one, stage_two, split="test", candidates=DEMO_CANDIDATES,
                                   device=device, sim=s1.sim)
    echo(table)
    echo(f"report: {paths['metrics']}")
    rows = manifest_groups(work, test)
    if rows is not None:
        groups = group_queries(list(test.video_ids), test.caption_video, rows)
        acc = within_group(work, test, groups, s1.sim, stage_two, device=device)
        gpath, gtable = write_report(group_table(acc["stage one"], {"re-ranked": [acc["cosine+head"]]},
                                                 groups.counts()), paths["metrics"].parent, name="within-group")
        echo(f"within-group accuracy (% of {groups.captions.size} grouped test captions whose own video scores "
             f"highest among its group's members; chance {groups.chance()})\n{gtable}")
        echo(f"report: {gpath}")
    html, _ = retrieval_report(paths["metrics"].parent, demo_runs(work))
    echo(f"HTML report: {html}   (open it in a browser; total {time.time() - t0:.0f}s)")
    echo(f"search it in the browser: {serve_command(work, store, stage_one, stage_two)}")
    return paths["metrics"]


def serve_command(work: WorkDir, store: str, stage_one: str | Path, stage_two: str | Path) -> str:
    """The one command that serves the demo's store, stage one and re-ranker (``cli.py serve``)."""
    import shlex

    parts = ["python", "cli.py", "serve", "--store", str(store), "--stage-one", str(stage_one),
             "--stage-two", str(stage_two), "--work-dir", str(work.root)]
    return " ".join(shlex.quote(p) for p in parts)


def per_head_config(pairs: Sequence[str], heads: Sequence[str]) -> dict[str, dict]:
    """``["clip2video:num_centers=5"]`` -> ``{"clip2video": {"num_centers": 5}, <other heads>: {}}``."""
    options: dict[str, dict] = {h: {} for h in heads}
    for pair in pairs:
        head, sep, rest = pair.partition(":")
        if not sep or head not in options:
            raise UsageError(f"--head-option: expected HEAD:key=value with HEAD one of {', '.join(heads)}, "
                             f"got {pair!r}")
        options[head].update(parse_key_values((rest,), "--head-option"))
    return options


def compare_stage_one(work: WorkDir, store: str | None, heads: list[str], head_option: Sequence[str],
                      config: StageOneTrainConfig, out: str | Path | None = None, echo: Echo = print,
                      allow_incomplete: bool = False) -> tuple[Path, str]:
    """Train each stage-one head (selection on val), evaluate all on test next to the untrained meanP
    baseline; ``head_option``: ``HEAD:key=value`` pairs (each ``--head-option``). Writes ``compare-stage-one.{json,txt}`` and
    ``compare-stage-one.runs.json``."""
    unknown = [h for h in heads if h not in list_heads(stage=1)]
    if not heads or unknown:
        raise UsageError(f"--heads: unknown head(s) {unknown} (known: {', '.join(list_heads(stage=1))})")
    options = per_head_config(head_option, heads)
    store = store or work.default_store()
    out_dir = Path(out) if out else work.experiment_dir("compare-stage-one")
    train, val = work.stage_train_val(store)
    if val is None:
        echo("no val split in the store: each head keeps its last epoch")
    test = work.stage(store, "test")
    coverage = check_complete(test, allow_incomplete)
    results = {"meanP (untrained)": evaluate(untrained_baseline(test.frame_emb.shape[-1]), test,
                                             device=config.device)}
    runs: dict[str, dict] = {}
    for name in heads:
        echo(f"[{name}] training {config.epochs} epochs on {train.split} ({len(train.video_ids)} videos)")
        t0 = time.time()
        run_config = replace(config, head=name, head_config=options.get(name) or {})
        ckpt = train_stage_one_run(work, store, run_config, out=out_dir / "runs" / f"stage1-{name}")
        seconds = time.time() - t0
        loaded = load_stage_one(ckpt, expect_encoder_identity=test.encoder_identity)
        results[f"{name} (trained)"] = evaluate(loaded.head, test, device=config.device)
        runs[name] = {"checkpoint": str(ckpt), "best_epoch": loaded.history.get("best_epoch"),
                      "val_rsum": loaded.history.get("best_score"), "config": loaded.config,
                      "parameters": loaded.head.num_parameters(), "train_seconds": round(seconds, 1)}
        echo(f"      best epoch {runs[name]['best_epoch']}, {seconds:.0f}s")
    json_path, table = write_report(results, out_dir, name="compare-stage-one", split=coverage)
    meta = {"store": redact_url(store), "store_fingerprint": train.store_fingerprint, "test_split": test.split,
            "epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
            "device": config.device, "threads": config.num_threads, "heads": runs}
    write_text(out_dir / "compare-stage-one.runs.json", metrics_to_json(meta) + "\n")
    return json_path, table


def ablation_table(stage_one: dict, variants: dict[str, dict], k: int) -> dict[str, dict[str, float]]:
    """One row per model: T2V and V2T R@1/5/10 and MnR, plus stage one's R@K per direction. A variant
    given as a list of per-seed metrics gets their mean, and the standard deviation of R@1 over seeds."""
    rows = {}
    for label, m in [("stage one", stage_one), *variants.items()]:
        seeds = m if isinstance(m, list) else [m]
        row = {}
        for d in ("t2v", "v2t"):
            if d not in seeds[0]:
                continue
            for key in ("R@1", "R@5", "R@10", "MnR"):
                row[f"{d.upper()} {key}"] = float(np.mean([s[d][key] for s in seeds]))
            if len(seeds) > 1:
                row[f"{d.upper()} R@1 sd"] = float(np.std([s[d]["R@1"] for s in seeds]))
        rows[label] = row
    for d in ("t2v", "v2t"):
        if d in stage_one:
            rows["stage one"][f"{d.upper()} R@{k} (stage one)"] = stage_one[d][f"R@{k}"]
    return rows


def group_table(stage_one: dict[str, float], variants: dict[str, list[dict[str, float]]],
                counts: dict[str, int]) -> dict[str, dict[str, float]]:
    """Within-group accuracy rows: stage one's, then each variant's mean over seeds per varied
    attribute (and its standard deviation when there are several seeds)."""
    columns = {**{a: f"{a} (n={n})" for a, n in counts.items()}, "all": "all"}
    rows = {"stage one (cosine)": {name: stage_one[a] for a, name in columns.items()}}
    for label, seeds in variants.items():
        row = {}
        for a, name in columns.items():
            row[name] = float(np.mean([s[a] for s in seeds]))
            if len(seeds) > 1:
                row[f"{a} sd"] = float(np.std([s[a] for s in seeds]))
        rows[f"{label}, cosine + head"] = row
    return rows


def manifest_groups(work: WorkDir, split: Any, manifest: str | Path | None = None) -> dict[str, dict] | None:
    """The manifest's video rows by id when the store's manifest (``manifest`` or the work dir's
    ``<dataset>/manifest``) has near-duplicate groups, else ``None``; a given manifest that is not
    the store's is refused (``reports.inputs.load_manifest_info``)."""
    attrs = getattr(split, "store_attrs", None) or {}
    dataset, want = attrs.get("dataset"), attrs.get("manifest_sha256")
    directory = Path(manifest) if manifest else (work.manifest_dir(str(dataset)) if dataset else None)
    if manifest is None and (directory is None or not (directory / "meta.json").is_file()):
        return None
    try:
        info = load_manifest_info(directory, "--manifest", store_sha256=want)
    except UsageError:
        if manifest:
            raise
        return None  # the work dir's manifest of that name is another one: no group figures
    return info.videos if info.has_groups else None


def within_group(work: WorkDir, split: Any, groups: Any, sim: np.ndarray, stage_two: str | Path,
                 device: str = "cpu", manifest: str | Path | None = None) -> dict[str, dict[str, float]]:
    """Within-group accuracy (%) per varied attribute of stage one's cosine (``"stage one"``) and of
    ``cosine + head`` for the stage-two checkpoint ``stage_two`` (``"cosine+head"``) on ``split``'s
    near-duplicate groups (``groups``: ``group_queries``; ``sim``: stage one's similarity)."""
    loaded, _, head_split = load_head(stage_two, split, captions=lambda: caption_texts(work, split, manifest))
    acc = head_group_accuracy(groups, sim, {"h": loaded}, split=head_split, device=device)
    return {"stage one": acc["stage one"], "cosine+head": acc["h cosine+head"]}


def ablation(work: WorkDir, variants: list[str], config: StageTwoTrainConfig, store: str | None = None,
             stage_one: str | None = None, candidates: int = DEMO_CANDIDATES, out: str | Path | None = None,
             demo_defaults: bool = False, echo: Echo = print, allow_incomplete: bool = False,
             seeds: Sequence[int] | None = None, manifest: str | Path | None = None) -> tuple[Path, str]:
    """Stage-two ablation: each variant (``ABLATION_VARIANTS``) trained on train (epoch selected on
    val only) with each of ``seeds`` (default: ``config.seed`` alone) re-ranks the test split's
    stage-one top ``candidates``; one table of all of them (means over seeds, and the spread of R@1).

    ``config`` holds the options every variant shares (``head_config`` is added to each variant's
    own; the contrastive options apply to heads that support them). With ``demo_defaults`` the
    variant "both" with the demo's seed is the demo's own head (``<work>/runs/stage2-crosstvr``),
    reused. When the store's manifest has near-duplicate groups (the synthetic benchmark), also the
    within-group accuracy of ``cosine + head`` per varied attribute (``synthetic.head_groups``).
    Writes ``OUT/ablation.{json,txt}``, ``OUT/ablation-groups.{json,txt}`` (with groups),
    ``OUT/ablation.runs.json`` (every run's metrics) and each run's ranked lists under
    ``OUT/<variant>-seed<S>`` (``OUT/<variant>`` when ``seeds`` is not given), its run under
    ``OUT/runs/`` by the same name, so ablations over other seeds or variants reuse it (a run there
    made with other arguments is trained again).
    """
    unknown = [v for v in variants if v not in ABLATION_VARIANTS]
    if not variants or unknown:
        raise UsageError(f"--variants: unknown variant(s) {unknown} (known: {', '.join(ABLATION_VARIANTS)})")
    tagged = seeds is not None  # runs named <variant>-seed<S> (one seed given as --seed: <variant>)
    seeds = list(dict.fromkeys(int(s) for s in seeds)) if seeds else [int(config.seed)]
    store = store or work.default_store()
    stage_one = stage_one or str(best_stage_one(work))
    out_dir = Path(out) if out else work.experiment_dir("ablation")
    test = work.stage(store, "test", STAGE_TWO_ARRAYS)
    coverage = check_complete(test, allow_incomplete)
    s1 = stage_one_scores(stage_one, test, device=config.device)
    rows = manifest_groups(work, test, manifest)
    groups = None if rows is None else group_queries(list(test.video_ids), test.caption_video, rows)
    echo(f"stage one: {stage_one}" + ("" if groups is None else
                                      f"; {groups.captions.size} grouped test captions (groups of {groups.group_size})"))
    results: dict[str, list[dict]] = {}
    group_results: dict[str, list[dict]] = {}
    runs: dict[str, dict] = {}
    stage_one_metrics: dict = {}
    stage_one_groups: dict = {}
    for name in variants:
        label, head, head_config, variant_options = ABLATION_VARIANTS[name]
        head_config = {**head_config, **config.head_config}
        for seed in seeds:
            run_config = replace(config, head=head, head_config=head_config, seed=seed, **variant_options)
            if not supports(head, "contrastive"):  # the contrastive options concern heads with learnable queries
                run_config = replace(run_config, itc_steps=None, itc_weight=None)
            if not supports(head, "blip2_init"):  # the Q-Former start concerns heads that can load it
                run_config = replace(run_config, init_from=None, tokenizer=None)
            tag = f"{name}-seed{seed}" if tagged else name
            echo(f"[{label}] seed {seed}: training {head} {head_config or ''}")
            t0 = time.time()
            run_dir = (work.run_dir(2, "crosstvr") if name == "both" and not head_config and demo_defaults
                       and seed == config.seed else out_dir / "runs" / tag)
            ckpt = train_own_head(work, store, stage_one, run_config, out=run_dir, echo=echo)
            train_s = time.time() - t0
            _, _, res = rerank_split(work, store, stage_one, ckpt, split="test", candidates=candidates, out=out_dir / tag,
                                     device=config.device, sim=s1.sim, allow_incomplete=allow_incomplete)
            m = res.metrics()
            stage_one_metrics = m["stage one"]
            results.setdefault(label, []).append(m["re-ranked"])
            run = {"variant": name, "label": label, "seed": seed, "head": head, "head_config": head_config,
                   "train_options": variant_options, "checkpoint": str(ckpt), "train_seconds": round(train_s, 1),
                   "rerank_seconds": round(res.seconds["total"], 1), "pairs_scored": res.num_pairs,
                   "metrics": m["re-ranked"]}
            line = (f"      T2V R@1 {m['re-ranked']['t2v']['R@1']:.1f} (stage one {m['stage one']['t2v']['R@1']:.1f}), "
                    f"{train_s:.0f}s training, {res.seconds['total']:.0f}s re-ranking")
            if groups is not None:
                acc = within_group(work, test, groups, s1.sim, ckpt, device=config.device, manifest=manifest)
                stage_one_groups = acc["stage one"]
                run["within_group"] = acc["cosine+head"]
                group_results.setdefault(label, []).append(acc["cosine+head"])
                line += "; within group " + ", ".join(f"{a} {v:.0f}" for a, v in acc["cosine+head"].items())
            runs[tag] = run
            echo(line)
    json_path, table = write_report(ablation_table(stage_one_metrics, results, candidates), out_dir, name="ablation",
                                    split=coverage)
    meta = {"store": redact_url(store), "stage_one": s1.info, "split": "test", "k": candidates, "seeds": seeds,
            "device": config.device, "variants": runs}
    if groups is not None:
        _, gtable = write_report(group_table(stage_one_groups, group_results, groups.counts()), out_dir,
                                 name="ablation-groups")
        table += (f"\n\nwithin-group accuracy of cosine + head (% of {groups.captions.size} grouped test captions "
                  f"whose own video scores highest in its group of {groups.group_size}; chance "
                  f"{100 / groups.group_size:.0f}%)\n{gtable}")
        meta["within_group"] = {"stage one": stage_one_groups, "counts": groups.counts()}
    write_text(out_dir / "ablation.runs.json", metrics_to_json(meta) + "\n")
    return json_path, table
