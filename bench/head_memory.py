"""Peak memory of one training step of a stage-two head at the paper's size.

    python bench/head_memory.py [--preset crosstvr-blip2] [--batch 1 2] [--frames 12]
                                [--grad-checkpoint on|off] [--precision fp32|bf16] [--device cpu|cuda]

One ITM step as the trainer runs it: B positive pairs plus one negative video and one negative
caption each (3B pairs over B videos and B captions), the positives' contrastive loss, backward and
an AdamW step, on random EVA ViT-g/14-shaped tokens (per video ``--frames`` frames of 257 x 1408)
and random caption ids of length 32. Each batch size runs in a fresh process, so the figure is
that process's own peak: on CPU the peak resident set size (``ru_maxrss``), on CUDA
``torch.cuda.max_memory_allocated``. The difference between two batch sizes is the cost per
positive pair; extrapolated to the paper's batch of 128.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_step(preset: str, batch: int, frames: int, tokens: int, width: int, text_len: int, checkpointing: bool,
             amp: str, device: str, threads: int) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    from heads.registry import create_head, get_preset
    from heads.stage_two.itc import batch_itc_loss
    from heads.stage_two.pairs import ItmBatch
    from heads.training.common import forward_precision, make_optimizer

    torch.set_num_threads(threads)
    p = get_preset(preset)
    torch.manual_seed(0)
    head = create_head(p["head"], width, 0, stage=2, **p["head_config"]).to(device).train()
    for stack in (head.block, head.temporal_block):
        if stack is not None:
            stack.checkpointing = checkpointing
    optimizer, _ = make_optimizer(head, 1e-4, 0.05, 10, 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    vocab = int(p["head_config"]["vocab_size"])
    g = torch.Generator().manual_seed(0)
    b = batch
    batch_data = ItmBatch(
        text_tokens=torch.randint(1000, vocab, (b, text_len), generator=g).to(device),
        text_mask=torch.ones(b, text_len, dtype=torch.bool, device=device),
        tokens=torch.randn(b, frames, tokens, width, generator=g).to(torch.float16).to(device),
        frame_mask=torch.ones(b, frames, dtype=torch.bool, device=device),
        pair_text=torch.cat([torch.arange(b), torch.arange(b), torch.arange(b).roll(1)]).to(device),
        pair_video=torch.cat([torch.arange(b), torch.arange(b).roll(1), torch.arange(b)]).to(device),
        labels=torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(device))
    t0 = time.perf_counter()
    with forward_precision(amp, device):
        video = head.encode_video(batch_data.tokens, batch_data.frame_mask)
        logits = head.match(batch_data.text_tokens, batch_data.text_mask, video, batch_data.pair_text,
                            batch_data.pair_video).float()
        loss = F.cross_entropy(logits, batch_data.labels)
        itc, _ = batch_itc_loss(head, batch_data, batch_data.pair_text[:b], batch_data.pair_video[:b], video)
        loss = loss + itc.float()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"batch": b, "seconds": round(seconds, 2), "parameters": head.num_parameters(),
           "rss_before_step_gib": round(before, 3),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.startswith("cuda"):
        out["peak_cuda_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="crosstvr-blip2")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2], help="positive pairs per step (each in its own process)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=257)
    ap.add_argument("--width", type=int, default=1408)
    ap.add_argument("--text-len", type=int, default=32)
    ap.add_argument("--grad-checkpoint", choices=["on", "off"], default="off")
    ap.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--paper-batch", type=int, default=128)
    ap.add_argument("--json", help="also write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(one_step(a.preset, int(a.child), a.frames, a.tokens, a.width, a.text_len,
                                  a.grad_checkpoint == "on", a.precision, a.device, a.threads)))
        return
    rows = []
    for b in a.batch:
        cmd = [sys.executable, __file__, "--child", str(b)] + [x for k in ("preset", "frames", "tokens", "width",
               "text_len", "grad_checkpoint", "amp", "device", "threads") for x in (f"--{k.replace('_', '-')}",
                                                                                   str(getattr(a, k)))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            raise SystemExit(f"batch {b} failed:\n{res.stderr[-2000:]}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        peak = r.get("peak_cuda_gib", r["peak_rss_gib"])
        print(f"batch {b:4d}: peak {'CUDA' if 'peak_cuda_gib' in r else 'RSS'} {peak:7.2f} GiB, step {r['seconds']:7.1f} s "
              f"({r['parameters']:,} parameters; before the step {r['rss_before_step_gib']:.2f} GiB RSS)")
    key = "peak_cuda_gib" if "peak_cuda_gib" in rows[0] else "peak_rss_gib"
    summary = {"preset": a.preset, "frames": a.frames, "tokens": a.tokens, "width": a.width,
               "grad_checkpoint": a.grad_checkpoint, "precision": a.precision, "device": a.device, "rows": rows}
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        per = (hi[key] - lo[key]) / (hi["batch"] - lo["batch"])
        fixed = lo[key] - per * lo["batch"]
        summary.update(per_positive_gib=round(per, 3), fixed_gib=round(fixed, 3),
                       paper_batch=a.paper_batch, paper_batch_gib=round(fixed + per * a.paper_batch, 1))
        print(f"per positive pair {per:.2f} GiB, fixed {fixed:.2f} GiB -> batch {a.paper_batch}: "
              f"{fixed + per * a.paper_batch:.1f} GiB (grad checkpoint {a.grad_checkpoint}, precision {a.precision}, {a.device})")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
