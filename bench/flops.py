"""Matrix-product throughput of this machine as onnxruntime reaches it: one fp32 MatMul, large enough
to be bound by arithmetic rather than by memory, on the engine's own session options.

The compute-side counterpart of bench.membw: a decode step whose products multiply near this rate is
bound by arithmetic, however fast memory is.
"""

from __future__ import annotations

import time

import numpy as np

# [ROWS, K] x [K, N]: 3.2 GFLOP a product, with weights of 8 MiB that the cache keeps close.
ROWS, K, N = 512, 1024, 2048


def matmul_flops(threads: int, reps: int) -> list[float]:
    """FLOP/s of `reps` fp32 products [ROWS, K] x [K, N] (the weights an initializer, as in a model)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from textgen_server.engine import session_options

    if threads < 1 or reps < 1:
        raise ValueError("threads and reps must be at least 1")
    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.standard_normal((K, N), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, N])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )
    x = rng.standard_normal((ROWS, K), dtype=np.float32)
    session.run(None, {"x": x})  # untimed: packs the weights, warms the thread pool
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run(None, {"x": x})
        samples.append(2 * ROWS * K * N / (time.perf_counter() - start))
    return samples
