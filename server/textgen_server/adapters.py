"""LoRA adapters while serving: which ones requests may name, and which sit in the graph's slots.

`AdapterRegistry` is what `--lora-dir DIR` serves: every `NAME.npz` in DIR (written by
`textgen-export lora`), checked against the model when it is registered; a file that does not fit is
refused with a log line naming it and why, and the others serve. `scan` compares DIR with what is
registered: new files are added, deleted ones removed, changed ones (size or modification time)
checked and replaced. The server scans at start-up and again on SIGHUP (__main__.py). Each
registered version is read again only while its file is still that version (size and modification
time): a request never runs on weights it was not checked with, and the scheduler moves a queued
request whose adapter a rescan replaced to the new version, so that no request meets two versions
(the old one's prompt positions kept for reuse with the new one's weights).

`AdapterSlots` is the slot table: the graph holds `slots` adapters at once (native_graph.py), and
more may be registered. A request's adapter is placed when the request is admitted: if it is in a
slot, that slot; otherwise the least recently used slot that no running row uses is given to it and
the adapter is read from disk on a loader thread while the batch goes on. The request stays queued
until then (or until some slot frees, when every slot is in use). The scheduler copies a loaded
adapter into the engine between two steps, so a slot is never written while a pass runs, and never
while a running row uses it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .excerpt import excerpt
from .lora_format import ADAPTER_SUFFIX, AdapterFormatError, AdapterWeights, load_adapter
from .model_config import ModelConfig

log = logging.getLogger(__name__)

MAX_NAMES_LISTED = 20  # in a NOT_FOUND message: the known names, up to this many


@dataclass(frozen=True, eq=False)
class Adapter:
    """One registered version of an adapter file (a replaced file is a new Adapter)."""

    name: str
    path: Path
    stamp: tuple[int, int]  # (mtime_ns, size) when it was checked
    rank: int
    modules: tuple[str, ...]
    nbytes: int


@dataclass
class ScanResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # file name -> why


def unknown_adapter_message(name: str, known: Collection[str]) -> str:
    """`lora: no adapter named 'x' (known: a, b)`, with the name and the list cut short when long."""
    names = sorted(known)
    listed = ", ".join(names[:MAX_NAMES_LISTED])
    if len(names) > MAX_NAMES_LISTED:
        listed += f" and {len(names) - MAX_NAMES_LISTED} more"
    return f"lora: no adapter named {excerpt(name)} (known: {listed or 'none; this server has no adapters'})"


class AdapterRegistry:
    """The adapters requests may name: the `*.npz` files of one directory that fit the model."""

    def __init__(self, config: ModelConfig, directory: Path | None) -> None:
        self.config = config
        self.directory = directory
        self._lock = threading.Lock()
        self._adapters: dict[str, Adapter] = {}

    def names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._adapters)

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            return self._adapters.get(name)

    def forget(self, adapter: Adapter) -> None:
        """Unregister this version of an adapter (its file could not be loaded any more)."""
        with self._lock:
            if self._adapters.get(adapter.name) is adapter:
                del self._adapters[adapter.name]

    def load(self, adapter: Adapter) -> AdapterWeights:
        """Read this version of an adapter's weights from disk again: the slot table calls this on its
        loader thread. Raises AdapterFormatError when its file is another version now (replaced since
        it was checked, or while it was read: a rescan serves the new one), OSError when it is gone."""
        _check_unchanged(adapter)
        weights = load_adapter(adapter.path, self.config)
        _check_unchanged(adapter)
        return weights

    def current(self, adapter: Adapter) -> Adapter:
        """The version of `adapter` served now: a later one when a rescan replaced its file, else itself
        (also when the rescan removed it)."""
        with self._lock:
            return self._adapters.get(adapter.name, adapter)

    def scan(self) -> ScanResult:
        """Bring the registry in line with the directory; reads new and changed files (blocking)."""
        result = ScanResult()
        if self.directory is None:
            return result
        try:
            paths = sorted(
                p
                for p in self.directory.iterdir()
                if p.suffix == ADAPTER_SUFFIX and not p.name.startswith(".")
            )
        except OSError as exc:
            result.refused[str(self.directory)] = f"cannot list the directory ({exc.strerror or exc})"
            return result
        with self._lock:
            current = dict(self._adapters)
        updated: dict[str, Adapter] = {}
        for path in paths:
            name = path.name[: -len(ADAPTER_SUFFIX)]
            try:
                stat = path.stat()
                if not path.is_file():
                    continue
                stamp = (stat.st_mtime_ns, stat.st_size)
                known = current.get(name)
                if known is not None and known.stamp == stamp:
                    updated[name] = known
                    continue
                weights = load_adapter(path, self.config)
            except (AdapterFormatError, OSError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                result.refused[path.name] = reason
                continue
            updated[name] = Adapter(
                name=name,
                path=path,
                stamp=stamp,
                rank=weights.rank,
                modules=tuple(weights.modules),
                nbytes=weights.nbytes,
            )
            (result.replaced if name in current else result.added).append(name)
        result.removed = sorted(set(current) - set(updated))
        with self._lock:
            self._adapters = updated
        return result


def _check_unchanged(adapter: Adapter) -> None:
    stat = adapter.path.stat()
    if (stat.st_mtime_ns, stat.st_size) != adapter.stamp:
        raise AdapterFormatError(
            f"{adapter.path.name} changed since it was checked (SIGHUP makes the server serve the new file)"
        )


@dataclass
class _Slot:
    adapter: Adapter | None = None
    ready: bool = False  # False while its adapter is being read
    last_used: int = 0


@dataclass(frozen=True)
class Placement:
    """Where a request's adapter is: `slot` when ready to use; else whether it waits for a slot to free
    (every slot is in use by running rows) or only for its load to finish."""

    slot: int | None
    waiting_for_slot: bool = False


class AdapterSlots:
    """Which adapter is in which of the graph's slots (1..count); least recently used makes room."""

    def __init__(
        self,
        count: int,
        load: Callable[[Adapter], AdapterWeights],
        on_loaded: Callable[[], None] = lambda: None,
    ) -> None:
        self.count = count
        self._slots = [_Slot() for _ in range(count)]  # _slots[i] is adapter slot i + 1
        self._load = load
        self._on_loaded = on_loaded
        self._clock = 0
        self._finished: list[tuple[int, Adapter, AdapterWeights | Exception]] = []
        self._finished_lock = threading.Lock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textgen-lora-load")
        self.loads = 0  # adapters read into a slot so far

    def resident(self) -> dict[int, str]:
        """Slot -> name of the adapter in it (ready or loading)."""
        return {i + 1: s.adapter.name for i, s in enumerate(self._slots) if s.adapter is not None}

    def place(self, adapter: Adapter, in_use: Collection[int]) -> Placement:
        """The slot of `adapter` if it is loaded; else start loading it into a free slot (none is in
        `in_use`, the slots running rows use) and say it must wait. Scheduler thread only."""
        self._clock += 1
        for index, slot in enumerate(self._slots):
            if slot.adapter is adapter:
                if not slot.ready:
                    return Placement(None)
                slot.last_used = self._clock
                return Placement(index + 1)
        free = [
            index
            for index, slot in enumerate(self._slots)
            if index + 1 not in in_use and (slot.adapter is None or slot.ready)
        ]
        if not free:
            return Placement(None, waiting_for_slot=True)
        # Empty slots first (the lowest: passes bind the slot range in use), then the least recently used.
        victim = min(free, key=lambda i: (self._slots[i].adapter is not None, self._slots[i].last_used, i))
        self._slots[victim] = _Slot(adapter, ready=False, last_used=self._clock)
        future = self._loader.submit(self._load, adapter)
        future.add_done_callback(lambda done: self._loaded(victim, adapter, done))
        return Placement(None)

    def _loaded(self, index: int, adapter: Adapter, future: Future[AdapterWeights]) -> None:
        try:
            outcome: AdapterWeights | Exception = future.result()
        except Exception as exc:  # noqa: BLE001 -- reported to the requests that wait for it
            outcome = exc
        with self._finished_lock:
            self._finished.append((index, adapter, outcome))
        self._on_loaded()

    def install(self, write: Callable[[int, AdapterWeights], None]) -> list[tuple[Adapter, Exception]]:
        """Write finished loads with `write(slot, weights)` (the engine's; between passes, scheduler
        thread); returns the adapters that failed to load, with why."""
        with self._finished_lock:
            finished, self._finished = self._finished, []
        failed = []
        for index, adapter, outcome in finished:
            slot = self._slots[index]
            if slot.adapter is not adapter:
                continue  # cannot happen (a loading slot is never given away), but never write a stranger
            if isinstance(outcome, Exception):
                self._slots[index] = _Slot()
                failed.append((adapter, outcome))
                continue
            write(index + 1, outcome)
            slot.ready = True
            self.loads += 1
        return failed

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)
