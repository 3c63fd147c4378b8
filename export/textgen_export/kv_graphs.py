"""Two tiny ONNX graphs that join and slice KV caches where they live.

Continuous batching reshapes the cache whenever sequences join or leave (text-generation-inference's
CausalLMBatch.concatenate / filter). Through numpy, a GPU's whole cache would go to the host and back
each time; these graphs run in ONNX Runtime on the model's own execution provider instead, each
handling all 2 x layers cache tensors in one run. They depend on the layer count and dtype, so the
exporter writes them beside model.onnx (the server does not depend on the onnx package).
"""

from __future__ import annotations

from pathlib import Path

from onnx import ModelProto, TensorProto, ValueInfoProto, helper, save_model
from textgen_server.model_config import KV_JOIN_FILE, KV_SELECT_FILE

from .native_graph import ONNX_DTYPES, OPSET


def _cache_input(name: str, elem_type: int) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, ["batch", "kv_heads", "width", "head_dim"])


def _join_graph(count: int, elem_type: int) -> ModelProto:
    """out_i = concat(left-pad(a_i, pad_a), left-pad(b_i, pad_b)) along the batch axis."""
    nodes, inputs, outputs = [], [], []
    for name in ("pad_a", "pad_b"):  # [8]: begin then end pads of [batch, kv_heads, width, head_dim]
        inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, [8]))
    for i in range(count):
        inputs += [_cache_input(f"a{i}", elem_type), _cache_input(f"b{i}", elem_type)]
        nodes += [
            helper.make_node("Pad", [f"a{i}", "pad_a"], [f"pa{i}"]),
            helper.make_node("Pad", [f"b{i}", "pad_b"], [f"pb{i}"]),
            helper.make_node("Concat", [f"pa{i}", f"pb{i}"], [f"out{i}"], axis=0),
        ]
        outputs.append(_cache_input(f"out{i}", elem_type))
    graph = helper.make_graph(nodes, "textgen_kv_join", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _select_graph(count: int, elem_type: int) -> ModelProto:
    """out_i = x_i[rows, :, first:, :]: keep some rows, drop leading columns."""
    inputs = [
        helper.make_tensor_value_info("rows", TensorProto.INT64, ["kept"]),
        helper.make_tensor_value_info("first", TensorProto.INT64, [1]),
    ]
    initializers = [
        helper.make_tensor("end", TensorProto.INT64, [1], [2**63 - 1]),
        helper.make_tensor("width_axis", TensorProto.INT64, [1], [2]),
    ]
    nodes, outputs = [], []
    for i in range(count):
        inputs.append(_cache_input(f"x{i}", elem_type))
        nodes += [
            helper.make_node("Gather", [f"x{i}", "rows"], [f"g{i}"], axis=0),
            helper.make_node("Slice", [f"g{i}", "first", "end", "width_axis"], [f"out{i}"]),
        ]
        outputs.append(_cache_input(f"out{i}", elem_type))
    graph = helper.make_graph(nodes, "textgen_kv_select", inputs, outputs, initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def write_kv_graphs(model_dir: Path, *, num_layers: int, dtype: str) -> None:
    count = 2 * num_layers  # a key and a value tensor per layer
    save_model(_join_graph(count, ONNX_DTYPES[dtype]), str(model_dir / KV_JOIN_FILE))
    save_model(_select_graph(count, ONNX_DTYPES[dtype]), str(model_dir / KV_SELECT_FILE))
