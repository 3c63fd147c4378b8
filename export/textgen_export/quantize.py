"""int4 / int8 weights: the decoder's MatMuls become ONNX Runtime's MatMulNBits, and the damage is measured.

Quantization is ONNX Runtime's own, applied by the graph writer to each weight as it is written
(`quantize_weight`: the function `MatMulNBitsQuantizer` calls per MatMul, so the graph is the one the
quantizer would make of the unquantized graph, without the unquantized graph held in memory first):
q/k/v, o, gate/up, down and the LM head, with:

- block_size 32: the finest block MatMulNBits supports well on CPU and CUDA (llama.cpp's Q4_0 and
  Q8_0 use 32 too); larger blocks save a little memory and cost accuracy;
- symmetric blocks: no zero points to read, and Q4_0/Q8_0 are symmetric as well;
- accuracy_level 4: on the CPU the activations are quantized to int8 per block and the products
  run in integer arithmetic. Without it, CPU int4 at batch 16 was slower than fp32 and int8 25x
  slower (measured for issue 10). CUDA ignores it.

The LM head is int8 in both by default (`--lm-head int4` makes it 4-bit): every token's logits come
from it, and 4 bits there cost measurable quality where 8 bits cost none. Measured on the bench demo model (random weights, so its
distributions are flat and the figures are a floor; batch-1 decode, prompt 128, 2 threads,
interleaved): int4 with the LM head in fp32 agreed with fp32 on 48.1% of next tokens (mean KL 0.0104
nats) at 146 tok/s, with an int8 LM head on the same 48.1% (KL 0.0104) at 243 tok/s, with a 4-bit
LM head on 48.6% (KL 0.0111, 7% more) at 273 tok/s; int8 throughout agreed on 96.7% (KL 0.00006).
The bench model's LM head is 40% of its bytes per token; Mistral-7B's is 2% of its weights, but in
fp32 beside int4 layers it would still be 13% of what each token reads. onnxruntime-genai's builder
quantizes its LM head with the layers, so `--lm-head int4` is the like-for-like export beside its int4.

`measure_quality` compares the quantized model with the unquantized one, teacher-forced over a fixed
text: the share of positions whose most likely next token agrees, and the mean KL divergence
KL(unquantized || quantized) of the next-token distributions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4
BITS = {"int4": 4, "int8": 8}
DEFAULT_LM_HEAD = "int8"  # for either dtype; see above

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
class QualityReport:
    """What quantization cost, measured against the unquantized model."""

    positions: int  # how many next-token distributions were compared
    next_token_agreement: float  # share of positions with the same argmax, 0..1
    mean_kl: float  # mean KL(unquantized || quantized), nats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def quantization_settings(weight_dtype: str, lm_head_dtype: str = DEFAULT_LM_HEAD) -> dict[str, Any]:
    """How a quantized export was quantized, as textgen.json records it (its QualityReport beside it
    when the quality was measured)."""
    return {
        "weight_dtype": weight_dtype,
        "block_size": BLOCK_SIZE,
        "accuracy_level": ACCURACY_LEVEL,
        "lm_head_bits": BITS[lm_head_dtype],
    }


def quantize_weight(weight: npt.NDArray[Any], bits: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[Any]]:
    """A MatMul weight [K, N] in MatMulNBits' layout, by the function onnxruntime's MatMulNBitsQuantizer
    calls for each weight (symmetric blocks of BLOCK_SIZE along K): the packed weight
    [N, K / BLOCK_SIZE, BLOCK_SIZE * bits / 8] and the scales [N, K / BLOCK_SIZE] in the weight's dtype."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        DefaultWeightOnlyQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits
    )
    # Contiguous: the C++ function reads the buffer as [K, N] whatever the strides (a transposed view
    # came out as other bytes than the quantizer makes of the stored initializer).
    packed, scales, _ = DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(weight))
    return packed, scales


def measure_quality(reference_dir: Path, quantized_dir: Path) -> QualityReport:
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
    return QualityReport(
        positions=int(reference.shape[0]),
        next_token_agreement=agreement,
        mean_kl=float(kl.mean()),
    )


def _logsumexp(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """log(sum(exp(x))) over the last axis, kept as [rows, 1]."""
    top = x.max(axis=-1, keepdims=True)
    result: npt.NDArray[np.float64] = top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))
    return result
