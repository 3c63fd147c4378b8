#!/usr/bin/env bash
# Prepare the onnxruntime-gpu wheel for a GPU machine that reaches no network and takes at most
# 64 MiB of files per call (the device tool): download the wheel that pyproject.toml's `gpu` extra
# pins into .gpu-wheel/ (git-ignored), then split it into 60 MiB parts that travel one per call
# and are joined there. Run from anywhere; it runs nothing on a device.
#
#   scripts/gpu_wheel_parts.sh            # for the device image's Python (3.12)
#   PYTHON_VERSION=3.11 scripts/gpu_wheel_parts.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.gpu-wheel"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PART_SIZE=60M

requirement="$(python3 "$ROOT/scripts/requirements.py" gpu | grep '^onnxruntime-gpu==')"
rm -rf "$OUT"
mkdir -p "$OUT/parts"
# The wheel for the target's interpreter, not this one's: a cp311 wheel does not install on 3.12.
python3 -m pip download "$requirement" --no-deps --only-binary=:all: \
    --python-version "$PYTHON_VERSION" --implementation cp --platform manylinux_2_28_x86_64 \
    --dest "$OUT" --quiet
wheel="$(cd "$OUT" && ls onnxruntime_gpu-*.whl)"
(cd "$OUT" && sha256sum "$wheel" > parts/SHA256SUMS)
split -b "$PART_SIZE" "$OUT/$wheel" "$OUT/parts/$wheel.part-"

echo "$requirement for CPython $PYTHON_VERSION: $OUT/$wheel ($(du -h "$OUT/$wheel" | cut -f1))"
echo "parts (carry one per call; ignored files that were carried stay there between calls):"
(cd "$ROOT" && ls -1 .gpu-wheel/parts/)
cat <<EOF

On the device, once every part and .gpu-wheel/parts/SHA256SUMS are there (and models/, from
\`make demo test-gpu\` here, in a call of its own: it is about 50 MiB):
  cd .gpu-wheel && cat parts/$wheel.part-* > $wheel && sha256sum -c parts/SHA256SUMS && cd ..
  python3 -m pip install -q --no-index --no-deps --target /tmp/ort-gpu .gpu-wheel/$wheel
  TEXTGEN_GPU_MODEL_DIRS="models/tiny models/tiny-fp16" TEXTGEN_REQUIRE_CUDA=1 \\
    PYTHONPATH=/tmp/ort-gpu:server:sdk python3 -m pytest --noconftest -p no:cacheprovider -rs tests/test_gpu.py
onnxruntime-gpu needs CUDA 13 and cuDNN 9 on the library path; where they come from pip's nvidia-*
packages, add them to LD_LIBRARY_PATH first (or call onnxruntime.preload_dlls() before a session).
EOF
