"""One-token decoding steps replayed from a CUDA graph (static KV cache only).

A decoding step of a 2 B model at batch 256 is ~1-2 ms of GPU work but, by the H200 figures
in docs/benchmarks.md, ~30 ms of Python and kernel launches through the HF model (hundreds of
small kernels per step), so an eager greedy loop leaves the GPU mostly idle (an estimate,
not yet measured). With a static KV cache every step of a batch has the same
shapes and reads and writes the same buffers (transformers' ``StaticLayer`` keeps its write
position in a device tensor and advances it in place), so the model's forward can be captured
once per batch as a CUDA graph and replayed: the step's inputs, as the model's own
``prepare_inputs_for_generation`` makes them each step, are copied into the captured input
buffers, and the graph runs the whole forward in one launch.

Capture needs a forward without host reads (``.item()``, ``bool(tensor)``, data-dependent
shapes); ``tests/test_step_graph.py`` checks that on the CPU for every decoder-only family by
intercepting such operations. A graph lives for one batch (each batch has its own cache), so
weights swapped between checkpoints are never stale in it. ``replay_by_call`` runs the same
buffer logic without a graph (the CPU tests of the copy and output handling).
"""

from __future__ import annotations

import torch

_PLAIN = (int, float, bool, str, type(None))


def _tensors(value, path: tuple = ()) -> dict[tuple, torch.Tensor]:
    """The tensors in step inputs (nested dicts too: masks per layer type) by path."""
    if torch.is_tensor(value):
        return {path: value}
    if isinstance(value, dict):
        return {p: t for key, v in value.items() for p, t in _tensors(v, (*path, key)).items()}
    return {}


def _same_constants(value, captured) -> bool:
    """Same structure and the same non-tensor values (the same objects, or equal plain ones)."""
    if torch.is_tensor(value) or torch.is_tensor(captured):
        return torch.is_tensor(value) and torch.is_tensor(captured)
    if isinstance(value, dict) and isinstance(captured, dict):
        return value.keys() == captured.keys() and all(
            _same_constants(value[k], captured[k]) for k in value
        )
    return value is captured or (type(value) in _PLAIN and value == captured)


def _with_buffers(value, buffers: dict[tuple, torch.Tensor], path: tuple = ()):
    """``value`` with each tensor replaced by the buffer at its path."""
    if torch.is_tensor(value):
        return buffers[path]
    if isinstance(value, dict):
        return {key: _with_buffers(v, buffers, (*path, key)) for key, v in value.items()}
    return value


class StepGraph:
    """The captured forward of one decoding step, for one batch's input shapes."""

    def __init__(self, model, model_inputs: dict, replay_by_call: bool = False) -> None:
        self.model = model
        self.replay_by_call = replay_by_call
        self.captured = model_inputs
        self.buffers = {path: t.clone() for path, t in _tensors(model_inputs).items()}
        self.inputs = _with_buffers(model_inputs, self.buffers)
        self.graph = None
        self.outputs = None
        if not replay_by_call:
            self.graph = torch.cuda.CUDAGraph()
            device = next(t.device for t in self.buffers.values() if t.is_cuda)
            # capture_begin/end, not ``torch.cuda.graph``: that empties the device and pinned
            # host caches before every capture, and a capture per batch would pay for it
            # (the prefetch's pinned blocks are meant to be reused). A capture cannot run on
            # the default stream; thread_local: only this thread's calls belong to it.
            stream = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.device(device), torch.cuda.stream(stream):
                self.graph.capture_begin(capture_error_mode="thread_local")
                try:
                    self.outputs = model(**self.inputs, return_dict=True)
                finally:
                    self.graph.capture_end()
            torch.cuda.current_stream(device).wait_stream(stream)

    def accepts(self, model_inputs: dict) -> bool:
        """Whether these step inputs fit the captured buffers (same keys, shapes, constants)."""
        if not _same_constants(model_inputs, self.captured):
            return False
        tensors = _tensors(model_inputs)
        return tensors.keys() == self.buffers.keys() and all(
            t.shape == self.buffers[p].shape and t.dtype == self.buffers[p].dtype
            for p, t in tensors.items()
        )

    def run(self, model_inputs: dict):
        """The step's model outputs (their tensors are overwritten by the next run)."""
        for path, tensor in _tensors(model_inputs).items():
            self.buffers[path].copy_(tensor)
        if self.replay_by_call:
            self.outputs = self.model(**self.inputs, return_dict=True)
        else:
            self.graph.replay()
        return self.outputs
