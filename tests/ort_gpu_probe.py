"""Run by tests/test_onnxruntime_versions.py under the onnxruntime-gpu virtualenv (on its CPU provider).

Reads a JSON request on stdin, `{"model_dirs": [...], "prompts": [[ids], ...], "new_tokens": n}`, and
prints one JSON object: the onnxruntime distributions installed and the version imported, and for
each model directory the load error of every `*.onnx` file in it (null when it loaded) and the
engine's greedy tokens for each prompt alone and for all of them decoded together (or the engine's
error). Every file is tried, whatever its name, so graphs the exporter adds later are covered too.
With `"adapters": {model_dir: [adapter .npz, ...]}` and `"adapter_rows": [slot per prompt]`, those
adapters go into slots 1.. of that model and `with_adapters` holds the rows decoded together, row i
through slot adapter_rows[i].
"""

from __future__ import annotations

import importlib.metadata
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import onnxruntime as ort
from greedy import engine_greedy, engine_greedy_rows
from textgen_server.engine import Engine
from textgen_server.lora_format import load_adapter


def _distribution() -> dict[str, str]:
    found = {}
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _load_error(path: Path) -> str | None:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 -- the error is the result
        return f"{type(exc).__name__}: {exc}"
    return None


def _probe_model(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, adapters: list[str], adapter_rows: list[int]
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "graphs": {path.name: _load_error(path) for path in sorted(model_dir.glob("*.onnx"))}
    }
    try:
        # The cache as a GPU holds it (OrtValues bound by pointer), each prompt alone, then all together.
        engine = Engine(model_dir, provider="cpu", slots=len(prompts), host_arrays=False)
        result["alone"] = [engine_greedy(engine, prompt, new_tokens) for prompt in prompts]
        result["batched"] = engine_greedy_rows(engine, prompts, new_tokens)
        if adapters:
            for slot, path in enumerate(adapters, start=1):
                engine.load_adapter(slot, load_adapter(Path(path), engine.config))
            result["with_adapters"] = engine_greedy_rows(engine, prompts, new_tokens, adapters=adapter_rows)
    except Exception:  # noqa: BLE001 -- reported to the test, which fails with it
        result["engine_error"] = traceback.format_exc()
    return result


def main() -> None:
    request = json.load(sys.stdin)
    report = {
        "distributions": _distribution(),
        "version": ort.__version__,
        "available_providers": ort.get_available_providers(),
        "models": {
            name: _probe_model(
                Path(name),
                request["prompts"],
                request["new_tokens"],
                request.get("adapters", {}).get(name, []),
                request.get("adapter_rows", []),
            )
            for name in request["model_dirs"]
        },
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
