"""The BLIP-2 backend: the tokens BLIP-2's Q-Former was trained on, from a local Hugging Face
BLIP-2 directory (``--encoder blip2:/path/to/dir``; docs/METHOD.md, "Tokens for a
BLIP-2-initialised head").

What the directory must hold (what ``Blip2ForImageTextRetrieval.save_pretrained`` writes plus the
processor's files, i.e. a download of ``Salesforce/blip2-itm-vit-g``): ``config.json`` (model type
``blip-2``), ``model.safetensors`` (or ``model.safetensors.index.json`` and its shards) with the
vision tower, the Q-Former, its query tokens and text embeddings and both ITC projections
(``vision_projection``, ``text_projection``), the Q-Former's BERT tokenizer (``tokenizer.json`` or
``vocab.txt``) and ``preprocessor_config.json``. A ``Blip2Model`` / ``Blip2ForConditionalGeneration``
save holds the vision side only (no text embeddings, no projections) and is refused.

Outputs (float32; embeddings **not** L2-normalised afterwards, heads normalise):

* frame tokens = ``Blip2VisionModel(pixel_values).last_hidden_state`` (N, 1 + patches, vision
  hidden): for BLIP-2 the vision encoder holds 39 of EVA ViT-g/14's 40 blocks and
  ``post_layernorm`` is its ``ln_vision``, so these are the second-last EVA block + ln_vision,
  257 x 1408 for ``blip2-itm-vit-g``;
* frame embedding = BLIP-2's ITC image side made one vector per frame: the Q-Former's query
  outputs (cross-attending to the frame tokens) -> ``vision_projection`` -> L2-normalised per query
  -> **mean over the queries** (BLIP-2 itself scores a text against the best of its 32 query
  embeddings; stage one needs a single vector per frame);
* text tokens = the Q-Former's text-only pass (``embeddings`` -> ``qformer`` with
  ``query_length=0``), last hidden state, cut / padded to ``max_tokens`` with a validity mask
  (``True`` for real tokens incl. [CLS] and [SEP]; padded positions are zeros, so a caption's
  tokens do not depend on its batch); texts are truncated at ``context_length`` =
  min(tokenizer's ``model_max_length``, Q-Former's ``max_position_embeddings``) tokens;
* text embedding = ``text_projection`` of the [CLS] hidden state (BLIP-2's ITC text side).

Preprocessing: the image size, mean and std of ``preprocessor_config.json``; frames are resized to
size x size (aspect not kept, as BLIP-2's image processor does) with torch's antialiased bicubic
on the encoder's device, from frames the decoder already resized (PIL bicubic) to that short side,
and without the image processor's rounding to uint8 after its PIL resize: pixel values differ
from the image processor's by resampling detail only (the same frame, size and normalisation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from core.errors import EncoderError
from core.fileio import sha256_file
from pipeline.encoder_base import Encoder

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
TOKENS = "vision_model last_hidden_state: second-last EVA block + ln_vision (post_layernorm)"
FRAME_EMB = ("mean over queries of the L2-normalised vision_projection(Q-Former query outputs); "
             "not normalised again")
TEXT_TOKENS = "Q-Former text-only pass, last hidden state"
TEXT_EMB = "text_projection of the [CLS] hidden state, not normalised"
# the pieces the ITC sides need: (what, whether a weight name belongs to it)
REQUIRED = (
    ("vision tower (vision_model.*)", lambda k: k.startswith("vision_model.")),
    ("query tokens", lambda k: k == "query_tokens"),
    ("Q-Former (qformer.*)", lambda k: k.startswith("qformer.")),
    ("Q-Former text embeddings (embeddings.word_embeddings)", lambda k: "embeddings.word_embeddings" in k),
    ("vision_projection", lambda k: k.startswith("vision_projection.")),
    ("text_projection", lambda k: k.startswith("text_projection.")),
)
NEEDS = ("need a Blip2ForImageTextRetrieval save such as Salesforce/blip2-itm-vit-g (config.json, "
         "model.safetensors, tokenizer, preprocessor_config.json)")


def _fail(directory: Path, what: str) -> EncoderError:
    return EncoderError(f"blip2:{directory}: {what}")


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of ``directory``: ``model.safetensors`` or the shards its index names."""
    single = directory / WEIGHTS
    if single.is_file():
        return [single]
    index = directory / WEIGHTS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as exc:
            raise _fail(directory, f"{WEIGHTS_INDEX} is not a safetensors index ({exc})") from None
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise _fail(directory, f"weight shard(s) {', '.join(missing)} named in {WEIGHTS_INDEX} are missing")
        return [directory / n for n in names]
    raise _fail(directory, f"no {WEIGHTS} (or {WEIGHTS_INDEX}); {NEEDS}")


def check_blip2_dir(directory: str | Path) -> tuple[dict, list[Path]]:
    """Check that ``directory`` holds what :class:`Blip2Encoder` needs, reading only file headers;
    returns (config.json, weight files). Any lack is one ``EncoderError`` line naming it."""
    from safetensors import safe_open

    d = Path(directory)
    if not d.is_dir():
        raise _fail(d, f"no such directory; {NEEDS}")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise _fail(d, f"no config.json, not a Hugging Face model directory; {NEEDS}")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise _fail(d, f"config.json is not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("model_type") != "blip-2":
        kind = config.get("model_type") if isinstance(config, dict) else None
        raise _fail(d, f"config.json describes a {kind!r} model, not BLIP-2 (model_type 'blip-2'); {NEEDS}")
    files = weight_files(d)
    keys: set[str] = set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys.update(st.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise _fail(d, f"{f.name} cannot be read as safetensors ({type(exc).__name__}: {exc})") from None
    missing = [what for what, belongs in REQUIRED if not any(belongs(k) for k in keys)]
    if missing:
        raise _fail(d, f"the weights lack {', '.join(missing)}: a Blip2Model / Blip2ForConditionalGeneration "
                       f"save holds the vision side only; {NEEDS}")
    if not any((d / n).is_file() for n in TOKENIZER_FILES[:2]):
        raise _fail(d, "no tokenizer files (tokenizer.json or vocab.txt: the Q-Former's BERT tokenizer)")
    if not (d / "preprocessor_config.json").is_file():
        raise _fail(d, "no preprocessor_config.json (the image size, mean and std of BLIP-2's image processor)")
    return config, files


def image_format(directory: Path, vision_image_size: int) -> tuple[int, list[float], list[float]]:
    """(size, mean, std) of ``preprocessor_config.json`` (BlipImageProcessor's defaults where a key
    is absent); the size must be square and equal the vision tower's."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    path = directory / "preprocessor_config.json"
    try:
        pp = json.loads(path.read_text())
    except ValueError as exc:
        raise _fail(directory, f"preprocessor_config.json is not JSON ({exc})") from None
    size = pp.get("size", vision_image_size)
    if isinstance(size, dict):
        h, w = size.get("height", size.get("shortest_edge")), size.get("width", size.get("shortest_edge"))
        if h is None or h != w:
            raise _fail(directory, f"preprocessor_config.json size {size} is not square")
        size = h
    if int(size) != int(vision_image_size):
        raise _fail(directory, f"preprocessor_config.json size {size} != the vision tower's image_size "
                               f"{vision_image_size}")
    if not pp.get("do_rescale", True) or abs(float(pp.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise _fail(directory, "preprocessor_config.json: only rescaling by 1/255 is supported")
    if pp.get("do_normalize", True):
        mean, std = pp.get("image_mean", OPENAI_CLIP_MEAN), pp.get("image_std", OPENAI_CLIP_STD)
    else:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return int(size), [float(v) for v in mean], [float(v) for v in std]


class Blip2Encoder(Encoder):
    """A BLIP-2 (vision tower, Q-Former, query tokens, ITC projections) in eval mode; see the
    module docstring for what each output is."""

    def __init__(self, spec: Any, model: torch.nn.Module, tokenizer: Any, directory: Path,
                 weight_paths: list[Path], device: str | torch.device = "cpu") -> None:
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.directory = Path(directory)
        self.weight_paths = list(weight_paths)
        self.device = torch.device(device)
        self.dtype = next(model.vision_model.parameters()).dtype
        config = model.config
        size, mean, std = image_format(self.directory, config.vision_config.image_size)
        self.set_image_format(size, mean, std, "square")
        self.num_queries = int(config.num_query_tokens)
        self.context_length = int(min(int(tokenizer.model_max_length),
                                      int(config.qformer_config.max_position_embeddings)))
        self.token_layer = None  # BLIP-2's tokens are fixed
        self._identity: dict | None = None
        self.probe_dims()

    # -- identity -------------------------------------------------------------------------
    def identity(self) -> dict:
        """Kind ``blip2``, the sha256 of every weight and tokenizer file (by file name), the
        preprocessing, the dims and what each output is; no local paths."""
        if self._identity is None:
            tok = {n: sha256_file(self.directory / n) for n in TOKENIZER_FILES if (self.directory / n).is_file()}
            self._identity = {
                "name": "blip2", "kind": "blip2",
                "architecture": "Blip2ForImageTextRetrieval",
                "weights": {"kind": "blip2", "sha256": {p.name: sha256_file(p) for p in self.weight_paths}},
                "tokenizer_sha256": tok,
                "image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resize": "square (bicubic, antialiased), no crop",
                "num_tokens": self.num_tokens, "token_dim": self.token_dim,
                "embed_dim": self.embed_dim, "text_dim": self.text_dim,
                "context_length": self.context_length, "num_query_tokens": self.num_queries,
                "tokens": TOKENS, "emb": FRAME_EMB, "text_tokens": TEXT_TOKENS, "text_emb": TEXT_EMB}
        return dict(self._identity)

    # -- images ---------------------------------------------------------------------------
    @torch.no_grad()
    def query_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frame tokens (N, num_tokens, token_dim) -> the L2-normalised projected query embeddings
        (N, num_queries, embed_dim): BLIP-2's ITC image side."""
        m = self.model
        queries = m.query_tokens.expand(tokens.shape[0], -1, -1)
        image_mask = torch.ones(tokens.shape[:-1], dtype=torch.long, device=tokens.device)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=tokens,
                        encoder_attention_mask=image_mask).last_hidden_state
        out = out[:, :self.num_queries].to(m.vision_projection.weight.dtype)
        return F.normalize(m.vision_projection(out), dim=-1)

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed (N,3,S,S) -> (tokens (N,num_tokens,token_dim), emb (N,embed_dim))."""
        x = x.to(self.device, self.dtype)
        tokens = self.model.vision_model(pixel_values=x).last_hidden_state
        return tokens, self.query_embeddings(tokens).mean(dim=1)

    # -- texts ----------------------------------------------------------------------------
    def _batch(self, texts: list[str]) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context_length,
                              return_tensors="pt")

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids (C, longest text) of the Q-Former's BERT tokenizer ([CLS] ... [SEP], padded)."""
        return self._batch(texts)["input_ids"].to(self.device)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], max_tokens: int = 32
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Texts -> (tokens (C,max_tokens,text_dim), mask (C,max_tokens) bool, emb (C,embed_dim)),
        from one text-only Q-Former pass over each whole (``context_length``-truncated) text."""
        m = self.model
        width = m.config.qformer_config.hidden_size
        if not len(texts):
            return (torch.zeros(0, max_tokens, width, device=self.device),
                    torch.zeros(0, max_tokens, dtype=torch.bool, device=self.device),
                    torch.zeros(0, m.text_projection.out_features, device=self.device))
        batch = self._batch(texts)
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        h = m.qformer(query_embeds=m.embeddings(input_ids=ids), query_length=0,
                      attention_mask=attn).last_hidden_state
        emb = m.text_projection(h[:, 0].to(m.text_projection.weight.dtype))
        mask = attn[:, :max_tokens].bool()
        tokens = h[:, :max_tokens] * mask.unsqueeze(-1).to(h.dtype)  # padding: zeros, whatever the batch
        if tokens.shape[1] < max_tokens:
            pad = max_tokens - tokens.shape[1]
            tokens = F.pad(tokens, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad), value=False)
        return tokens, mask, emb


def load_blip2(spec: Any, device: str | torch.device = "cpu") -> Blip2Encoder:
    """The :class:`Blip2Encoder` of ``spec.pretrained`` (a local BLIP-2 directory), in float32."""
    from transformers import AutoTokenizer, Blip2ForImageTextRetrieval

    directory = Path(str(spec.pretrained)).expanduser()
    _, files = check_blip2_dir(directory)
    try:
        model, info = Blip2ForImageTextRetrieval.from_pretrained(directory, dtype=torch.float32,
                                                                 output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise _fail(directory, f"transformers cannot load it ({type(exc).__name__}: {exc})") from None
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith("itm_head.")]
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (" ..." if len(missing) > 4 else "")
        raise _fail(directory, f"{len(missing)} weight(s) the encoder needs are missing ({shown}); {NEEDS}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # tokenizers raise many types; the message is what matters
        raise _fail(directory, f"cannot load its tokenizer ({type(exc).__name__}: {exc})") from None
    try:
        model = model.to(device)
    except RuntimeError as exc:  # e.g. --device cuda where there is none: one line, as for open_clip
        raise _fail(directory, f"cannot be put on {device} ({exc})") from None
    return Blip2Encoder(spec, model, tokenizer, directory, files, device=device)
