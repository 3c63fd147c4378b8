"""The KV cache against the memory the process may take: cgroup v1 and v2 limits read as the kernel
enforces them, a cache that does not fit refused at start-up with a budget that does, and a cache
that fits committed at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import psutil
import pytest
from server_harness import SERVER
from textgen_server.engine import Engine
from textgen_server.kv_cache import KVBudgetError, KVCache
from textgen_server.memory import CgroupMemory, Headroom, headroom
from textgen_server.model_config import ModelConfig

GiB = 2**30


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_cgroup_v2_every_limited_ancestor_counts_its_working_set(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    write_tree(
        tmp_path / "fs",
        {
            "memory.max": "max\n",  # the root: no limit
            "kubepods/memory.max": f"{64 * GiB}\n",
            "kubepods/memory.current": f"{10 * GiB}\n",
            "kubepods/pod1/memory.max": f"{8 * GiB}\n",
            "kubepods/pod1/memory.current": f"{5 * GiB}\n",
            # 2 GiB of it is inactive file cache (the model file just read): the kernel drops it first.
            "kubepods/pod1/memory.stat": f"anon {3 * GiB}\ninactive_file {2 * GiB}\nactive_file 1024\n",
            "kubepods/pod1/ctr/memory.max": "max\n",
            "kubepods/pod1/ctr/memory.current": f"{5 * GiB}\n",
        },
    )
    room = headroom(host_available=100 * GiB, proc_self_cgroup=proc, cgroup_fs=tmp_path / "fs")
    assert room.cgroups == (
        CgroupMemory("/kubepods/pod1", 8 * GiB, 3 * GiB),
        CgroupMemory("/kubepods", 64 * GiB, 10 * GiB),
    )
    assert room.bytes == 5 * GiB
    assert "cgroup /kubepods/pod1 has a limit of 8.0 GiB with 3.0 GiB in use" in room.describe()


def test_cgroup_v2_in_a_container_namespace_and_the_host_bound(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    write_tree(tmp_path, {"memory.max": f"{4 * GiB}\n", "memory.current": f"{1 * GiB}\n"})
    assert headroom(host_available=100 * GiB, proc_self_cgroup=proc, cgroup_fs=tmp_path).bytes == 3 * GiB
    # The host has less free than the cgroup allows: the host bounds it.
    tight = headroom(host_available=2 * GiB, proc_self_cgroup=proc, cgroup_fs=tmp_path)
    assert tight.bytes == 2 * GiB and tight.describe() == "the host has 2.0 GiB available"


def test_cgroup_v1_container_view_and_unlimited(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    # A v1 container shows the host's path, which is not mounted inside: its own cgroup is the root.
    proc.write_text("5:devices:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    memory = tmp_path / "fs" / "memory"
    write_tree(
        memory,
        {
            "memory.limit_in_bytes": f"{2 * GiB}\n",
            "memory.usage_in_bytes": f"{1 * GiB}\n",
            "memory.stat": f"cache 9\ntotal_inactive_file {GiB // 2}\n",
        },
    )
    room = headroom(host_available=100 * GiB, proc_self_cgroup=proc, cgroup_fs=tmp_path / "fs")
    assert room.cgroups == (CgroupMemory("/", 2 * GiB, GiB // 2),) and room.bytes == GiB + GiB // 2
    (memory / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    unlimited = headroom(host_available=100 * GiB, proc_self_cgroup=proc, cgroup_fs=tmp_path / "fs")
    assert unlimited.cgroups == () and unlimited.bytes == 100 * GiB


def test_without_cgroups_the_host_figure_stands(tmp_path: Path) -> None:
    room = headroom(host_available=7 * GiB, proc_self_cgroup=tmp_path / "absent", cgroup_fs=tmp_path)
    assert room.bytes == 7 * GiB and room.cgroups == ()


def test_this_machine_reports_a_plausible_headroom() -> None:
    room = headroom()
    assert 0 < room.bytes <= psutil.virtual_memory().total


def cache(tiny_model_dir: Path | str, slots: int, room: int) -> KVCache:
    config = ModelConfig.load(Path(tiny_model_dir))
    return KVCache(
        Path(tiny_model_dir),
        config,
        slots=slots,
        max_len=config.max_total_tokens,
        device="cpu",
        providers=["CPUExecutionProvider"],
        memory=lambda: Headroom(room, ()),
    )


def test_a_cache_larger_than_the_headroom_is_refused_with_a_budget_that_fits(tiny_model_dir: Path) -> None:
    fitting = cache(tiny_model_dir, slots=1, room=GiB)
    slot_bytes = fitting.nbytes
    room = 10 * slot_bytes + slot_bytes // 2  # ten and a half slots' worth
    with pytest.raises(KVBudgetError) as refused:
        cache(tiny_model_dir, slots=16, room=room)
    message = str(refused.value)
    max_len = fitting.max_len
    suggested = int(room * 0.8) // slot_bytes
    assert f"lower --max-batch-total-tokens to {suggested * max_len} ({suggested} sequences" in message
    assert f"16 slots x {max_len} positions" in message and "the host has" in message
    assert cache(tiny_model_dir, slots=suggested, room=room).nbytes <= room
    with pytest.raises(KVBudgetError, match="not one sequence of"):
        cache(tiny_model_dir, slots=1, room=slot_bytes // 2)


def test_the_cache_is_committed_at_start_up(tiny_model_dir: Path) -> None:
    """Resident at once: untouched zero pages would leave the process small until the slots fill.
    Measured in a fresh interpreter, where no memory freed earlier can be handed out again."""
    script = f"""
import onnxruntime as ort
import psutil
from test_memory import cache
process = psutil.Process()
before = process.memory_info().rss
kv = cache({str(tiny_model_dir)!r}, slots=64, room=2**36)  # 64 slots x 4096 positions: 128 MiB
print(kv.nbytes, process.memory_info().rss - before)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
    )
    nbytes, grown = (int(word) for word in result.stdout.split())
    assert nbytes >= 100 * 2**20
    assert grown >= 0.9 * nbytes, f"RSS grew by {grown} bytes for a {nbytes}-byte cache"


def test_the_engine_asks_before_it_allocates(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("textgen_server.kv_cache.headroom", lambda: Headroom(2**20, ()))
    with pytest.raises(KVBudgetError, match=r"needs 64.0 MiB .* may take only 1.0 MiB more"):
        Engine(tiny_model_dir, provider="cpu", slots=32)


def test_the_server_refuses_a_budget_the_machine_cannot_hold(tiny_model_dir: Path) -> None:
    """200,000 slots of the tiny model: about 390 GiB, refused in one line before anything is allocated."""
    slots = 200_000
    result = subprocess.run(
        [
            str(SERVER),
            "--model-dir",
            str(tiny_model_dir),
            "--port",
            "0",
            "--max-batch-size",
            str(slots),
            "--max-batch-total-tokens",
            str(slots * 4096),
            "--max-concurrent-requests",
            str(slots),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "KVBudgetError" in last and "lower --max-batch-total-tokens to" in last, result.stderr


def test_a_device_cache_that_cannot_be_allocated_names_the_budget(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the cache is device memory, which onnxruntime allocates (here faked to fail)."""

    def out_of_memory(*args: object) -> None:
        raise RuntimeError("Failed to allocate memory for requested buffer of size 8589934592")

    monkeypatch.setattr(ort.OrtValue, "ortvalue_from_shape_and_type", out_of_memory)
    config = ModelConfig.load(tiny_model_dir)
    with pytest.raises(
        KVBudgetError, match=r"needs 64.0 MiB on cpu and allocating it failed .*lower --max-batch"
    ):
        KVCache(
            tiny_model_dir,
            config,
            slots=32,
            max_len=config.max_total_tokens,
            device="cpu",
            providers=["CPUExecutionProvider"],
            host_arrays=False,
        )
