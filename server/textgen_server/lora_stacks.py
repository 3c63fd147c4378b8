"""The adapter slots' weights: per layer and target group, A and B stacks allocated once, bound by pointer.

Each stack holds one block per adapter slot, slot after slot: for slot i (1..slots; 0 is the base
model and has none) rows (i - 1) * R_g .. i * R_g of A^T [slots * R_g, in] and of B [slots * R_g, out],
where R_g is the group's rank (the layout's `groups`: its rank times the group's members). For each
layer and group the graph takes A^T [k * R_g, in] and B [k * R_g, out] (native_graph.py): the blocks of
k consecutive slots, from the lowest to the highest a row of the pass uses, one pointer each; none
(k = 0) when every row is the base model, so such a pass does no adapter work at all. The graph
computes every bound slot's product on every token and keeps each token's own, so the work grows with
the slots in the batch, not with the rows: one adapter's worth for a prefill.

Writing an adapter into a slot packs its matrices the way the graph packs the projections: in a group of
several members (q/k/v), member j's A^T goes into rows j*R..j*R+r of the slot's block of A^T,
and its B into the same rows of the slot's block of B, under that member's own output columns
(block-diagonal), where R is the layout's rank and r the adapter's; the rest of the slot is zeros, so
smaller ranks and missing modules add nothing.

Where the stacks live: on the CPU they are numpy arrays, written in place. On a GPU they are device
OrtValues with a host mirror: a slot is written into the mirror, then each stack is copied to the
device whole (`update_inplace`; a slot load is rare, and the copy is a few hundred megabytes at most
for Mistral-7B). Either way a write must not overlap a forward pass: the scheduler writes between its
steps, from its own thread, and only into slots no running row uses.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from .kv_cache import NUMPY_DTYPES
from .lora_format import AdapterWeights
from .model_config import ModelConfig


class LoraStacks:
    """A^T and B stacks for every layer and group; block i of every stack belongs to the same adapter."""

    def __init__(self, config: ModelConfig, device: str) -> None:
        if config.lora is None:
            raise ValueError(f"{config.name}: the graph has no adapter slots")
        self.layout = config.lora
        self.slots = self.layout.slots  # adapter slots 1..slots; 0, the base model, has no block
        self.device = device
        self.dtype = NUMPY_DTYPES[config.dtype]
        io = config.io
        # name -> host array, by slot: [slots, R_g, in] for A^T, [slots, R_g, out] for B
        self._host: dict[str, npt.NDArray[Any]] = {}
        for layer in range(config.num_layers):
            for group in self.layout.groups:
                fan_in, rank, fan_out = self.layout.group_shape(group)
                self._host[io.lora_a.format(layer, group)] = np.zeros(
                    (self.slots, rank, fan_in), dtype=self.dtype
                )
                self._host[io.lora_b.format(layer, group)] = np.zeros(
                    (self.slots, rank, fan_out), dtype=self.dtype
                )
        self._io = io
        self._layers = config.num_layers
        self._device_values: dict[str, ort.OrtValue] = {}
        if device != "cpu":
            self._device_values = {
                name: ort.OrtValue.ortvalue_from_numpy(array, device, 0) for name, array in self._host.items()
            }
        self._pointers = {
            name: int(self._device_values[name].data_ptr()) if self._device_values else int(array.ctypes.data)
            for name, array in self._host.items()
        }

    @property
    def nbytes(self) -> int:
        """Bytes of all the stacks (on the device; as much again on the host for a GPU's mirror)."""
        return sum(array.nbytes for array in self._host.values())

    def bind(self, binding: ort.IOBinding, first: int, count: int) -> None:
        """Bind the blocks of slots first..first + count - 1 of every stack (consecutive: one pointer
        each) as the graph's inputs, [count * R_g, in] and [count * R_g, out]; count 0 binds none."""
        if count < 0 or (count and not 1 <= first <= first + count - 1 <= self.slots):
            raise ValueError(f"adapter slots {first}..{first + count - 1} outside 1..{self.slots}")
        for name, array in self._host.items():
            block = array[0]  # one slot: [R_g, in] or [R_g, out]
            shape = [count * block.shape[0], block.shape[1]]
            offset = (first - 1) * block.nbytes if count else 0
            binding.bind_input(name, self.device, 0, self.dtype, shape, self._pointers[name] + offset)

    def write(self, slot: int, weights: AdapterWeights | None) -> None:
        """Put `weights` in `slot` (1..slots); None clears it. The caller makes sure no pass runs."""
        if not 1 <= slot <= self.slots:
            raise ValueError(f"adapter slot {slot} outside 1..{self.slots}")
        rank = self.layout.rank
        matrices = weights.matrices if weights is not None else {}
        for layer in range(self._layers):
            for group, members in self.layout.groups.items():
                a_name, b_name = self._io.lora_a.format(layer, group), self._io.lora_b.format(layer, group)
                a_t, b_all = (
                    self._host[a_name][slot - 1],
                    self._host[b_name][slot - 1],
                )  # [R_g, in], [R_g, out]
                a_t[...] = 0
                b_all[...] = 0
                out_offset = 0
                for j, module in enumerate(members):
                    fan_out = self.layout.modules[module][1]
                    pair = matrices.get((layer, module))
                    if pair is not None:
                        a, b = pair  # [in, r], [r, out]
                        r = a.shape[1]
                        a_t[j * rank : j * rank + r, :] = a.T
                        b_all[j * rank : j * rank + r, out_offset : out_offset + fan_out] = b
                    out_offset += fan_out
                if self._device_values:
                    self._device_values[a_name].update_inplace(self._host[a_name])
                    self._device_values[b_name].update_inplace(self._host[b_name])
