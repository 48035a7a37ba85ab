"""BLIP-2 Q-Former weights in and out of a CrossTVR head (docs/METHOD.md, "Initialising from BLIP-2").

Two on-disk forms are read:

* a Hugging Face-format directory, as ``transformers``' ``Blip2ForImageTextRetrieval.save_pretrained``
  writes it (``config.json``, ``model.safetensors`` or sharded ``model-*.safetensors`` with their
  index, or ``pytorch_model.bin``; tokenizer files beside them);
* a LAVIS ``.pth`` file (``{"model": state_dict}``), whose names differ from the Hugging Face ones
  by a fixed renaming (``Qformer.bert.encoder.`` -> ``qformer.encoder.``, ``.self.`` ->
  ``.attention.``, ``vision_proj`` -> ``vision_projection``, ...); its shapes give the layout,
  the attention head count is BERT-base's 12 unless given.

Both are first brought to the Hugging Face names (:func:`read_blip2`); :func:`weight_table` maps
each of our parameters to one of those names; :func:`load_blip2` copies them, reporting every
tensor whose shape differs. :func:`save_blip2` writes a head's Q-Former back in the Hugging Face
layout (so a Q-Former pre-trained here loads like a downloaded one).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.errors import CheckpointError
from core.fileio import sha256_file

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_LAVIS = [(r"^Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
          (r"^Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
          (r"^Qformer\.bert\.encoder\.", "qformer.encoder."),
          (r"\.(attention|crossattention)\.self\.", r".\1.attention."),
          (r"^vision_proj\.", "vision_projection."), (r"^text_proj\.", "text_projection.")]


@dataclass
class Blip2Weights:
    """A BLIP-2 checkpoint brought to Hugging Face tensor names, and its Q-Former layout."""

    tensors: dict[str, torch.Tensor]
    layout: dict[str, Any]  # width, layers, heads, num_queries, cross_every, ff_mult, ln_eps, vocab, ...
    source: dict[str, Any] = field(default_factory=dict)  # {"kind", "sha256"}: what was read


def _hf_weight_tensors(directory: Path) -> tuple[dict[str, torch.Tensor], Path]:
    single, index, binary = (directory / n for n in WEIGHT_FILES)
    if single.is_file():
        from safetensors.torch import load_file

        return load_file(str(single)), single
    if index.is_file():
        from safetensors.torch import load_file

        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(load_file(str(directory / name)))
        return tensors, index
    if binary.is_file():
        return torch.load(binary, map_location="cpu", weights_only=True), binary
    raise CheckpointError(f"{directory}: no BLIP-2 weights ({', '.join(WEIGHT_FILES)}) in this directory")


def _layout_from_config(cfg: dict, path: Path) -> dict[str, Any]:
    q = cfg.get("qformer_config")
    if not isinstance(q, dict):
        raise CheckpointError(f"{path}: config.json has no qformer_config: not a BLIP-2 checkpoint")
    width = int(q.get("hidden_size", 768))
    return {"width": width, "layers": int(q.get("num_hidden_layers", 12)),
            "heads": int(q.get("num_attention_heads", 12)),
            "num_queries": int(cfg.get("num_query_tokens", 32)),
            "cross_every": int(q.get("cross_attention_frequency", 2)),
            "ff_mult": int(q.get("intermediate_size", 4 * width)) / width,
            "ln_eps": float(q.get("layer_norm_eps", 1e-12)),
            "vocab_size": int(q.get("vocab_size", 30522)),
            "max_positions": int(q.get("max_position_embeddings", 512)),
            "pad_token_id": int(q.get("pad_token_id", 0) or 0),
            "dropout": float(q.get("hidden_dropout_prob", 0.1)),
            "encoder_width": int(q.get("encoder_hidden_size", 1408)),
            "embed_dim": int(cfg.get("image_text_hidden_size", 256))}


def _layout_from_tensors(t: dict[str, torch.Tensor], path: Path, heads: int = 12) -> dict[str, Any]:
    try:
        width = int(t["query_tokens"].shape[-1])
        layers = 1 + max(int(m.group(1)) for k in t for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.", k)] if m)
        cross = sorted(int(m.group(1)) for k in t
                       for m in [re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention\.attention\.key\.weight", k)] if m)
        words = t["embeddings.word_embeddings.weight"]
        inter = t["qformer.encoder.layer.0.intermediate_query.dense.weight"]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a BLIP-2 Q-Former state dict (missing {exc})") from exc
    return {"width": width, "layers": layers, "heads": heads, "num_queries": int(t["query_tokens"].shape[-2]),
            "cross_every": cross[1] - cross[0] if len(cross) > 1 else max(1, layers),
            "ff_mult": int(inter.shape[0]) / width, "ln_eps": 1e-12, "vocab_size": int(words.shape[0]),
            "max_positions": int(t["embeddings.position_embeddings.weight"].shape[0]), "pad_token_id": 0,
            "dropout": 0.1, "encoder_width": int(t["qformer.encoder.layer.0.crossattention.attention.key.weight"].shape[1]),
            "embed_dim": int(t["vision_projection.weight"].shape[0]) if "vision_projection.weight" in t else 0}


def lavis_to_hf(name: str) -> str:
    """A LAVIS BLIP-2 tensor name in Hugging Face's naming (unchanged when it has no LAVIS form)."""
    for pattern, repl in _LAVIS:
        name = re.sub(pattern, repl, name)
    return name


def read_blip2(path: str | Path, heads: int | None = None) -> Blip2Weights:
    """Read a BLIP-2 checkpoint: a Hugging Face-format directory or a LAVIS ``.pth`` file."""
    p = Path(path)
    if p.is_dir():
        config = p / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{p}: no config.json: not a Hugging Face-format BLIP-2 directory")
        try:
            cfg = json.loads(config.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config}: not JSON ({exc})") from exc
        layout = _layout_from_config(cfg, config)
        try:
            tensors, weights = _hf_weight_tensors(p)
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - a torn or foreign weight file: one line naming it
            raise CheckpointError(f"{p}: cannot read the BLIP-2 weights ({exc})") from exc
        if heads:
            layout["heads"] = int(heads)
        return Blip2Weights(tensors, layout, {"kind": "hf", "sha256": sha256_file(weights)})
    if p.is_file():
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one-line message
            raise CheckpointError(f"{p}: cannot read as a torch state dict ({exc})") from exc
        state = raw.get("model", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{p}: not a LAVIS BLIP-2 checkpoint (no state dict)")
        tensors = {lavis_to_hf(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return Blip2Weights(tensors, _layout_from_tensors(tensors, p, heads or 12),
                            {"kind": "lavis", "sha256": sha256_file(p)})
    raise CheckpointError(f"{p}: no such BLIP-2 checkpoint (a Hugging Face-format directory or a LAVIS .pth file)")


# options a BLIP-2 checkpoint decides (its tensors' shapes): with --init-from they override a preset's
SHAPE_OPTIONS = ("width", "layers", "heads", "num_queries", "cross_every", "ff_mult", "ln_eps", "vocab_size",
                 "max_positions", "itc_dim")


def options_from_layout(layout: dict[str, Any]) -> dict[str, Any]:
    """CrossTVR options that build a head with this Q-Former's layout (BLIP-2's input path: the
    frozen tokens go unprojected into the cross attention, text through BERT's embeddings)."""
    return {"width": layout["width"], "layers": layout["layers"], "heads": layout["heads"],
            "num_queries": layout["num_queries"], "cross_every": layout["cross_every"],
            "ff_mult": layout["ff_mult"], "ln_eps": layout["ln_eps"], "embed_norm": True, "prenorm": False,
            "text_cross": False, "visual_proj": False, "standardize": False, "text_input": "ids",
            "vocab_size": layout["vocab_size"], "max_positions": layout["max_positions"],
            "itc_dim": layout["embed_dim"], "itc_text_pool": "cls"}


def _layer_table(prefix: str, i: int, cross: bool) -> dict[str, str | tuple[str, ...]]:
    hf = f"qformer.encoder.layer.{i}."
    rows: dict[str, str | tuple[str, ...]] = {}
    for kind in ("weight", "bias"):
        rows[f"{prefix}self_attn.in_proj_{kind}"] = tuple(f"{hf}attention.attention.{x}.{kind}"
                                                          for x in ("query", "key", "value"))
        rows[f"{prefix}self_attn.out_proj.{kind}"] = f"{hf}attention.output.dense.{kind}"
        rows[f"{prefix}norm_self.{kind}"] = f"{hf}attention.output.LayerNorm.{kind}"
        if cross:
            for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
                rows[f"{prefix}cross_attn.{ours}.{kind}"] = f"{hf}crossattention.attention.{theirs}.{kind}"
            rows[f"{prefix}cross_attn.out.{kind}"] = f"{hf}crossattention.output.dense.{kind}"
            rows[f"{prefix}norm_cross.{kind}"] = f"{hf}crossattention.output.LayerNorm.{kind}"
        for part, inter, out in (("query", "intermediate_query", "output_query"), ("text", "intermediate", "output")):
            rows[f"{prefix}ffn_{part}.fc1.{kind}"] = f"{hf}{inter}.dense.{kind}"
            rows[f"{prefix}ffn_{part}.fc2.{kind}"] = f"{hf}{out}.dense.{kind}"
            rows[f"{prefix}norm_ffn_{part}.{kind}"] = f"{hf}{out}.LayerNorm.{kind}"
    return rows


def weight_table(head: torch.nn.Module) -> dict[str, str | tuple[str, ...]]:
    """Our parameter name -> the Hugging Face tensor name (a tuple: concatenated along dim 0)
    for every parameter a BLIP-2 checkpoint initialises. An unshared temporal stack is
    initialised from the same Q-Former as the spatial one (as the paper does)."""
    table: dict[str, str | tuple[str, ...]] = {
        "queries": "query_tokens", "fc.weight": "itm_head.weight", "fc.bias": "itm_head.bias",
        "word_embeddings.weight": "embeddings.word_embeddings.weight",
        "position_embeddings.weight": "embeddings.position_embeddings.weight"}
    stacks = ["block"] + (["temporal_block"] if getattr(head, "temporal_block", None) is not None
                          and head.temporal_block is not head.block else [])
    for stack in stacks:
        module = getattr(head, stack)
        for kind in ("weight", "bias"):
            table[f"{stack}.embed_norm.{kind}"] = f"qformer.layernorm.{kind}"
        for i, layer in enumerate(module.layers):
            table.update(_layer_table(f"{stack}.layers.{i}.", i, layer.cross_attn is not None))
    if getattr(head, "itc_dim", 0):
        for kind in ("weight", "bias"):
            table[f"itc_vision.{kind}"] = f"vision_projection.{kind}"
            table[f"itc_text.{kind}"] = f"text_projection.{kind}"
    return table


def _cross_kv(name: str) -> bool:
    return re.search(r"\.cross_attn\.(k|v)\.(weight|bias)$", name) is not None


@dataclass
class LoadReport:
    """What :func:`load_blip2` did: tensors copied, left at their initialisation, re-initialised."""

    loaded: list[str]
    kept: list[str]  # our parameters a BLIP-2 checkpoint does not hold (selector, frame positions, ...)
    reinitialised: list[str]
    source: dict[str, Any]

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors from BLIP-2, {len(self.kept)} of the head's own initialised "
                f"({', '.join(sorted({k.split('.')[0] for k in self.kept})) or 'none'})"
                + (f", {len(self.reinitialised)} visual key/value tensors re-initialised" if self.reinitialised else ""))


def load_blip2(head: torch.nn.Module, weights: Blip2Weights | str | Path,
               reinit_visual_kv: bool = False) -> LoadReport:
    """Copy a BLIP-2 checkpoint's Q-Former, query tokens, ITM head, word/position embeddings,
    contrastive projections and (when saved) temperature into ``head``.

    Every tensor whose shape differs is reported in one ``CheckpointError`` (ours vs the
    checkpoint's). ``reinit_visual_kv=True`` leaves the cross attention's key / value projections
    at the head's own initialisation when only they differ (frozen tokens of another width than
    the Q-Former was trained on, e.g. ViT-B/32's 768 instead of EVA ViT-g/14's 1408).
    """
    w = weights if isinstance(weights, Blip2Weights) else read_blip2(weights)
    params = dict(head.named_parameters(remove_duplicate=False))
    table = weight_table(head)
    missing, mismatched, plan = [], [], {}
    for ours, theirs in table.items():
        if ours not in params:
            continue
        names = theirs if isinstance(theirs, tuple) else (theirs,)
        if any(n not in w.tensors for n in names):
            missing.append(f"{ours} <- {' + '.join(n for n in names if n not in w.tensors)}")
            continue
        src = torch.cat([w.tensors[n] for n in names]) if len(names) > 1 else w.tensors[names[0]]
        src = src.reshape(params[ours].shape) if ours == "queries" and src.numel() == params[ours].numel() else src
        if tuple(src.shape) != tuple(params[ours].shape):
            mismatched.append((ours, tuple(params[ours].shape), names[0], tuple(src.shape)))
            continue
        plan[ours] = src
    if missing:
        raise CheckpointError(f"the BLIP-2 checkpoint lacks {len(missing)} tensors the head needs: "
                              + "; ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
    reinit: list[str] = []
    if mismatched:
        if reinit_visual_kv and all(_cross_kv(m[0]) for m in mismatched):
            reinit = [m[0] for m in mismatched]
        else:
            lines = "; ".join(f"{o} {so} vs {t} {st}" for o, so, t, st in mismatched)
            hint = (" (use --reinit-visual-kv to re-initialise the visual key/value projections)"
                    if any(_cross_kv(m[0]) for m in mismatched) else "")
            raise CheckpointError(f"{len(mismatched)} tensors differ in shape between the head and the BLIP-2 "
                                  f"checkpoint: {lines}{hint}")
    with torch.no_grad():
        for ours, src in plan.items():
            params[ours].copy_(src.to(params[ours].dtype))
        if "temp" in w.tensors and hasattr(head, "itc_logit_scale"):
            # LAVIS keeps the temperature t (logits = sim / t); our head keeps log(1 / t)
            head.itc_logit_scale.fill_(float(-torch.log(w.tensors["temp"].float().clamp_min(1e-4))))
    covered = set(plan) | set(reinit)
    kept = [n for n, _ in head.named_parameters() if n not in covered and n != "itc_logit_scale"]
    return LoadReport(sorted(plan), kept, sorted(reinit), w.source)


def blip2_init(head: torch.nn.Module, weights: Blip2Weights, reinit_visual_kv: bool = False) -> dict[str, Any]:
    """:func:`load_blip2`, returned as the record a checkpoint keeps (source, counts, summary)."""
    report = load_blip2(head, weights, reinit_visual_kv)
    return {**report.source, "loaded": len(report.loaded), "kept": report.kept,
            "reinitialised": report.reinitialised, "summary": report.summary()}


def save_blip2(head: torch.nn.Module, directory: str | Path, encoder_width: int | None = None,
               dropout: float = 0.1) -> Path:
    """Write ``head``'s Q-Former (spatial stack), queries, ITM head, embeddings and contrastive
    projections as a Hugging Face-format BLIP-2 checkpoint (``config.json`` + ``model.safetensors``;
    the temperature as ``temp``, LAVIS's name). The vision tower is not written: the head never had it."""
    from safetensors.torch import save_file

    c = head.cfg
    if c.text_input != "ids" or not c.embed_norm or c.visual_proj or c.text_cross or c.prenorm or not head.itc_dim:
        raise ValueError("only a head with BLIP-2's layout (crosstvr-blip2 options: text_input='ids', embed_norm, "
                         "no visual projection, no text cross attention, post-LN, itc_dim > 0) can be saved as BLIP-2")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    params = dict(head.named_parameters(remove_duplicate=False))
    tensors: dict[str, torch.Tensor] = {}
    for ours, theirs in weight_table(head).items():
        if ours.startswith("temporal_block.") or ours not in params:
            continue
        value = params[ours].detach().float().cpu()
        if isinstance(theirs, tuple):
            for name, part in zip(theirs, value.chunk(len(theirs))):
                tensors[name] = part.contiguous()
        else:
            tensors[theirs] = (value.unsqueeze(0) if ours == "queries" else value).contiguous()
    tensors["temp"] = torch.exp(-head.itc_logit_scale.detach().float().cpu()).reshape(())
    save_file(tensors, str(out / "model.safetensors"))
    width = int(c.width)
    config = {"model_type": "blip-2", "architectures": ["Blip2ForImageTextRetrieval"],
              "num_query_tokens": int(c.num_queries), "image_text_hidden_size": int(head.itc_dim),
              "qformer_config": {"model_type": "blip_2_qformer", "hidden_size": width,
                                 "num_hidden_layers": int(c.layers), "num_attention_heads": int(c.heads),
                                 "intermediate_size": int(round(width * c.ff_mult)),
                                 "cross_attention_frequency": int(c.cross_every),
                                 "encoder_hidden_size": int(encoder_width or head.token_dim),
                                 "vocab_size": int(c.vocab_size), "max_position_embeddings": int(c.max_positions),
                                 "layer_norm_eps": float(c.ln_eps), "hidden_dropout_prob": dropout,
                                 "attention_probs_dropout_prob": dropout, "hidden_act": "gelu",
                                 "use_qformer_text_input": True, "pad_token_id": 0}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
