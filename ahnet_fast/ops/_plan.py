"""Values derived from parameters and buffers, built once and rebuilt only when a source changes.

A conv layer's packed weights and an eval-mode BatchNorm folded into per-channel (scale, shift)
depend on nothing but the layer's own tensors, yet building them costs several small device
launches. At batch 1 on a GPU those launches cost more than the conv itself, so the fused
pipeline asks this cache instead of rebuilding them on every call.

A cached value is valid while every source tensor is the same Python object and still views
the same live storage (both held by weak reference, so the cache never keeps a model or a freed
weight alive), with the same offset, dtype, shape, strides and in-place version counter
(``_version``). That covers the ways a parameter or buffer changes: optimizer steps,
``load_state_dict`` and the running-statistics update write in place (version bump), ``module.to()``
and ``param.data = new`` swap the storage, and a new tensor is a new object. The storage is
compared by identity, not by address: after ``model.double().float()`` the allocator may well hand
the new float storage the old one's address (it did on some CI machines), so an address check
would serve a stale plan.

One change no version counter sees: an in-place write through ``param.data`` (``p.data.mul_(2)``)
goes to a detached alias with its own counter, invisible to this cache as it is to autograd's
checks. Write under ``torch.no_grad()`` to the parameter itself, or call :func:`clear` after such a
write. Under ``torch.compile`` nothing is cached (dynamo cannot trace the lookup, and inductor
hoists such constants itself).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["cached", "clear", "stats"]

Tensor = torch.Tensor

# Enough for several models of ~120 layers with a few derived values each; the oldest entries
# go first (they belong to models or casts that no longer run).
_MAX_ENTRIES = 4096
_cache: "OrderedDict[tuple, tuple[tuple, Any]]" = OrderedDict()
_counts = {"hits": 0, "builds": 0}


def _state(t: Tensor) -> tuple:
    """What, besides object and storage identity, a derived value depends on."""
    return (t.storage_offset(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))


def _signature(t: Optional[Tensor]) -> tuple:
    if t is None:
        return (None,)
    return (weakref.ref(t), StorageWeakRef(t.untyped_storage()), _state(t))


def _valid(saved: tuple, t: Optional[Tensor]) -> bool:
    if t is None:
        return saved == (None,)
    ref, storage, state = saved
    return (ref() is t and not storage.expired() and storage.cdata == t.untyped_storage()._cdata
            and state == _state(t))


def cached(tag: str, sources: Sequence[Optional[Tensor]], build: Callable[[], Any],
           extra: Hashable = ()) -> Any:
    """``build()``, memoised on (``tag``, the identity and state of ``sources``, ``extra``).

    ``sources`` are the tensors the value is computed from (None allowed); ``extra`` holds the
    non-tensor inputs (eps, a dtype...). ``build`` must depend on nothing else.
    """
    if torch.compiler.is_compiling():
        return build()
    key = (tag, tuple(id(t) if t is not None else None for t in sources), extra)
    hit = _cache.get(key)
    if hit is not None and all(_valid(s, t) for s, t in zip(hit[0], sources)):
        _cache.move_to_end(key)
        _counts["hits"] += 1
        return hit[1]
    try:
        signature = tuple(_signature(t) for t in sources)
    except (RuntimeError, NotImplementedError):
        return build()  # a tensor without a plain storage (a wrapper subclass): nothing to key on
    value = build()
    _cache[key] = (signature, value)
    _cache.move_to_end(key)
    while len(_cache) > _MAX_ENTRIES:
        _cache.popitem(last=False)
    _counts["builds"] += 1
    return value


def clear() -> None:
    """Drop every cached value (tests; or to release memory held by values of dead models)."""
    _cache.clear()


def stats() -> dict[str, int]:
    """{"hits", "builds", "entries"}: how often the cache answered and how often it built."""
    return {**_counts, "entries": len(_cache)}
