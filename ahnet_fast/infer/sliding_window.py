"""Sliding-window inference over whole volumes.

Runs any ``nn.Module`` mapping ``(B, C, h, w, d)`` to ``(B, K, h, w, d)`` over a
volume ``(B, C, H, W, D)`` of any size, window by window, and stitches the
window outputs with Gaussian or constant weights (as MONAI's
``sliding_window_inference``). The model runs on ``sw_device`` (e.g. the GPU);
the stitched output lives on ``device`` (e.g. the CPU when the volume's
logits do not fit on the GPU).

AH-Net only takes sizes that are multiples of 32 along D (and of
``2**max(5, psp+3)`` in-plane in transpose mode): the window is rounded up to
the next valid size (:func:`valid_window`), capped at the (rounded-up) volume
size so a small volume is not padded further than needed, and a volume
smaller than a window is padded (``pad_mode``) and the output cropped back.

Test-time mirroring (``mirror_axes``): every window is also run mirrored along
each combination of the given axes and the un-mirrored outputs are averaged
before blending (as nnU-Net does), for a model trained with those flips as
augmentation; ``2**len(mirror_axes)`` forward passes per window.
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "window_rules",
    "valid_window",
    "window_starts",
    "importance_map",
    "mirror_combinations",
    "sliding_window_inference",
]

log = logging.getLogger(__name__)


def window_rules(model: nn.Module) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """``(multiples, minimums)`` per spatial axis that ``model`` requires, or None if any size works.

    Recognises models with an ``input_spec`` (ahnet_fast's AHNet, see
    :mod:`ahnet_fast.models.validation`) and MONAI's ``AHNet`` (which keeps
    ``psp_block_num`` on the model and ``upsample_mode`` on its PSP block);
    for the latter the same rule is applied here: D a multiple of 32,
    H and W multiples of ``2**max(5, psp+3)`` in transpose mode (else 32),
    and at least ``2**(psp+3)``.
    """
    spec = getattr(model, "input_spec", None)
    if callable(spec) and not hasattr(spec, "multiples"):
        spec = spec()
    if spec is not None and hasattr(spec, "multiples") and hasattr(spec, "minimums"):
        mult, mins = tuple(spec.multiples()), tuple(spec.minimums())
        if len(mult) == 3:
            return mult, mins  # type: ignore[return-value]
    psp = getattr(model, "psp_block_num", None)
    if psp is not None and getattr(model, "spatial_dims", 3) == 3:
        mode = getattr(model, "upsample_mode", None) or getattr(getattr(model, "psp", None), "upsample_mode", None)
        first = 2 ** max(5, psp + 3) if mode in (None, "transpose") else 32
        low = max(first, 2 ** (psp + 3) if psp else first)
        low = -(-low // first) * first
        return (first, first, 32), (low, low, 32)
    return None


def valid_window(
    window: Sequence[int],
    rules: tuple[Sequence[int], Sequence[int]] | None,
) -> tuple[int, int, int]:
    """Round ``window`` up to the next size the model accepts (see :func:`window_rules`)."""
    if len(window) != 3 or any(int(w) < 1 for w in window):
        raise ValueError(f"window must be 3 positive sizes (H, W, D), got {tuple(window)}")
    if rules is None:
        return tuple(int(w) for w in window)  # type: ignore[return-value]
    mult, mins = rules
    return tuple(max(int(lo), -(-int(w) // int(m)) * int(m)) for w, m, lo in zip(window, mult, mins))  # type: ignore[return-value]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start offsets of windows of length ``window`` covering ``[0, size)``.

    Consecutive windows are ``floor(window * (1 - overlap))`` apart (at least
    1); the last one is shifted back to end exactly at ``size``.
    Requires ``size >= window``.
    """
    if size < window:
        raise ValueError(f"size {size} is smaller than window {window}")
    if size == window:
        return [0]
    step = max(1, int(window * (1.0 - overlap)))
    n = math.ceil((size - window) / step) + 1
    return sorted({min(i * step, size - window) for i in range(n)})


def importance_map(
    window: Sequence[int],
    mode: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Blending weights ``(h, w, d)`` float32, strictly positive: MONAI 1.6.1's map.

    Gaussian: separable, centred, sigma = ``sigma_scale * size`` per axis, computed exactly as
    ``monai.data.utils.compute_importance_map`` does (float32, not normalised: the peak is 1
    for odd sizes and just under 1 for even ones) and floored like it at
    ``max(min(map), 1e-3)``. The floor matters: without it the weights fall to ~1e-10 at
    window corners, where one window's border prediction then decides the blend alone;
    with it, our blend equals MONAI's ``sliding_window_inference`` with the same options
    (tests/test_infer_sliding_window.py).
    """
    if mode == "constant":
        return torch.ones(tuple(int(w) for w in window), dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"blend mode must be 'gaussian' or 'constant', got {mode!r}")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    m = None
    for ax, n in enumerate(window):
        n = int(n)
        sigma = n * sigma_scale
        x = torch.arange(start=-(n - 1) / 2.0, end=(n - 1) / 2.0 + 1, dtype=torch.float, device=device)
        x = torch.exp(x ** 2 / (-2 * sigma ** 2))
        m = x if m is None else m.unsqueeze(-1) * x[(None,) * ax]
    assert m is not None
    return m.clamp_(min=max(float(m.min()), 1e-3))


def mirror_combinations(mirror_axes: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty set of the spatial ``mirror_axes`` (0 = H, 1 = W, 2 = D) as tensor dims of
    a ``(B, C, H, W, D)`` tensor: ``(0, 1)`` -> ``[(2,), (3,), (2, 3)]``.

    ``ValueError`` for an axis outside 0..2 or a repeated one.
    """
    axes = [int(a) for a in mirror_axes]
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError("mirror_axes must be distinct spatial axes among 0 (H), 1 (W), 2 (D), "
                         f"got {tuple(mirror_axes)}")
    dims = [a + 2 for a in sorted(axes)]
    return [tuple(d for bit, d in enumerate(dims) if mask >> bit & 1) for mask in range(1, 2 ** len(dims))]


def _pad_amounts(size: Sequence[int], target: Sequence[int]) -> list[int]:
    # F.pad order: last axis first, (before, after) each; pad symmetrically like MONAI
    pads: list[int] = []
    for s, t in reversed(list(zip(size, target))):
        extra = max(0, int(t) - int(s))
        pads += [extra // 2, extra - extra // 2]
    return pads


def _window_runner(model: nn.Module | Callable[[torch.Tensor], torch.Tensor], amp: contextlib.AbstractContextManager,
                   use_graph: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """``chunk -> model(chunk)`` under ``amp``; with ``use_graph`` the first full-size chunk is
    captured as a CUDA graph and replayed for every chunk of that shape (others run plainly)."""
    def plain(chunk: torch.Tensor) -> torch.Tensor:
        with amp:
            return model(chunk)

    if not use_graph:
        return plain
    state: dict = {"graph": None, "shape": None, "failed": False}

    def run(chunk: torch.Tensor) -> torch.Tensor:
        if state["failed"]:
            return plain(chunk)
        if state["graph"] is None:
            from .graphed import graphed

            try:
                # the output is consumed before the next replay: no copy of it needed
                state["graph"] = graphed(plain, chunk, clone=False)
                state["shape"] = chunk.shape
            except Exception as exc:  # an op that cannot be captured: keep going without graphs
                log.warning("CUDA graph capture failed (%s: %s); windows run without graphs", type(exc).__name__, exc)
                state["failed"] = True
                return plain(chunk)
        if chunk.shape != state["shape"]:
            return plain(chunk)  # the last, smaller batch of windows
        return state["graph"](chunk)

    return run


def sliding_window_inference(
    inputs: torch.Tensor,
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    window: Sequence[int] | None = None,
    overlap: float = 0.25,
    blend: Literal["gaussian", "constant"] = "gaussian",
    sigma_scale: float = 0.125,
    sw_batch_size: int = 1,
    sw_device: torch.device | str | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    pad_mode: Literal["constant", "replicate"] = "constant",
    pad_value: float = 0.0,
    rules: tuple[Sequence[int], Sequence[int]] | None | Literal["auto"] = "auto",
    cuda_graph: bool = True,
    mirror_axes: Sequence[int] = (),
) -> torch.Tensor:
    """Run ``model`` over ``inputs`` window by window and blend the outputs.

    Args:
        inputs: ``(B, C, H, W, D)`` floating tensor (any device; windows are
            copied to ``sw_device`` one batch at a time).
        model: maps ``(n, C, h, w, d)`` to ``(n, K, h, w, d)``; called under
            ``torch.no_grad()``; put it in eval mode yourself.
        window: ``(h, w, d)``; None = the whole volume. Rounded up to a size
            the model accepts (``rules``) and capped at the rounded-up volume.
        overlap: share of a window overlapping its neighbour, in ``[0, 1)``.
        blend: "gaussian" (weights fall off towards window borders, where a
            convolution net sees padding) or "constant" (plain average).
        sw_batch_size: windows per forward call.
        sw_device: where the model runs (default: ``inputs.device``).
        device: where the output is stitched (default: ``inputs.device``).
        autocast_dtype: e.g. ``torch.bfloat16`` to run the model under autocast.
        progress: show a tqdm bar over window batches.
        pad_mode, pad_value: how a volume smaller than a window is padded.
        rules: ``(multiples, minimums)`` for the window, None for any size,
            "auto" = :func:`window_rules` of ``model``.
        cuda_graph: on a CUDA ``sw_device``, capture the forward once as a CUDA graph
            (:func:`ahnet_fast.infer.graphed`) and replay it for every full batch of windows
            (they all have one shape); a capture that fails falls back to plain calls.
        mirror_axes: spatial axes (0 = H, 1 = W, 2 = D) to mirror at test time: each window's
            output is the mean of the model's outputs over every combination of these flips
            (:func:`mirror_combinations`), each flipped back; ``()`` (default) = one pass.

    Returns:
        ``(B, K, H, W, D)`` float32 on ``device``.
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
        raise ValueError(
            f"inputs must be a 5-D tensor (B, C, H, W, D), got "
            f"{tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}"
        )
    if not inputs.dtype.is_floating_point:
        raise ValueError(f"inputs must be floating point, got {inputs.dtype}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if pad_mode not in ("constant", "replicate"):
        raise ValueError(f"pad_mode must be 'constant' or 'replicate', got {pad_mode!r}")
    mirrors = mirror_combinations(mirror_axes)
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    device = torch.device(device) if device is not None else inputs.device
    if rules == "auto":
        # a compiled wrapper (ahnet_fast.infer.compiled) keeps the model it runs as .module
        src = model if isinstance(model, nn.Module) else getattr(model, "module", None)
        rules = window_rules(src) if isinstance(src, nn.Module) else None

    batch, _, *size = inputs.shape
    whole = valid_window(size, rules)  # smallest valid shape holding the whole volume
    if window is None:
        win = whole
    else:
        asked = tuple(int(w) for w in window)
        win = valid_window(asked, rules)
        if win != asked:
            log.info("window %s rounded up to %s (model size rules)", asked, win)
        win = tuple(min(w, m) for w, m in zip(win, whole))  # type: ignore[assignment]
    padded = [max(s, w) for s, w in zip(size, win)]
    pads = _pad_amounts(size, padded)
    x = inputs
    if any(pads):
        if pad_mode == "constant":
            x = F.pad(x, pads, mode="constant", value=pad_value)
        else:
            x = F.pad(x, pads, mode="replicate")

    starts = [window_starts(p, w, overlap) for p, w in zip(padded, win)]
    slices = [
        (b, i, j, k) for b in range(batch) for i in starts[0] for j in starts[1] for k in starts[2]
    ]
    weight = importance_map(win, blend, sigma_scale, device=device)
    count = torch.zeros(padded, dtype=torch.float32, device=device)
    for i in starts[0]:
        for j in starts[1]:
            for k in starts[2]:
                count[i:i + win[0], j:j + win[1], k:k + win[2]] += weight
    out: torch.Tensor | None = None

    if autocast_dtype is not None:
        amp: contextlib.AbstractContextManager = torch.autocast(device_type=sw_device.type, dtype=autocast_dtype)
    else:
        amp = contextlib.nullcontext()
    groups = [slices[n:n + sw_batch_size] for n in range(0, len(slices), sw_batch_size)]
    run = _window_runner(model, amp, cuda_graph and sw_device.type == "cuda" and len(groups) > 1)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(groups), desc="sliding window", unit="batch", leave=False)
    try:
        with torch.no_grad():
            for group in groups:
                chunk = torch.cat(
                    [x[b:b + 1, :, i:i + win[0], j:j + win[1], k:k + win[2]] for b, i, j, k in group]
                ).to(sw_device, non_blocking=True)
                y = run(chunk)
                if mirrors and isinstance(y, torch.Tensor):
                    # a float32 copy: a CUDA-graph runner overwrites its output buffer on the next replay
                    y = y.to(torch.float32, copy=True)
                    for dims in mirrors:
                        y = y + run(chunk.flip(dims)).float().flip(dims)
                    y = y / (len(mirrors) + 1)
                if not isinstance(y, torch.Tensor) or y.ndim != 5 or y.shape[0] != len(group) \
                        or tuple(y.shape[2:]) != tuple(win):
                    raise ValueError(
                        f"model output for windows of shape {tuple(chunk.shape)} must be "
                        f"({len(group)}, K, {win[0]}, {win[1]}, {win[2]}), got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
                    )
                y = y.to(device=device, dtype=torch.float32) * weight
                if out is None:
                    out = torch.zeros((batch, y.shape[1], *padded), dtype=torch.float32, device=device)
                for n, (b, i, j, k) in enumerate(group):
                    out[b, :, i:i + win[0], j:j + win[1], k:k + win[2]] += y[n]
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    assert out is not None  # at least one window always exists
    out /= count
    # crop the padding back off (F.pad order is last axis first)
    if not any(pads):
        return out
    before = [pads[2 * (2 - a)] for a in range(3)]
    # a copy, so the padded buffer is freed
    return out[:, :, before[0]:before[0] + size[0], before[1]:before[1] + size[1],
               before[2]:before[2] + size[2]].contiguous()
