"""The one registry of heads: configs as data, built on demand (open_clip's ``create_model`` /
``list_models`` pattern).

Each entry names its stage (1: a cosine head whose embeddings rank the whole gallery; 2: a pair
scorer that re-ranks stage one's top K), the dimensions it is built for, where its class lives
(imported only when a head is built, so listing heads imports no torch) and what it supports:

* ``text_tokens``: the stage-one head reads the captions' word tokens besides their embeddings
  (batches, evaluation and re-ranking then stage and pass them);
* ``contrastive``: the stage-two head has learnable queries and can be trained with BLIP-2's
  contrastive objective (ITC), after which its score is ITM log-odds + ITC logit;
* ``token_selector``: the stage-two head keeps the M most informative tokens per frame.
* ``blip2_init``: the stage-two head can start from a BLIP-2 Q-Former checkpoint (``--init-from``)
  and read captions through its tokenizer.

Every head's options are the fields of its ``Config`` dataclass (``head_defaults(name)``);
``create_head(name, *dims, **options)`` refuses unknown options naming the known ones, and
``create_head(**head.config())`` rebuilds a head from its saved config.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

from core.errors import UnknownHeadError, UnknownOptionError

STAGE_NAMES = {1: "stage-one", 2: "stage-two"}


@dataclass(frozen=True)
class HeadSpec:
    """One registered head (see the module docstring)."""

    name: str
    stage: int
    target: str  # "module:Class"
    description: str
    supports: frozenset = frozenset()

    @property
    def dims(self) -> tuple[str, ...]:
        """The dimensions a head of this stage is built for (from the store's arrays)."""
        return ("embed_dim",) if self.stage == 1 else ("token_dim", "text_dim")


HEADS: dict[str, HeadSpec] = {spec.name: spec for spec in (
    HeadSpec("meanP", 1, "heads.stage_one.models:MeanP",
             "CLIP4Clip meanP: mean of the frame embeddings (no video-side parameters)"),
    HeadSpec("seqTransf", 1, "heads.stage_one.models:SeqTransf",
             "CLIP4Clip seqTransf: a temporal transformer over the frames, residual from meanP"),
    HeadSpec("clip2video", 1, "heads.stage_one.clip2video:CLIP2Video",
             "CLIP2Video: temporal difference block + temporal alignment block over word tokens",
             frozenset({"text_tokens"})),
    HeadSpec("crosstvr", 2, "heads.stage_two.models:CrossTVR",
             "CrossTVR: decoupled spatial / temporal text-video cross attention with a token selector",
             frozenset({"contrastive", "token_selector", "blip2_init"})),
    HeadSpec("t2v2t", 2, "heads.stage_two.models:T2V2T",
             "T2V2T: text-to-video bypass cross attention, then video-to-text attention"),
)}


def list_heads(stage: int | None = None, supports: str | None = None) -> list[str]:
    """Names of the registered heads, optionally of one stage and with one capability."""
    return [n for n, s in HEADS.items()
            if (stage is None or s.stage == stage) and (supports is None or supports in s.supports)]


def get_spec(name: str, stage: int | None = None) -> HeadSpec:
    """The registry entry of ``name``; ``UnknownHeadError`` naming the known heads (of ``stage``)."""
    spec = HEADS.get(name)
    if spec is None or (stage is not None and spec.stage != stage):
        what = f"{STAGE_NAMES[stage]} head" if stage is not None else "head"
        raise UnknownHeadError(f"unknown {what} {name!r}; known heads: "
                               f"{', '.join(sorted(list_heads(stage), key=str.lower))}")
    return spec


def supports(head: Any, feature: str) -> bool:
    """Whether a head (name, class or instance; anything with a registered ``name``) supports
    ``feature`` (``text_tokens``, ``contrastive``, ``token_selector``, ``blip2_init``)."""
    name = head if isinstance(head, str) else getattr(head, "name", None)
    spec = HEADS.get(name) if isinstance(name, str) else None
    return spec is not None and feature in spec.supports


def head_class(name: str, stage: int | None = None) -> type:
    """The class of head ``name`` (imported now)."""
    module, _, attr = get_spec(name, stage).target.partition(":")
    return getattr(importlib.import_module(module), attr)


def head_defaults(name: str) -> dict[str, Any]:
    """``{option: default}`` of head ``name`` (the fields of its ``Config`` dataclass)."""
    cls = head_class(name)
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls.Config)}


def check_options(name: str, options: dict[str, Any], what: str = "option") -> None:
    """``UnknownOptionError`` naming the head's options when ``options`` has a key its ``Config`` lacks
    (before any work: a command checks its ``--head-option`` values with it)."""
    accepted = [f.name for f in dataclasses.fields(head_class(name).Config)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UnknownOptionError(f"unknown {what}(s) {unknown} for {STAGE_NAMES[get_spec(name).stage]} head "
                                 f"{name!r}; its options: {', '.join(accepted)}")


def create_head(name: str, *dims: int, stage: int | None = None, **kwargs: Any) -> Any:
    """Build head ``name`` for the given dimensions and options.

    ``dims`` are the head's dimensions in order (stage one: ``embed_dim``; stage two: ``token_dim,
    text_dim``), positionally or by name; the other keyword arguments are options of its
    ``Config``. Unknown names raise ``UnknownHeadError``, unknown options ``UnknownOptionError`` (a
    ``ConfigError`` and a ``TypeError``) naming the head's options, missing dimensions ``TypeError``.
    """
    spec = get_spec(name, stage)
    if len(dims) > len(spec.dims):
        raise TypeError(f"head {name!r} takes {len(spec.dims)} dimension(s) {spec.dims}, got {len(dims)}")
    sizes = dict(zip(spec.dims, dims))
    for d in spec.dims[len(dims):]:
        if d not in kwargs:
            raise TypeError(f"head {name!r} needs its dimension {d!r}")
        sizes[d] = kwargs.pop(d)
    check_options(name, kwargs)
    return head_class(name)(*(int(sizes[d]) for d in spec.dims), **kwargs)


# -- presets: a head's options and its training recipe, as data (heads/presets/<name>.json) ---------
def _preset_files() -> dict[str, Any]:
    from importlib import resources

    root = resources.files("heads") / "presets"
    return {f.name[:-5]: f for f in root.iterdir() if f.name.endswith(".json")}


def list_presets() -> list[str]:
    """Names of the shipped presets (``heads/presets/*.json``)."""
    return sorted(_preset_files())


def get_preset(name: str) -> dict[str, Any]:
    """A preset: ``{"description", "head", "head_config", "train"}`` (``train``: trainer options)."""
    import json

    files = _preset_files()
    if name not in files:
        raise UnknownHeadError(f"unknown preset {name!r} (known: {', '.join(sorted(files)) or 'none'})")
    return json.loads(files[name].read_text())
