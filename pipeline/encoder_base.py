"""What every frozen encoder gives the extraction job (docs/ARCHITECTURE.md, "Encoders").

:class:`Encoder` is the interface the extraction job, the probes and the benchmarks use, with the
parts every backend shares: frame preprocessing on the encoder's device (uint8 frames -> resized,
normalised float) and the dimensions read off one forward pass. The backends are
``pipeline.encoders.FrozenEncoder`` (open_clip) and ``pipeline.blip2_encoder.Blip2Encoder``
(a Hugging Face BLIP-2 directory); ``pipeline.encoders.load_encoder`` is the one registry.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import EncoderError, UsageError
from core.identity import EXTRACTION_KEY, without_extraction  # noqa: F401  (re-exported)

RESIZE_MODES = ("short_crop", "square")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
def resolve_precision(precision: str | None, device: str | torch.device) -> str:
    """``auto`` (or None) -> ``bf16`` on CUDA, ``fp32`` elsewhere; ``bf16`` / ``fp16`` / ``fp32`` as given."""
    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if p == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return p


def resize_short_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,3,H,W) float so the shorter side is ``size`` (bicubic, antialiased), then
    center-crop to ``size`` x ``size`` (CLIP's preprocessing)."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,3,H,W) float to ``size`` x ``size`` (bicubic, antialiased; the aspect ratio is not
    kept, as BLIP / BLIP-2's image processors do)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)


class Encoder(ABC):
    """A frozen image-text encoder: visual tokens and a pooled embedding per frame, word tokens and
    a pooled embedding per caption.

    Attributes every backend sets: ``spec`` (what was asked for; ``spec.short_name()`` names
    files), ``device``, ``dtype``, ``image_size``, ``mean``, ``std``, ``resize`` (one of
    :data:`RESIZE_MODES`), ``context_length``; :meth:`probe_dims` sets ``num_tokens``,
    ``token_dim``, ``embed_dim`` and ``text_dim``. Embeddings are returned **not** L2-normalised
    (heads normalise).
    """

    spec: Any
    device: torch.device
    dtype: torch.dtype
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: str = "short_crop"
    context_length: int
    num_tokens: int
    token_dim: int
    embed_dim: int
    text_dim: int
    precision: str = "fp32"  # the compute precision (set_precision): fp32, or bf16 / fp16 autocast

    # -- compute precision ----------------------------------------------------------------
    def set_precision(self, precision: str | None) -> str:
        """Run the encoders under ``precision`` (:data:`PRECISIONS`; ``auto``: bf16 on CUDA, fp32
        elsewhere): bf16 / fp16 are autocast (weights stay as loaded), fp32 runs as loaded."""
        self.precision = resolve_precision(precision, self.device)
        return self.precision

    def autocast(self) -> AbstractContextManager:
        """The context the forward passes run in: autocast to bf16 / fp16, or nothing for fp32."""
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.precision])

    def compile(self) -> None:
        """``torch.compile`` the image encoder (``encode_images``) of this instance."""
        if getattr(self, "_compiled", False):
            return
        self.encode_images = torch.compile(self.encode_images)  # type: ignore[method-assign]
        self._compiled = True

    def set_image_format(self, image_size: int, mean: Any, std: Any, resize: str) -> None:
        """The preprocessing: square side, per-channel mean / std (of [0, 1] pixels), resize mode."""
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.image_size = int(image_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3:
            raise EncoderError(f"{self.spec}: expected 3 channel means and stds, got {self.mean} / {self.std}")
        self.resize = resize
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)

    def probe_dims(self) -> None:
        """Set ``num_tokens``, ``token_dim``, ``embed_dim``, ``text_dim`` from one frame and one text;
        the image and text embeddings must share one space."""
        with torch.no_grad():
            tok, emb = self.encode_frames(torch.zeros(1, self.image_size, self.image_size, 3,
                                                      dtype=torch.uint8))
            ttok, _, temb = self.encode_texts(["a"], max_tokens=self.context_length)
        self.num_tokens = int(tok.shape[1])
        self.token_dim = int(tok.shape[2])
        self.embed_dim = int(emb.shape[1])
        self.text_dim = int(ttok.shape[2])
        if temb.shape[1] != self.embed_dim:
            raise EncoderError(f"{self.spec}: image embed {self.embed_dim} != text embed {temb.shape[1]}")

    # -- images ---------------------------------------------------------------------------
    def preprocess(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) uint8 (any device) -> (N,3,S,S) normalised float on the encoder device.

        The resize (when the frames' shorter side is not the encoder's size), crop and
        normalisation run on the encoder's device, in float32 whatever the compute precision;
        frames a decoder already brought to the size (PIL bicubic) are only cropped. A pinned
        host tensor is copied without blocking."""
        if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
            raise ValueError(f"expected frames (N,H,W,3), got {tuple(frames_uint8.shape)}")
        x = torch.as_tensor(frames_uint8).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if self.resize == "square":
            x = resize_square(x, self.image_size)
        else:
            x = resize_short_crop(x, self.image_size)
        x = x.clamp_(0, 255) / 255.0
        x = (x - self._mean_t) / self._std_t
        return x.to(self.dtype).contiguous()

    @abstractmethod
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (N,3,S,S) -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""

    @torch.no_grad()
    def encode_frames(self, frames_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,H,W,3) uint8 frames -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""
        return self.encode_images(self.preprocess(torch.as_tensor(frames_uint8)))

    # -- texts ----------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (C, L) on the encoder device."""

    @abstractmethod
    def encode_texts(self, texts: list[str], max_tokens: int = 32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts -> (tokens (C,max_tokens,text_dim), mask (C,max_tokens) bool, emb (C,embed_dim))."""

    # -- identity -------------------------------------------------------------------------
    @abstractmethod
    def identity(self) -> dict:
        """JSON-serialisable description of what produced the features (no local paths)."""

    def store_identity(self, resize: str) -> dict:
        """The identity a store of this encoder records: :meth:`identity` plus, under
        :data:`EXTRACTION_KEY`, the compute precision (:meth:`set_precision`) and ``resize`` (where
        the frames were resized: ``worker``, ``device``, or the decoders' size and then the device),
        so that a store is never grown or finished with features computed another way."""
        return {**self.identity(), EXTRACTION_KEY: {"precision": self.precision, "resize": str(resize)}}
