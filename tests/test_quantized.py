"""int4 and int8 weights: exports that report their quality and serve exactly like the engine offline."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from server_harness import ServerThread
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as rpc
from textgen_export.native_graph import LM_HEAD_NODE
from textgen_server.engine import Engine
from textgen_server.model_config import ModelConfig
from textgen_server.prompt import encode_prompt
from textgen_server.tokenizer import Tokenizer

PROMPTS = ["Hello", "Tell me about rivers", "1 2 3 4 5 6 7 8", "Write a poem about the sea, please"]


# (weights, LM head): the two defaults, and the 4-bit LM head of onnxruntime-genai's int4 builds.
VARIANTS = [("int4", None), ("int8", None), ("int4", "int4")]


@pytest.fixture(scope="module", params=VARIANTS, ids=["int4", "int8", "int4-lm-head-int4"])
def quantized_dir(request: pytest.FixtureRequest, quantized_model_dir: Callable[..., Path]) -> Path:
    weight_dtype, lm_head = request.param
    return quantized_model_dir(weight_dtype, lm_head=lm_head)


def _offline_greedy(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    tokens = [int(engine.prefill(0, prompt).argmax())]
    while len(tokens) < new_tokens:
        logits = engine.decode(np.array([tokens[-1]]), np.array([len(prompt) + len(tokens) - 1]))
        tokens.append(int(logits[0].argmax()))
    return tokens


def test_export_reports_its_quality_and_quantizes_the_linear_layers(quantized_dir: Path) -> None:
    config = ModelConfig.load(quantized_dir)
    weight_dtype, _, lm_head = quantized_dir.name.partition("-lm-head-")
    lm_head_bits = int((lm_head or "int8")[3:])
    assert (config.weight_dtype, config.dtype) == (weight_dtype, "fp32")
    report = config.quantization
    assert report["weight_dtype"] == weight_dtype and report["block_size"] == 32
    assert report["positions"] > 100
    assert 0.0 <= report["next_token_agreement"] <= 1.0 and report["mean_kl"] >= 0.0
    graph = onnx.load(str(quantized_dir / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    plain = [n.name for n in graph.node if n.op_type == "MatMul"]
    # Per layer: qkv, o, gate, up, down (2 layers), and the LM head, in 8 bits unless asked otherwise.
    assert len(nbits) == 2 * 5 + 1 and plain == []
    bits = {n.name: a.i for n in nbits for a in n.attribute if a.name == "bits"}
    accuracy = {a.i for n in nbits for a in n.attribute if a.name == "accuracy_level"}
    assert bits.pop(f"{LM_HEAD_NODE}_Q{lm_head_bits}") == lm_head_bits == report["lm_head_bits"]
    assert set(bits.values()) == {int(weight_dtype[3:])} and accuracy == {4}


@pytest.fixture(scope="module")
def served(quantized_dir: Path) -> Iterator[rpc.TextGenerationStub]:
    harness = ServerThread(quantized_dir)
    with grpc.insecure_channel(harness.target) as channel:
        yield rpc.TextGenerationStub(channel)
    harness.stop(grace=1)


def test_served_greedy_equals_the_engine_offline_in_a_batch(
    quantized_dir: Path, served: rpc.TextGenerationStub
) -> None:
    tokenizer = Tokenizer.from_file(quantized_dir / "tokenizer.json")
    engine = Engine(quantized_dir, provider="cpu", slots=1)
    expected = [_offline_greedy(engine, encode_prompt(tokenizer, p, raw=False), 24) for p in PROMPTS]

    def stream(prompt: str) -> list[int]:
        request = pb.GenerateRequest(prompt=prompt, max_tokens=24, temperature=0)
        return [m.token.id for m in served.GenerateStream(request)]

    with ThreadPoolExecutor(max_workers=len(PROMPTS) * 2) as pool:  # each prompt twice, all at once
        together = list(pool.map(stream, PROMPTS * 2))
    eos = tokenizer.eos_id
    for got, want in zip(together, expected * 2, strict=True):
        cut = want.index(eos) + 1 if eos in want else len(want)
        assert got == want[:cut]
    info = served.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.weight_dtype, info.dtype) == (quantized_dir.name.partition("-lm-head-")[0], "fp32")


def _onnxruntime_quantizer(model: onnx.ModelProto, weight_dtype: str, lm_head: str) -> onnx.ModelProto:
    """The reference: onnxruntime's MatMulNBitsQuantizer over the whole unquantized graph, the layers
    in one pass and the LM head in another where its bits differ."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    def quantize(model: onnx.ModelProto, bits: int, **nodes: list[str]) -> onnx.ModelProto:
        quantizer = MatMulNBitsQuantizer(
            model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4, **nodes
        )
        quantizer.process()
        result: onnx.ModelProto = quantizer.model.model
        return result

    bits, head_bits = int(weight_dtype[3:]), int(lm_head[3:])
    if bits == head_bits:
        return quantize(model, bits)
    return quantize(
        quantize(model, bits, nodes_to_exclude=[LM_HEAD_NODE]), head_bits, nodes_to_include=[LM_HEAD_NODE]
    )


@pytest.mark.parametrize(("weight_dtype", "lm_head"), VARIANTS, ids=["int4", "int8", "int4-lm-head-int4"])
def test_weights_are_quantized_as_onnxruntimes_quantizer_quantizes_the_unquantized_graph(
    tiny_model_dir: Path, quantized_model_dir: Callable[..., Path], weight_dtype: str, lm_head: str | None
) -> None:
    """The graph writer quantizes each weight as it writes it, never holding the unquantized graph:
    the result must be the graph onnxruntime's quantizer makes of the unquantized export, node for
    node and byte for byte."""
    reference = _onnxruntime_quantizer(
        onnx.load(str(tiny_model_dir / "model.onnx")), weight_dtype, lm_head or "int8"
    )
    ours = onnx.load(str(quantized_model_dir(weight_dtype, lm_head=lm_head) / "model.onnx"))

    def nodes(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
        return {node.name: node for node in model.graph.node}

    assert nodes(ours) == nodes(reference)
    used = {name for node in reference.graph.node for name in node.input}
    expected = {t.name: numpy_helper.to_array(t) for t in reference.graph.initializer if t.name in used}
    written = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    assert written.keys() == expected.keys()
    for name, array in written.items():
        assert array.dtype == expected[name].dtype and array.shape == expected[name].shape, name
        np.testing.assert_array_equal(array, expected[name], err_msg=name)
