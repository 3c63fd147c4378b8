"""textgen servers for the tests: in-process on port 0 with its own event loop in a thread
(ServerThread), or the `textgen-server` command as a user runs it (ServerProcess)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import subprocess
import sys
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from textgen_server.app import ServerSettings, TextgenServer
from textgen_server.scheduler import SchedulerLimits

T = TypeVar("T")


class ServerThread:
    def __init__(
        self,
        model_dir: Path,
        *,
        load: bool = True,
        limits: SchedulerLimits | None = None,
        grace_seconds: float = 5.0,
        **other_settings: Any,
    ) -> None:
        """`other_settings`: any other ServerSettings field (tls, auth_token_file, metrics_port...)."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        settings = ServerSettings(
            model_dir=model_dir,
            port=0,
            provider="cpu",
            limits=limits or SchedulerLimits(),
            grace_seconds=grace_seconds,
            **other_settings,
        )
        self.server = TextgenServer(settings)
        self.port = self.call(self.server.start())
        if load:
            self.call(self.server.load_model())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def stop(self, grace: float | None = None) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


SERVER = Path(sys.executable).parent / "textgen-server"


class ServerProcess:
    """`textgen-server ARGS`; `lines` collects its log (stderr), `port` and `metrics_port` are read
    from it."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([str(SERVER), *args], stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.port = 0
        self.metrics_port = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            if match := re.search(r"listening on [\d.]+:(\d+)", line):
                self.port = int(match.group(1))
            if match := re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line):
                self.metrics_port = int(match.group(1))
            if "ready on" in line or "cannot" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60) -> None:
        assert self._ready.wait(timeout), "server did not start"
        assert self.port, "".join(self.lines)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not ended within 30 s."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each TCP socket process `pid` listens on (Linux /proc); an IPv4-mapped
    IPv6 address counts as its IPv4 address."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd) if fd.is_symlink() else ""
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    sockets = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            # The kernel prints each 32-bit word in host (little-endian) order.
            raw = b"".join(bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                address = address.ipv4_mapped
            sockets.add((str(address), int(hex_port, 16)))
    return sockets
