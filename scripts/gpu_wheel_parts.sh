#!/usr/bin/env bash
# Prepare `make test-gpu` for a GPU machine that reaches no network and takes at most 64 MiB of files
# per call (the device tool): download the onnxruntime-gpu wheel that pyproject.toml's `gpu` extra
# pins into .gpu-wheel/ (git-ignored) and split it into 60 MiB parts that travel one per call, and
# download the rest of what .venv-ort-gpu installs (the `gpu` extra's other requirements and pytest,
# with their dependencies) into .gpu-wheel/deps/, so that the tests there run on the versions they
# run on here whatever the machine's image holds. Run from anywhere; it runs nothing on a device.
# scripts/gpu_device_check.sh joins, installs and tests there.
#
#   scripts/gpu_wheel_parts.sh            # for the device image's Python (3.12)
#   PYTHON_VERSION=3.11 scripts/gpu_wheel_parts.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.gpu-wheel"
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"
PART_SIZE=60M
# The wheels for the target's interpreter, not this one's: a cp311 wheel does not install on 3.12.
# pip matches manylinux tags exactly, so each one the wheels use is named.
TARGET=(--only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp
    --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)

requirements="$(python3 "$ROOT/scripts/requirements.py" gpu 'pytest>=8')"
wheel_requirement="$(grep '^onnxruntime-gpu==' <<<"$requirements")"
rm -rf "$OUT"
mkdir -p "$OUT/parts" "$OUT/deps"
python3 -m pip download "$wheel_requirement" --no-deps "${TARGET[@]}" --dest "$OUT" --quiet
grep -v '^onnxruntime-gpu==' <<<"$requirements" >"$OUT/requirements.txt"
python3 -m pip download -r "$OUT/requirements.txt" "${TARGET[@]}" --dest "$OUT/deps" --quiet
wheel="$(cd "$OUT" && ls onnxruntime_gpu-*.whl)"
(cd "$OUT" && sha256sum "$wheel" >parts/SHA256SUMS)
split -b "$PART_SIZE" "$OUT/$wheel" "$OUT/parts/$wheel.part-"

mib() { du -cm "$@" | tail -1 | cut -f1; }
echo "$wheel_requirement for CPython $PYTHON_VERSION: $OUT/$wheel ($(mib "$OUT/$wheel") MiB)"
echo "its dependencies and pytest: .gpu-wheel/deps/ ($(ls "$OUT/deps" | wc -l) wheels, $(mib "$OUT/deps") MiB)"
parts=()
while IFS= read -r part; do parts+=(".gpu-wheel/parts/$part"); done < <(ls "$OUT/parts" | grep -- '\.part-')
last="${parts[-1]}"
cat <<EOF

The device calls, one after another while the machine is warm (ignored files carried in one call
stay there for the next); each carries under 64 MiB with the working tree. Build the models here
first: make models/tiny/textgen.json models/tiny-fp16/textgen.json models/tiny-lora/textgen.json
EOF
for part in "${parts[@]}"; do
    [ "$part" = "$last" ] || echo "  carry [\"$part\"]   command: true"
done
echo "  carry [\"$last\", \".gpu-wheel/parts/SHA256SUMS\", \".gpu-wheel/deps\", \"models/tiny-fp16\"]   command: true"
echo "  carry [\"models/tiny\", \"models/tiny-lora\"]   command: bash scripts/gpu_device_check.sh"
