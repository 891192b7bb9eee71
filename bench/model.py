"""Whole-model benchmarks: AH-Net eval forward and one training step, all contenders in one process.

Network: AH-Net as MONAI builds it (default: ``layers=(3,4,6,3), psp_block_num=4,
upsample_mode="trilinear"``, the paper's 27,085,500 parameters; in/out channels 1), every
contender loaded with the same weights, whose BatchNorm running statistics are first
calibrated on random input so that eval activations are of a sane size (a fresh model's
reach 1e5). Shapes ``NxCxHxWxD``: 1x1x192x192x64, 2x1x192x192x64, 1x1x384x256x64.

Modes: ``infer`` = eval forward without autograd; ``train`` = one optimisation step
(zero_grad, train-mode forward, MSE loss against a random target, backward, Adam step).

Contenders (model weights and input in the run's dtype, bf16 by default):

* MONAI AHNet eager, contiguous and channels_last_3d (family ``eager``), and the
  channels_last_3d eval forward replayed from a CUDA graph (``alternative``);
* MONAI AHNet under torch.compile (``--compile-mode``, max-autotune by default, which
  brings CUDA graphs; inference also with inductor freezing) (``compile``);
* ours: ``ahnet_fast.reference.AHNet`` and the fast AH-Net when it exists (with a
  CUDA-graph eval variant and an activation-checkpointing training variant when its
  constructor offers a checkpointing flag) (``ours``);
* MONAI's 3D UNet (channels 16..256, strides 2, 2 residual units) at the same input,
  as the paper compared against a 3D U-Net (``other-net``; not in the ratios).

Correctness gate: each AH-Net contender's eval output (infer) or train-mode output and
parameter gradients (train) against MONAI in float32 with TF32 off (float64 for float32
runs); limit max(2 x error of MONAI eager in the same dtype, floor).

Run: ``python -m bench.model [--shapes ...] [--quick] [--out DIR]`` or ``ahnet-fast bench model``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bench import common
from bench.common import Unavailable, short_error

CL3D = torch.channels_last_3d
DEFAULT_SHAPES = ["1x1x192x192x64", "2x1x192x192x64", "1x1x384x256x64"]
QUICK_SHAPES = ["1x1x192x192x64"]
#: a CPU run's default: the smallest input the paper configuration accepts (H, W >= 2**(psp+3) = 128);
#: one eval forward takes seconds on a few cores instead of about a minute at 192x192x64
CPU_SHAPES = ["1x1x128x128x32"]
#: how to get the MONAI rows (the peer implementation every contender is checked against)
MONAI_HINT = "pip install monai adds MONAI's AHNet (the reference rows and the correctness gate's peer)"
CONFIGS = {
    "paper": {"layers": (3, 4, 6, 3), "psp_block_num": 4, "upsample_mode": "trilinear"},
    "transpose-psp3": {"layers": (3, 4, 6, 3), "psp_block_num": 3, "upsample_mode": "transpose"},
}
#: constructor flags the fast AH-Net may offer for activation checkpointing
CHECKPOINT_FLAGS = ("activation_checkpointing", "checkpointing", "checkpoint", "use_checkpoint",
                    "grad_checkpointing")
#: where the fast AH-Net may live ("module:attribute"); AHNET_FAST_BENCH_FAST_MODEL overrides
FAST_MODEL_CANDIDATES = ("ahnet_fast.models.fast:FastAHNet", "ahnet_fast.models.fast:AHNet",
                         "ahnet_fast.models.fast_ahnet:AHNet",
                         "ahnet_fast.models.fused:AHNet", "ahnet_fast.models:FastAHNet",
                         "ahnet_fast.fast:AHNet", "ahnet_fast:AHNet")


@dataclass(frozen=True)
class ModelShape:
    n: int
    c: int
    h: int
    w: int
    d: int

    @property
    def name(self) -> str:
        return f"{self.n}x{self.c}x{self.h}x{self.w}x{self.d}"

    @property
    def tuple(self) -> tuple[int, ...]:
        return (self.n, self.c, self.h, self.w, self.d)


def parse_shapes(spec: str | Sequence[str] | None, *, quick: bool = False) -> list[ModelShape]:
    """'NxCxHxWxD' items (comma-separated) -> shapes (default: the three of DESIGN.md)."""
    if spec is None or spec == "" or spec == []:
        items = QUICK_SHAPES if quick else DEFAULT_SHAPES
    elif isinstance(spec, str):
        items = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        items = [s.strip() for part in spec for s in part.split(",") if s.strip()]
    out = []
    for item in items:
        if not re.fullmatch(r"\d+x\d+x\d+x\d+x\d+", item):
            raise ValueError(f"model shape {item!r} is not NxCxHxWxD (e.g. 1x1x192x192x64)")
        shape = ModelShape(*(int(v) for v in item.split("x")))
        if min(shape.tuple) < 1:
            raise ValueError(f"model shape {item!r} has a zero size")
        out.append(shape)
    return out


# ----------------------------------------------------------------------------
# networks


def monai_ahnet(cfg: dict) -> nn.Module:
    try:
        from monai.networks.nets import AHNet
    except ImportError as exc:
        raise Unavailable(f"MONAI not installed ({short_error(exc)}); {MONAI_HINT}") from None
    return AHNet(spatial_dims=3, **cfg)


def reference_ahnet(cfg: dict) -> nn.Module:
    try:
        from ahnet_fast.reference import AHNet
    except ImportError as exc:
        raise Unavailable(f"ahnet_fast.reference.AHNet: {short_error(exc)}") from None
    return AHNet(spatial_dims=3, **cfg)


def monai_unet(cfg: dict) -> nn.Module:
    try:
        from monai.networks.nets import UNet
    except ImportError as exc:
        raise Unavailable(f"MONAI not installed ({short_error(exc)}); pip install monai adds MONAI's 3D UNet "
                          "row") from None
    return UNet(spatial_dims=3, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def _any_ahnet(cfg: dict) -> nn.Module:
    try:
        return monai_ahnet(cfg)
    except Unavailable:
        return reference_ahnet(cfg)


def find_fast_ahnet() -> type:
    """The fast AH-Net class (not the reference one), or Unavailable with every reason."""
    try:
        from ahnet_fast.models.ahnet import AHNet as Reference
    except ImportError:
        Reference = None  # noqa: N806
    env = os.environ.get("AHNET_FAST_BENCH_FAST_MODEL")
    reasons = []
    for spec in ([env] if env else FAST_MODEL_CANDIDATES):
        mod_name, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), attr or "AHNet")
        except (ImportError, AttributeError) as exc:
            reasons.append(f"{spec}: {type(exc).__name__}")
            continue
        if cls is Reference:
            reasons.append(f"{spec}: is still the reference AHNet")
            continue
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
        reasons.append(f"{spec}: not an nn.Module class")
    raise Unavailable("no fast AH-Net yet (" + "; ".join(reasons) + ")")


def checkpoint_flag(cls: type) -> str | None:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return None
    return next((f for f in CHECKPOINT_FLAGS if f in params), None)


# ----------------------------------------------------------------------------
# contenders


@dataclass
class ModelContext:
    cfg: dict
    master_state: dict  # float32 state_dict (calibrated BN statistics)
    device: torch.device
    dtype: torch.dtype
    mode: str
    compile_mode: str = "max-autotune"


@dataclass
class Built:
    module: nn.Module  # holds the parameters (named like MONAI's)
    forward: Callable[[torch.Tensor], torch.Tensor]  # module itself, or its compiled form


@dataclass
class ModelContender:
    name: str
    family: str  # "eager" | "alternative" | "compile" | "ours" | "other-net"
    layout: str  # "contig" | "cl3d"
    build: Callable[[ModelContext], Built]
    modes: frozenset = frozenset({"infer", "train"})
    graph: bool = False  # time the eval forward as CUDA-graph replays
    comparable: bool = True  # False: a different network, no correctness gate against AH-Net
    note: str = ""


def _place(model: nn.Module, ctx: ModelContext, layout: str, state: dict | None) -> nn.Module:
    if state is not None:
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"state_dict mismatch: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    model = model.to(device=ctx.device, dtype=ctx.dtype)
    if layout == "cl3d":
        model = model.to(memory_format=CL3D)
    return model.train(ctx.mode == "train")


def _eager(factory: Callable[[dict], nn.Module], layout: str, *, load: bool = True,
           **extra: Any) -> Callable[[ModelContext], Built]:
    def build(ctx: ModelContext) -> Built:
        model = _place(factory({**ctx.cfg, **extra}), ctx, layout, ctx.master_state if load else None)
        return Built(model, model)

    return build


def _fast(layout: str, checkpointing: bool = False) -> Callable[[ModelContext], Built]:
    def build(ctx: ModelContext) -> Built:
        cls = find_fast_ahnet()
        kwargs = dict(spatial_dims=3, **ctx.cfg)
        if checkpointing:
            flag = checkpoint_flag(cls)
            if flag is None:
                raise Unavailable(f"{cls.__module__}.{cls.__name__} has no checkpointing flag "
                                  f"({', '.join(CHECKPOINT_FLAGS)})")
            kwargs[flag] = True
        model = _place(cls(**kwargs), ctx, layout, ctx.master_state)
        return Built(model, model)

    return build


def _compiled(ctx: ModelContext) -> Built:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    model = _place(monai_ahnet(ctx.cfg), ctx, "cl3d", ctx.master_state)
    compiled = torch.compile(model, mode=ctx.compile_mode, dynamic=False)
    if ctx.mode == "infer":
        return Built(model, _FrozenOnFirstCall(compiled, inductor_config))
    return Built(model, compiled)


class _FrozenOnFirstCall:
    """Compiles (first call) with inductor freezing on: weights become constants and BN folds."""

    def __init__(self, compiled: Callable, inductor_config: Any):
        self.compiled, self.config, self.done = compiled, inductor_config, False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.done:
            with self.config.patch(freezing=True):
                out = self.compiled(x)
            self.done = True
            return out
        return self.compiled(x)


def default_contenders(*, compile: bool = True) -> list[ModelContender]:
    infer = frozenset({"infer"})
    out = [
        ModelContender("MONAI eager contig", "eager", "contig", _eager(monai_ahnet, "contig")),
        ModelContender("MONAI eager cl3d", "eager", "cl3d", _eager(monai_ahnet, "cl3d")),
        ModelContender("MONAI eager cl3d + CUDA graph", "alternative", "cl3d", _eager(monai_ahnet, "cl3d"),
                       modes=infer, graph=True, note="eval forward captured once, replayed"),
    ]
    if compile:
        out.append(ModelContender("MONAI torch.compile", "compile", "cl3d", _compiled,
                                  note="inference with inductor freezing"))
    out += [
        ModelContender("ours reference", "ours", "cl3d", _eager(reference_ahnet, "cl3d"),
                       note="ahnet_fast.reference.AHNet (plain torch)"),
        ModelContender("ours fast", "ours", "cl3d", _fast("cl3d")),
        ModelContender("ours fast + CUDA graph", "ours", "cl3d", _fast("cl3d"), modes=infer, graph=True),
        ModelContender("ours fast + checkpointing", "ours", "cl3d", _fast("cl3d", True),
                       modes=frozenset({"train"})),
        ModelContender("MONAI UNet contig", "other-net", "contig", _eager(monai_unet, "contig", load=False),
                       comparable=False, note="3D UNet baseline (different network)"),
        ModelContender("MONAI UNet cl3d", "other-net", "cl3d", _eager(monai_unet, "cl3d", load=False),
                       comparable=False),
    ]
    return out


# ----------------------------------------------------------------------------
# steps, reference, gate


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.float(), target)


def _forward_grads(module: nn.Module, forward: Callable, x: torch.Tensor, target: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    out = forward(x)
    grads = torch.autograd.grad(loss_fn(out, target), [p for _, p in params], allow_unused=True)
    return out.detach(), {n: g for (n, _), g in zip(params, grads) if g is not None}


def _flat(grads: dict[str, torch.Tensor], order: Sequence[str]) -> torch.Tensor:
    missing = [n for n in order if n not in grads]
    if missing:
        raise KeyError(f"no gradient for parameters {missing[:5]} (names differ from MONAI's?)")
    return torch.cat([grads[n].detach().double().flatten() for n in order])


def calibrate(model: nn.Module, shape: ModelShape, device: torch.device, batches: int = 2, seed: int = 0) -> None:
    """Set BN running statistics to the cumulative average over a few random batches."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator(device=device).manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(shape.tuple, generator=g, device=device))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.eval()


def count_flops(factory: Callable[[dict], nn.Module], cfg: dict, shape: ModelShape) -> float | None:
    """Forward FLOPs from a meta-device run (no memory, no compute)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            model = factory(cfg).eval()
            x = torch.empty(shape.tuple)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
        return float(counter.get_total_flops())
    except Exception:
        return None


def _check_outputs(built: Built, mode: str, x: torch.Tensor, target: torch.Tensor, order: Sequence[str]
                   ) -> list[torch.Tensor]:
    if mode == "infer":
        with torch.no_grad():
            return [built.forward(x)]
    out, grads = _forward_grads(built.module, built.forward, x, target)
    return [out, _flat(grads, order)]


def _step_fn(built: Built, mode: str, device: torch.device) -> Callable:
    if mode == "infer":
        def infer(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return built.forward(x)
        return infer
    kwargs = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.Adam(built.module.parameters(), lr=1e-4, **kwargs)

    def step(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(built.forward(x), target)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def run_model_contender(c: ModelContender, ctx: ModelContext, x: torch.Tensor, target: torch.Tensor,
                        refs: list[torch.Tensor] | None, order: Sequence[str], base_errors: list[float] | None,
                        *, reps: int, warmup: int, max_seconds: float, flops: float | None) -> dict:
    rec: dict[str, Any] = {"contender": c.name, "family": c.family, "layout": c.layout, "note": c.note}
    device, mode = ctx.device, ctx.mode
    xin = x.contiguous(memory_format=CL3D) if c.layout == "cl3d" else x
    if c.graph and device.type != "cuda":
        return {**rec, "status": "unavailable: CUDA graphs need a CUDA device"}
    t0 = time.perf_counter()
    try:
        built = c.build(ctx)
        if c.comparable and refs is not None:
            outs = _check_outputs(built, mode, xin, target, order)
        else:
            with torch.no_grad() if mode == "infer" else contextlib.nullcontext():
                outs = [built.forward(xin)]
        common.sync(device)
    except Unavailable as exc:
        return {**rec, "status": f"unavailable: {exc}"}
    except Exception as exc:
        return {**rec, "status": f"failed: {short_error(exc)}"}
    rec["build_s"] = time.perf_counter() - t0
    rec["params"] = sum(p.numel() for p in built.module.parameters())
    if c.comparable and refs is not None:
        check = common.check_outputs(outs, refs, ["out", "grads"][: len(refs)], ctx.dtype, base_errors)
        rec["check"] = check.as_dict()
        if not check.ok:
            return {**rec, "status": f"wrong: {check.reason}"}
    elif not all(bool(torch.isfinite(o).all()) for o in outs):
        return {**rec, "status": "wrong: non-finite output"}
    else:
        rec["check"] = {"ok": True, "reason": "different network: finite output only"}
    del outs
    try:
        fn = _step_fn(built, mode, device)
        rec["launches"] = _count_launches(c, fn, xin, target, mode)
        with torch.no_grad() if mode == "infer" else contextlib.nullcontext():
            timing = common.time_fn(fn, [(xin, target)], device, reps=reps, warmup=warmup,
                                    graph=bool(c.graph and device.type == "cuda"), max_seconds=max_seconds,
                                    min_reps=min(10, reps))
            rec["timing"] = timing.as_dict()
            if c.graph and timing.method != "graph":
                return {**rec, "status": f"failed: CUDA graph capture: {timing.graph_error}"}
            rec["ms"] = timing.ms
            rec["peak_bytes"] = common.peak_memory_bytes(fn, (xin, target), device)
    except Exception as exc:
        return {**rec, "status": f"failed: timing: {short_error(exc)}"}
    if flops and c.comparable:
        rec["tflops"] = (flops if mode == "infer" else 3 * flops) / (rec["ms"] * 1e-3) / 1e12
    rec["status"] = "ok"
    return rec


def _count_launches(c: ModelContender, fn: Callable, x: torch.Tensor, target: torch.Tensor,
                    mode: str) -> int | None:
    """Kernels one call launches (Triton launches and kernel-launching torch ops, run for real:
    ahnet_fast.launches), for eager contenders; None for compiled or graph-replayed ones, whose
    kernels that count cannot see (inductor's own launchers, one graph launch)."""
    if c.graph or c.family == "compile":
        return None
    from ahnet_fast.launches import record_launches

    with torch.no_grad() if mode == "infer" else contextlib.nullcontext():
        with record_launches(run_triton=True) as log:
            fn(x, target)
    return log.total


def _master(network: Callable[[dict], nn.Module], cfg: dict, shape: ModelShape, device: torch.device,
            seed: int) -> tuple[dict, str]:
    """float32 weights every contender loads (MONAI's init, BN calibrated at ``shape``)."""
    torch.manual_seed(seed)
    model = network(cfg).to(device)
    source = type(model).__module__
    calibrate(model, shape, device, batches=2 if device.type == "cuda" else 1, seed=seed)  # a CPU run is short
    return {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, source


def _reference(network: Callable[[dict], nn.Module], cfg: dict, master: dict, mode: str, x: torch.Tensor,
               target: torch.Tensor, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[str]]:
    rdt = torch.float64 if dtype == torch.float32 else torch.float32
    model = network(cfg)
    model.load_state_dict(master)
    model = model.to(device=x.device, dtype=rdt).train(mode == "train")
    built = Built(model, model)
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    with common.no_tf32():
        outs = _check_outputs(built, mode, x.to(rdt), target.to(rdt), order)
    return outs, order


def run_model(
    shapes: Sequence[ModelShape],
    *,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
    modes: Sequence[str] = ("infer", "train"),
    config: dict | None = None,
    reps: int = 100,
    warmup: int = 3,
    max_seconds: float = 10.0,
    compile: bool = True,
    compile_mode: str = "max-autotune",
    contenders: Sequence[ModelContender] | None = None,
    only: Sequence[str] | None = None,
    extra_contenders: Sequence[ModelContender] = (),
    out_dir: str | Path | None = None,
    budget_s: float | None = None,
    compile_min_left_s: float = 90.0,
    network: Callable[[dict], nn.Module] | None = None,
    seed: int = 0,
    log: Callable[[str], None] = common.log,
) -> dict:
    """Run every (shape, mode, contender) and return the payload (also written to
    ``out_dir``/model.json and model.md after every contender). Pass 1 runs all but
    the compiled contenders, pass 2 the compiled ones, within ``budget_s``. ``network(cfg)``
    builds the network whose float32 weights all contenders load and which is the reference
    and the same-dtype baseline of the gate (default MONAI's AHNet, else
    ahnet_fast.reference.AHNet)."""
    from bench import report

    for m in modes:
        if m not in ("infer", "train"):
            raise ValueError(f"mode {m!r} not in infer, train")
    cfg = {"in_channels": 1, "out_channels": 1, **(config or CONFIGS["paper"])}
    net = network or _any_ahnet
    deadline = common.Deadline(budget_s)
    flags = common.set_flags(dtype)
    env = common.env_record(device)
    log(f"[model] device {env.get('gpu') or env['device']}, torch {env['torch']}, dtype {common.dtype_name(dtype)}, "
        f"config {cfg}, {reps} timed calls per contender")
    if device.type != "cuda":
        log(f"[model] {common.CPU_NOTE}")
    if importlib.util.find_spec("monai") is None:
        log(f"[model] MONAI is not installed: its rows are reported as unavailable and the network is "
            f"ahnet_fast.reference.AHNet; {MONAI_HINT}")
    all_contenders = list(contenders if contenders is not None else default_contenders(compile=compile))
    all_contenders += list(extra_contenders)
    if only:
        all_contenders = [c for c in all_contenders if any(o in c.name for o in only)]
    payload: dict[str, Any] = {
        "suite": "model", "env": env, "flags": flags, "model_config": cfg,
        **({"note": common.CPU_NOTE} if device.type != "cuda" else {}),
        "config": {"dtype": common.dtype_name(dtype), "modes": list(modes), "reps": reps, "warmup": warmup,
                   "max_seconds": max_seconds, "compile_mode": compile_mode if compile else None,
                   "budget_s": budget_s, "shapes": [s.name for s in shapes],
                   "loss": "MSE(out.float(), random target); Adam lr 1e-4 (fused on CUDA)"},
        "results": [],
    }
    out = Path(out_dir) if out_dir is not None else None

    def save() -> None:
        if out is not None:
            report.write_suite(out, payload)

    if not shapes:
        save()
        return payload
    try:
        master, source = _master(net, cfg, shapes[0], device, seed)
    except Exception as exc:
        payload["error"] = f"cannot build the master model: {short_error(exc)}"
        log(f"[model] {payload['error']}")
        save()
        return payload
    payload["weights"] = f"{source} init (seed {seed}), BN statistics calibrated at {shapes[0].name}"
    flops_cache: dict[tuple, float | None] = {}
    passes = [[c for c in all_contenders if c.family != "compile"], [c for c in all_contenders if c.family == "compile"]]
    for pass_no, todo_all in enumerate(passes, 1):
        for shape in shapes:
            for mode in modes:
                todo = [c for c in todo_all if mode in c.modes]
                if not todo:
                    continue
                base = {"shape": shape.name, "mode": mode, "dtype": common.dtype_name(dtype)}
                min_left = compile_min_left_s if pass_no == 2 else 5.0
                if deadline.expired(min_left):
                    payload["results"] += [{**base, "contender": c.name, "family": c.family, "layout": c.layout,
                                            "status": "skipped: time budget spent"} for c in todo]
                    save()
                    continue
                g = torch.Generator(device=device).manual_seed(seed + 1)
                x = torch.randn(shape.tuple, generator=g, device=device)
                target = torch.randn((shape.n, cfg["out_channels"], shape.h, shape.w, shape.d), generator=g,
                                     device=device)
                try:
                    refs, order = _reference(net, cfg, master, mode, x, target, dtype)
                except Exception as exc:
                    payload["results"] += [{**base, "contender": c.name, "family": c.family, "layout": c.layout,
                                            "status": f"failed: reference: {short_error(exc)}"} for c in todo]
                    common.free_memory(device)
                    save()
                    continue
                x = x.to(dtype)
                try:  # error of MONAI eager in the run's dtype: the yardstick of the gate
                    base_built = _eager(net, "contig")(ModelContext(cfg, master, device, dtype, mode))
                    base_outs = _check_outputs(base_built, mode, x, target, order)
                    base_errors = [common.rel_err(o, r) for o, r in zip(base_outs, refs)]
                    del base_built, base_outs
                except Exception as exc:  # e.g. no MONAI here: the gate uses the dtype floor alone
                    base_errors = None
                    log(f"[model] {shape.name} {mode}: no same-dtype MONAI baseline ({short_error(exc)})")
                common.free_memory(device)
                for c in todo:
                    which = "unet" if c.family == "other-net" else "net"
                    if (which, shape) not in flops_cache:
                        flops_cache[(which, shape)] = count_flops(monai_unet if which == "unet" else net, cfg, shape)
                    if deadline.expired(min_left):
                        rec = {"contender": c.name, "family": c.family, "layout": c.layout,
                               "status": "skipped: time budget spent"}
                    else:
                        rec = run_model_contender(c, ModelContext(cfg, master, device, dtype, mode, compile_mode),
                                                  x, target.to(torch.float32), refs, order, base_errors, reps=reps,
                                                  warmup=warmup, max_seconds=max_seconds,
                                                  flops=flops_cache[(which, shape)])
                    rec["flops_forward"] = flops_cache[(which, shape)]
                    payload["results"].append({**base, **rec})
                    ms = f"{rec['ms']:.3f} ms" if rec.get("status") == "ok" else ""
                    if rec.get("status") == "ok" and rec.get("launches") is not None:
                        ms += f", {rec['launches']} launches"
                    log(f"[model] {shape.name} {mode:5s} {c.name:30s} {rec['status']} {ms}".rstrip())
                    if c.family == "compile":
                        with contextlib.suppress(Exception):
                            torch.compiler.reset()
                    common.free_memory(device)
                    save()
                del refs, x, target
                common.free_memory(device)
    save()
    return payload


# ----------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser, *, shapes_flag: str = "--shapes") -> None:
    parser.add_argument(shapes_flag, dest="model_shapes", default=None,
                        help="comma-separated NxCxHxWxD (default: " + ", ".join(DEFAULT_SHAPES) + ")")
    parser.add_argument("--model-modes", dest="model_modes", default=None,
                        help="infer,train (default both; a quick CPU run: infer)")
    parser.add_argument("--model-config", default="paper", choices=sorted(CONFIGS),
                        help="paper: psp 4, trilinear (27.1M params); transpose-psp3: psp 3, transposed convs")
    parser.add_argument("--layers", default=None, help="override layers, e.g. 1,1,1,1 (small smoke runs)")
    parser.add_argument("--psp", type=int, default=None, help="override psp_block_num (0..4)")
    parser.add_argument("--model-contenders", default=None,
                        help="keep only model contenders whose name contains one of these (comma-separated)")


def run_from_args(args: argparse.Namespace) -> dict:
    opts = common.run_options(args)
    cpu = opts.device.type != "cuda"
    shapes_spec = args.model_shapes
    if shapes_spec is None and cpu:
        shapes_spec = CPU_SHAPES
        common.log(f"[model] CPU run: shape {', '.join(CPU_SHAPES)} by default (--shapes names others)")
    shapes = parse_shapes(shapes_spec, quick=args.quick)
    modes_spec = args.model_modes or ("infer" if cpu and args.quick else "infer,train")
    modes = [m.strip() for m in modes_spec.split(",") if m.strip()]
    if not modes or any(m not in ("infer", "train") for m in modes):
        raise ValueError(f"--modes {args.model_modes!r}: expected infer, train or infer,train")
    cfg = dict(CONFIGS[args.model_config])
    if args.layers:
        try:
            cfg["layers"] = tuple(int(v) for v in args.layers.split(","))
        except ValueError:
            raise ValueError(f"--layers {args.layers!r} is not 4 comma-separated integers") from None
        if len(cfg["layers"]) != 4 or min(cfg["layers"]) < 1:
            raise ValueError(f"--layers needs 4 positive integers, got {args.layers!r}")
    if args.psp is not None:
        if not 0 <= args.psp <= 4:
            raise ValueError(f"--psp must be in 0..4, got {args.psp}")
        cfg["psp_block_num"] = args.psp
    only = [s.strip() for s in args.model_contenders.split(",")] if args.model_contenders else None
    payload = run_model(shapes, device=opts.device, dtype=opts.dtype, modes=modes, config=cfg, reps=opts.reps,
                        compile=opts.compile, compile_mode=args.compile_mode, only=only, out_dir=opts.out,
                        budget_s=opts.budget_s, max_seconds=opts.max_seconds, warmup=1 if cpu else 3)
    common.log(f"[model] results in {opts.out}")
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    return common.suite_main(argv, prog="python -m bench.model", description=__doc__.split("\n")[0],
                             add_arguments=add_arguments, run_from_args=run_from_args)


if __name__ == "__main__":
    sys.exit(main())
