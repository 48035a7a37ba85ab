"""The stage-two training config: every option of a run, as data (torch-free, so the command line
builds its options from it without importing torch), and the rules that resolve its head-dependent
defaults and read arguments saved by earlier versions."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from core.errors import ConfigError, UsageError
from core.fileio import jsonable
from core.split import Split
from heads.evaluation.rerank import DIRECTIONS
from heads.registry import get_spec, list_heads, supports

HARD_NEGATIVE_MODES = ("random", "hard", "anneal")
NEGATIVE_SOURCES = ("text", "video", "mixed")
ITC_DEFAULTS = {"itc_steps": 1200, "itc_weight": 1.0}  # for heads that support contrastive training
DEFAULT_ITC_DIM = 128   # width of the contrastive projection of a head trained with ITC
# arguments added after runs were first saved: a saved state without them ran with these values
_ARG_DEFAULTS = {"rank_weight": 0.0, "itc_steps": 0, "itc_batch": 64, "itc_cluster": 1, "itc_lr": 5e-4,
                 "itc_weight": 0.0, "init_from": None, "tokenizer": None, "reinit_visual_kv": False, "text_len": 32,
                 "neg_source": "text", "neg_video_pool": 4, "val_directions": "t2v"}
PRECISIONS = ("auto", "bf16", "fp32")  # no fp16: training in it would need loss scaling
# arguments renamed since runs were first saved: old name -> today's (values too, where they changed)
_RENAMED_ARGS = {"amp": "precision", "val_k": "val_candidates"}
_RENAMED_VALUES = {"precision": {"off": "fp32"}}


def check_directions(directions: str) -> tuple[str, ...]:
    """The re-ranking directions named by ``directions`` (``"t2v"``, ``"v2t"`` or ``"t2v,v2t"``), in
    their usual order, or ``ValueError`` naming the bad value."""
    names = [d.strip() for d in str(directions).split(",") if d.strip()]
    if not names or len(set(names)) != len(names) or set(names) - set(DIRECTIONS):
        raise ValueError(f"val_directions must be t2v, v2t or t2v,v2t, got {directions!r}")
    return tuple(d for d in DIRECTIONS if d in names)


def _opt(default: Any, help: str, resume_free: bool = False, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, "resume_free": resume_free}, **kw)


@dataclass
class StageTwoTrainConfig:
    """Everything that decides a stage-two training run. ``help`` metadata is the CLI's option help;
    ``resume_free`` fields may differ between an interrupted run and its continuation."""

    head: str = _opt("crosstvr", "Stage-two head (`python cli.py heads`).")
    head_config: dict = field(default_factory=dict, metadata={"help": "Head options (its Config fields).",
                                                               "resume_free": False})
    epochs: int = _opt(6, "ITM epochs.")
    batch_size: int = _opt(32, "Positive pairs per ITM step (x3 with negatives).")
    lr: float = _opt(5e-4, "Peak learning rate of the ITM phase.")
    weight_decay: float = _opt(0.05, "AdamW weight decay.")
    warmup: float = _opt(0.1, "Warm-up: a fraction of the ITM steps (< 1) or steps.")
    hard_negatives: str = _opt("anneal", "anneal: random in-batch negatives only for the first --anneal-start "
                               "of the steps, then a linear rise to hard ones (stage-one softmax) over the "
                               "next --anneal share; hard; random.")
    anneal_start: float = _opt(0.4, "Share of steps with random negatives only.")
    anneal: float = _opt(0.3, "Share of steps over which hard negatives rise to 100%.")
    neg_temperature: float = _opt(0.05, "Temperature of the stage-one softmax hard negatives are drawn from.")
    neg_pool: int | None = _opt(128, "Hard negatives come from this many most similar candidates.")
    neg_source: str = _opt("text", "Which stage-one similarity hard negatives are drawn from: text (caption to "
                           "video), video (video to video: a caption's negative is one of its video's nearest "
                           "videos, a video's negative a caption of one of them; finds near-duplicates), mixed "
                           "(each hard negative from either, at even odds).")
    neg_video_pool: int = _opt(4, "With --neg-source video or mixed: the video-to-video draw's pool of nearest "
                               "videos.")
    rank_weight: float = _opt(0.0, "Weight of a pairwise ranking term added to ITM: each positive's cosine + "
                              "head score must beat its negatives' (0 = ITM only).")
    itc_steps: int | None = _opt(None, "Steps of contrastive (ITC, BLIP-2 stage one) pre-training before ITM "
                                 f"[default: {ITC_DEFAULTS['itc_steps']} for heads that support it, else 0].")
    itc_batch: int = _opt(64, "Videos per contrastive step.")
    itc_cluster: int = _opt(1, "Contrastive batches built from clusters of this many stage-one neighbours "
                            "(1 = random).")
    itc_lr: float = _opt(5e-4, "Peak learning rate of the contrastive phase.")
    itc_weight: float | None = _opt(None, "Weight of the positives' contrastive loss added to ITM, as BLIP-2 "
                                    f"trains both [default: {ITC_DEFAULTS['itc_weight']:g} for heads that "
                                    "support it, else 0]. With either, the head scores a pair by ITM + ITC.")
    init_from: str | None = _opt(None, "Initialise the head from a BLIP-2 checkpoint: a Hugging Face-format "
                                 "directory (Blip2ForImageTextRetrieval.save_pretrained) or a LAVIS .pth; the "
                                 "head takes its Q-Former's layout and reads captions through its tokenizer.")
    tokenizer: str | None = _opt(None, "Directory of the caption tokenizer of a head that reads caption ids "
                                 "[default: the --init-from directory].")
    reinit_visual_kv: bool = _opt(False, "With --init-from: re-initialise the cross attention's visual key/value "
                                  "projections when the cached tokens' width differs from the Q-Former's.")
    text_len: int = _opt(32, "Caption length in tokens of a head that reads caption ids.")
    precision: str = _opt("auto", "Compute precision of the training forward passes: auto (bf16 autocast on CUDA, "
                          "fp32 elsewhere), bf16 (autocast) or fp32.", resume_free=True)
    grad_checkpoint: bool = _opt(False, "Recompute the Q-Former layers' activations in the backward pass "
                                 "(less memory, ~30% more time).", resume_free=True)
    val_candidates: int = _opt(15, "Stage-one candidates re-ranked per val query for model selection (the "
                               "re-ranking's K).")
    val_directions: str = _opt("t2v,v2t", "Directions whose mean re-ranked val R@1 selects the epoch: t2v, v2t "
                               "or t2v,v2t.")
    val_queries: int = _opt(256, "Val captions (and, for V2T, val videos) used for model selection (0: all).")
    seed: int = _opt(0, "Seed of initialisation, batches and negatives.")
    device: str = _opt("cpu", "Torch device.", resume_free=True)
    max_steps: int | None = _opt(None, "Stop after this many steps in all (resumable: run again to continue).",
                                 resume_free=True)
    num_threads: int | None = _opt(None, "Torch CPU threads (default: all cores).", resume_free=True)
    prefetch: int = _opt(2, "Batches read ahead in a thread.", resume_free=True)
    eval_batch: int = _opt(128, "Pairs per forward pass in validation.", resume_free=True)
    progress: bool = _opt(True, "Show progress bars.", resume_free=True)

    def resolved(self) -> "StageTwoTrainConfig":
        """This config with the head-dependent defaults filled in (``itc_steps`` / ``itc_weight``)
        and checked; ``ConfigError`` for an impossible combination."""
        spec = get_spec(self.head, stage=2)
        contrastive = "contrastive" in spec.supports
        steps = (ITC_DEFAULTS["itc_steps"] if contrastive else 0) if self.itc_steps is None else int(self.itc_steps)
        weight = ((ITC_DEFAULTS["itc_weight"] if contrastive else 0.0) if self.itc_weight is None
                  else float(self.itc_weight))
        if steps < 0 or weight < 0:
            raise ConfigError(f"itc_steps and itc_weight must be >= 0, got {steps} and {weight}")
        if (steps > 0 or weight > 0) and not contrastive:
            raise ConfigError(f"contrastive training (itc_steps / itc_weight) needs a head with learnable queries "
                              f"({', '.join(list_heads(stage=2, supports='contrastive'))}), not {self.head!r}: use "
                              f"itc_steps=0, itc_weight=0")
        if self.hard_negatives not in HARD_NEGATIVE_MODES:
            raise ConfigError(f"hard_negatives must be one of {HARD_NEGATIVE_MODES}, got {self.hard_negatives!r}")
        if self.neg_source not in NEGATIVE_SOURCES:
            raise ConfigError(f"neg_source must be one of {NEGATIVE_SOURCES}, got {self.neg_source!r}")
        if self.neg_video_pool < 1:
            raise ConfigError(f"neg_video_pool must be >= 1, got {self.neg_video_pool}")
        try:
            check_directions(self.val_directions)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.init_from and not supports(self.head, "blip2_init"):
            raise ConfigError(f"--init-from loads a BLIP-2 Q-Former into a head that can take it "
                              f"({', '.join(list_heads(stage=2, supports='blip2_init'))}), not {self.head!r}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2 (random negatives come from the batch), got {self.batch_size}")
        return replace(self, itc_steps=steps, itc_weight=weight, head_config=dict(self.head_config or {}))

    def build_options(self) -> dict:
        """The options the head is built with: ``head_config`` plus the contrastive projection's width
        when the run trains with ITC."""
        options = dict(self.head_config or {})
        if (self.itc_steps or 0) > 0 or (self.itc_weight or 0) > 0:
            options.setdefault("itc_dim", DEFAULT_ITC_DIM)
        return options

    def reads_caption_ids(self) -> bool:
        """Whether the head reads captions as token ids of its own tokenizer (a BLIP-2-initialised
        head does) rather than the store's text tokens."""
        return (self.head_config or {}).get("text_input", "ids" if self.init_from else "tokens") == "ids"

    def train_args(self, train: Split, val: Split | None, stage_one_sha256: str) -> dict:
        """The run's identity as saved in its checkpoint and resume state."""
        args = asdict(self)
        args.pop("progress")
        args.pop("eval_batch")
        args.update(train_split=str(train.split), val_split=None if val is None else str(val.split),
                    store_fingerprint=str(train.store_fingerprint), stage_one_sha256=stage_one_sha256)
        return jsonable(args)


RESUME_FREE = frozenset(f.name for f in StageTwoTrainConfig.__dataclass_fields__.values()
                        if f.metadata.get("resume_free"))


def upgrade_args(args: dict) -> dict:
    """Training arguments saved by earlier versions, in today's names and with the values runs
    saved before an argument existed ran with."""
    args = {**_ARG_DEFAULTS, **args}
    if "head_cfg" in args:
        args["head_config"] = args.pop("head_cfg")
    return upgrade_names(args)


def upgrade_names(options: dict) -> dict:
    """``options`` (training arguments or a run.json's options) with renamed arguments under
    today's names and values (``amp=off`` is ``precision=fp32``)."""
    out = {}
    for key, value in options.items():
        key = _RENAMED_ARGS.get(key, key)
        out[key] = _RENAMED_VALUES.get(key, {}).get(value, value) if isinstance(value, str) else value
    return out


def with_switches(head: str, head_config: dict, mode: str | None = None, shared: bool | None = None,
                  num_selected: int | None = None) -> dict:
    """``head_config`` with the command line's CrossTVR switches (``--mode``, ``--shared`` / ``--no-shared``,
    ``--num-selected``) folded in; ``UsageError`` when they are given for another head."""
    switches = {k: v for k, v in (("mode", mode), ("shared", shared), ("num_selected", num_selected))
                if v is not None}
    if switches and head != "crosstvr":
        raise UsageError("--mode, --shared / --no-shared and --num-selected apply to --head crosstvr only")
    return {**head_config, **switches}


# The stage-two ablation: name -> (table label, head, head options, trainer options of the variant).
ABLATION_VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "spatial": ("+spatial", "crosstvr", {"mode": "spatial"}, {}),
    "temporal": ("+temporal", "crosstvr", {"mode": "temporal"}, {}),
    "both": ("both (shared)", "crosstvr", {}, {}),
    "both-unshared": ("both (unshared)", "crosstvr", {"shared": False}, {}),
    "both-itm-only": ("both (shared), ITM only", "crosstvr", {}, {"itc_steps": 0, "itc_weight": 0.0}),
    "t2v2t": ("T2V2T", "t2v2t", {}, {}),
}
