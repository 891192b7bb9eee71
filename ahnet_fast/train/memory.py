"""``--max-memory GB``: pick the largest patch / batch / checkpointing that fits.

Candidates are ordered by what helps training most: a larger patch (more
context) first, then a larger batch, and at equal size no activation
checkpointing (faster) before checkpointing. The first candidate whose peak
memory fits under the limit is chosen.

Peak memory of one training step:

* on a CUDA device it is **measured**: one real forward/backward/optimizer
  step on random data, ``torch.cuda.max_memory_allocated`` (an out-of-memory
  error means "does not fit");
* on the CPU it is **estimated** without computing anything: the model runs on
  the ``meta`` device and every tensor saved for backward is counted (each
  storage once). Parameters, gradients and Adam's two moments add 4x the
  parameter bytes; a transient of twice the largest activation covers the
  gradient buffers alive during backward. With checkpointing the saved bytes of
  each checkpointed block are replaced by its input, plus the largest block's
  saved bytes (recomputed during backward). Under bf16/fp16 autocast
  activations are counted at half size (an estimate: BatchNorm keeps fp32 statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["MemoryChoice", "estimate_step_bytes", "measure_step_bytes", "choose_config"]

GiB = 1024**3


@dataclass
class MemoryChoice:
    """The chosen configuration and how it was found."""

    patch_size: tuple[int, ...]
    batch_size: int
    checkpointing: bool
    peak_bytes: int
    method: str  # "measured" or "estimated"
    limit_bytes: int
    tried: list[dict[str, Any]] = field(default_factory=list)

    def describe(self) -> str:
        return (
            f"max-memory {self.limit_bytes / GiB:.2f} GiB: chose patch {'x'.join(map(str, self.patch_size))}, "
            f"batch {self.batch_size}, activation checkpointing {'on' if self.checkpointing else 'off'} "
            f"({self.method} peak {self.peak_bytes / GiB:.2f} GiB; {len(self.tried)} configurations tried)"
        )


def _checkpoint_blocks(model: nn.Module) -> list[str]:
    from ahnet_fast.train.models import checkpoint_block_names

    return checkpoint_block_names(model)


def estimate_step_bytes(
    model_factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    checkpointing: bool,
    amp: str = "none",
) -> int:
    """Estimated peak bytes of one training step (module docstring), computed on ``meta``.

    Args:
        model_factory: builds the model (called under ``torch.device("meta")``).
        input_shape: ``(B, C, *spatial)``.
        checkpointing: count as if activation checkpointing were on.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"``.
    """
    with torch.device("meta"):
        model = model_factory()
        x = torch.empty(*input_shape)
    model.train()
    blocks = _checkpoint_blocks(model) if checkpointing else []
    current: list[str | None] = [None]
    saved: dict[Any, tuple[int, str | None]] = {}
    block_inputs: dict[str, int] = {}
    biggest = [0]

    def pre(name: str):
        def hook(mod, args):
            current[0] = name
            block_inputs[name] = sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))
        return hook

    def post(mod, args, out):
        current[0] = None

    handles = []
    mods = dict(model.named_modules())
    for b in blocks:
        handles.append(mods[b].register_forward_pre_hook(pre(b)))
        handles.append(mods[b].register_forward_hook(post))

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        key = st._cdata if hasattr(st, "_cdata") else id(t)
        if key not in saved:
            saved[key] = (int(st.nbytes()), current[0])
        return t

    def track(mod, args, out):
        if isinstance(out, torch.Tensor):
            biggest[0] = max(biggest[0], out.numel() * out.element_size())

    for m in model.modules():
        handles.append(m.register_forward_hook(track))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
    finally:
        for h in handles:
            h.remove()
    act_scale = 0.5 if amp in ("bf16", "fp16") else 1.0
    total = sum(n for n, _ in saved.values())
    if checkpointing and blocks:
        per_block: dict[str, int] = {}
        for n, owner in saved.values():
            if owner is not None:
                per_block[owner] = per_block.get(owner, 0) + n
        outside = total - sum(per_block.values())
        acts = outside + sum(block_inputs.values()) + (max(per_block.values()) if per_block else 0)
    else:
        acts = total
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # weights + grads + Adam (exp_avg, exp_avg_sq); fp16/bf16 keep fp32 master weights
    return int(4 * params + act_scale * (acts + 2 * biggest[0]))


def measure_step_bytes(
    model_factory: Callable[[], nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
    checkpointing: bool,
    amp: str = "none",
    device: str | torch.device = "cuda",
) -> int | None:
    """Measured peak CUDA bytes of one real training step; None if it runs out of memory."""
    from ahnet_fast.train.models import enable_activation_checkpointing
    from ahnet_fast.train.optim import make_adam

    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("measure_step_bytes needs a CUDA device; use estimate_step_bytes on the CPU")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    model = opt = x = y = None
    try:
        model = model_factory().to(device).train()
        if checkpointing:
            enable_activation_checkpointing(model)
        opt = make_adam([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        x = torch.randn(*input_shape, device=device)
        y = torch.randint(0, num_classes, (input_shape[0], *input_shape[2:]), device=device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        del model, opt, x, y
        torch.cuda.empty_cache()


def choose_config(
    limit_gb: float,
    model_factory: Callable[[], nn.Module],
    in_channels: int,
    num_classes: int,
    patch_candidates: Sequence[Sequence[int]],
    batch_candidates: Sequence[int] = (1, 2, 4, 8),
    amp: str = "none",
    device: str | torch.device = "cpu",
    allow_checkpointing: bool = True,
) -> MemoryChoice:
    """Pick the largest configuration whose training step fits in ``limit_gb`` GiB.

    Args:
        limit_gb: memory budget in GiB (> 0).
        model_factory: builds the model to train.
        in_channels: input channels.
        num_classes: output classes (for the measured step's labels).
        patch_candidates: spatial patch sizes (each valid for the model).
        batch_candidates: batch sizes.
        amp, device: as in training; a CUDA device measures, the CPU estimates.

    Raises:
        ValueError: nothing fits (the message gives the smallest requirement).
    """
    if not limit_gb > 0:
        raise ValueError(f"max-memory must be > 0 GiB, got {limit_gb}")
    limit = int(limit_gb * GiB)
    device = torch.device(device)
    measure = device.type == "cuda"
    cands = []
    for p in patch_candidates:
        for b in batch_candidates:
            for ck in ((False, True) if allow_checkpointing else (False,)):
                cands.append((math.prod(p), b, not ck, tuple(int(v) for v in p), b, ck))
    # largest patch first, then batch, then without checkpointing
    cands.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    tried: list[dict[str, Any]] = []
    smallest = None
    for _, _, _, patch, batch, ck in cands:
        shape = (batch, in_channels, *patch)
        try:
            if measure:
                peak = measure_step_bytes(model_factory, shape, num_classes, ck, amp, device)
            else:
                peak = estimate_step_bytes(model_factory, shape, ck, amp)
        except ValueError as exc:  # the model refuses this shape (e.g. batch 1 too small for BatchNorm)
            tried.append({"patch": list(patch), "batch": batch, "checkpointing": ck, "peak_bytes": None,
                          "fits": False, "invalid": str(exc)})
            continue
        tried.append({"patch": list(patch), "batch": batch, "checkpointing": ck,
                      "peak_bytes": peak, "fits": peak is not None and peak <= limit})
        if peak is not None:
            smallest = peak if smallest is None else min(smallest, peak)
        if peak is not None and peak <= limit:
            return MemoryChoice(patch, batch, ck, peak, "measured" if measure else "estimated", limit, tried)
    need = "no candidate was usable" if smallest is None else f"{smallest / GiB:.2f} GiB at least"
    raise ValueError(
        f"no patch/batch/checkpointing configuration fits in {limit_gb} GiB ({need}); "
        f"tried patches {[list(p) for p in patch_candidates]} and batches {list(batch_candidates)}"
    )
