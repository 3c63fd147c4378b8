"""Memory read bandwidth of this machine: numpy sums a large array, on 1 and on N threads.

An integer sum is a plain streaming read (no pairwise tree as for floats), and numpy releases the GIL
in reductions, so N Python threads summing N slices read in parallel.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt


def read_bandwidth(threads: int, size_bytes: int, reps: int) -> list[float]:
    """Bytes/s of `reps` passes over one `size_bytes` array, split evenly over `threads` threads."""
    if threads < 1 or reps < 1:
        raise ValueError("threads and reps must be at least 1")
    array = np.ones(
        size_bytes // 8, dtype=np.int64
    )  # np.ones writes every page: none is faulted in while timed
    chunks = np.array_split(array, threads)
    array.sum()  # one untimed pass brings the pages and the code paths in
    samples = []
    for _ in range(reps):
        seconds = _timed_pass(chunks)
        samples.append(array.nbytes / seconds)
    return samples


def _timed_pass(chunks: list[npt.NDArray[np.int64]]) -> float:
    if len(chunks) == 1:
        start = time.perf_counter()
        chunks[0].sum()
        return time.perf_counter() - start
    barrier = threading.Barrier(len(chunks) + 1)

    def reader(chunk: npt.NDArray[np.int64]) -> None:
        barrier.wait()
        chunk.sum()

    workers = [threading.Thread(target=reader, args=(c,)) for c in chunks]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - start
