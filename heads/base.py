"""What every trainable head declares about itself (the model owns what only it knows).

A head is an ``nn.Module`` with a registry ``name``, a ``Config`` dataclass of its options (the
registry builds heads from configs as data, ``heads.registry.create_head``), ``config()`` (the
JSON-able keyword arguments that rebuild it) and the names of its parameters that must not decay
(``no_weight_decay``: fnmatch patterns; vectors and scalars never decay), from which
``optim_groups`` makes the optimiser's parameter groups for every trainer.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any, ClassVar

from torch import nn


class Head(nn.Module):
    """Base of stage-one and stage-two heads (see the module docstring)."""

    name: ClassVar[str] = "base"
    Config: ClassVar[type]
    no_weight_decay: ClassVar[tuple[str, ...]] = ()

    def optim_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: weight decay on weight matrices, none on vectors, scalars and the
        parameters named by ``no_weight_decay``; a parameter shared by two modules appears once."""
        decay, no_decay, seen = [], [], set()
        for name, p in self.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            exempt = p.ndim < 2 or any(fnmatchcase(name, pattern) for pattern in self.no_weight_decay)
            (no_decay if exempt else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def num_parameters(self) -> int:
        """Number of distinct trainable parameters (shared tensors counted once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def config(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this head with ``create_head(**config)``."""
        raise NotImplementedError
