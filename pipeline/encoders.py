"""Frozen image-text encoders built from open_clip (docs/ARCHITECTURE.md, "Encoders").

An :class:`EncoderSpec` names an open_clip architecture and its weights: an open_clip pretrained
tag (``openai``, ``laion400m_s11b_b41k``, ...), a local checkpoint path (a ``state_dict`` saved
with ``torch.save``) or ``None`` for random weights (initialised under a fixed torch seed, so the
same spec always gives the same weights). :func:`load_encoder` builds a :class:`FrozenEncoder`.

Conventions of the outputs:

* ``encode_frames`` -> visual tokens = CLS + patch tokens *before* the projection, after the
  final norm (``ln_post`` for open_clip's own VisionTransformer; ``trunk.forward_features`` for
  timm trunks such as EVA01-g-14), and the projected frame embedding, **not** L2-normalised
  (it equals ``model.encode_image(x)``; heads normalise).
* ``encode_texts`` -> text tokens after ``ln_final`` truncated to ``max_tokens`` positions with a
  validity mask (``True`` for real tokens incl. start/end-of-text), and the projected text
  embedding computed from the full context, **not** L2-normalised (equals ``model.encode_text``).

The JSON configs in ``pipeline/model_configs/`` are registered with open_clip on first use only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import EncoderError
from core.fileio import sha256_file

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
RANDOM_INIT_SEED = 0
_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_configs_registered = False


def register_model_configs() -> None:
    """Add ``pipeline/model_configs/*.json`` to open_clip's registry (once per process)."""
    global _configs_registered
    if _configs_registered:
        return
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _configs_registered = True


def is_checkpoint_path(pretrained: str | None) -> bool:
    """Whether ``pretrained`` names a local file rather than an open_clip tag."""
    if not pretrained:
        return False
    return (os.sep in pretrained or "/" in pretrained or pretrained.startswith(".")
            or pretrained.endswith(_CKPT_SUFFIXES) or Path(pretrained).is_file())


@dataclass(frozen=True)
class EncoderSpec:
    """An open_clip architecture name and its weights (tag, checkpoint path or None = random)."""

    model: str
    pretrained: str | None = None

    @property
    def is_checkpoint(self) -> bool:
        return is_checkpoint_path(self.pretrained)

    def short_name(self) -> str:
        """A readable name for file names: ``model`` + tag, or + checkpoint file stem."""
        if not self.pretrained:
            return f"{self.model}-random"
        if self.is_checkpoint:
            return f"{self.model}-{Path(self.pretrained).stem}"
        return f"{self.model}-{self.pretrained}"

    def __str__(self) -> str:
        return self.model if not self.pretrained else f"{self.model}:{self.pretrained}"


PRESETS: dict[str, EncoderSpec] = {
    "clip-b32": EncoderSpec("ViT-B-32", "openai"),
    "eva-g14": EncoderSpec("EVA01-g-14", "laion400m_s11b_b41k"),
    # The synthetic world's own small CLIP; its checkpoint path is given as `synth-b32-tiny:PATH`.
    "synth-b32-tiny": EncoderSpec("synth-vit-b32-tiny", None),
}


def parse_encoder(text: str) -> EncoderSpec:
    """Parse ``preset``, ``preset:weights``, ``model``, ``model:tag`` or ``model:/path/ckpt.pt``.

    A bare model name means random weights. ``hf-hub:`` model names are kept whole.
    """
    text = text.strip()
    if not text:
        raise EncoderError("empty encoder spec")
    if text in PRESETS:
        return PRESETS[text]
    if text.startswith("hf-hub:"):
        return EncoderSpec(text, None)
    name, sep, weights = text.partition(":")
    if not sep:
        return EncoderSpec(name, None)
    if not weights:
        raise EncoderError(f"encoder spec {text!r}: nothing after ':'")
    model = PRESETS[name].model if name in PRESETS else name
    return EncoderSpec(model, weights)


def _resize_short_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (N,3,H,W) float so the shorter side is ``size`` (bicubic, antialiased), then
    center-crop to ``size`` x ``size``."""
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        h, w = nh, nw
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top:top + size, left:left + size]


class FrozenEncoder:
    """An open_clip model in eval mode with token-level image and text encoders."""

    def __init__(self, spec: EncoderSpec, model: torch.nn.Module, tokenizer: Any,
                 device: str | torch.device = "cpu") -> None:
        import open_clip

        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = next(model.parameters()).dtype
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", getattr(model.visual, "image_size", 224))
        if isinstance(size, (tuple, list)):
            if size[0] != size[1]:
                raise EncoderError(f"{spec}: non-square image size {size} is not supported")
            size = size[0]
        self.image_size: int = int(size)
        self.mean: tuple[float, ...] = tuple(float(v) for v in cfg["mean"])
        self.std: tuple[float, ...] = tuple(float(v) for v in cfg["std"])
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self._timm = hasattr(model.visual, "trunk")
        self._text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower here
        if self._text is not None and not hasattr(self._text, "ln_final"):
            raise EncoderError(f"{spec}: text tower {type(self._text).__name__} is not supported "
                               f"(need open_clip's TextTransformer)")
        self.context_length: int = int(getattr(model, "context_length", 77))
        self._causal_only = self._text_is_causal_only()
        with torch.no_grad():
            tok, emb = self.encode_frames(torch.zeros(1, self.image_size, self.image_size, 3,
                                                      dtype=torch.uint8))
            ttok, _, temb = self.encode_texts(["a"], max_tokens=self.context_length)
        self.num_tokens: int = int(tok.shape[1])
        self.token_dim: int = int(tok.shape[2])
        self.embed_dim: int = int(emb.shape[1])
        self.text_dim: int = int(ttok.shape[2])
        if temb.shape[1] != self.embed_dim:
            raise EncoderError(f"{spec}: image embed {self.embed_dim} != text embed {temb.shape[1]}")

    def _text_is_causal_only(self) -> bool:
        """Whether the text tower attends with a causal mask only (no padding mask / cls)."""
        t = self._text if self._text is not None else self.model
        if getattr(t, "attn_mask", None) is None:
            return False
        if self._text is not None and (getattr(t, "use_pad_mask", False)
                                       or getattr(t, "cls_emb", None) is not None):
            return False
        pool = getattr(t, "pool_type", getattr(t, "text_pool_type", "argmax"))
        return pool in ("argmax", "eos", "first")

    # -- identity -------------------------------------------------------------------------
    def identity(self) -> dict:
        """JSON-serialisable description of what produced the features (no local paths)."""
        p = self.spec.pretrained
        if not p:
            weights = {"kind": "random", "seed": RANDOM_INIT_SEED}
        elif self.spec.is_checkpoint:
            weights = {"kind": "checkpoint", "sha256": sha256_file(p)}
        else:
            weights = {"kind": "open_clip", "tag": p}
        return {"name": self.spec.model, "weights": weights, "image_size": self.image_size,
                "mean": list(self.mean), "std": list(self.std), "num_tokens": self.num_tokens,
                "token_dim": self.token_dim, "embed_dim": self.embed_dim,
                "text_dim": self.text_dim, "context_length": self.context_length,
                "tokens": "cls+patches after final norm, before projection",
                "emb": "projected, not normalised"}

    # -- images ---------------------------------------------------------------------------
    def preprocess(self, frames_uint8: torch.Tensor) -> torch.Tensor:
        """(N,H,W,3) uint8 (any device) -> (N,3,S,S) normalised float on the encoder device."""
        if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
            raise ValueError(f"expected frames (N,H,W,3), got {tuple(frames_uint8.shape)}")
        x = torch.as_tensor(frames_uint8).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = _resize_short_crop(x, self.image_size).clamp_(0, 255) / 255.0
        x = (x - self._mean_t) / self._std_t
        return x.to(self.dtype).contiguous()

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (N,3,S,S) -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""
        visual = self.model.visual
        x = x.to(self.device, self.dtype)
        if self._timm:
            tokens = visual.trunk.forward_features(x)
            emb = visual.head(visual.trunk.forward_head(tokens))
            return tokens, emb
        h = visual._embeds(x)
        h = visual.transformer(h)
        pooled, _ = visual._pool(h)
        tokens = visual.ln_post(h)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return tokens, pooled

    @torch.no_grad()
    def encode_frames(self, frames_uint8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,H,W,3) uint8 frames -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""
        return self.encode_images(self.preprocess(torch.as_tensor(frames_uint8)))

    # -- texts ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (C, context_length)."""
        return self.tokenizer(list(texts)).to(self.device)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_tokens: int = 32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts -> (tokens (C,max_tokens,text_dim), mask (C,max_tokens) bool, emb (C,embed_dim)).

        Tokens are taken after ``ln_final`` from a pass over the full context (so ``emb`` equals
        the model's own ``encode_text``); positions past ``max_tokens`` are dropped.
        """
        from open_clip.transformer import text_global_pool

        ids = self.tokenize(texts)
        # With a purely causal mask, positions after the last real token do not change earlier
        # ones: run only up to the longest text (or max_tokens), identical results, much faster.
        keep = ids.shape[1]
        if self._causal_only and ids.shape[0]:
            longest = int((ids != 0).sum(dim=1).max())
            keep = min(ids.shape[1], max(longest, max_tokens, 1))
        run = ids[:, :keep]
        if self._text is not None:
            t = self._text
            if getattr(t, "cls_emb", None) is not None:
                raise EncoderError(f"{self.spec}: text towers with a class token are not supported")
            x, attn_mask = t._embeds(run)
            if attn_mask is not None and attn_mask.ndim == 2:
                attn_mask = attn_mask[:keep, :keep]
            x = t.transformer(x, attn_mask=attn_mask)
            x = t.ln_final(x)
            pooled = text_global_pool(x, run, pool_type=t.pool_type,
                                      eos_token_id=getattr(t, "eos_id", None))
            proj = t.text_projection
        else:
            m = self.model
            attn_mask = m.attn_mask[:keep, :keep] if m.attn_mask is not None else None
            x = m.token_embedding(run).to(self.dtype)
            x = x + m.positional_embedding[:keep].to(self.dtype)
            x = m.transformer(x, attn_mask=attn_mask)
            x = m.ln_final(x)
            pooled = text_global_pool(x, run, m.text_pool_type,
                                      eos_token_id=getattr(m, "text_eos_id", None))
            proj = m.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        mask = ids[:, :max_tokens] != 0
        tokens = x[:, :max_tokens]
        if tokens.shape[1] < max_tokens:  # context shorter than max_tokens: pad
            pad = max_tokens - tokens.shape[1]
            tokens = F.pad(tokens, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        return tokens, mask, pooled


def load_encoder(spec: EncoderSpec | str, device: str | torch.device = "cpu") -> FrozenEncoder:
    """Build the frozen encoder for ``spec`` (a spec or a string for :func:`parse_encoder`)."""
    import open_clip

    if isinstance(spec, str):
        spec = parse_encoder(spec)
    register_model_configs()
    if spec.model not in open_clip.list_models() and not spec.model.startswith("hf-hub:"):
        raise EncoderError(f"unknown open_clip model {spec.model!r} (registered configs in "
                           f"{MODEL_CONFIG_DIR} and open_clip's own)")
    pretrained = spec.pretrained
    if spec.is_checkpoint and not Path(pretrained).is_file():
        raise EncoderError(f"{spec}: checkpoint file {pretrained} does not exist")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model = open_clip.create_model(spec.model, pretrained=pretrained or None,
                                           device=device)
    except RuntimeError as exc:
        raise EncoderError(f"cannot load encoder {spec}: {exc}") from exc
    tokenizer = open_clip.get_tokenizer(spec.model)
    return FrozenEncoder(spec, model, tokenizer, device=device)
