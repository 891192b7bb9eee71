"""Model construction, encoder freezing and activation checkpointing for training.

The trainer accepts any AH-Net-compatible class (same constructor keywords and
state_dict keys as ``monai.networks.nets.AHNet``): the reference model
(:mod:`ahnet_fast.reference`) or the fast drop-in (``ahnet_fast.AHNet``).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ENCODER_PREFIXES",
    "ahnet_class",
    "build_ahnet",
    "build_2d_model",
    "freeze_encoder",
    "FrozenBNTrainMode",
    "checkpoint_block_names",
    "enable_activation_checkpointing",
]

# AH-Net's (and the FCN's) ResNet encoder; everything else is decoder/head.
ENCODER_PREFIXES = ("conv1.", "bn0.", "layer1.", "layer2.", "layer3.", "layer4.")


def ahnet_class(fast: bool | None = None) -> Callable[..., nn.Module]:
    """The AH-Net class to train.

    ``fast=True``: ``ahnet_fast.AHNet`` (the drop-in fast model where the
    library provides one); ``False``: :class:`ahnet_fast.reference.AHNet`;
    ``None``: fast on a CUDA machine, reference otherwise (the reference is the
    CPU path).
    """
    if fast is None:
        fast = torch.cuda.is_available()
    if fast:
        import ahnet_fast

        return ahnet_fast.AHNet
    from ahnet_fast.reference import AHNet

    return AHNet


def build_ahnet(model_config: dict[str, Any], fast: bool | None = None) -> nn.Module:
    """``AHNet(**model_config)`` of the class chosen by :func:`ahnet_class`."""
    cls = ahnet_class(fast)
    try:
        return cls(**model_config)
    except TypeError as exc:
        raise ValueError(f"invalid AH-Net configuration {model_config}: {exc}") from exc


def build_2d_model(kind: str, in_slices: int, out_channels: int, upsample_mode: str = "bilinear") -> nn.Module:
    """The 2D network of the recipe's first stage.

    Args:
        kind: ``"mcfcn"`` (the paper's multi-channel FCN: a 1x1 conv+BN+ReLU
            projects the slices to 3 channels first) or ``"fcn"`` (the
            neighbouring slices are the 3 input channels directly; then the
            transferred 3D stem computes exactly what the 2D stem did).
        in_slices: neighbouring slices per input (3 in the paper; ``"fcn"`` needs 3).
    """
    from ahnet_fast.reference import FCN, MCFCN

    if kind == "mcfcn":
        return MCFCN(in_channels=in_slices, out_channels=out_channels, upsample_mode=upsample_mode, pretrained=False)
    if kind == "fcn":
        if in_slices != 3:
            raise ValueError(f"the plain FCN takes exactly 3 slices, got {in_slices}; use 'mcfcn'")
        return FCN(out_channels=out_channels, upsample_mode=upsample_mode, pretrained=False)
    raise ValueError(f"2D model must be 'fcn' or 'mcfcn', got {kind!r}")


def freeze_encoder(model: nn.Module, prefixes: Iterable[str] = ENCODER_PREFIXES) -> list[str]:
    """Stop gradients into the encoder's parameters; returns the frozen parameter names.

    BatchNorm layers of the frozen part should also keep their (transferred)
    running statistics: wrap training in :class:`FrozenBNTrainMode`.
    """
    prefixes = tuple(prefixes)
    frozen = []
    for name, p in model.named_parameters():
        if name.startswith(prefixes):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


class FrozenBNTrainMode:
    """Callable that puts a model in train mode except the BatchNorms under ``prefixes``.

    Frozen encoder BNs then normalise with their running statistics and don't
    update them, so the frozen encoder computes a fixed function.
    """

    def __init__(self, prefixes: Iterable[str] = ENCODER_PREFIXES) -> None:
        self.prefixes = tuple(p.rstrip(".") for p in prefixes)

    def __call__(self, model: nn.Module) -> None:
        model.train()
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                name in self.prefixes or name.startswith(tuple(p + "." for p in self.prefixes))
            ):
                m.eval()


def _checkpointed_forward(module: nn.Module, original: Callable, *args: Any) -> Any:
    needs_grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
        p.requires_grad for p in module.parameters()
    )
    if not (torch.is_grad_enabled() and needs_grad):
        return original(*args)  # nothing would be stored for backward anyway
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
           and m.track_running_stats]
    calls = {"n": 0}

    def run(*a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1 or not bns:
            return original(*a)
        # Recomputation during backward: the forward ran once already and updated
        # the BN running statistics; restore them so each step updates them once.
        # (in ``finally``: torch stops a recomputation early, by raising, once it has
        # what backward needs)
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for m in bns]
        try:
            return original(*a)
        finally:
            with torch.no_grad():
                for m, (rm, rv, nb) in zip(bns, saved):
                    m.running_mean.copy_(rm)
                    m.running_var.copy_(rv)
                    m.num_batches_tracked.copy_(nb)

    return checkpoint(run, *args, use_reentrant=False)


def checkpoint_block_names(model: nn.Module) -> list[str]:
    """Default checkpointed blocks: residual blocks of layer1..4, AH-Net's dense blocks and up-transitions."""
    names = []
    for name, _ in model.named_modules():
        parts = name.split(".")
        if len(parts) == 2 and parts[0] in ("layer1", "layer2", "layer3", "layer4"):
            names.append(name)  # one residual block
        elif len(parts) == 1 and (parts[0].startswith("dense") or (parts[0].startswith("up") and parts[0] != "up_conv")):
            names.append(name)
    return names


def enable_activation_checkpointing(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Recompute the activations of large blocks in backward instead of storing them.

    Patches the ``forward`` of each chosen submodule on the instance (state_dict
    keys are unchanged). Default blocks: every residual block of ``layer1..4``,
    the dense blocks ``dense0..4`` and the up-transitions of AH-Net (for the 2D
    FCN: the residual blocks). BatchNorm running statistics are updated once
    per step, as without checkpointing.

    Returns:
        Names of the checkpointed submodules.
    """
    mods = dict(model.named_modules())
    if names is None:
        chosen = checkpoint_block_names(model)
    else:
        chosen = list(names)
        missing = [n for n in chosen if n not in mods]
        if missing:
            raise ValueError(f"no submodules named {missing} in {type(model).__name__}")
    for name in chosen:
        m = mods[name]
        if getattr(m, "_ahnet_fast_checkpointed", False):
            continue
        original = m.forward
        m.forward = functools.partial(_checkpointed_forward, m, original)  # type: ignore[method-assign]
        m._ahnet_fast_checkpointed = True  # type: ignore[attr-defined]
    return chosen
