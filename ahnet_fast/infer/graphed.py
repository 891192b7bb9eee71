"""One CUDA graph for a whole inference forward: ``graphed(model, example)``.

At batch 1 the fast AH-Net issues about one kernel per conv, and each launch costs the host a
few microseconds: for small volumes that host time, not the kernels, sets the pace. A CUDA
graph records every launch of one forward once and replays them with a single host call.
Sliding-window inference is the natural user: every window has the same shape.

A graph is valid for one input shape, dtype, memory layout and device, and for the model's
parameters and buffers as they were at capture: they are read through their addresses, so
in-place updates (an optimizer step, ``load_state_dict``) are seen by later replays, but a
``model.to()`` or any other swap of storages needs a new capture.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["GraphedForward", "graphed"]

Tensor = torch.Tensor


class GraphedForward:
    """Callable replaying a captured inference forward; see :func:`graphed`."""

    def __init__(self, model: Callable[[Tensor], Tensor], example: Tensor, *, warmup: int = 3, clone: bool = True,
                 pool: Optional[tuple] = None) -> None:
        if getattr(model, "training", False):
            raise ValueError("graphed: the model is in training mode; call model.eval() first (a captured "
                             "training forward would replay the same batch statistics update every time)")
        if example.device.type != "cuda":
            raise ValueError(f"graphed: CUDA graphs need a CUDA input, got one on {example.device}; "
                             "on other devices call the model directly")
        if warmup < 1:
            raise ValueError(f"graphed: warmup must be >= 1 (Triton compiles and cuDNN picks its algorithms "
                             f"outside the capture), got {warmup}")
        self.model = model
        self.clone = clone
        self.static_input = example.detach().clone(memory_format=torch.preserve_format)
        stream = torch.cuda.Stream(device=example.device)
        stream.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(warmup):  # compiles kernels and builds every per-layer plan
                model(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph, pool=pool):
            self.static_output = model(self.static_input)

    @property
    def shape(self) -> torch.Size:
        return self.static_input.shape

    def __call__(self, x: Tensor) -> Tensor:
        """``model(x)`` by replay. ``x`` must have the captured shape, dtype and device."""
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype or x.device != \
                self.static_input.device:
            raise ValueError(
                f"graphed forward was captured for {tuple(self.static_input.shape)} {self.static_input.dtype} on "
                f"{self.static_input.device}; got {tuple(x.shape)} {x.dtype} on {x.device} (capture another "
                "with ahnet_fast.infer.graphed for that input)")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output.clone() if self.clone else self.static_output


def graphed(model: Callable[[Tensor], Tensor], example: Tensor, *, warmup: int = 3,
            clone: bool = True) -> Callable[[Tensor], Tensor]:
    """Capture one inference forward of ``model`` for inputs like ``example`` as a CUDA graph.

    Args:
        model: an eval-mode model on the GPU (any nn.Module, or a function of one tensor; the
            fast AH-Net is what it is for).
        example: an input of the shape, dtype, layout and device to capture (its values are
            copied, not kept).
        warmup: forwards run before the capture, on a side stream (kernel compiles, per-layer
            plans, cuDNN algorithm choice must not happen inside the capture).
        clone: return a copy of the graph's output buffer (default). ``clone=False`` returns the
            buffer itself, overwritten by the next call.
    Returns:
        ``f(x) -> model(x)`` for ``x`` of the captured shape, dtype and device (``torch.no_grad``).
    """
    return GraphedForward(model, example, warmup=warmup, clone=clone)

