"""The small ONNX graph that copies one KV slot to another where the cache lives.

The engine keeps running rows in the first slots of its cache buffers; when a row leaves, the last
row's slot is copied into the gap. On a GPU that copy must stay on the device, and the server has no
array library of its own there, so this graph (one Identity per cache tensor, all 2 x layers in one
run) does it on the model's execution provider: the engine binds its input and output by pointer
to the two slots. It depends on the layer count and dtype, so the exporter writes it beside
model.onnx (the server does not depend on the onnx package).
"""

from __future__ import annotations

from pathlib import Path

from onnx import helper, save_model
from textgen_server.model_config import KV_COPY_FILE

from .native_graph import ONNX_DTYPES, make_model


def write_kv_copy_graph(model_dir: Path, *, num_layers: int, dtype: str) -> None:
    elem = ONNX_DTYPES[dtype]
    dims = ["rows", "kv_heads", "max_len", "head_dim"]
    count = 2 * num_layers
    nodes = [helper.make_node("Identity", [f"src{i}"], [f"dst{i}"], name=f"copy{i}") for i in range(count)]
    inputs = [helper.make_tensor_value_info(f"src{i}", elem, dims) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"dst{i}", elem, dims) for i in range(count)]
    graph = helper.make_graph(nodes, "textgen_kv_copy", inputs, outputs)
    save_model(make_model(graph), str(model_dir / KV_COPY_FILE))
