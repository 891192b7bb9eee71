"""``auto`` on a GPU: the backend that measured fastest for this op and shape class, remembered.

Which implementation wins depends on the op, its flags and the tensor sizes: the fused Triton
kernels remove passes over memory, but at small sizes (the deep decoder layers, batch 1) cuDNN
plus a few elementwise launches can be as fast. So on the first call of an op with a new
*key* (op, flags, dtype, layout, channel counts, kernel, and the batch and spatial sizes
rounded up to powers of two) ``auto`` times every backend that can serve the call (one
warm-up and ``_REPS`` timed runs each, CUDA events) and keeps the fastest. Choices are saved
under ``$AHNET_FAST_CACHE_DIR`` (default ``~/.cache/ahnet_fast``) in ``backend_choice.json``,
keyed by the GPU's name, compute capability and the torch/triton/ahnet_fast versions, so a
later process on the same machine measures nothing, and another GPU or version measures anew.

Until a key is measured, and wherever measuring is off, ``auto`` keeps its fixed order
(``_backend._auto_order``: Triton first for the convs). Nothing is measured while a CUDA
graph is being captured, under ``torch.compile``, in deterministic mode (timing runs would be
extra launches there) or with ``AHNET_FAST_AUTOSELECT=0``. The timed runs have no side effects:
the forward ops are functional (running statistics come back as outputs), and an op writing
into ``out=`` writes the same values again.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ahnet_fast._atomic import atomic_write_text

__all__ = ["cache_path", "choose", "clear", "decide", "enabled", "key_for"]

ENV_SWITCH = "AHNET_FAST_AUTOSELECT"
ENV_DIR = "AHNET_FAST_CACHE_DIR"
_REPS = 3

_lock = threading.Lock()
_choices: Optional[dict[str, dict]] = None  # machine key -> {call key -> record}
# exact call signature -> backend name: the per-call lookup (a dict hit, no string building, no
# file, no device query) once a signature's shape class is decided
_decided: dict[tuple, str] = {}
_machine_keys: dict[int, str] = {}


def cache_path() -> Path:
    """Where measured choices are kept (``$AHNET_FAST_CACHE_DIR/backend_choice.json``)."""
    base = os.environ.get(ENV_DIR) or os.path.join(os.path.expanduser("~"), ".cache", "ahnet_fast")
    return Path(base) / "backend_choice.json"


def enabled() -> bool:
    """Whether auto may time backends now (see the module docstring)."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if torch.compiler.is_compiling() or torch.are_deterministic_algorithms_enabled():
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except Exception:  # no CUDA runtime at all
        return False


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def key_for(op: str, variant: object, tensors: Sequence[Optional[torch.Tensor]]) -> str:
    """The shape class of a call: op and flags, dtype and layout of the input, exact channel
    counts and weight shape (they pick the kernel variant), and the batch and spatial sizes of
    the input rounded up to powers of two (so every input size does not measure again)."""
    x = tensors[0]
    assert x is not None
    layout = "cl" if (x.dim() == 5 and x.stride(1) == 1 and x.size(1) > 1) else "c"
    sizes = [_pow2(s) for i, s in enumerate(x.shape) if i != 1]
    others = [tuple(t.shape) for t in tensors[1:] if t is not None and t.dim() == 5]
    return f"{op}|{variant}|{str(x.dtype).replace('torch.', '')}|{layout}|C{x.shape[1]}|{sizes}|{others}"


def _machine_key(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _machine_keys:
        _machine_keys[index] = _describe_machine(index)
    return _machine_keys[index]


def _describe_machine(device: int) -> str:
    import ahnet_fast

    try:
        import triton
        tv = triton.__version__
    except Exception:
        tv = "none"
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    return f"{name}|sm_{major}{minor}|torch {torch.__version__}|triton {tv}|ahnet_fast {ahnet_fast.__version__}"


def _load() -> dict[str, dict]:
    global _choices
    if _choices is None:
        try:
            data = json.loads(cache_path().read_text())
            _choices = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            _choices = {}
    return _choices


def _save() -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(_choices, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home: the choices stay in memory for this process


def clear(disk: bool = False) -> None:
    """Drop the choices held in memory (the next call reads the file again, as a new process
    would); ``disk=True`` also deletes the file, so everything is measured anew."""
    global _choices
    with _lock:
        _choices = None
        _decided.clear()
        if disk:
            try:
                cache_path().unlink()
            except OSError:
                pass


def _time_ms(run: Callable[[], object], device: torch.device) -> float:
    run()  # warm-up: compiles, allocator
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(_REPS):
        run()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / _REPS


def choose(key: str, device: torch.device, candidates: Sequence[str], run: Callable[[str], object],
           timer: Optional[Callable[[Callable[[], object], torch.device], float]] = None) -> str:
    """The measured-fastest of ``candidates`` (backend names that can all serve the call) for
    ``key`` on ``device``: from the cache, or timed now with ``run(name)`` and remembered."""
    with _lock:
        mkey = _machine_key(device)
        rec = _load().get(mkey, {}).get(key)
        if rec is not None and rec.get("choice") in candidates:
            return rec["choice"]
        timer = timer or _time_ms
        times = {name: float(timer(lambda name=name: run(name), device)) for name in candidates}
        best = min(candidates, key=lambda n: times[n])
        _load().setdefault(mkey, {})[key] = {"choice": best, "ms": {n: round(t, 4) for n, t in times.items()}}
        _save()
        return best


def decide(op: str, variant: object, tensors: Sequence[Optional[torch.Tensor]], order: Sequence[str],
           servable: Callable[[str], bool], run: Callable[[str], object]) -> Optional[str]:
    """auto's backend for this call of a forward op on a GPU, or None (use the fixed order).

    The call's exact signature (op, flags, dtype, layout, shapes, device) is looked up in
    memory first, so a decided call costs a dict lookup and one ``servable`` check; otherwise,
    when timing is allowed and several of ``order`` can serve the call, its shape class is
    measured (or read from the file) by :func:`choose`."""
    x = tensors[0]
    assert x is not None
    sig = (op, variant, x.dtype, x.stride(1) == 1, x.device.index, tuple(x.shape),
           tuple(tuple(t.shape) for t in tensors[1:] if t is not None and t.dim() == 5))
    name = _decided.get(sig)
    if name is not None:
        return name if servable(name) else None
    if not enabled():
        return None
    usable = [c for c in order if servable(c)]
    if len(usable) < 2:
        return None
    name = choose(key_for(op, variant, tensors), x.device, usable, run)
    _decided[sig] = name
    return name
