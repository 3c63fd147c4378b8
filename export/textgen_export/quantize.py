"""int4 / int8 weights: the decoder's MatMuls become ONNX Runtime's MatMulNBits, and the damage is measured.

Quantization is ONNX Runtime's own `MatMulNBitsQuantizer` over the finished decoder graph (every
MatMul with a constant weight: q/k/v, o, gate/up, down, and the LM head unless excluded), with:

- block_size 32: the finest block MatMulNBits supports well on CPU and CUDA (llama.cpp's Q4_0 and
  Q8_0 use 32 too); larger blocks save a little memory and cost accuracy;
- symmetric blocks: no zero points to read, and Q4_0/Q8_0 are symmetric as well;
- accuracy_level 4: on the CPU the activations are quantized to int8 per block and the products
  run in integer arithmetic. Without it, CPU int4 at batch 16 was slower than fp32 and int8 25x
  slower (measured for issue 10). CUDA ignores it.

The LM head stays in the activation dtype for int4 and is quantized for int8. Measured on the bench
demo model (random weights, so its distributions are flat and the figures are a floor): int4 with
the LM head in fp32 agreed with fp32 on 48.1% of next tokens (mean KL 0.0104 nats), with a 4-bit LM
head on 48.6% (KL 0.0111); int8 with an 8-bit LM head on 96.7% (KL 0.00006). A 4-bit LM head costs
7% more KL there and saves a third of that model's bytes, but the LM head is only 2% of
Mistral-7B's weights, where every token's logits come from it: it stays unquantized.

`measure_quality` compares the quantized model with the unquantized one, teacher-forced over a fixed
text: the share of positions whose most likely next token agrees, and the mean KL divergence
KL(unquantized || quantized) of the next-token distributions.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from onnx import ModelProto

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
BITS = {"int4": 4, "int8": 8}

# A fixed English text (the README's first paragraphs would drift; this does not).
QUALITY_TEXT = (
    "The river starts high in the mountains, where snow melts slowly through the spring and early "
    "summer. By the time it reaches the valley it has gathered the water of a dozen smaller streams, "
    "and the old town was built where it first grows wide enough for boats. For three hundred years "
    "the town lived from the river: mills along its banks ground the grain of the farms upstream, "
    "barges carried timber and salt down to the coast, and every spring the floods brought fresh soil "
    "to the fields. Today most of the mills are museums or restaurants, the barges have given way to "
    "trucks on the highway, and a dam twenty kilometres upstream keeps the floods away. Yet people "
    "still walk along the river in the evening, children still throw stones from the bridge, and in "
    "the autumn the fishermen come back, as they always have, to wait for the salmon."
)


@dataclass(frozen=True)
class QuantizationReport:
    weight_dtype: str
    block_size: int
    accuracy_level: int
    lm_head_quantized: bool
    positions: int  # how many next-token distributions were compared
    next_token_agreement: float  # share of positions with the same argmax, 0..1
    mean_kl: float  # mean KL(unquantized || quantized), nats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def lm_head_quantized(weight_dtype: str) -> bool:
    return weight_dtype == "int8"


def quantize_decoder(model: ModelProto, weight_dtype: str, lm_head_node: str) -> ModelProto:
    """The decoder with its MatMul weights in `weight_dtype` ("int4" or "int8") as MatMulNBits."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # The quantizer logs one line per node at INFO; the exporter prints its own progress.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=BITS[weight_dtype],
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        nodes_to_exclude=[] if lm_head_quantized(weight_dtype) else [lm_head_node],
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantized: ModelProto = quantizer.model.model
    return quantized


def measure_quality(reference_dir: Path, quantized_dir: Path, weight_dtype: str) -> QuantizationReport:
    """Teacher-force QUALITY_TEXT through both model directories and compare next-token distributions."""
    from textgen_server.engine import Engine
    from textgen_server.model_config import TOKENIZER_FILE
    from textgen_server.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(quantized_dir / TOKENIZER_FILE)
    ids = [tokenizer.bos_id, *tokenizer.encode(QUALITY_TEXT)]
    per_engine = []
    for model_dir in (reference_dir, quantized_dir):
        engine = Engine(model_dir, provider="cpu", slots=1, max_len=len(ids) + 1)
        rows = [engine.prefill(0, ids[:1])]  # [vocab] after each prefix
        for position in range(1, len(ids) - 1):
            rows.append(engine.decode(np.array([ids[position]]), np.array([position]))[0])
        per_engine.append(np.stack(rows).astype(np.float64))  # [positions, vocab]
        del engine
    reference, quantized = per_engine
    log_p = reference - _logsumexp(reference)
    log_q = quantized - _logsumexp(quantized)
    kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)  # [positions]
    agreement = float(np.mean(reference.argmax(-1) == quantized.argmax(-1)))
    return QuantizationReport(
        weight_dtype=weight_dtype,
        block_size=BLOCK_SIZE,
        accuracy_level=ACCURACY_LEVEL,
        lm_head_quantized=lm_head_quantized(weight_dtype),
        positions=int(reference.shape[0]),
        next_token_agreement=agreement,
        mean_kl=float(kl.mean()),
    )


def _logsumexp(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log(sum(exp(x))) over the last axis, kept as [rows, 1]."""
    top = x.max(axis=-1, keepdims=True)
    result: npt.NDArray[np.float64] = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    return result
