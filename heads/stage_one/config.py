"""The stage-one training config: every option of a run, as data (torch-free, so the command line
builds its options from it without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

# fields of the config that do not change what is trained (not compared when a run is reused)
RUN_ONLY = ("num_threads", "prefetch", "progress")


@dataclass
class StageOneTrainConfig:
    """Everything that decides a stage-one training run (``help`` metadata: the CLI's option help)."""

    head: str = field(default="seqTransf", metadata={"help": "Stage-one head (`python cli.py heads`)."})
    head_config: dict = field(default_factory=dict, metadata={"help": "Head options (its Config fields)."})
    epochs: int = field(default=10, metadata={"help": "Training epochs."})
    batch_size: int = field(default=128, metadata={"help": "Videos per batch (one caption each)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay."})
    warmup: float = field(default=0.1, metadata={"help": "Warm-up: a fraction of all steps (< 1) or steps."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and batches."})
    device: str = field(default="cpu", metadata={"help": "Torch device."})
    num_threads: int | None = field(default=None, metadata={"help": "Torch CPU threads (default: all cores)."})
    prefetch: int = field(default=2, metadata={"help": "Batches read ahead in a thread."})
    progress: bool = field(default=True, metadata={"help": "Show a progress bar."})
