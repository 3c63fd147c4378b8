"""Side-by-side benchmarks: this engine vs transformers vs onnxruntime-genai, the memory roofline,
the gRPC cost and a concurrency sweep, measured in one run (`make bench`, `python -m bench`).

Imports nothing heavy: the onnxruntime-genai worker runs this package from its own virtualenv.
"""
