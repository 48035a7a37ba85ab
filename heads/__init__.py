"""Trainable heads over cached frozen-encoder features, and everything that uses them.

``heads.registry`` is the one registry (``create_head``, ``list_heads``); ``heads.stage_one`` holds
the cosine heads and their trainer, ``heads.stage_two`` the re-ranking heads, their training and
their pair scoring, ``heads.training`` what both trainers share, ``heads.evaluation`` similarity,
metrics reports, post-processing, re-ranking and external stage ones (docs/ARCHITECTURE.md).
"""

from heads.registry import HEADS, create_head, get_spec, head_defaults, list_heads, supports

__all__ = ["HEADS", "create_head", "get_spec", "head_defaults", "list_heads", "supports"]
