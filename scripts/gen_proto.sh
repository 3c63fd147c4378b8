#!/usr/bin/env bash
# Regenerate the Python stubs of the API contract (proto/textgen/v1/*.proto):
#   sdk/textgen/v1/textgen_pb2.py, textgen_pb2_grpc.py and their .pyi (mypy-protobuf).
# Idempotent: the same tool versions give byte-identical files. `make proto` calls this;
# tests/test_proto_stubs.py runs it into a temporary directory to catch stale stubs.
#
# Usage: scripts/gen_proto.sh [OUT_DIR]    (default: sdk)
# The interpreter is $PYTHON, else the repository's .venv, else python3; it needs
# grpcio-tools, and mypy-protobuf's protoc-gen-mypy / protoc-gen-mypy_grpc beside it.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/sdk}"

if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
  python="$root/.venv/bin/python"
else
  python="$(command -v python3)"
fi
# The mypy-protobuf plugins are installed beside the interpreter.
bindir="$(dirname "$python")"
export PATH="$bindir:$PATH"

cd "$root"
mkdir -p "$out"
mapfile -t protos < <(find proto -name '*.proto' | LC_ALL=C sort)
"$python" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  "${protos[@]#proto/}"

# textgen.v1 is a regular package (mypy and setuptools need the marker file).
init="$out/textgen/v1/__init__.py"
if [[ ! -f "$init" ]]; then
  echo '"""Generated gRPC stubs of the textgen.v1 API; regenerate with scripts/gen_proto.sh."""' > "$init"
fi
