"""A training forward and backward captured as CUDA graphs: ``graphed_training(model, example)``.

At small batches a training step of the fast AH-Net (about 980 launches, see
tests/test_hot_path.py) is paced by the host issuing launches. ``torch.cuda.make_graphed_callables``
records the forward and the backward once each and replays them with one host call apiece;
the optimizer step stays outside (``torch.optim`` with ``capturable=True`` can be graphed by
the caller). What the fast model does inside a forward is capturable: no host
synchronisation, the running statistics and batch counters committed by multi-tensor
launches (replayed every step), no data-dependent Python.

Limits, checked up front: a CUDA model in training mode, a CUDA example, and no BatchNorm with
``momentum=None`` (the cumulative average reads the batch counter on the host). The graphs
are valid for the example's shape, dtype and layout; parameters must keep their storages
(in-place optimizer updates are fine, ``model.to()`` is not).
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["graphed_training"]


def graphed_training(model: nn.Module, example: torch.Tensor, *, warmup: int = 3) -> nn.Module:
    """``model`` with its forward and backward replayed from CUDA graphs for inputs like ``example``.

    Args:
        model: a training-mode module on a GPU (the fast AH-Net, or any module torch can graph).
        example: an input of the shape, dtype, layout and device the training steps use.
        warmup: iterations run before the capture (kernel compiles, cuDNN algorithm choice and
            the backend timing of ``auto`` happen there, never inside the capture).
    Returns:
        The graphed module (``torch.cuda.make_graphed_callables``): call it like ``model`` on
        tensors of the captured shape; ``loss.backward()`` replays the backward graph.
    """
    if not model.training:
        raise ValueError("graphed_training: the model is in eval mode; call model.train() first "
                         "(for inference use ahnet_fast.infer.graphed)")
    if example.device.type != "cuda":
        raise ValueError(f"graphed_training: CUDA graphs need a CUDA input, got one on {example.device}")
    devices = {p.device for p in model.parameters()}
    if devices != {example.device}:
        raise ValueError(f"graphed_training: the model's parameters are on {sorted(map(str, devices))}, "
                         f"the example on {example.device}; move the model with model.to(device) first")
    cumulative = [name for name, m in model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.momentum is None]
    if cumulative:
        raise ValueError(f"graphed_training: BatchNorm layers with momentum=None (e.g. {cumulative[0]!r}) read "
                         "their batch counter on the host every step, which a CUDA graph cannot replay; "
                         "give them a momentum")
    if warmup < 1:
        raise ValueError(f"graphed_training: warmup must be >= 1, got {warmup}")
    sample = example.detach().clone(memory_format=torch.preserve_format).requires_grad_(example.requires_grad)
    return torch.cuda.make_graphed_callables(model, (sample,), num_warmup_iters=warmup)
