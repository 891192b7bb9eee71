"""2D -> 3D weight transfer (AH-Net, Liu et al. 2018, arXiv 1711.08580).

Two tools:

* :func:`inflate_conv_weight` turns any 2D conv weight ``(Cout, Cin, kh, kw)`` into a
  3D weight ``(Cout, Cin, kh, kw, T)`` with the slice axis last (the layout of
  AH-Net, whose inputs are ``(B, C, H, W, D)``). Strategies:

  - ``"centre"``: the 2D weight at the middle tap ``T // 2``, zeros elsewhere. A
    3D conv with z padding ``T // 2`` then equals the 2D conv on every slice of
    any volume (the other taps see nothing).
  - ``"average"``: ``W / T`` at every tap. On a volume constant along D (with
    replicate z padding, or on interior slices) it equals the 2D conv.
  - ``"scaled"``: ``alpha_t * W`` with ``alpha_t > 0`` and ``sum(alpha) == 1``
    (``"average"`` is the uniform case), same invariant.

* :func:`transfer_2d_to_3d` is the paper's transform of a 2D ResNet50 encoder
  (from an FCN / MCFCN, or a torchvision-format ResNet50 state dict, in memory
  or in a file) into AH-Net's encoder (``conv1``, ``bn0``, ``layer1..4``):

  - stem ``(64, 3, 7, 7) -> (64, 1, 7, 7, 3)``: the 2D network sees three
    neighbouring slices as its RGB channels, so RGB channel ``z`` becomes z-tap
    ``z``; the 3D stem at slice ``d`` then computes exactly what the 2D stem
    computes on the stack ``(x[d-1], x[d], x[d+1])``;
  - every other ``k x k`` conv becomes ``k x k x 1``;
  - every BatchNorm copies weight, bias **and** running_mean / running_var /
    num_batches_tracked (MONAI's ``AHNet.copy_from`` copies only the affine
    parameters, so a transferred model in eval mode is not the 2D model);
  - the shortcut's BN is ``downsample.1`` in 2D and ``downsample.2`` in AH-Net
    (AH-Net inserts a z max-pool at ``downsample.1``).

  A :class:`TransferReport` lists what was copied, what was skipped and why.

This module uses plain torch only; it works on any module whose state_dict keys
are those of MONAI's AHNet (``ahnet_fast.reference.AHNet``, the fast model, or
MONAI's own).
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

__all__ = [
    "InflateMode",
    "TransferReport",
    "inflate_conv_weight",
    "stem_2d_to_3d",
    "load_state_dict_file",
    "transfer_2d_to_3d",
]

InflateMode = str  # "centre" | "average" | "scaled"
_INFLATE_MODES = ("centre", "center", "average", "scaled")

StateSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

# AH-Net encoder parts that have a 2D counterpart; everything else (decoder, PSP,
# final) is 3D-only and is trained from scratch.
_ENCODER_PREFIXES = ("conv1.", "bn0.", "layer1.", "layer2.", "layer3.", "layer4.")
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


# --------------------------------------------------------------------------- inflation
def inflate_conv_weight(
    weight: torch.Tensor,
    depth: int,
    mode: InflateMode = "centre",
    alphas: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Inflate a 2D conv weight to a 3D one along a new last (slice) axis.

    Args:
        weight: ``(Cout, Cin, kh, kw)`` 2D conv weight (any float dtype/device).
        depth: ``T >= 1``, the kernel size along the new last axis.
        mode: ``"centre"`` (also spelled ``"center"``): ``W`` at tap ``T // 2``
            (for even ``T`` the upper of the two middle taps), zeros elsewhere;
            ``"average"``: ``W / T`` at every tap; ``"scaled"``: ``alphas[t] * W``.
        alphas: only for ``"scaled"``: ``T`` positive numbers summing to 1
            (checked to 1e-6 relative), so a volume constant along D sees ``W``.

    Returns:
        ``(Cout, Cin, kh, kw, T)`` tensor, same dtype and device as ``weight``.

    Raises:
        ValueError: on a weight that is not 4D, ``depth < 1``, an unknown mode,
            or alphas of the wrong length / sign / sum (or alphas given to a
            mode that does not use them).
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"inflate_conv_weight expects a 2D conv weight (Cout, Cin, kh, kw); got {shape}")
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"depth must be an int >= 1, got {depth!r}")
    if mode not in _INFLATE_MODES:
        raise ValueError(f"unknown inflation mode {mode!r}; accepted: 'centre', 'average', 'scaled'")
    if mode != "scaled" and alphas is not None:
        raise ValueError(f"alphas are only used by mode='scaled', not mode={mode!r}")

    if mode in ("centre", "center"):
        out = weight.new_zeros((*weight.shape, depth))
        out[..., depth // 2] = weight
        return out
    if mode == "average":
        coeff = torch.full((depth,), 1.0 / depth, dtype=torch.float64)
    else:
        if alphas is None:
            raise ValueError("mode='scaled' needs alphas: T positive numbers that sum to 1")
        coeff = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu().reshape(-1)
        if coeff.numel() != depth:
            raise ValueError(f"alphas has {coeff.numel()} entries but depth is {depth}; give one alpha per tap")
        if not torch.isfinite(coeff).all() or (coeff <= 0).any():
            raise ValueError(f"alphas must all be finite and > 0, got {coeff.tolist()}")
        total = float(coeff.sum())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"alphas must sum to 1 (so a volume constant along D sees W), they sum to {total!r}")
    # coefficients in float64, cast once: keeps W exactly recoverable as sum_t alpha_t W
    return weight.unsqueeze(-1) * coeff.to(device=weight.device, dtype=weight.dtype)


def stem_2d_to_3d(weight: torch.Tensor, in_channels: int = 1) -> torch.Tensor:
    """The paper's stem transform: input channels of the 2D stem become z-taps.

    Args:
        weight: ``(Cout, T, kh, kw)``, the 2D stem (ResNet50: ``(64, 3, 7, 7)``,
            its RGB channels standing for ``T`` neighbouring slices).
        in_channels: input channels of the 3D network. With ``1`` (the paper)
            the result is ``(Cout, 1, kh, kw, T)``, channel ``z`` -> tap ``z``.
            With ``C > 1`` every 3D input channel gets that kernel divided by
            ``C`` (so ``C`` identical channels give the single-channel result;
            MONAI's ``copy_from`` repeats without dividing).

    Returns:
        ``(Cout, in_channels, kh, kw, T)``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"stem_2d_to_3d expects a 2D stem weight (Cout, T, kh, kw); got {shape}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    w = weight.permute(0, 2, 3, 1).unsqueeze(1)  # (Cout, 1, kh, kw, T)
    if in_channels == 1:
        return w.contiguous()
    return (w / in_channels).repeat(1, in_channels, 1, 1, 1).contiguous()


# --------------------------------------------------------------------------- sources
def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict saved with ``torch.save`` (tensors only, ``weights_only``).

    Accepts a bare state dict or a checkpoint dict holding one under
    ``"state_dict"`` or ``"model"``; a DataParallel ``"module."`` prefix is removed.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read as a tensor state dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"state dict file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with non-tensor objects, ...
        raise ValueError(f"cannot read {path} as a torch state dict ({type(exc).__name__}: {exc})") from exc
    return _as_state_dict(obj, where=path)


def _as_state_dict(obj: object, where: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{where}: expected a non-empty mapping of parameter names to tensors")
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise ValueError(f"{where}: entry {k!r} is not a (name, tensor) pair ({type(v).__name__})")
        out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def _source_state_dict(source: StateSource) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, nn.Module):
        return dict(source.state_dict()), type(source).__name__
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict_file(source), os.fspath(source)
    if isinstance(source, Mapping):
        return _as_state_dict(source, where="state dict"), "state dict"
    raise TypeError(
        f"source must be an nn.Module, a state dict or a path to a state dict file; got {type(source).__name__}"
    )


# --------------------------------------------------------------------------- report
@dataclass
class TransferReport:
    """What :func:`transfer_2d_to_3d` did.

    Attributes:
        source: description of the source (class name, file path or "state dict").
        source_format: ``"fcn"`` (FCN/MCFCN keys, stem BN ``bn0``) or
            ``"torchvision"`` (ResNet keys, stem BN ``bn1``, ``fc`` head).
        copied: ``(source_key, target_key, source_shape, target_shape)`` per tensor.
        skipped: ``(source_key, reason)`` for source tensors that were not used.
        missing: target encoder keys no source tensor filled (empty when strict).
    """

    source: str
    source_format: str
    copied: list[tuple[str, str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def n_copied(self) -> int:
        return len(self.copied)

    def summary(self) -> str:
        """A short human-readable account (skip reasons grouped by reason)."""
        lines = [
            f"2D->3D transfer from {self.source} ({self.source_format} format): "
            f"{len(self.copied)} tensors copied, {len(self.skipped)} skipped, {len(self.missing)} missing"
        ]
        stem = [c for c in self.copied if c[1] == "conv1.weight"]
        if stem:
            lines.append(f"  stem {stem[0][0]} {stem[0][2]} -> conv1.weight {stem[0][3]} (input channel z -> z-tap z)")
        reasons: dict[str, list[str]] = {}
        for key, reason in self.skipped:
            reasons.setdefault(reason, []).append(key)
        for reason, keys in reasons.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")
            lines.append(f"  skipped ({reason}): {shown}")
        if self.missing:
            lines.append(f"  missing in source: {', '.join(self.missing[:5])}" + (" ..." if len(self.missing) > 5 else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- transfer
_DOWNSAMPLE_BN_3D = re.compile(r"^(layer\d\.\d+\.downsample)\.2\.")


def _detect_format(sd: Mapping[str, torch.Tensor]) -> str:
    if "conv1.weight" not in sd:
        raise ValueError(
            "source has no 'conv1.weight': expected an FCN/MCFCN (keys conv1, bn0, layer1..4) "
            "or a torchvision ResNet50 state dict (keys conv1, bn1, layer1..4, fc); "
            f"first keys are {list(sd)[:5]}"
        )
    if "bn0.weight" in sd:
        return "fcn"
    if "bn1.weight" in sd:
        return "torchvision"
    raise ValueError("source has 'conv1.weight' but neither 'bn0.*' (FCN/MCFCN) nor 'bn1.*' (torchvision ResNet)")


def _target_to_source_key(key: str, fmt: str) -> str:
    """Name of the 2D tensor that feeds AH-Net encoder tensor ``key``."""
    if key.startswith("bn0.") and fmt == "torchvision":
        return "bn1." + key[len("bn0.") :]
    m = _DOWNSAMPLE_BN_3D.match(key)
    if m:  # AH-Net: downsample = (conv, z-pool, BN); 2D: (conv, BN)
        return f"{m.group(1)}.1." + key[m.end() :]
    return key


def _skip_reason(key: str, fmt: str) -> str:
    if key.startswith("fc."):
        return "ImageNet classifier head: AH-Net has no counterpart"
    if key.startswith("init_proj."):
        return "MCFCN input projection (C -> 3 channels, BN, ReLU): AH-Net's stem reads neighbouring slices instead"
    if key.startswith(("gcn", "refine", "transformer.", "up_conv.")):
        return "2D decoder (GCN/Refine): AH-Net's 3D decoder is trained from scratch"
    if key.startswith("layer"):
        return "encoder block absent in the target (target has fewer blocks per layer)"
    return "no counterpart in AH-Net's encoder"


@torch.no_grad()
def transfer_2d_to_3d(source: StateSource, target: nn.Module, *, strict: bool = True) -> TransferReport:
    """Copy a 2D ResNet50 encoder into AH-Net's encoder, in place (the paper's transform).

    Args:
        source: an FCN / MCFCN module (``ahnet_fast.reference`` or MONAI's), a
            state dict with FCN or torchvision ResNet50 keys, or the path of such
            a state dict saved with ``torch.save`` (see :func:`load_state_dict_file`).
        target: an AH-Net (``spatial_dims=3``) whose state_dict keys are MONAI's:
            ``conv1.weight (64, C, 7, 7, 3)``, ``bn0.*``, ``layerN.i.conv{1,2,3}.weight``
            ``(o, i, k, k, 1)``, ``layerN.i.bn{1,2,3}.*``, ``layerN.0.downsample.{0,2}.*``.
            Its decoder is left untouched. Any ``layers=`` configuration works as
            long as the source has at least as many blocks per layer.
        strict: if True (default) every encoder tensor of ``target`` must be
            filled, else :class:`ValueError` lists the missing ones (nothing is
            written in that case). With False the report lists them.

    Returns:
        A :class:`TransferReport`.

    Raises:
        ValueError: unrecognised source layout; a shape that cannot be mapped
            (the message names the key and both shapes); missing tensors when strict.
        TypeError: a source of an unsupported type.
    """
    src, name = _source_state_dict(source)
    fmt = _detect_format(src)
    tgt = target.state_dict()
    encoder_keys = [k for k in tgt if k.startswith(_ENCODER_PREFIXES)]
    if "conv1.weight" not in tgt or not any(k.startswith("layer1.") for k in tgt):
        raise ValueError(
            f"target {type(target).__name__} does not look like AH-Net: it needs 'conv1.weight', 'bn0.*' "
            "and 'layer1..4.*' state_dict keys"
        )

    report = TransferReport(source=name, source_format=fmt)
    updates: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in encoder_keys:
        skey = _target_to_source_key(key, fmt)
        if skey not in src:
            report.missing.append(key)
            continue
        s, t = src[skey], tgt[key]
        new = _convert(key, skey, s, t)
        updates[key] = new
        used.add(skey)
        report.copied.append((skey, key, tuple(s.shape), tuple(t.shape)))

    if strict and report.missing:
        raise ValueError(
            f"source {name} lacks {len(report.missing)} tensors the target's encoder needs, e.g. "
            f"{report.missing[:5]} (does the source have as many blocks per layer as the target?); "
            "pass strict=False to copy what matches"
        )
    for skey in src:
        if skey not in used:
            report.skipped.append((skey, _skip_reason(skey, fmt)))

    result = target.load_state_dict(updates, strict=False)
    if result.unexpected_keys:  # cannot happen: updates only holds target keys
        raise RuntimeError(f"unexpected keys while loading: {result.unexpected_keys}")
    return report


def _convert(key: str, skey: str, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Map source tensor ``s`` (2D) onto target tensor ``t``'s shape, or raise naming both."""

    def mismatch(extra: str = "") -> ValueError:
        return ValueError(
            f"cannot map source '{skey}' {tuple(s.shape)} onto target '{key}' {tuple(t.shape)}{extra}"
        )

    if key == "conv1.weight" and t.dim() == 5 and s.dim() == 4:
        # (Cout, T, kh, kw) -> (Cout, C, kh, kw, T): input channel z -> z-tap z
        if s.shape[0] != t.shape[0] or s.shape[2:] != t.shape[2:4] or s.shape[1] != t.shape[4]:
            raise mismatch(
                f": the stem's {s.shape[1]} input channels become its z-taps, so the target needs "
                f"({s.shape[0]}, C, {s.shape[2]}, {s.shape[3]}, {s.shape[1]})"
            )
        new = stem_2d_to_3d(s, in_channels=t.shape[1])
    elif t.dim() == 5 and s.dim() == 4:
        if t.shape[4] != 1 or t.shape[:4] != s.shape:
            raise mismatch(f": a 2D conv (o, i, k, k) becomes (o, i, k, k, 1), here {(*s.shape, 1)}")
        new = s.unsqueeze(-1)
    elif t.shape == s.shape:
        new = s
    else:
        raise mismatch()
    return new.to(device=t.device, dtype=t.dtype)
