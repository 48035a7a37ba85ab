"""Calibration probes for the synthetic world: where does a frozen encoder keep each attribute?

The synthetic benchmark is a fair yardstick only if fine details are *present* in the frozen
encoder's patch tokens but *diluted* in its pooled (projected CLS) frame embedding, and if the
encoder knows the world at all (a random-weight encoder does not). :func:`probe_encoder` measures
both for one encoder spec:

* **Linear probes** (train split -> test split; a multinomial logistic regression per attribute,
  fixed hyper-parameters, no selection on test) on three frame features: the projected CLS
  embedding (``cls``), the mean of the frame's patch tokens (``patch_mean``) and the patch token
  of the grid cell that holds the detail object (``detail_patch``; an oracle location, it tells
  whether the detail is in the tokens at all) and every patch token of the frame concatenated
  (``patch_grid``; where things are, which motion needs). Frame-level attributes: main colour / shape,
  background, and, on frames where the detail is visible, detail colour / shape / corner.
  Video-level attributes that need two moments (motion, timing) are probed on the concatenated
  features of an early and a late frame.
* **Zero-shot retrieval** on the test split: video embedding = mean of its probed frames' CLS
  embeddings, text embedding = the encoder's own; T2V / V2T R@1/5/10 with :mod:`core.metrics`.

Frames are decoded once per split (``synthetic.frames``: ``frames-<hash>.npy`` in ``cache_dir``, the
cache the pretraining uses too). Runs in about a minute on 2 CPU cores for the default
world with the small synthetic encoder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from synthetic.frames import frame_cache
from synthetic.world import SIZE, detail_cell, detail_visible

PROBE_FRAMES = (4, 20)   # an early (t=0.17) and a late (t=0.83) frame of a 24-frame video
FRAME_ATTRS = ("bg_color", "main_color", "main_shape")
DETAIL_ATTRS = ("detail_color", "detail_shape", "corner")
VIDEO_ATTRS = ("motion", "timing")
FEATURES = ("cls", "patch_mean", "detail_patch", "patch_grid")


def linear_probe(x_train: np.ndarray, y_train: Sequence[str], x_test: np.ndarray,
                 y_test: Sequence[str], steps: int = 300, lr: float = 0.05,
                 weight_decay: float = 1e-3, seed: int = 0) -> float:
    """Accuracy (%) on the test rows of a softmax regression fitted on the train rows.

    Features are standardised with train statistics; labels unseen in training count as errors.
    Full-batch Adam with fixed settings (no hyper-parameter search, so nothing is tuned on test).
    """
    import torch

    classes = sorted(set(y_train))
    index = {c: i for i, c in enumerate(classes)}
    xtr = np.asarray(x_train, dtype=np.float32)
    xte = np.asarray(x_test, dtype=np.float32)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr_t = torch.from_numpy((xtr - mu) / sd)
    xte_t = torch.from_numpy((xte - mu) / sd)
    ytr_t = torch.tensor([index[c] for c in y_train])
    if len(classes) == 1:
        return float(100.0 * np.mean([c == classes[0] for c in y_test]))
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(xtr.shape[1], len(classes))
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xtr_t), ytr_t)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = lin(xte_t).argmax(1).numpy()
    truth = np.array([index.get(c, -1) for c in y_test])
    return float(100.0 * np.mean(pred == truth))


def _encode_frames(encoder, frames: np.ndarray, batch: int = 64, progress: bool = False,
                   desc: str = "encode") -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) uint8 -> (tokens (N, 1+P, D), emb (N, E)) as float32 numpy."""
    import torch
    from tqdm import tqdm

    toks, embs = [], []
    for start in tqdm(range(0, len(frames), batch), desc=desc, unit="batch", disable=not progress):
        tok, emb = encoder.encode_frames(torch.from_numpy(np.array(frames[start:start + batch])))
        toks.append(tok.float().numpy())
        embs.append(emb.float().numpy())
    return np.concatenate(toks), np.concatenate(embs)


def _split_features(manifest, split: str, encoder, cache_dir: Path, frames: Sequence[int],
                    workers: int, progress: bool) -> dict[str, Any]:
    part = manifest.split(split)
    pix, labels = frame_cache(part, cache_dir, frames, workers, progress)
    tokens, emb = _encode_frames(encoder, pix, progress=progress, desc=f"encode {split} frames")
    grid = int(round(np.sqrt(tokens.shape[1] - 1)))
    if grid * grid != tokens.shape[1] - 1:
        raise ValueError(f"probes need a square patch grid after the CLS token, got {tokens.shape[1]} tokens")
    detail = np.empty((len(labels), tokens.shape[2]), dtype=np.float32)
    for i, lab in enumerate(labels):
        r, c = detail_cell(lab, size=SIZE, patch=SIZE // grid)
        detail[i] = tokens[i, 1 + r * grid + c]
    return {"labels": labels, "cls": emb, "patch_mean": tokens[:, 1:].mean(1),
            "detail_patch": detail, "patch_grid": tokens[:, 1:].reshape(len(labels), -1),
            "num_frames": len(frames)}


def _probe_table(train: dict, test: dict, steps: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for attr in FRAME_ATTRS + DETAIL_ATTRS:
        rows_tr = [i for i, lab in enumerate(train["labels"])
                   if attr in FRAME_ATTRS or detail_visible(lab, lab["t"])]
        rows_te = [i for i, lab in enumerate(test["labels"])
                   if attr in FRAME_ATTRS or detail_visible(lab, lab["t"])]
        out[attr] = {f: linear_probe(train[f][rows_tr], [train["labels"][i][attr] for i in rows_tr],
                                     test[f][rows_te], [test["labels"][i][attr] for i in rows_te], steps)
                     for f in FEATURES}
    f_tr, f_te = train["num_frames"], test["num_frames"]
    for attr in VIDEO_ATTRS:
        out[attr] = {}
        for f in FEATURES:
            xtr = train[f].reshape(-1, f_tr * train[f].shape[-1])
            xte = test[f].reshape(-1, f_te * test[f].shape[-1])
            ytr = [lab[attr] for lab in train["labels"][::f_tr]]
            yte = [lab[attr] for lab in test["labels"][::f_te]]
            out[attr][f] = linear_probe(xtr, ytr, xte, yte, steps)
    for attr, row in out.items():
        values = {lab[attr] for lab in test["labels"]}
        row["chance"] = 100.0 / max(1, len(values))
    return out


def _zero_shot(manifest, encoder, test: dict) -> dict[str, dict[str, float]]:
    from core.metrics import retrieval_metrics

    part = manifest.split("test")
    f = test["num_frames"]
    vids = [lab["video_id"] for lab in test["labels"][::f]]
    v = test["cls"].reshape(len(vids), f, -1)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    v = v.mean(1)
    v = v / np.linalg.norm(v, axis=-1, keepdims=True)
    caps = part.captions.to_pydict()
    texts = caps["text"]
    col = {vid: i for i, vid in enumerate(vids)}
    caption_video = np.array([col[vid] for vid in caps["video_id"]])
    embs = []
    for start in range(0, len(texts), 256):
        _, _, emb = encoder.encode_texts(texts[start:start + 256])
        embs.append(emb.float().numpy())
    t = np.concatenate(embs)
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    return retrieval_metrics(t @ v.T, caption_video)


def probe_encoder(manifest, spec: str, cache_dir: str | Path, frames: Sequence[int] = PROBE_FRAMES,
                  steps: int = 300, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Linear probes (train -> test) and zero-shot retrieval (test) for encoder ``spec`` on a
    synthetic ``manifest``. Returns ``{"encoder", "probes": {attr: {feature: acc, "chance"}},
    "zero_shot": {"t2v": ..., "v2t": ...}}``."""
    from pipeline.encoders import load_encoder

    cache_dir = Path(cache_dir)
    encoder = load_encoder(spec)
    train = _split_features(manifest, "train", encoder, cache_dir, frames, workers, progress)
    test = _split_features(manifest, "test", encoder, cache_dir, frames, workers, progress)
    return {"encoder": str(spec), "identity": encoder.identity(), "frames": list(frames),
            "train_frames": len(train["labels"]), "test_frames": len(test["labels"]),
            "probes": _probe_table(train, test, steps), "zero_shot": _zero_shot(manifest, encoder, test)}


def probe_label(spec: str, taken: Sequence[str] = ()) -> str:
    """The column name of encoder ``spec`` in a probe table: ``random`` (no weights given),
    ``pretrained`` (the world's own config with a checkpoint), else the spec itself; the spec too when
    the name is ``taken`` already."""
    from synthetic.pretrain import DEFAULT_CONFIG

    label = "random" if ":" not in spec else ("pretrained" if spec.startswith(f"{DEFAULT_CONFIG}:") else spec)
    return label if label not in taken else spec


def probe_encoders(manifest, specs: Sequence[str], cache_dir: str | Path, steps: int = 300,
                   workers: int = 2, progress: bool = True) -> dict[str, dict[str, Any]]:
    """:func:`probe_encoder` of every encoder of ``specs``, by :func:`probe_label`."""
    names: dict[str, str] = {}
    for s in specs:
        names[probe_label(s, list(names))] = s
    return {label: probe_encoder(manifest, s, cache_dir, steps=steps, workers=workers, progress=progress)
            for label, s in names.items()}


def format_probes(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per attribute, one column per (encoder, feature)."""
    names = list(results)
    attrs = list(next(iter(results.values()))["probes"])
    head = ["attribute", "chance"] + [f"{n}:{f}" for n in names for f in FEATURES]
    rows = [head]
    for a in attrs:
        first = results[names[0]]["probes"][a]
        rows.append([a, f"{first['chance']:.0f}"] +
                    [f"{results[n]['probes'][a][f]:.1f}" for n in names for f in FEATURES])
    for n in names:
        zs = results[n]["zero_shot"]
        rows.append([f"zero-shot {n}", ""] + [
            f"T2V R@1/5/10 {zs['t2v']['R@1']:.1f}/{zs['t2v']['R@5']:.1f}/{zs['t2v']['R@10']:.1f}"] +
            [""] * (len(head) - 3))
    widths = [max(len(str(r[i])) for r in rows if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def write_probes(results: dict[str, Any], path: str | Path) -> Path:
    """Write the probe results as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path
