#!/usr/bin/env bash
# Fetch the wheels bench/gpu_check.sh installs on a GPU machine that reaches no package registry and has
# torch, torchvision, timm, transformers, h5py, pyarrow, jinja2, matplotlib, click and tqdm already
# (Python 3.12, x86_64 Linux): the rest of what the command line imports (faiss-cpu for index / search
# included), cp312 manylinux, versions as requirements.txt pins them.
# The run tool carries at most 64 MiB, the working tree included, and the wheels are ~77 MiB (av, faiss and
# decord bundle their libraries, already deflated): each wheel is re-zipped uncompressed (the same files,
# so pip installs it the same) and all go into one xz tarball, DIR/wheels.tar.xz (~50 MiB), which
# bench/gpu_check.sh unpacks and installs with pip --no-index. DIR is git-ignored (wheels/); carry it.
#   bash bench/gpu_wheels.sh [DIR]        (make gpu-wheels; several minutes: xz -9)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-wheels}
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$DIR" "$TMP/download" "$TMP/stored"
pin() { grep -E "^$1==" requirements.txt | head -1; }
PKGS=("$(pin open_clip_torch)" "$(pin decord)" "$(pin av)" "$(pin zarr)" "$(pin numcodecs)" "$(pin faiss-cpu)"
      donfig google-crc32c ftfy wcwidth)
"$PY" -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 -d "$TMP/download" "${PKGS[@]}"
fetched=$(du -cb "$TMP"/download/*.whl | tail -1 | cut -f1)
# the same members, stored instead of deflated (RECORD hashes the contents, not the zip: pip accepts them)
"$PY" - "$TMP/download" "$TMP/stored" <<'EOF'
import sys
import zipfile
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for whl in sorted(src.glob("*.whl")):
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            out = zipfile.ZipInfo(info.filename, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_STORED
            zout.writestr(out, zin.read(info))
    with zipfile.ZipFile(dst / whl.name) as check:
        assert check.testzip() is None, whl.name
EOF
rm -f "$DIR"/*.whl "$DIR/wheels.tar.xz"  # loose wheels of an older layout would travel too
if command -v xz > /dev/null; then
  tar -C "$TMP/stored" -cf - . | xz -9e -T0 > "$DIR/wheels.tar.xz.part"
else
  "$PY" -c "import lzma, sys, tarfile
with tarfile.open(sys.argv[1], 'w:xz', preset=9 | lzma.PRESET_EXTREME) as t:
    t.add(sys.argv[2], arcname='.')" "$DIR/wheels.tar.xz.part" "$TMP/stored"
fi
mv "$DIR/wheels.tar.xz.part" "$DIR/wheels.tar.xz"
packed=$(stat -c %s "$DIR/wheels.tar.xz")
# what else travels: the tracked and untracked-not-ignored files
tree=0
if command -v git > /dev/null && git rev-parse --git-dir > /dev/null 2>&1; then
  tree=$( (git ls-files; git ls-files --others --exclude-standard) | sort -u | tr '\n' '\0' \
          | du -cb --files0-from=- 2> /dev/null | tail -1 | cut -f1 || echo 0)
fi
echo "$(ls "$TMP"/download/*.whl | wc -l) wheels ($((fetched / 1048576)) MiB) in $DIR/wheels.tar.xz:" \
     "$((packed / 1048576)) MiB; with the working tree ($((tree / 1048576)) MiB): $(((packed + tree) / 1048576)) MiB"
if [ $((packed + tree)) -gt $((63 * 1048576)) ]; then
  echo "more than 63 MiB with the working tree: they would not fit the 64 MiB the run tool carries" >&2
  exit 1
fi
