"""Encoder identities as heads compare them: what made the features, apart from how a store computed them."""

from __future__ import annotations

# The key a store's encoder identity adds to ``Encoder.identity()``: how the extraction computed the
# features ({"precision": fp32 / bf16 / fp16, "resize": where frames were resized}); stores made before
# it lack the key (docs/ARCHITECTURE.md, "Encoders"). A store refuses to be grown or finished with
# another; a head trained on one store's features is accepted on another's that differs only there.
EXTRACTION_KEY = "extraction"


def without_extraction(identity: dict) -> dict:
    """An encoder identity without what the extraction added (:data:`EXTRACTION_KEY`): the encoder
    itself, as ``Encoder.identity()`` gives it."""
    return {k: v for k, v in identity.items() if k != EXTRACTION_KEY}
