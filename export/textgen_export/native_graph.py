"""A compact ONNX graph for Mistral/Llama decoders, written op by op from the checkpoint's weights.

Same inputs and outputs as optimum's `text-generation-with-past` export (so the engine, the KV
graphs and the tests serve either), but about 35 nodes a layer instead of about 160:

- the attention mask and the rotary tables are computed once per pass, not once per layer;
- grouped-query attention multiplies each KV head with its group of query heads directly
  ([batch, kv_heads, group, seq, head_dim] x [batch, kv_heads, 1, head_dim, total]) instead of
  copying the cache once per query head (transformers' repeat_kv, an Expand in optimum's graph);
- q, k, v are one MatMul, and so are the MLP's gate and up projections;
- the LM head runs on the last position only; logits leave as float32 whatever the dtype.

Only standard ONNX operators (opset 18), so every execution provider runs it. Tensor layouts are
noted next to each op.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from textgen_server.model_config import ModelIO

OPSET = 18
ONNX_DTYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16}
_NUMPY_DTYPES: dict[str, type[np.floating[Any]]] = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class DecoderShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    max_positions: int

    @classmethod
    def from_hf_config(cls, config: Any, max_positions: int) -> DecoderShape:
        heads = int(config.num_attention_heads)
        return cls(
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(config.num_key_value_heads or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            rope_theta=float(getattr(config, "rope_theta", 10000.0)),
            rms_norm_eps=float(config.rms_norm_eps),
            max_positions=max_positions,
        )


class _Builder:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.elem = ONNX_DTYPES[dtype]
        self.np_dtype = _NUMPY_DTYPES[dtype]
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def op(self, op_type: str, inputs: list[str], name: str = "", **attrs: Any) -> str:
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"n{self._count}_{op_type}", **attrs))
        return out

    def op_n(self, op_type: str, inputs: list[str], count: int, **attrs: Any) -> list[str]:
        self._count += 1
        outs = [f"{op_type.lower()}_{self._count}_{i}" for i in range(count)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._count}_{op_type}", **attrs))
        return outs

    def weight(self, name: str, array: npt.NDArray[Any], cast: bool = True) -> str:
        values = array.astype(self.np_dtype, copy=False) if cast else array
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.array(values, dtype=np.int64), cast=False)


def _value_info(name: str, elem: int, dims: list[str | int]) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def build_decoder_graph(
    shape: DecoderShape, weights: dict[str, npt.NDArray[Any]], dtype: str, io: ModelIO | None = None
) -> ModelProto:
    """The decoder as an ONNX model; `weights` are the checkpoint's tensors by their HF names."""
    io = io or ModelIO()
    g = _Builder(dtype)
    s = shape
    group = s.num_heads // s.num_kv_heads
    half = s.head_dim // 2

    # Constants shared by every layer.
    g.ints("c_1", [1])
    g.ints("c_m1", [-1])
    g.ints("c_end", [2**63 - 1])
    g.ints("axes_0", [0])
    g.ints("axes_1", [1])
    g.ints("axes_2", [2])
    g.ints("axes_1_2", [1, 2])
    g.ints("q_heads_shape", [0, 0, s.num_heads, s.head_dim])  # [batch, seq, heads, head_dim]
    g.ints("kv_heads_shape", [0, 0, s.num_kv_heads, s.head_dim])
    g.ints("grouped_shape", [0, s.num_kv_heads, group, -1, s.head_dim])  # [b, kv, group, seq, d]
    g.ints("heads_shape", [0, s.num_heads, -1, s.head_dim])  # [batch, heads, seq, head_dim]
    g.ints("hidden_shape", [0, 0, s.num_heads * s.head_dim])  # [batch, seq, heads * head_dim]
    g.ints("split_qkv", [s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim, s.num_kv_heads * s.head_dim])
    g.ints("split_mlp", [s.intermediate_size, s.intermediate_size])
    g.weight("scale", np.array(1.0 / np.sqrt(s.head_dim)))
    g.weight("zero", np.array(0.0))
    g.weight("masked", np.array(np.finfo(g.np_dtype).min))

    # Rotary tables: inv_freq as transformers computes it, angles for every position we serve.
    inv_freq = 1.0 / (
        s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.int64).astype(np.float32) / s.head_dim)
    )
    angles = np.arange(s.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [positions, half]
    angles = np.concatenate([angles, angles], axis=-1)  # [positions, head_dim]
    g.weight("cos_table", np.cos(angles))
    g.weight("sin_table", np.sin(angles))
    # rotate_half(x) = concat(-x[half:], x[:half]) as a [head_dim, head_dim] matrix: x @ R.
    rotate = np.zeros((s.head_dim, s.head_dim), dtype=np.float32)
    rotate[np.arange(half) + half, np.arange(half)] = -1.0
    rotate[np.arange(half), np.arange(half) + half] = 1.0

    # -- once per pass: positions' rotary factors and the attention bias --------------------------
    cos = g.op("Unsqueeze", [g.op("Gather", ["cos_table", io.position_ids]), "axes_1"])  # [b, 1, seq, d]
    sin = g.op("Unsqueeze", [g.op("Gather", ["sin_table", io.position_ids]), "axes_1"])  # [b, 1, seq, d]
    total = g.op("Slice", [g.op("Shape", [io.attention_mask]), "c_1", "c_end"])  # [1] = past + seq
    seq = g.op("Slice", [g.op("Shape", [io.input_ids]), "c_1", "c_end"])  # [1]
    total_s = g.op("Squeeze", [total, "axes_0"])
    seq_start = g.op("Squeeze", [g.op("Sub", [total, seq]), "axes_0"])
    key_col = g.op("Unsqueeze", [g.op("Range", ["c_0_s", total_s, "c_1_s"]), "axes_0"])  # [1, total]
    query_col = g.op("Unsqueeze", [g.op("Range", [seq_start, total_s, "c_1_s"]), "axes_1"])  # [seq, 1]
    g.initializers.append(numpy_helper.from_array(np.array(0, dtype=np.int64), "c_0_s"))
    g.initializers.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "c_1_s"))
    causal = g.op("LessOrEqual", [key_col, query_col])  # [seq, total]
    itself = g.op("Equal", [key_col, query_col])  # [seq, total]
    real_key = g.op(
        "Unsqueeze", [g.op("Cast", [io.attention_mask], to=TensorProto.BOOL), "axes_1_2"]
    )  # [b,1,1,t]
    # A padding query may see itself, so that no row of the softmax is all masked (NaN-free).
    allowed = g.op("Or", [g.op("And", [causal, real_key]), itself])  # [b, 1, seq, total]
    bias = g.op("Unsqueeze", [g.op("Where", [allowed, "zero", "masked"]), "axes_1"])  # [b, 1, 1, seq, t]

    def rms_norm(x: str, weight_name: str) -> str:
        w = g.weight(weight_name, weights[weight_name])
        return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=s.rms_norm_eps, stash_type=1)

    def rope(x: str) -> str:  # x: [b, heads, seq, d]
        rotated = g.op("MatMul", [x, "rotate_half_t"])
        return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])])

    g.weight("rotate_half_t", rotate)
    hidden = g.op(
        "Gather", [g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"]), io.input_ids]
    )  # [b, seq, hidden]
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}."
        # -- attention -----------------------------------------------------------------------------
        normed = rms_norm(hidden, p + "input_layernorm.weight")
        qkv_w = np.concatenate([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], axis=0).T
        qkv = g.op("MatMul", [normed, g.weight(p + "qkv.weight", qkv_w)])  # [b, seq, (h + 2 kv) d]
        q, k, v = g.op_n("Split", [qkv, "split_qkv"], 3, axis=-1)
        q = g.op("Transpose", [g.op("Reshape", [q, "q_heads_shape"])], perm=[0, 2, 1, 3])  # [b, h, seq, d]
        k = g.op("Transpose", [g.op("Reshape", [k, "kv_heads_shape"])], perm=[0, 2, 1, 3])  # [b, kv, seq, d]
        v = g.op("Transpose", [g.op("Reshape", [v, "kv_heads_shape"])], perm=[0, 2, 1, 3])
        q = g.op("Mul", [rope(q), "scale"])
        present_k = g.op(
            "Concat", [io.past_key.format(layer), rope(k)], name=io.present_key.format(layer), axis=2
        )
        present_v = g.op(
            "Concat", [io.past_value.format(layer), v], name=io.present_value.format(layer), axis=2
        )
        grouped_q = g.op("Reshape", [q, "grouped_shape"])  # [b, kv, group, seq, d]
        # Transpose right before the MatMul, so that ORT fuses it into FusedMatMul(transB) and the
        # cache is not copied out transposed every step.
        keys = g.op("Unsqueeze", [present_k, "axes_2"])  # [b, kv, 1, total, d]
        keys_t = g.op("Transpose", [keys], perm=[0, 1, 2, 4, 3])  # [b, kv, 1, d, total]
        scores = g.op("Add", [g.op("MatMul", [grouped_q, keys_t]), bias])  # [b, kv, group, seq, total]
        probs = g.op("Softmax", [scores], axis=-1)
        values = g.op("Unsqueeze", [present_v, "axes_2"])  # [b, kv, 1, total, d]
        attended = g.op("Reshape", [g.op("MatMul", [probs, values]), "heads_shape"])  # [b, h, seq, d]
        attended = g.op("Reshape", [g.op("Transpose", [attended], perm=[0, 2, 1, 3]), "hidden_shape"])
        o_w = g.weight(p + "self_attn.o_proj.weight", weights[p + "self_attn.o_proj.weight"].T)
        hidden = g.op("Add", [hidden, g.op("MatMul", [attended, o_w])])  # [b, seq, hidden]
        # -- MLP: down(silu(gate(x)) * up(x)) ------------------------------------------------------
        normed = rms_norm(hidden, p + "post_attention_layernorm.weight")
        gate_up_w = np.concatenate(
            [weights[p + "mlp.gate_proj.weight"], weights[p + "mlp.up_proj.weight"]], 0
        ).T
        gate, up = g.op_n(
            "Split",
            [g.op("MatMul", [normed, g.weight(p + "gate_up.weight", gate_up_w)]), "split_mlp"],
            2,
            axis=-1,
        )  # [b, seq, intermediate] each
        activated = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        down_w = g.weight(p + "mlp.down_proj.weight", weights[p + "mlp.down_proj.weight"].T)
        hidden = g.op("Add", [hidden, g.op("MatMul", [activated, down_w])])

    last = g.op("Slice", [hidden, "c_m1", "c_end", "axes_1"])  # [b, 1, hidden]
    normed = rms_norm(last, "model.norm.weight")
    lm_w = g.weight("lm_head.weight", weights["lm_head.weight"].T)
    logits = g.op("MatMul", [normed, lm_w])  # [b, 1, vocab]
    g.op("Cast", [logits], name=io.logits, to=TensorProto.FLOAT)

    kv_dims: list[str | int] = ["batch", s.num_kv_heads, "past", s.head_dim]
    present_dims: list[str | int] = ["batch", s.num_kv_heads, "total", s.head_dim]
    inputs = [
        _value_info(io.input_ids, TensorProto.INT64, ["batch", "seq"]),
        _value_info(io.attention_mask, TensorProto.INT64, ["batch", "total"]),
        _value_info(io.position_ids, TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [_value_info(io.logits, TensorProto.FLOAT, ["batch", 1, s.vocab_size])]
    for layer in range(s.num_layers):
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
            inputs.append(_value_info(past.format(layer), g.elem, kv_dims))
            outputs.append(_value_info(present.format(layer), g.elem, present_dims))
    graph = helper.make_graph(g.nodes, "textgen_decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="textgen")
    model.ir_version = 8
    return model


def save_decoder(model: ModelProto, path: Path) -> None:
    """Weights over 2 GB go to `<name>_data` beside the graph (protobuf's message limit)."""
    from onnx import save_model

    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{path.name}_data",
        size_threshold=1024,
    )
