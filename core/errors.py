"""One exception hierarchy for the project.

Every error a user can cause and fix (a wrong path, a store made by another encoder, a test split
handed to a trainer, a run directory holding another run, a malformed import) derives from
:class:`CrossTVRError`; the command line turns those into one clear line and a non-zero exit.
They also derive from the builtin a caller would expect (``ValueError``, ``KeyError``), so
``except ValueError`` keeps working.

``manifests/`` imports nothing of ours, so its ``ManifestError`` and ``UnknownDatasetError``
derive from ``ValueError`` only; the command line catches them beside this hierarchy.
"""

from __future__ import annotations


class CrossTVRError(Exception):
    """Base of every error of this project that names what to fix."""


class StoreError(CrossTVRError, ValueError):
    """A path is not a feature cache of this schema, or the cache cannot serve a request."""


class StoreMismatchError(StoreError):
    """Two things that must come from one store (or one encoder) do not: an existing store made for
    another request, a checkpoint trained on another encoder's features, splits of two stores."""


class ForbiddenSplitError(CrossTVRError, ValueError):
    """A test split was handed to a trainer (training and model selection never see test)."""


class RunMismatchError(CrossTVRError, ValueError):
    """An output directory holds a run of other arguments (or another stage one / store)."""


class CheckpointError(CrossTVRError, ValueError):
    """A file is not a checkpoint of the expected kind."""


class ConfigError(CrossTVRError, ValueError):
    """A run configuration (``--config run.json``, head options) cannot be used."""


class UnknownOptionError(ConfigError, TypeError):
    """An option a component does not have: a head's (``--head-option``, a preset, a config) or the
    synthetic encoder's pretraining (``pretrain-encoder --option``)."""


class ExternalFormatError(CrossTVRError, ValueError):
    """An external stage-one file or directory is unreadable, malformed or does not fit the split."""


class EncoderError(CrossTVRError, ValueError):
    """An encoder spec cannot be parsed or its weights cannot be loaded."""


class ExtractionError(CrossTVRError):
    """An extraction finished with more failed videos in a store than tolerated."""


class IncompleteSplitError(CrossTVRError, ValueError):
    """Metrics were asked for on a split some of whose videos (or captions) are missing from the store."""


class UnknownHeadError(CrossTVRError, KeyError):
    """A head name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class UsageError(CrossTVRError, ValueError):
    """A command was given an option or input it cannot work with (the command line exits 2)."""
