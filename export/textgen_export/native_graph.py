"""The ONNX decoder graph for Mistral/Llama, written op by op from the checkpoint's weights.

The graph is built around `com.microsoft.GroupQueryAttention` over a KV cache the engine allocates
once (engine.py): each layer's past key/value input is a buffer [batch, kv_heads, max_len, head_dim]
that the engine also binds as the layer's present output, so the op writes each step's new columns
in place. Every row sits at its own position, given by `seqlens_k` [batch] (the row's total length
minus one); rotary embeddings are applied inside the op at those positions, from cos/sin tables
stored in the graph. No attention mask, no position ids, no padding, no concatenation.

About 11 nodes a layer:
- q, k, v are one MatMul whose packed output feeds GroupQueryAttention directly; the MLP's gate and
  up are two, as in onnxruntime-genai's builder: packed, a Split copied their output into two and
  their adapters' B was block-diagonal, half zeros (on the bench model, four adapters mixed in 16
  streams went from 0.79x to 0.86x of all base in `make bench`; 16 base rows were unchanged);
- each residual add and the norm after it are one SkipSimplifiedLayerNormalization, as
  onnxruntime-genai's builder writes them;
- the LM head runs on the last position only; logits leave as float32 whatever the dtype.

With LoRA slots (`lora`, a LoraLayout), every target projection also adds its row's adapter. Per
layer and group the graph takes A^T [k*r, in] and B [k*r, out]: the blocks of k consecutive adapter
slots (r rows each) that the engine binds by pointer into stacks it allocates once (server
lora_stacks.py); `lora_index` [batch] gives each row's slot among them (1..k; 0: none, the base
model). Each projection computes x @ A for all k slots at once over all tokens (one Gemm, transB),
zeroes each token's products but its own slot's (`lora_mask`) and applies B (one MatMul): any mix of
adapters and the base model in one pass, with plain ONNX ops. A pass of the base model alone binds
k = 0 and does no adapter work (a MatMul with K = 0 gives zeros: onnxruntime since 1.19 on CUDA).
The packed q/k/v MatMul gets packed adapters too: A concatenated along the rank, B block-diagonal
(the layout's `groups`, model_config.LORA_GROUPS). The adapters stay in the activation dtype whatever the
weights' dtype (int4/int8 quantize the base projections' weights only).

Why not one adapter per row, gathered (A_all[lora_index], as vLLM's CPU path does): at 16 rows that
copies each row's adapter every step. On the bench demo model (one thread, CPU time of a 16-row decode
step, four rank-16 adapters mixed) the gathered form cost about 24 ms and this one 20 ms, the plain
graph 16.3 ms; a step of base rows alone costs 16.6 ms here and 23 ms gathered. The work grows with
the number of slots bound rather than with the rows.

Standard ONNX operators (opset 18) plus ONNX Runtime contrib ops that both its CPU and CUDA
providers implement (GroupQueryAttention, SimplifiedLayerNormalization,
SkipSimplifiedLayerNormalization, and MatMulNBits for int4/int8 weights); IR version 8, which
onnxruntime 1.32 and onnxruntime-gpu 1.31.1 both load. Tensor layouts are noted next to each op.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import GraphProto, ModelProto, NodeProto, TensorProto, ValueInfoProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data
from textgen_server.model_config import LoraLayout, ModelIO

from .errors import ExportError, missing_tensors

OPSET = 18
IR_VERSION = 8
# Weights beyond this many bytes are written to `model.onnx_data` beside the graph: a protobuf
# message cannot exceed 2 GB.
EXTERNAL_DATA_OVER = 1_800_000_000
LM_HEAD_NODE = "lm_head"  # its own bits when quantized (WeightBits.lm_head; quantize.py)
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


class ExternalData:
    """Initializers written to a data file beside the graph as the graph is built, so that no weight
    stays in memory once written (a 7B model's weights would otherwise be held two or three times:
    the arrays, their TensorProtos and the serialized model)."""

    ALIGNMENT = 4096  # page-aligned offsets: onnxruntime can map a weight instead of copying it
    MIN_BYTES = 1024  # smaller tensors stay in the graph, as onnx.save_model's size_threshold keeps them

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("wb")

    def tensor(self, name: str, array: npt.NDArray[Any]) -> TensorProto:
        """`array` appended to the data file; the TensorProto that points at it."""
        offset = self._file.tell()
        padding = -offset % self.ALIGNMENT
        self._file.write(b"\0" * padding)
        self._file.write(np.ascontiguousarray(array).data)
        proto = TensorProto(
            name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=list(array.shape)
        )
        proto.raw_data = b""  # set_external_data wants the field present; it points elsewhere instead
        set_external_data(proto, self.path.name, offset + padding, array.nbytes)
        proto.ClearField("raw_data")
        return proto

    def close(self) -> None:
        self._file.close()


@dataclass(frozen=True)
class WeightBits:
    """Quantized weights (MatMulNBits): the bits of the layers' projections and of the LM head."""

    layers: int
    lm_head: int


class _Builder:
    def __init__(
        self, dtype: str, external: ExternalData | None = None, bits: WeightBits | None = None
    ) -> None:
        self.dtype = dtype
        self.elem = ONNX_DTYPES[dtype]
        self.np_dtype = _NUMPY_DTYPES[dtype]
        self.external = external
        self.bits = bits
        self.nodes: list[NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._constants: set[str] = set()
        self.names: set[str] = set()  # outputs of single-output nodes so far
        self._count = 0

    def op(self, op_type: str, inputs: list[str], name: str = "", node: str = "", **attrs: Any) -> str:
        """A node with one output, named `name` (else generated); `node` names the node itself."""
        self._count += 1
        out = name or f"{op_type.lower()}_{self._count}"
        node_name = node or f"n{self._count}_{op_type}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=node_name, **attrs))
        self.names.add(out)
        return out

    def op_n(
        self,
        op_type: str,
        inputs: list[str],
        count: int,
        names: list[str] | None = None,
        omit: tuple[int, ...] = (),
        **attrs: Any,
    ) -> list[str]:
        """A node with `count` outputs; `names` gives some of them fixed names ("" = generated), and the
        optional outputs at the indices in `omit` are left out ("" in the node)."""
        self._count += 1
        outs = [
            "" if i in omit else (names[i] if names and names[i] else f"{op_type.lower()}_{self._count}_{i}")
            for i in range(count)
        ]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"n{self._count}_{op_type}", **attrs))
        return outs

    def weight(self, name: str, array: npt.NDArray[Any], cast: bool = True) -> str:
        values = array.astype(self.np_dtype, copy=False) if cast else array
        if self.external is not None and values.nbytes >= ExternalData.MIN_BYTES:
            self.initializers.append(self.external.tensor(name, values))
        else:
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def matmul(
        self, x: str, weight: str, array: npt.NDArray[Any], bits: int | None, name: str = "", node: str = ""
    ) -> str:
        """x @ array ([in, out], the initializer `weight`), or with `bits` the same product as
        MatMulNBits over the array quantized by onnxruntime's own quantizer (quantize.py): the node,
        initializers and attributes its MatMulNBitsQuantizer would make of the MatMul, so the weights
        need not be written in full first."""
        if bits is None:
            return self.op("MatMul", [x, self.weight(weight, array)], name=name, node=node)
        from .quantize import ACCURACY_LEVEL, BLOCK_SIZE, quantize_weight

        fan_in, fan_out = array.shape
        packed, scales = quantize_weight(array.astype(self.np_dtype, copy=False), bits)
        inputs = [
            x,
            self.weight(f"{weight}_Q{bits}", packed, cast=False),
            self.weight(f"{weight}_scales", scales),
        ]
        # Named as the quantizer names them: the node after the MatMul it replaces, the output as that
        # MatMul's was.
        matmul_node = node or f"n{self._count + 1}_MatMul"
        return self.op(
            "MatMulNBits",
            inputs,
            name=name or f"matmul_{self._count + 1}",
            node=f"{matmul_node}_Q{bits}",
            domain="com.microsoft",
            K=fan_in,
            N=fan_out,
            bits=bits,
            block_size=BLOCK_SIZE,
            accuracy_level=ACCURACY_LEVEL,
        )

    def ints(self, name: str, values: list[int]) -> str:
        """An int64 constant; asking again for the same name reuses it."""
        if name in self._constants:
            return name
        self._constants.add(name)
        return self.weight(name, np.array(values, dtype=np.int64), cast=False)


def _value_info(name: str, elem: int, dims: list[str | int]) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def lora_layout(shape: DecoderShape, slots: int, rank: int) -> LoraLayout:
    """The adapter slots of a decoder of this shape: every target projection, `rank` at most."""
    s = shape
    q_out, kv_out = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    modules = {
        "q_proj": (s.hidden_size, q_out),
        "k_proj": (s.hidden_size, kv_out),
        "v_proj": (s.hidden_size, kv_out),
        "o_proj": (q_out, s.hidden_size),
        "gate_proj": (s.hidden_size, s.intermediate_size),
        "up_proj": (s.hidden_size, s.intermediate_size),
        "down_proj": (s.intermediate_size, s.hidden_size),
    }
    return LoraLayout(slots=slots, rank=rank, modules=modules)


def expected_shapes(s: DecoderShape) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads, by its Hugging Face name: the shape config.json gives it."""
    q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    shapes = {
        "model.embed_tokens.weight": (s.vocab_size, s.hidden_size),
        "lm_head.weight": (s.vocab_size, s.hidden_size),
        "model.norm.weight": (s.hidden_size,),
    }
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "input_layernorm.weight": (s.hidden_size,),
            p + "post_attention_layernorm.weight": (s.hidden_size,),
            p + "self_attn.q_proj.weight": (q, s.hidden_size),
            p + "self_attn.k_proj.weight": (kv, s.hidden_size),
            p + "self_attn.v_proj.weight": (kv, s.hidden_size),
            p + "self_attn.o_proj.weight": (s.hidden_size, q),
            p + "mlp.gate_proj.weight": (s.intermediate_size, s.hidden_size),
            p + "mlp.up_proj.weight": (s.intermediate_size, s.hidden_size),
            p + "mlp.down_proj.weight": (s.hidden_size, s.intermediate_size),
        }
    return shapes


class CheckedWeights(Mapping[str, npt.NDArray[Any]]):
    """The checkpoint's tensors, each checked as the graph writer reads it: the shape config.json
    gives it, and finite values. A tensor of another shape would make a graph onnxruntime refuses
    (or, for a norm, one that fails at every request); NaN weights one that answers token 0 forever."""

    def __init__(
        self, weights: Mapping[str, npt.NDArray[Any]], shapes: Mapping[str, tuple[int, ...]]
    ) -> None:
        """Refuses a checkpoint that lacks any of `shapes`' tensors at once, before a layer is written."""
        missing = [name for name in shapes if name not in weights]
        if missing:
            raise missing_tensors(missing)
        self._weights = weights
        self._shapes = shapes

    def __getitem__(self, name: str) -> npt.NDArray[Any]:
        array = self._weights[name]
        expected = self._shapes.get(name)
        if expected is not None and tuple(array.shape) != expected:
            raise ExportError(
                f"the checkpoint's {name} is {list(array.shape)}, config.json makes it {list(expected)}"
            )
        if not np.isfinite(array).all():
            raise ExportError(f"the checkpoint's {name} holds NaN or infinite values")
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self._weights)

    def __len__(self) -> int:
        return len(self._weights)


def build_decoder_graph(
    shape: DecoderShape,
    weights: Mapping[str, npt.NDArray[Any]],
    dtype: str,
    io: ModelIO | None = None,
    lora: LoraLayout | None = None,
    external_data: Path | None = None,
    bits: WeightBits | None = None,
    on_layer: Callable[[int], None] | None = None,
) -> ModelProto:
    """The decoder as an ONNX model; `weights` are the checkpoint's tensors by their HF names, each
    looked up when its op is written (a CheckpointTensors reads it from disk then).
    With `lora`, the target projections carry adapter slots (module docstring). With `external_data`,
    the weights go to that file as they are written (save the model beside it with save_decoder).
    With `bits`, the projections' weights are quantized as they are written (MatMulNBits).
    `on_layer(n)` is called once the first n decoder layers are written, for progress output."""
    io = io or ModelIO()
    external = ExternalData(external_data) if external_data is not None else None
    try:
        checked = CheckedWeights(weights, expected_shapes(shape))
        return _build(shape, checked, io, lora, _Builder(dtype, external, bits), on_layer)
    finally:
        if external is not None:
            external.close()


def _build(
    s: DecoderShape,
    weights: Mapping[str, npt.NDArray[Any]],
    io: ModelIO,
    lora: LoraLayout | None,
    g: _Builder,
    on_layer: Callable[[int], None] | None,
) -> ModelProto:
    lora_inputs: list[ValueInfoProto] = []

    def projection(x: str, weight: str, array: npt.NDArray[Any], layer: int, group: str) -> str:
        """x @ array (the initializer `weight`, [in, out]), plus each row's adapter for this group when
        the graph has slots."""
        base = g.matmul(x, weight, array, g.bits.layers if g.bits else None)  # [b, seq, out]
        if lora is None:
            return base
        fan_in, rank, fan_out = lora.group_shape(group)
        a_name, b_name = io.lora_a.format(layer, group), io.lora_b.format(layer, group)
        rows = f"lora_{group}_rows"  # k * rank: the k slots bound this pass, `rank` rows each
        lora_inputs.append(_value_info(a_name, g.elem, [rows, fan_in]))  # A transposed, slot after slot
        lora_inputs.append(_value_info(b_name, g.elem, [rows, fan_out]))
        shape = f"lora_shape_{group}"  # [b*seq, k, rank]
        if shape not in g.names:
            g.op("Concat", ["lora_tokens", "lora_k", g.ints(f"c_rank_{group}", [rank])], name=shape, axis=0)
        # Every bound slot's A on every token (one GEMM over all tokens, each adapter read once), then
        # each token keeps its own slot's products and one GEMM applies the Bs.
        tokens = g.op("Reshape", [x, g.ints(f"c_flat_{fan_in}", [-1, fan_in])])  # [b*seq, in]
        xa = g.op("Gemm", [tokens, a_name], transB=1)  # [b*seq, k*rank]
        xa = g.op("Mul", [g.op("Reshape", [xa, shape]), "lora_mask"])  # [b*seq, k, rank]
        xa = g.op("Reshape", [xa, "lora_rows_shape"])  # [b, seq, k*rank]
        return g.op("Add", [base, g.op("MatMul", [xa, b_name])])  # [b, seq, out]

    g.ints("c_m1", [-1])
    g.ints("c_end", [2**63 - 1])
    g.ints("axes_1", [1])

    # Rotary tables for GroupQueryAttention (non-interleaved, i.e. transformers' rotate_half): inv_freq
    # as transformers computes it, one row per position the server can reach.
    inv_freq = 1.0 / (
        s.rope_theta ** (np.arange(0, s.head_dim, 2, dtype=np.int64).astype(np.float32) / s.head_dim)
    )
    angles = np.arange(s.max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]  # [positions, d/2]
    g.weight("cos_cache", np.cos(angles))
    g.weight("sin_cache", np.sin(angles))

    def rms_norm(x: str, weight_name: str) -> str:
        w = g.weight(weight_name, weights[weight_name])
        return g.op("SimplifiedLayerNormalization", [x, w], axis=-1, epsilon=s.rms_norm_eps, stash_type=1)

    def add_and_rms_norm(residual: str, x: str, weight_name: str) -> tuple[str, str]:
        """(rms_norm(residual + x), residual + x) in one op: one pass over the row, not an Add and then
        a norm (16 fewer nodes on the bench model, whose decode steps are short enough to notice)."""
        w = g.weight(weight_name, weights[weight_name])
        normed, _, _, total = g.op_n(
            "SkipSimplifiedLayerNormalization",
            [x, residual, w],
            4,
            omit=(1, 2),  # mean and inv_std_var
            domain="com.microsoft",
            epsilon=s.rms_norm_eps,
        )
        return normed, total

    if lora is not None:
        _lora_mask(g, io, lora_a=io.lora_a.format(0, "o"), rank=lora.group_shape("o")[1])
    hidden = g.op(
        "Gather", [g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"]), io.input_ids]
    )  # [b, seq, hidden]
    mlp_out = ""  # the last layer's MLP output, not yet added to `hidden`
    for layer in range(s.num_layers):
        p = f"model.layers.{layer}."
        # -- attention: one packed q/k/v MatMul, then GroupQueryAttention with the cache in place ----
        if mlp_out:
            normed, hidden = add_and_rms_norm(hidden, mlp_out, p + "input_layernorm.weight")
        else:
            normed = rms_norm(hidden, p + "input_layernorm.weight")
        qkv_w = np.concatenate([weights[p + f"self_attn.{n}_proj.weight"] for n in "qkv"], axis=0).T
        qkv = projection(normed, p + "qkv.weight", qkv_w, layer, "qkv")  # [b, seq, (h + 2 kv) d]
        # Rotary inside the op at each row's own positions (derived from seqlens_k); the new keys and
        # values are written into the past buffers, which the engine binds as the presents too.
        attended, _, _ = g.op_n(
            "GroupQueryAttention",
            [
                qkv,
                "",
                "",
                io.past_key.format(layer),  # [b, kv, max_len, d]
                io.past_value.format(layer),
                io.seqlens_k,  # [b] int32: each row's total length - 1
                io.total_sequence_length,  # [] int32: the longest row's total length
                "cos_cache",
                "sin_cache",
            ],
            3,
            names=["", io.present_key.format(layer), io.present_value.format(layer)],
            domain="com.microsoft",
            num_heads=s.num_heads,
            kv_num_heads=s.num_kv_heads,
            do_rotary=1,
            rotary_interleaved=0,
            scale=float(1.0 / np.sqrt(s.head_dim)),
        )  # [b, seq, h d]
        o_w = weights[p + "self_attn.o_proj.weight"].T
        attn_out = projection(attended, p + "self_attn.o_proj.weight", o_w, layer, "o")  # [b, seq, hidden]
        # -- MLP: down(silu(gate(x)) * up(x)) ------------------------------------------------------
        normed, hidden = add_and_rms_norm(hidden, attn_out, p + "post_attention_layernorm.weight")
        gate_w, up_w = weights[p + "mlp.gate_proj.weight"].T, weights[p + "mlp.up_proj.weight"].T
        gate = projection(normed, p + "mlp.gate_proj.weight", gate_w, layer, "gate")  # [b, seq, intermediate]
        up = projection(normed, p + "mlp.up_proj.weight", up_w, layer, "up")  # [b, seq, intermediate]
        activated = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        down_w = weights[p + "mlp.down_proj.weight"].T
        mlp_out = projection(activated, p + "mlp.down_proj.weight", down_w, layer, "down")  # [b, seq, hidden]
        if on_layer is not None:
            on_layer(layer + 1)

    # Only the last position's logits: slice before the final residual add and norm.
    last_hidden = g.op("Slice", [hidden, "c_m1", "c_end", "axes_1"])  # [b, 1, hidden]
    last_mlp = g.op("Slice", [mlp_out, "c_m1", "c_end", "axes_1"])  # [b, 1, hidden]
    normed, _ = add_and_rms_norm(last_hidden, last_mlp, "model.norm.weight")
    lm_w = weights["lm_head.weight"].T
    lm_bits = g.bits.lm_head if g.bits else None
    # A Cast copies the logits every step (65 µs of a 16-row fp32 step): only where the dtype changes.
    if g.elem == TensorProto.FLOAT:
        g.matmul(normed, "lm_head.weight", lm_w, lm_bits, name=io.logits, node=LM_HEAD_NODE)  # [b, 1, vocab]
    else:
        logits = g.matmul(normed, "lm_head.weight", lm_w, lm_bits, node=LM_HEAD_NODE)  # [b, 1, vocab]
        g.op("Cast", [logits], name=io.logits, to=TensorProto.FLOAT)

    kv_dims: list[str | int] = ["batch", s.num_kv_heads, "max_len", s.head_dim]
    inputs = [
        _value_info(io.input_ids, TensorProto.INT64, ["batch", "seq"]),
        _value_info(io.seqlens_k, TensorProto.INT32, ["batch"]),
        _value_info(io.total_sequence_length, TensorProto.INT32, []),
    ]
    if lora is not None:
        inputs.append(_value_info(io.lora_index, TensorProto.INT64, ["batch"]))
        inputs.extend(lora_inputs)
    outputs = [_value_info(io.logits, TensorProto.FLOAT, ["batch", 1, s.vocab_size])]
    for layer in range(s.num_layers):
        for past, present in ((io.past_key, io.present_key), (io.past_value, io.present_value)):
            inputs.append(_value_info(past.format(layer), g.elem, kv_dims))
            outputs.append(_value_info(present.format(layer), g.elem, kv_dims))
    graph = helper.make_graph(g.nodes, "textgen_decoder", inputs, outputs, initializer=g.initializers)
    return make_model(graph)


def _lora_mask(g: _Builder, io: ModelIO, lora_a: str, rank: int) -> None:
    """What every projection's adapter part shares: `lora_mask` [b*seq, k, 1], 1 where the token's
    row uses the j-th of the k slots bound (`lora_index` j + 1; 0, the base model, matches none);
    `lora_tokens` [1] = b*seq; `lora_k` [1] = k, from `lora_a` whose rows are k * `rank`; and
    `lora_rows_shape` = [b, seq, -1]."""
    batch_seq = g.op("Shape", [io.input_ids])  # [2]: b, seq
    g.op("Concat", [batch_seq, g.ints("c_m1", [-1])], name="lora_rows_shape", axis=0)
    g.op("ReduceProd", [batch_seq], name="lora_tokens", keepdims=1)  # [1]
    zero = g.ints("c_0", [0])
    rows = g.op("Gather", [g.op("Shape", [lora_a]), zero], axis=0)  # [1]
    k = g.op("Div", [rows, g.ints("c_lora_rank", [rank])], name="lora_k")  # [1]
    one = g.weight("c_scalar_1", np.array(1, dtype=np.int64), cast=False)
    slots = g.op("Range", [one, g.op("Add", [g.op("Squeeze", [k, zero]), one]), one])  # [k]: 1..k
    row_slot = g.op(
        "Expand", [g.op("Unsqueeze", [io.lora_index, g.ints("axes_1", [1])]), batch_seq]
    )  # [b, seq]
    token_slot = g.op("Reshape", [row_slot, g.ints("c_m1_1_1", [-1, 1, 1])])  # [b*seq, 1, 1]
    match = g.op(
        "Equal", [token_slot, g.op("Unsqueeze", [slots, g.ints("axes_02", [0, 2])])]
    )  # [b*seq, k, 1]
    g.op("Cast", [match], name="lora_mask", to=g.elem)


def make_model(graph: GraphProto) -> ModelProto:
    """A model both runtimes load: onnxruntime 1.32 (CPU) and onnxruntime-gpu 1.31.1 read IR <= 10."""
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)],
        producer_name="textgen",
    )
    model.ir_version = IR_VERSION
    return model


def save_decoder(model: ModelProto, path: Path) -> None:
    """Weights over 2 GB go to `<name>_data` beside the graph (protobuf's message limit). A model
    built with `external_data` (`<name>_data` beside `path`) already has them there."""
    from onnx import save_model

    if any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        save_model(model, str(path))
        return
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_OVER
    save_model(
        model,
        str(path),
        save_as_external_data=large,
        all_tensors_to_one_file=True,
        location=f"{path.name}_data",
        size_threshold=1024,
    )
