"""Activations the decoder layers keep for backward, held in host memory between the forward and the backward.

With gradient checkpointing a layer keeps only its input until its recomputation; across a model's layers those
inputs are still a micro-batch's activations. Under `host_activations.saved()` autograd hands every tensor the
layers save (under whole-layer checkpointing: each layer's input) to `_pack`, which copies it to pinned host
memory and lets the device copy go, and back to `_unpack` when the backward needs it. On a GPU the copy out runs
on a side stream, overlapped with the next layers' compute, and when the backward takes a tensor back, the one
saved before it (the next the backward needs: it runs the layers in reverse) is already on its way in; the copy
handed back belongs to autograd alone, freed when that layer's backward is done, so the device holds about two
layers' inputs at a time. On a CPU the copies are plain ones. Values are unchanged: the
losses and gradients are those of the run without it, bit for bit.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass
class _Held:
    """One saved tensor: its host copy, where it came from, and (once brought back) its device copy."""
    host: torch.Tensor
    device: torch.device
    index: int  # in the order of the forward
    copied: object = None  # a CUDA event: the copy out is done
    on_device: torch.Tensor | None = None  # brought back, not yet handed to autograd
    arrived: object = None  # a CUDA event: the copy back is done
    handed_out: int = 0  # how many times autograd took it back (cos and sin: once per layer)


class HostActivations:
    """The saved tensors of one forward's layers, on the host (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.on_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.on_cuda else None
        self.held: list[_Held] = []
        self._by_tensor: dict[int, tuple[weakref.ref, _Held]] = {}  # one copy of a tensor saved by several layers

    def saved(self):
        """The context in which what autograd saves goes to the host."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        known = self._by_tensor.get(id(tensor))
        if known is not None and known[0]() is tensor:  # cos and sin: every layer saves the same two tensors
            return known[1]
        held = _Held(self._copy_out(tensor), tensor.device, len(self.held))
        if self.on_cuda:
            held.copied = self.stream.record_event()
        self.held.append(held)
        self._by_tensor[id(tensor)] = (weakref.ref(tensor), held)
        return held

    def _unpack(self, held: _Held) -> torch.Tensor:
        if held.on_device is None:
            self._bring_back(held)
        # Autograd owns the device copy from here: it is freed when this layer's backward is done, not kept here.
        tensor, held.on_device = held.on_device, None
        held.handed_out += 1
        earlier = next((other for other in reversed(self.held[:held.index])
                        if other.on_device is None and not other.handed_out), None)
        if earlier is not None:
            self._bring_back(earlier)  # the next one the backward needs, on its way while this one is used
        if self.on_cuda:
            torch.cuda.current_stream().wait_event(held.arrived)
            tensor.record_stream(torch.cuda.current_stream())
        return tensor

    def _copy_out(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.on_cuda:
            return tensor.detach().clone()
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream())  # the tensor is written before it is copied
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not handed out again before the copy has read it
        return host

    def _bring_back(self, held: _Held) -> None:
        if held.on_device is not None:
            return
        if not self.on_cuda:
            held.on_device = self._copy_in(held.host, held.device)
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(held.copied)
            held.on_device = self._copy_in(held.host, held.device)
            held.arrived = self.stream.record_event()

    def _copy_in(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The host copy back where it came from (on a CPU, the host copy itself)."""
        return host.to(device, non_blocking=True) if self.on_cuda else host
