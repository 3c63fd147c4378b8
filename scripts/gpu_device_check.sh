#!/usr/bin/env bash
# `make test-gpu` on a GPU machine that reaches no network, from what scripts/gpu_wheel_parts.sh
# prepared and the device calls carried: join and check the onnxruntime-gpu wheel, install it and
# .gpu-wheel/deps/ into a folder of their own (the machine's own packages stay untouched and come
# after it), say what the machine offers, then run tests/test_gpu.py on the demo models with CUDA
# required. Its log goes to $OUT (or /tmp/gpu-check). Run from the repository's root:
#
#   bash scripts/gpu_device_check.sh
#   TEXTGEN_REQUIRE_CUDA=0 bash scripts/gpu_device_check.sh   # a rehearsal on a machine without CUDA
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
LOGS="${OUT:-/tmp/gpu-check}"
SITE="${GPU_CHECK_SITE:-/tmp/ort-gpu-site}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$LOGS"

cd .gpu-wheel
wheel="$(cut -d' ' -f3 <parts/SHA256SUMS)"
cat parts/"$wheel".part-* >"$wheel"
sha256sum -c parts/SHA256SUMS
cd ..
rm -rf "$SITE"
"$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" \
    ".gpu-wheel/$wheel" .gpu-wheel/deps/*.whl
export PYTHONPATH="$SITE:server:sdk"

{
    nvidia-smi -L || echo "nvidia-smi: none here"
    "$PYTHON" - <<'EOF'
import sys

import onnxruntime as ort
from textgen_server.engine import preload_cuda_libraries

preload_cuda_libraries()
print(f"Python {sys.version.split()[0]}; onnxruntime {ort.__version__} from {ort.__file__}")
print(f"providers: {', '.join(ort.get_available_providers())}")
EOF
} 2>&1 | tee "$LOGS/machine.txt"

TEXTGEN_GPU_MODEL_DIRS="models/tiny models/tiny-fp16" TEXTGEN_GPU_LORA_DIR=models/tiny-lora \
    TEXTGEN_REQUIRE_CUDA="${TEXTGEN_REQUIRE_CUDA:-1}" PYTHONUNBUFFERED=1 \
    "$PYTHON" -m pytest --noconftest -p no:cacheprovider -W ignore::pytest.PytestConfigWarning -rs -v \
    tests/test_gpu.py 2>&1 | tee "$LOGS/test-gpu.log"
