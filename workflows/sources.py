"""Where a command's manifest comes from: a manifest directory, or a registered dataset built now."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ManifestSource:
    """The manifest-source options of a command (``--manifest`` / ``--dataset`` with ``--annotations``,
    ``--videos``, ``--data-root`` and the builder's ``--option`` values), as ``workflows.data.load_manifest``
    reads them."""

    dataset: str | None = None
    manifest: str | Path | None = None
    annotations: str | Path | None = None
    videos: str | Path | None = None
    data_root: str | Path | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def given(self) -> bool:
        """Whether a manifest or a dataset was named."""
        return bool(self.manifest or self.dataset)
