"""Multi-process training and inference on torch.distributed (torchrun, DDP, gloo/NCCL).

Launch: ``torchrun --nproc_per_node=N -m ahnet_fast.cli train ...`` (one process per GPU, or
N CPU processes with gloo), or ``ahnet-fast train --nproc N ...``, which starts the same
workers through torch's elastic launcher (what torchrun runs, single node, standalone
rendezvous). Each worker calls :func:`setup` (reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* from
the environment torchrun sets, picks NCCL for CUDA and gloo otherwise, binds
``cuda:LOCAL_RANK``, and gives every collective ``timeout``) and :func:`teardown` at the end.

What the trainer does with it (:class:`ahnet_fast.train.trainer.Trainer`):

* DistributedDataParallel over the model; ``batch_size`` is per process, so the effective
  batch is ``world_size * batch_size * grad_accum`` (logged with the learning rate, which is
  used as given: no automatic scaling);
* the sample stream is split like DistributedSampler but over the library's step-indexed
  stream: global micro-batch ``s`` holds samples ``s*W*B .. (s+1)*W*B - 1`` and rank ``r``
  draws ``s*W*B + r*B .. + B - 1`` (:class:`RankStepBatchSampler`), so N processes with batch
  B see exactly the samples one process with batch N*B sees;
* gradient accumulation skips DDP's all-reduce on all but the last micro-step (``no_sync``);
* rank 0 alone logs, shows progress and writes checkpoints; every rank resumes from the same
  ``last.pt``; validation cases are split over the ranks and their counts summed;
* a failing rank ends the job: torchrun stops the others, and any collective waiting on a
  dead peer fails after ``timeout`` at the latest (:func:`describe_failure` words the error).
"""
from __future__ import annotations

import datetime
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "DistributedJobError",
    "RankStepBatchSampler",
    "agree",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "describe_failure",
    "is_main",
    "launch",
    "make_rank_loader",
    "preload_group_pinning_modules",
    "rank",
    "setup",
    "teardown",
    "world_size",
]

DEFAULT_TIMEOUT_S = 1800.0  # collectives; long enough for a rank-0 checkpoint write on a slow disk


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node, the
    ``device`` it trains on, the process-group ``backend`` ("nccl"/"gloo"), and whether
    :func:`setup` created the group (then :func:`teardown` destroys it)."""

    rank: int
    world_size: int
    local_rank: int
    device: str
    backend: str
    owned: bool


def active() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"environment variable {name}={v!r} is not an integer") from None


def preload_group_pinning_modules() -> None:
    """Import, before any process group exists, the torch modules that would otherwise pin the
    default group for the life of the process. Call it before ``dist.init_process_group`` when
    creating a group yourself (:func:`setup` does).

    Why: ``torch.distributed.nn.functional`` (nine functions) and
    ``torch.distributed.fsdp.sharded_grad_scaler`` take ``group.WORLD`` as a default argument,
    evaluated at import. Imported after ``init_process_group`` they hold the default group, so
    ``destroy_process_group`` no longer frees it and gloo's worker threads keep running into
    interpreter shutdown. They are imported late in practice: the first call of a
    ``torch.library`` custom op (every fused op here) imports ``torch._dynamo``, which imports
    them. A gloo thread that frees a finished collective's tensors during shutdown needs the GIL,
    is ended by the finalizing interpreter, and libstdc++ aborts the process ("terminate called
    without an active exception", SIGABRT) after the work is done: a launcher then reports the
    rank as failed. Seen with torch 2.13 on 2-process CPU runs about once in 20 to 100; the core
    showed ``ProcessGroupGloo::runLoop`` -> ``~AsyncBarrierWork`` -> ``~AsyncAllreduceWork`` ->
    ``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit`` inside ``Py_FinalizeEx``. Imported
    first, they capture no group, and ``destroy_process_group`` joins gloo's threads while the
    interpreter is alive.
    """
    import importlib

    for name in ("torch._dynamo", "torch.distributed.nn.functional", "torch.distributed.fsdp.sharded_grad_scaler"):
        try:
            importlib.import_module(name)
        except ImportError:  # a torch without the module cannot pin the group through it
            pass


def setup(device: Optional[str] = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Optional[DistContext]:
    """Join the process group torchrun describes in the environment; None for a single process.

    Args:
        device: "cpu", "cuda" (-> ``cuda:LOCAL_RANK``) or None (cuda if available). An explicit
            "cuda:K" is refused with several processes (each process takes its local rank's GPU).
        timeout_s: timeout of every collective (``init_process_group(timeout=...)``): a rank
            waiting on a failed peer raises after this many seconds instead of hanging.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return None
    if timeout_s <= 0:
        raise ValueError(f"the collective timeout must be > 0 seconds, got {timeout_s}")
    local = _env_int("LOCAL_RANK", 0)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda"):
        if ":" in dev:
            raise ValueError(f"--device {dev}: with several processes each one uses cuda:LOCAL_RANK; pass 'cuda'")
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible): start at most "
                             "one process per GPU (--nproc_per_node)")
        torch.cuda.set_device(local)
        dev, backend = f"cuda:{local}", "nccl"
    else:
        backend = "gloo"
    owned = False
    if not dist.is_initialized():
        preload_group_pinning_modules()
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout_s)))
        owned = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local, dev, backend, owned)


def teardown(ctx: Optional[DistContext]) -> None:
    """Destroy the process group :func:`setup` created (no-op otherwise)."""
    if ctx is not None and ctx.owned and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all ranks (in place and returned); identity for one process."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (picklable objects); identity for one process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def describe_failure(exc: BaseException) -> str:
    """A one-line error for a rank, saying which rank failed and what a collective error means."""
    r, w = rank(), world_size()
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    text = f"[rank {r}/{w}] {msg}"
    dist_errors = tuple(getattr(dist, n) for n in ("DistError", "DistBackendError") if hasattr(dist, n))
    if (dist_errors and isinstance(exc, dist_errors)) or "gloo" in msg.lower() or "nccl" in msg.lower() \
            or "timed out" in msg.lower() or "connection closed" in msg.lower():
        text += " (a collective failed: another rank probably failed first - see its error - or timed out)"
    return text


class DistributedJobError(RuntimeError):
    """Another rank failed; the message says which one and why."""


def agree(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on every rank and fail on every rank if it failed on any (one collective).

    Use it for the checks before training (dataset, files, headers): a rank that cannot see a
    file then stops the whole job at once with that rank's error, instead of leaving the
    others to wait in the first collective. The failing rank re-raises its own exception; the
    others raise :class:`DistributedJobError` naming it. One process: just ``fn()``.
    """
    err: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as exc:
        err = exc
    if active():
        msgs: list = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
        if err is None:
            bad = [(r, m) for r, m in enumerate(msgs) if m is not None]
            if bad:
                w = dist.get_world_size()
                raise DistributedJobError("; ".join(f"rank {r}/{w} failed: {m}" for r, m in bad))
    if err is not None:
        raise err
    return result


# ------------------------------------------------------------------------- data split
class RankStepBatchSampler(Sampler):
    """This rank's share of the step-indexed sample stream (see module docstring).

    Yields, for micro-steps ``start_step .. start_step + num_steps - 1``, the indices
    ``s*W*B + r*B + i`` (i < B); with W = 1 it equals :class:`ahnet_fast.data.loader.StepBatchSampler`.
    """

    def __init__(self, batch_size: int, num_steps: int, start_step: int = 0, rank_: int = 0, world: int = 1) -> None:
        if batch_size < 1 or num_steps < 0 or start_step < 0 or world < 1 or not 0 <= rank_ < world:
            raise ValueError(f"need batch_size >= 1, num_steps >= 0, start_step >= 0, 0 <= rank < world; got "
                             f"{batch_size}, {num_steps}, {start_step}, rank {rank_}, world {world}")
        self.batch_size, self.num_steps, self.start_step = batch_size, num_steps, start_step
        self.rank, self.world = rank_, world

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[list[int]]:
        b, w = self.batch_size, self.world
        for s in range(self.start_step, self.start_step + self.num_steps):
            first = s * w * b + self.rank * b
            yield list(range(first, first + b))


def make_rank_loader(dataset, batch_size: int, num_steps: int, start_step: int = 0, num_workers: int = 0,
                     pin_memory: bool = False, rank_: Optional[int] = None,
                     world: Optional[int] = None) -> DataLoader:
    """:func:`ahnet_fast.data.loader.make_loader` over this rank's share of the stream."""
    from ahnet_fast.data.loader import worker_init_fn

    gen = torch.Generator()
    gen.manual_seed(dataset.seed)
    sampler = RankStepBatchSampler(batch_size, num_steps, start_step, rank() if rank_ is None else rank_,
                                   world_size() if world is None else world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      worker_init_fn=worker_init_fn if num_workers > 0 else None, generator=gen,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if num_workers > 0 else None)


# ------------------------------------------------------------------------- launching
def launch(nproc: int, entrypoint: Callable[..., Any], args: Sequence[Any] = ()) -> dict[int, Any]:
    """Run ``entrypoint(*args)`` in ``nproc`` local worker processes, as torchrun --standalone does.

    Uses torch's elastic launcher (the machinery behind torchrun): workers get RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT; when one fails the others are stopped and a
    ``ChildFailedError`` names the failed rank. ``entrypoint`` must be a picklable module-level
    function. Returns {rank: return value}.
    """
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=int(nproc), run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5,
                       start_method="spawn")
    sys.stdout.flush()
    return elastic_launch(cfg, entrypoint)(*args)
