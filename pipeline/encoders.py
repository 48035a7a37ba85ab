"""The registry of frozen image-text encoders (docs/ARCHITECTURE.md, "Encoders").

An :class:`EncoderSpec` names an open_clip architecture and its weights: an open_clip pretrained
tag (``openai``, ``laion400m_s11b_b41k``, ...), a local checkpoint path (a ``state_dict`` saved
with ``torch.save``) or ``None`` for random weights (initialised under a fixed torch seed, so the
same spec always gives the same weights), and optionally the visual block the tokens are taken
from (``token_layer``; ``model:tag@N``). ``blip2:/path/to/dir`` names a Hugging Face BLIP-2
directory instead (``pipeline.blip2_encoder``). :func:`parse_encoder` reads every spec string and
:func:`load_encoder` builds a :class:`FrozenEncoder` (open_clip) or a ``Blip2Encoder``; both are
:class:`pipeline.encoder_base.Encoder`.

Conventions of the outputs:

* ``encode_frames`` -> visual tokens = CLS + patch tokens *before* the projection, after the
  final norm (``ln_post`` for open_clip's own VisionTransformer; ``trunk.forward_features`` for
  timm trunks such as EVA01-g-14), and the projected frame embedding, **not** L2-normalised
  (it equals ``model.encode_image(x)``; heads normalise). With ``token_layer`` N the tokens are
  the output of visual block N instead (``visual.transformer.resblocks[N]`` or
  ``visual.trunk.blocks[N]``; negative N counts from the end, -2 = second-last as BLIP-2 reads
  EVA ViT-g/14), with no final norm; the frame embedding is still ``model.encode_image(x)``.
* ``encode_texts`` -> text tokens after ``ln_final`` truncated to ``max_tokens`` positions with a
  validity mask (``True`` for real tokens incl. start/end-of-text), and the projected text
  embedding computed from the full context, **not** L2-normalised (equals ``model.encode_text``).

The JSON configs in ``pipeline/model_configs/`` are registered with open_clip on first use only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import EncoderError
from core.fileio import sha256_file
from pipeline.encoder_base import Encoder, without_extraction

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
RANDOM_INIT_SEED = 0
BLIP2 = "blip2"  # the spec prefix (and EncoderSpec.model) of a Hugging Face BLIP-2 directory
_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_LAYER_SUFFIX = re.compile(r"^(.*)@(-?\d+)$")
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
    """An open_clip architecture name and its weights (tag, checkpoint path or None = random), and
    the visual block the tokens come from (None: after the final norm); or, with ``model`` =
    :data:`BLIP2`, a Hugging Face BLIP-2 directory in ``pretrained``."""

    model: str
    pretrained: str | None = None
    token_layer: int | None = None

    @property
    def kind(self) -> str:
        """``"blip2"`` for a BLIP-2 directory, else ``"open_clip"``."""
        return BLIP2 if self.model == BLIP2 else "open_clip"

    @property
    def is_checkpoint(self) -> bool:
        return self.kind == "open_clip" and is_checkpoint_path(self.pretrained)

    def short_name(self) -> str:
        """A readable name for file names: ``model`` + tag, or + checkpoint file stem (+ the token
        layer when set); ``blip2-<directory name>`` for BLIP-2."""
        if self.kind == BLIP2:
            return f"{BLIP2}-{Path(str(self.pretrained)).name or 'model'}"
        if not self.pretrained:
            name = f"{self.model}-random"
        elif self.is_checkpoint:
            name = f"{self.model}-{Path(self.pretrained).stem}"
        else:
            name = f"{self.model}-{self.pretrained}"
        return name if self.token_layer is None else f"{name}-layer{self.token_layer}"

    def __str__(self) -> str:
        text = self.model if not self.pretrained else f"{self.model}:{self.pretrained}"
        return text if self.token_layer is None else f"{text}@{self.token_layer}"


PRESETS: dict[str, EncoderSpec] = {
    "clip-b32": EncoderSpec("ViT-B-32", "openai"),
    "eva-g14": EncoderSpec("EVA01-g-14", "laion400m_s11b_b41k"),
    # The synthetic world's own small CLIP; its checkpoint path is given as `synth-b32-tiny:PATH`.
    "synth-b32-tiny": EncoderSpec("synth-vit-b32-tiny", None),
}


def with_token_layer(spec: EncoderSpec, layer: int | None) -> EncoderSpec:
    """``spec`` with its tokens taken from visual block ``layer`` (``--token-layer``); ``None``
    leaves it as it is. Refused for BLIP-2 (its tokens are fixed) and for a spec that already names
    another layer (``model:tag@N``)."""
    if layer is None:
        return spec
    if spec.kind == BLIP2:
        raise EncoderError(f"--token-layer {layer}: {spec} gives BLIP-2's own tokens (second-last EVA "
                           f"block + ln_vision); the token layer is for open_clip encoders only")
    if spec.token_layer is not None and spec.token_layer != int(layer):
        raise EncoderError(f"--token-layer {layer} conflicts with encoder {spec} (layer {spec.token_layer})")
    return replace(spec, token_layer=int(layer))


def parse_encoder(text: str) -> EncoderSpec:
    """Parse ``preset``, ``preset:weights``, ``model``, ``model:tag`` or ``model:/path/ckpt.pt``,
    each optionally followed by ``@N`` (tokens from visual block N), or ``blip2:/path/to/dir``.

    A bare model name means random weights. ``hf-hub:`` model names are kept whole.
    """
    text = text.strip()
    if not text:
        raise EncoderError("empty encoder spec")
    name, _, weights = text.partition(":")
    if name == BLIP2:
        if not weights:
            raise EncoderError(f"encoder spec {text!r}: give the BLIP-2 directory, blip2:/path/to/dir")
        if _LAYER_SUFFIX.match(weights) and not Path(weights).exists():
            raise EncoderError(f"encoder spec {text!r}: BLIP-2's tokens are fixed (second-last EVA block + "
                               f"ln_vision); '@N' is for open_clip encoders only")
        return EncoderSpec(BLIP2, weights)
    layer = None
    m = _LAYER_SUFFIX.match(text)
    if m:
        text, layer = m.group(1), int(m.group(2))
    return with_token_layer(_parse_open_clip(text), layer)


def _parse_open_clip(text: str) -> EncoderSpec:
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


class FrozenEncoder(Encoder):
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
        self.set_image_format(int(size), cfg["mean"], cfg["std"], "short_crop")
        self._timm = hasattr(model.visual, "trunk")
        self._text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower here
        if self._text is not None and not hasattr(self._text, "ln_final"):
            raise EncoderError(f"{spec}: text tower {type(self._text).__name__} is not supported "
                               f"(need open_clip's TextTransformer)")
        self.context_length: int = int(getattr(model, "context_length", 77))
        self._causal_only = self._text_is_causal_only()
        self.token_layer: int | None = None  # the visual block the tokens come from (0-based)
        self.num_blocks: int = 0
        self._token_block: torch.nn.Module | None = None
        self._blocks_seq_first = False
        if spec.token_layer is not None:
            self._select_token_block(int(spec.token_layer))
        self.probe_dims()

    def _select_token_block(self, layer: int) -> None:
        """Take the tokens from the output of visual block ``layer`` (negative: from the end)."""
        visual = self.model.visual
        if self._timm:
            blocks = getattr(visual.trunk, "blocks", None)
        else:
            blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
            self._blocks_seq_first = not getattr(visual.transformer, "batch_first", True)
        if blocks is None or len(blocks) == 0:
            raise EncoderError(f"{self.spec}: --token-layer needs a visual tower with transformer blocks "
                               f"(visual.transformer.resblocks or visual.trunk.blocks); "
                               f"{type(visual).__name__} has none")
        n = len(blocks)
        if not -n <= layer < n:
            raise EncoderError(f"{self.spec}: --token-layer {layer} is out of range: the visual tower has {n} "
                               f"blocks (0..{n - 1}, or -{n}..-1 from the end)")
        self.num_blocks = n
        self.token_layer = layer % n
        self._token_block = blocks[self.token_layer]

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
        """JSON-serialisable description of what produced the features (no local paths);
        ``token_layer`` (the 0-based visual block) appears only when it was set."""
        p = self.spec.pretrained
        if not p:
            weights = {"kind": "random", "seed": RANDOM_INIT_SEED}
        elif self.spec.is_checkpoint:
            weights = {"kind": "checkpoint", "sha256": sha256_file(p)}
        else:
            weights = {"kind": "open_clip", "tag": p}
        ident = {"name": self.spec.model, "weights": weights, "image_size": self.image_size,
                 "mean": list(self.mean), "std": list(self.std), "num_tokens": self.num_tokens,
                 "token_dim": self.token_dim, "embed_dim": self.embed_dim,
                 "text_dim": self.text_dim, "context_length": self.context_length,
                 "tokens": "cls+patches after final norm, before projection",
                 "emb": "projected, not normalised"}
        if self.token_layer is not None:
            ident["token_layer"] = self.token_layer
            ident["tokens"] = (f"cls+patches output of visual block {self.token_layer} of {self.num_blocks}, "
                               f"no final norm, before projection")
        return ident

    # -- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (N,3,S,S) -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""
        x = x.to(self.device, self.dtype)
        if self._token_block is None:
            return self._encode_images(x)
        caught: list[torch.Tensor] = []
        hook = self._token_block.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            _, emb = self._encode_images(x)
        finally:
            hook.remove()
        if len(caught) != 1:
            raise EncoderError(f"{self.spec}: visual block {self.token_layer} ran {len(caught)} times in one pass")
        tokens = caught[0][0] if isinstance(caught[0], tuple) else caught[0]
        if self._blocks_seq_first:
            tokens = tokens.transpose(0, 1)
        return tokens.contiguous(), emb

    def _encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.model.visual
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


def load_encoder(spec: EncoderSpec | str, device: str | torch.device = "cpu") -> Encoder:
    """Build the frozen encoder for ``spec`` (a spec or a string for :func:`parse_encoder`): a
    :class:`FrozenEncoder` for open_clip, a ``pipeline.blip2_encoder.Blip2Encoder`` for
    ``blip2:/path/to/dir``."""
    if isinstance(spec, str):
        spec = parse_encoder(spec)
    if spec.kind == BLIP2:
        from pipeline.blip2_encoder import load_blip2

        return load_blip2(spec, device=device)
    import open_clip

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


def encoder_for_identity(identity: dict, candidates: list[str] | tuple[str, ...] = (),
                         device: str | torch.device = "cpu") -> Encoder:
    """The frozen encoder whose ``identity()`` is ``identity`` (a store's ``encoder`` attribute), to
    encode new captions the way the store's were. Random weights and open_clip tags are rebuilt from
    the identity alone; local weights (a checkpoint, a BLIP-2 directory) come from ``candidates``:
    encoder specs or checkpoint files, the one whose identity matches is taken. ``EncoderError``
    names what differs when none matches. How the store's extraction computed (its precision and
    resize, ``EXTRACTION_KEY``) is not part of the encoder and is not compared."""
    from core.fileio import json_diff

    identity = without_extraction(identity)
    name = str(identity.get("name", ""))
    weights = identity.get("weights") or {}
    layer = identity.get("token_layer")
    specs: list[EncoderSpec] = []
    for c in candidates:
        c = str(c)
        spec = parse_encoder(c) if (":" in c or c in PRESETS or not Path(c).is_file()) else EncoderSpec(name, c)
        if spec.kind != BLIP2 and spec.model == name and spec.token_layer is None and layer is not None:
            spec = replace(spec, token_layer=int(layer))
        if spec.is_checkpoint and weights.get("kind") == "checkpoint" and Path(str(spec.pretrained)).is_file() \
                and sha256_file(str(spec.pretrained)) != weights.get("sha256"):
            continue  # another checkpoint: not worth building
        specs.append(spec)
    if weights.get("kind") == "random":
        specs.append(EncoderSpec(name, None, None if layer is None else int(layer)))
    elif weights.get("kind") == "open_clip":
        specs.append(EncoderSpec(name, str(weights.get("tag")), None if layer is None else int(layer)))
    if not specs:
        what = "BLIP-2 directory (blip2:/path)" if weights.get("kind") == BLIP2 else \
            f"checkpoint (sha256 {str(weights.get('sha256'))[:12]})"
        raise EncoderError(f"the store's encoder {name!r} has local weights: give the {what} with --encoder")
    diffs: list[str] = []
    for spec in specs:
        enc = load_encoder(spec, device=device)
        d = json_diff(identity, enc.identity())
        if not d:
            return enc
        diffs.append(f"{spec}: {'; '.join(d[:3])}")
    raise EncoderError("no given encoder is the store's (" + " | ".join(diffs) + ")")
