"""Trainable heads over cached frozen-encoder features.

``STAGE_ONE`` maps head names to classes; ``build_stage_one(name, embed_dim, **cfg)`` builds one.
The registry is resolved lazily so that ``import heads.metrics`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from heads.stage_one import StageOneHead

__all__ = ["STAGE_ONE", "UnknownHeadError", "build_stage_one", "StoreMismatchError"]


class UnknownHeadError(KeyError):
    """A head name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


def _stage_one_registry() -> dict[str, type]:
    from heads.clip2video import CLIP2Video
    from heads.stage_one import MeanP, SeqTransf

    return {"meanP": MeanP, "seqTransf": SeqTransf, "clip2video": CLIP2Video}


def build_stage_one(name: str, embed_dim: int, **cfg: Any) -> "StageOneHead":
    """Build the stage-one head ``name`` for ``embed_dim``-d embeddings (``cfg``: its options)."""
    registry = _stage_one_registry()
    if name not in registry:
        raise UnknownHeadError(f"unknown stage-one head {name!r}; known heads: {', '.join(sorted(registry))}")
    cls = registry[name]
    import inspect

    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "embed_dim")]
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for stage-one head {name!r}; its options: {', '.join(accepted)}")
    return cls(embed_dim, **cfg)


def __getattr__(attr: str) -> Any:
    if attr == "STAGE_ONE":
        return _stage_one_registry()
    if attr == "StoreMismatchError":
        from heads.train import StoreMismatchError

        return StoreMismatchError
    raise AttributeError(f"module 'heads' has no attribute {attr!r}")
