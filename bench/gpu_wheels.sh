#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on a GPU machine that reaches no package registry and has
# torch, torchvision, timm, transformers, h5py, pyarrow and tqdm already (Python 3.12, x86_64 Linux):
# the rest of what the extraction benchmark imports, cp312 manylinux, versions as requirements.txt pins
# them. They go to wheels/ (git-ignored); the run tool carries at most 64 MiB, tree included: ~59 MiB here.
#   bash bench/gpu_wheels.sh [DIR]        (make gpu-wheels)
set -euo pipefail
DIR=${1:-wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
pin() { grep -E "^$1==" requirements.txt | head -1; }
PKGS=("$(pin open_clip_torch)" "$(pin decord)" "$(pin av)" "$(pin zarr)" "$(pin numcodecs)"
      donfig google-crc32c ftfy wcwidth)
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux2010_x86_64 -d "$DIR" "${PKGS[@]}"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
echo "$(ls "$DIR"/*.whl | wc -l) wheels in $DIR: $((total / 1048576)) MiB"
if [ "$total" -gt $((60 * 1048576)) ]; then
  echo "more than 60 MiB: with the repository they would not fit the 64 MiB the run tool carries" >&2
  exit 1
fi
