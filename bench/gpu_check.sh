#!/usr/bin/env bash
# The whole command line on a GPU, in one script with a time limit (run from anywhere; it works in the
# repository root). On the tiny synthetic world (tests/helpers.py: TINY_WORLD, TINY_HEAD) it runs every CLI
# step on the device: make-manifest, extract with both encoder kinds (open_clip: test-vit-micro, and
# without --quick the real ViT-B-32 with random weights; BLIP-2: a tiny Hugging Face BLIP-2 directory it
# writes with tests/blip2_world.py), train-stage-one, eval, train-head, rerank, index build, search,
# report, the BLIP-2-initialised head (train-head --preset crosstvr-blip2 --init-from, rerank), then the
# same training under torchrun (one process per GPU: NCCL on CUDA; two processes and gloo on --device cpu;
# one GPU: a collectives check shows NCCL, since the project joins no process group for one process),
# then the throughput and MFU figures of bench/extract_gpu.py (tiny on --device cpu).
#
#   bash bench/gpu_check.sh [--device cuda|cpu] [--out DIR] [--work DIR] [--quick]
#
# --device  cuda (default) or cpu: the dry run of the same script on a machine without a GPU
# --out     where the results go (default: $OUT, else ./gpu_check_out): gpu_check.json (every step: name,
#           exit status, seconds, command; a failed step's last lines), gpu_check.txt (the same as a table),
#           gpu_check.log (environment, pip, every step's output), extract_gpu.json, decoders.json,
#           report.html. At most 8 files, as the device tool brings back.
# --work    the work directory (manifests, stores, runs; default: a temporary one, removed at the end)
# --quick   the smallest set: no ViT-B-32 extraction, no BLIP-2 head, one torchrun training, no decoders
#           (on cpu: no collectives check and no benchmark, which tests/test_bench_extract_gpu.py runs)
#
# Nothing is installed from a registry: where wheels/ holds what bench/gpu_wheels.sh (make gpu-wheels)
# fetched (wheels.tar.xz or loose .whl files), they are installed first, with pip --no-index.
# A failing step is recorded and the script goes on (a step whose input a failed step should have made is
# recorded as skipped); it exits 1 if any step failed, 0 otherwise.
# Environment: PYTHON (default .venv/bin/python where it exists, else python3), LIMIT (seconds for the
# whole script, default 480 on cuda, 1800 on cpu: the benchmark gets what is left, and no step runs more
# than 30 s past it), STEP_LIMIT (seconds per step, default 180),
# BENCH_ARGS (extra options for bench/extract_gpu.py), SKIP_INSTALL=1 (packages present), NPROC (torchrun
# processes; default the GPUs, 2 on cpu).
set -u
T_START=$(date +%s.%N)
DEVICE=cuda
OUT_DIR=${OUT:-gpu_check_out}
WORK=""
QUICK=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cuda or cpu}; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    --out) OUT_DIR=${2:?--out needs a directory}; shift 2 ;;
    --out=*) OUT_DIR=${1#*=}; shift ;;
    --work) WORK=${2:?--work needs a directory}; shift 2 ;;
    --work=*) WORK=${1#*=}; shift ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--device cuda|cpu, --out DIR, --work DIR, --quick)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
# --out and --work relative to where the script was called from; the steps run in the repository root
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd) || exit 2
if [ -n "$WORK" ]; then mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || exit 2; fi
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

KEEP_WORK=1
if [ -z "$WORK" ]; then
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
  KEEP_WORK=0
fi
mkdir -p "$WORK/logs" || exit 2
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python
else PY=python3; fi
if [ "$DEVICE" = cuda ]; then LIMIT=${LIMIT:-480}; else LIMIT=${LIMIT:-1800}; fi
STEP_LIMIT=${STEP_LIMIT:-180}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
TSV=$WORK/steps.tsv
LOG=$OUT_DIR/gpu_check.log
: > "$TSV"
: > "$LOG"
rm -f "$OUT_DIR/gpu_check.json" "$OUT_DIR/gpu_check.txt" "$OUT_DIR/extract_gpu.json" "$OUT_DIR/decoders.json" \
  "$OUT_DIR/report.html"

now() { date +%s.%N; }
cpu_used() {  # CPU_USED: user + system seconds of this shell's finished children so far (no subshell: times
  times > "$WORK/times.txt"  # reports the calling shell's)
  CPU_USED=$(tail -1 "$WORK/times.txt" \
    | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] } printf "%.1f", t }')
}
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
left() {  # seconds of LIMIT left
  awk -v a="$T_START" -v b="$(now)" -v l="$LIMIT" 'BEGIN { printf "%d", l - (b - a) }'
}


# gpu_check.json / gpu_check.txt from the steps so far (rewritten after every step: a run cut short keeps them)
write_results() {
  "$PY" - "$TSV" "$OUT_DIR" "$DEVICE" "$QUICK" "$(elapsed "$T_START")" "$WORK" <<'EOF'
import json, sys
from pathlib import Path
tsv, out, device, quick, seconds, work = sys.argv[1:7]
steps = []
for line in Path(tsv).read_text().splitlines():
    name, status, secs, note, cmd, cpu = (line.split("\t") + [""] * 6)[:6]
    step = {"name": name, "status": int(status) if status.lstrip("-").isdigit() else None,
            "seconds": float(secs), "cpu_seconds": float(cpu or 0), "command": cmd}
    if note:
        step["note"] = note
    log = Path(work) / "logs" / f"{name}.log"
    if step["status"] not in (0, None) and log.exists():
        step["tail"] = log.read_text(errors="replace").splitlines()[-25:]
    steps.append(step)
failed = [s["name"] for s in steps if s["status"] != 0 and not s.get("note", "").startswith("not needed")]
env = [line for f in ("env.log", "imports.log") if (Path(work) / "logs" / f).exists()
       for line in (Path(work) / "logs" / f).read_text(errors="replace").splitlines()]
res = {"device": device, "quick": quick == "1", "seconds": float(seconds), "ok": not failed, "failed": failed,
       "env": env, "steps": steps}
Path(out, "gpu_check.json").write_text(json.dumps(res, indent=1) + "\n")
w = max([len(s["name"]) for s in steps] + [4])
rows = [f"gpu_check on {device}{' (quick)' if quick == '1' else ''}: {len(steps) - len(failed)} of {len(steps)} "
        f"steps ok, {float(seconds):.1f}s" + (f"; FAILED: {', '.join(failed)}" if failed else ""),
        f"{'step':{w}s}  {'status':>7s}  {'seconds':>8s}  {'cpu s':>7s}  note"]
for s in steps:
    st = "skipped" if s["status"] is None else str(s["status"])
    rows.append(f"{s['name']:{w}s}  {st:>7s}  {s['seconds']:8.1f}  {s['cpu_seconds']:7.1f}  {s.get('note', '')}")
Path(out, "gpu_check.txt").write_text("\n".join(rows) + "\n")
EOF
}

record() {  # name status seconds note command [cpu seconds] (one line: tabs and newlines become spaces)
  local cmd=${5//$'\n'/ }
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${cmd//$'\t'/ }" "${6:-0.0}" >> "$TSV"
  printf '%-26s %7s %8ss  %s\n' "$1" "$([ "$2" = skip ] && echo skipped || echo "$2")" "$3" "$4"
  write_results
}

passed() {  # every named step ran and exited 0
  local s
  for s in "$@"; do
    awk -F'\t' -v n="$s" '$1 == n && $2 == "0" { found = 1 } END { exit !found }' "$TSV" || return 1
  done
}

# step NAME NEEDS LIMIT COMMAND...: run COMMAND (its output to the log), record its exit status and time;
# NEEDS: the steps (comma list, or -) whose outputs it reads: if one did not pass, it is skipped
step() {
  local name=$1 needs=$2 limit=$3 t0 c0 rc dep
  shift 3
  if [ "$needs" != - ]; then
    for dep in ${needs//,/ }; do
      if ! passed "$dep"; then
        STEP_NOTE=""
        record "$name" skip 0.0 "skipped: $dep did not pass" "$*"
        echo "=== $name: skipped ($dep did not pass)" >> "$LOG"
        return 1
      fi
    done
  fi
  local rest
  rest=$(left)
  [ "$rest" -lt 30 ] && rest=30
  [ "$limit" -gt "$rest" ] && limit=$rest  # no step runs more than 30 s past LIMIT
  t0=$(now)
  cpu_used
  c0=$CPU_USED
  if declare -F "$1" > /dev/null; then  # a function of this script (exported below): through bash
    timeout -k 10 "$limit" bash -c '"$@"' _ "$@" > "$WORK/logs/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  fi
  rc=$?
  local secs cpu note=${STEP_NOTE:-}
  STEP_NOTE=""
  secs=$(elapsed "$t0")
  cpu_used
  cpu=$(awk -v a="$c0" -v b="$CPU_USED" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="timed out after ${limit}s${note:+; $note}"
  { echo "=== $name: exit $rc, ${secs}s: $*"; cat "$WORK/logs/$name.log"; echo; } >> "$LOG"
  record "$name" "$rc" "$secs" "$note" "$*" "$cpu"
  return "$rc"
}

# -- the environment -----------------------------------------------------------------------------------
{
  date -u
  echo "device $DEVICE, quick $QUICK, work $WORK, python $PY"
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  else echo "no nvidia-smi"; fi
  echo "cpus $(nproc)"
} > "$WORK/logs/env.log" 2>&1
{ echo "=== environment"; cat "$WORK/logs/env.log"; echo; } >> "$LOG"
cat "$WORK/logs/env.log"

# -- the wheels (nothing from a registry) ----------------------------------------------------------------
PKGS="open_clip_torch decord av zarr numcodecs donfig google-crc32c ftfy wcwidth faiss-cpu"
install_wheels() {
  # a distribution's Python may be marked externally managed; this machine is thrown away after the run
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  local dir=wheels
  if [ -f wheels/wheels.tar.xz ]; then  # bench/gpu_wheels.sh packs them so that they fit the 64 MiB carried
    dir=$WORK/wheels
    mkdir -p "$dir" && "$PY" -c "import sys, tarfile
with tarfile.open(sys.argv[1]) as t:
    t.extractall(sys.argv[2], filter='data')" wheels/wheels.tar.xz "$dir" || return 1
    ls -l "$dir"
  fi
  # resolve against what is installed; if a dependency is missing there, install ours alone and see;
  # if site-packages is not writable, into the user's
  "$PY" -m pip install --no-index --find-links "$dir" $PKGS \
    || "$PY" -m pip install --no-index --no-deps --find-links "$dir" $PKGS \
    || "$PY" -m pip install --user --no-index --no-deps --find-links "$dir" $PKGS
}
export PY ROOT WORK PKGS
export -f install_wheels
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  record install-wheels skip 0.0 "not needed: SKIP_INSTALL=1" ""
elif [ -f wheels/wheels.tar.xz ] || ls wheels/*.whl > /dev/null 2>&1; then
  step install-wheels - 240 install_wheels
else
  record install-wheels skip 0.0 "not needed: no wheels/ (make gpu-wheels)" ""
fi
step imports - 120 "$PY" -c "
import sys, torch, open_clip, zarr, decord, av, numcodecs, faiss, transformers, jinja2, matplotlib, click
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.device_count(), 'GPUs', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')
print('open_clip', open_clip.__version__, 'zarr', zarr.__version__, 'av', av.__version__, 'faiss', faiss.__version__,
      'transformers', transformers.__version__)
if sys.argv[1] == 'cuda':
    assert torch.cuda.is_available(), 'torch sees no GPU'
    x = torch.randn(256, 256, device='cuda')
    y = (x @ x).cpu()
    assert torch.allclose(y, x.cpu().double().matmul(x.cpu().double()).float(), rtol=1e-2, atol=1e-2), 'matmul'
    print(torch.cuda.get_device_name(0), 'matmul ok')
" "$DEVICE"

# -- the tiny synthetic world ------------------------------------------------------------------------------
W=$WORK
M=$W/synthetic/manifest
S=$W/stores/synthetic-micro.zarr
SB=$W/stores/synthetic-blip2.zarr
B2=$W/blip2-tiny
DEV=(--device "$DEVICE")
TINY_WORLD=(--option train_groups=2 --option train_random=6 --option val_groups=1 --option val_random=3
            --option test_groups=1 --option test_random=3)
TINY_HEAD=(--head-option width=16 --head-option layers=1 --head-option heads=2 --head-option num_queries=2
           --head-option spatial_frames=2)
EXTRACT=(--manifest "$M" --work-dir "$W" --frames 4 --shard-size 8 --workers 2)
CLI=("$PY" "$ROOT/cli.py")

make_blip2() {  # the tests' tiny BLIP-2 save (tests/blip2_world.py); inline where that is not importable
  "$PY" - "$B2" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, str(Path.cwd() / "tests"))
try:
    from blip2_world import make_blip2_dir
except ImportError:  # the same directory, written here
    def make_blip2_dir(d):
        import torch
        from transformers import (BertTokenizer, Blip2Config, Blip2ForImageTextRetrieval, BlipImageProcessor)
        words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
            "a the red green blue yellow purple orange square circle triangle star cross moves left right up "
            "down spins stays still appears early late small big object thing and with on in of is").split()
        cfg = Blip2Config(
            vision_config=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8, qkv_bias=True, layer_norm_eps=1e-6),
            qformer_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                cross_attention_frequency=2, encoder_hidden_size=24, vocab_size=len(words),
                                max_position_embeddings=40, pad_token_id=0, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0, use_qformer_text_input=True),
            text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             ffn_dim=32, vocab_size=len(words), max_position_embeddings=32, word_embed_proj_dim=16),
            num_query_tokens=4, image_text_hidden_size=16)
        torch.manual_seed(0)
        Blip2ForImageTextRetrieval(cfg).eval().save_pretrained(d)
        BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(d)
        BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(d)
        return Path(d)
print(make_blip2_dir(Path(sys.argv[1])))
EOF
}

export B2
export -f make_blip2
step make-manifest - "$STEP_LIMIT" "${CLI[@]}" make-manifest --dataset synthetic --work-dir "$W" "${TINY_WORLD[@]}"
step blip2-dir - "$STEP_LIMIT" make_blip2
step extract-open_clip make-manifest "$STEP_LIMIT" "${CLI[@]}" extract "${EXTRACT[@]}" --encoder test-vit-micro \
  --store "$S" "${DEV[@]}"
step extract-blip2 make-manifest,blip2-dir "$STEP_LIMIT" "${CLI[@]}" extract "${EXTRACT[@]}" --encoder "blip2:$B2" \
  --store "$SB" "${DEV[@]}"
if [ "$QUICK" = 0 ]; then  # the real ViT-B/32 (random weights: nothing is downloaded)
  step extract-vit-b32 make-manifest "$STEP_LIMIT" "${CLI[@]}" extract "${EXTRACT[@]}" --encoder ViT-B-32 \
    --store "$W/stores/synthetic-b32.zarr" "${DEV[@]}"
fi

# -- stage one, stage two, search and the report on the open_clip store --------------------------------
S1=$W/runs/s1
S2=$W/runs/s2
step train-stage-one extract-open_clip "$STEP_LIMIT" "${CLI[@]}" train-stage-one --store "$S" --work-dir "$W" \
  --head seqTransf --head-option num_layers=1 --head-option width=32 --epochs 1 --batch-size 8 --out "$S1" "${DEV[@]}"
step eval train-stage-one "$STEP_LIMIT" "${CLI[@]}" eval --store "$S" --work-dir "$W" --stage-one "$S1/stage_one.pt" \
  --out "$W/reports/eval" "${DEV[@]}"
step train-head train-stage-one "$STEP_LIMIT" "${CLI[@]}" train-head --store "$S" --work-dir "$W" \
  --stage-one "$S1/stage_one.pt" --epochs 1 --batch-size 4 --itc-steps 3 --itc-batch 4 --out "$S2" \
  "${TINY_HEAD[@]}" "${DEV[@]}"
step rerank train-head "$STEP_LIMIT" "${CLI[@]}" rerank --store "$S" --work-dir "$W" --stage-one "$S1/stage_one.pt" \
  --stage-two "$S2" --candidates 3 --out "$W/reports/rerank" "${DEV[@]}"
step index-build train-stage-one "$STEP_LIMIT" "${CLI[@]}" index build --store "$S" --work-dir "$W" \
  --stage-one "$S1" --out "$W/indexes/flat" "${DEV[@]}"
step search index-build,train-head "$STEP_LIMIT" "${CLI[@]}" search --store "$S" --work-dir "$W" --stage-one "$S1" \
  --stage-two "$S2" --index "$W/indexes/flat" --top 3 --candidates 4 --out "$W/search.json" "${DEV[@]}" \
  "a red square moves left"
step report rerank "$STEP_LIMIT" "${CLI[@]}" report --rerank-dir "$W/reports/rerank" --run "$S1" --run "$S2" \
  --improved 2 --hurt 2 --random 2 -o "$W/report.html" && cp "$W/report.html" "$OUT_DIR/report.html"

# -- the BLIP-2-initialised head (the paper's Large re-ranker) on the BLIP-2 store ------------------------
if [ "$QUICK" = 0 ]; then
  step train-stage-one-blip2 extract-blip2 "$STEP_LIMIT" "${CLI[@]}" train-stage-one --store "$SB" --work-dir "$W" \
    --head meanP --epochs 1 --batch-size 8 --out "$W/runs/b1" "${DEV[@]}"
  step train-head-blip2 train-stage-one-blip2 "$STEP_LIMIT" "${CLI[@]}" train-head --preset crosstvr-blip2 \
    --init-from "$B2" --store "$SB" --work-dir "$W" --stage-one "$W/runs/b1/stage_one.pt" --epochs 1 \
    --batch-size 4 --val-queries 4 --text-len 12 --out "$W/runs/b2" "${DEV[@]}"
  step rerank-blip2 train-head-blip2 "$STEP_LIMIT" "${CLI[@]}" rerank --store "$SB" --work-dir "$W" \
    --stage-one "$W/runs/b1/stage_one.pt" --stage-two "$W/runs/b2" --candidates 3 --out "$W/reports/rerank-blip2" "${DEV[@]}"
fi

# -- the same training under torchrun: one process per GPU (NCCL); on cpu two processes (gloo) ---------------
# heads/training/distributed.py joins a process group only for 2 or more processes: on a machine with one
# GPU the training runs under torchrun as one process, and the collectives step alone shows NCCL working
if [ -z "${NPROC:-}" ]; then
  NPROC=2
  if [ "$DEVICE" = cuda ]; then
    NPROC=$("$PY" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
  fi
fi
free_port() { "$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
torchrun() {  # torchrun SCRIPT ARGS...: SCRIPT under torch.distributed.run, NPROC processes on this machine
  local cmd=("$PY" -m torch.distributed.run --nnodes=1 --nproc_per_node="$NPROC" --rdzv-backend=c10d
             --rdzv-endpoint="127.0.0.1:$(free_port)" "$@")
  echo "+ ${cmd[*]}" >&2
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "${cmd[@]}"
}
cat > "$WORK/collectives.py" <<'EOF'
"""Each rank: the process group (nccl on cuda, gloo on cpu), all_reduce, all_gather and a barrier, checked."""
import os
import sys

import torch
import torch.distributed as dist

backend = "nccl" if sys.argv[1] == "cuda" else "gloo"
local = int(os.environ["LOCAL_RANK"])
if backend == "nccl":
    torch.cuda.set_device(local)
dist.init_process_group(backend)
rank, world = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", local) if backend == "nccl" else torch.device("cpu")
x = torch.full((1024,), float(rank + 1), device=dev)
dist.all_reduce(x)
parts = [torch.empty(3, device=dev) for _ in range(world)]
dist.all_gather(parts, torch.full((3,), float(rank), device=dev))
dist.barrier()
assert torch.all(x == world * (world + 1) / 2), x[:4]
assert [int(q[0]) for q in parts] == list(range(world)), parts
sys.stdout.write(f"rank {rank} of {world}: {backend} all_reduce, all_gather and barrier ok on {dev}\n")
sys.stdout.flush()
dist.destroy_process_group()
EOF
export NPROC
export -f free_port torchrun
if [ "$DEVICE" = cuda ] || [ "$QUICK" = 0 ]; then
  step torchrun-collectives imports 120 torchrun "$WORK/collectives.py" "$DEVICE"
fi
single() {  # the note of a training under torchrun with one process
  [ "$NPROC" = 1 ] && STEP_NOTE="1 process: the training joins no process group (torchrun-collectives checks it)"
}
single
step torchrun-train-stage-one extract-open_clip "$STEP_LIMIT" torchrun "$ROOT/cli.py" train-stage-one --store "$S" \
  --work-dir "$W" --head seqTransf --head-option num_layers=1 --head-option width=32 --epochs 1 --batch-size 8 \
  --out "$W/runs/s1-ddp" "${DEV[@]}"
if [ "$QUICK" = 0 ]; then
  single
  step torchrun-train-head train-stage-one "$STEP_LIMIT" torchrun "$ROOT/cli.py" train-head --store "$S" \
    --work-dir "$W" \
    --stage-one "$S1/stage_one.pt" --epochs 1 --batch-size 4 --itc-steps 3 --itc-batch 4 --out "$W/runs/s2-ddp" \
    "${TINY_HEAD[@]}" "${DEV[@]}"
fi

# -- throughput and MFU (bench/extract_gpu.py): what is left of LIMIT; tiny on cpu ---------------------------
if [ "$DEVICE" = cuda ]; then
  budget=$(( $(left) - ( QUICK ? 0 : 45 ) ))
  [ "$budget" -lt 60 ] && budget=60
  step bench-extract-gpu imports "$budget" "$PY" bench/extract_gpu.py --json "$OUT_DIR/extract_gpu.json" \
    --work-dir "$W/bench" ${BENCH_ARGS:-}
  if [ "$QUICK" = 0 ]; then  # the decoders on this machine's cores (short: no long clips)
    step bench-decoders imports 45 "$PY" bench/decoders.py --videos 8 --repeat 2 --long-videos 0 \
      --json "$OUT_DIR/decoders.json"
  fi
elif [ "$QUICK" = 0 ]; then  # tiny (tests/test_bench_extract_gpu.py runs the same; --quick leaves it to that)
  step bench-extract-gpu imports "$STEP_LIMIT" "$PY" bench/extract_gpu.py --device cpu --encoders test-vit-micro \
    --frames 8 --batch-size 8 --videos 3 --distinct-videos 2 --video-frames 12 --size 48 --clip-frames 4 \
    --workers 1 --work-dir "$W/bench" --json "$OUT_DIR/extract_gpu.json" ${BENCH_ARGS:-}
fi
grep -v "^WARNING:root:No pretrained" "$WORK/logs/bench-extract-gpu.log" 2>/dev/null | tail -12

write_results
echo
cat "$OUT_DIR/gpu_check.txt"
echo "results: $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.txt, $OUT_DIR/gpu_check.log"
# exit 1 if a step failed or was skipped for want of its input
awk -F'\t' '$2 != "0" && $4 !~ /^not needed/ { bad = 1 } END { exit bad }' "$TSV"
rc=$?
[ "$KEEP_WORK" = 0 ] && rm -rf "$WORK"
exit "$rc"
