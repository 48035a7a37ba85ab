#!/usr/bin/env bash
# The GPU check of issue 12, one script with a time limit, run from the repository root on a machine with
# a GPU, torch (2.11), torchvision, timm, transformers, h5py, pyarrow and tqdm (Python 3.12) and NO package
# registry: installs the wheels carried in wheels/ (bench/gpu_wheels.sh fetches them), then measures
# bench/extract_gpu.py (ViT-B-32 and EVA01-g-14, random weights) and the decoders, writing to $OUT:
#   env.txt (GPU, versions), pip.txt, extract_gpu.json / .txt, decoders.json / .txt
# Environment: OUT (default gpu-out), LIMIT (seconds for extract_gpu.py, default 360; the whole script stays
# under 8 minutes), BENCH_ARGS (extra options for extract_gpu.py), PYTHON, SKIP_INSTALL=1 (packages present).
set -u
OUT=${OUT:-gpu-out}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-360}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  nproc
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda,
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1
PKGS="open_clip_torch decord av zarr numcodecs donfig google-crc32c ftfy wcwidth"
if [ "${SKIP_INSTALL:-0}" != 1 ]; then
  # a distribution's Python may be marked externally managed; this machine is thrown away after the run
  export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
  # resolve against what is installed; if a dependency is missing there, install ours alone and see;
  # if site-packages is not writable, into the user's
  "$PY" -m pip install --no-index --find-links wheels $PKGS > "$OUT/pip.txt" 2>&1 \
    || "$PY" -m pip install --no-index --no-deps --find-links wheels $PKGS >> "$OUT/pip.txt" 2>&1 \
    || "$PY" -m pip install --user --no-index --no-deps --find-links wheels $PKGS >> "$OUT/pip.txt" 2>&1
fi
"$PY" -c "import open_clip, zarr, decord, av, numcodecs, numpy
print('open_clip', open_clip.__version__, 'zarr', zarr.__version__, 'av', av.__version__, 'numpy', numpy.__version__)" \
  >> "$OUT/env.txt" 2>&1 || { echo "imports failed: see $OUT/env.txt and $OUT/pip.txt"; tail -5 "$OUT/env.txt"; exit 3; }
cat "$OUT/env.txt"
timeout -k 10 "$LIMIT" "$PY" bench/extract_gpu.py --json "$OUT/extract_gpu.json" ${BENCH_ARGS:-} 2>&1 \
  | grep -v "^WARNING:root:No pretrained" | tee "$OUT/extract_gpu.txt"
rc=${PIPESTATUS[0]}
# the decoders on this machine's cores (short: no long clips)
timeout -k 5 60 "$PY" bench/decoders.py --videos 8 --repeat 2 --long-videos 0 --json "$OUT/decoders.json" \
  > "$OUT/decoders.txt" 2>&1 || echo "decoders: exit $? (see $OUT/decoders.txt)"
grep -v "moov\|ERROR opening" "$OUT/decoders.txt" | tail -12
exit "$rc"
