"""DDP training on 2 CPU processes (gloo) == one process on the combined batch; resume; failures.

The model is small (a fused conv->BN->ReLU block as ``layer1.0``, a fused BN->ReLU->conv as
``dense0`` - both checkpointed by the trainer's activation checkpointing -, a plain BatchNorm
called directly, and a 1x1x1 head) so that a few steps on CPU stay cheap; the data are a real
volume (a crop of nilearn's MNI152 T1 with its tissue labels). 2 processes x batch 2 x
accumulation 2 with synchronized BatchNorm must give the weights, BN statistics and optimizer
step of 1 process x batch 4 x accumulation 2. The network and the loss run in float64: Adam
divides by the gradient's magnitude, so a float32 run amplifies rounding noise in near-zero
gradients (seen: 1e-3 relative in one BN weight's gradient sum) into weight differences of
about 1% of a step, which would hide real errors.
"""
from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _spawn import spawn_ranks

WORLD = 2
K = 4  # background, CSF/other, GM, WM
PATCH = (24, 24, 8)


class TinyNet(nn.Module):
    """(B, 1, H, W, D) float32 -> (B, K, H, W, D) float64 logits (the net runs in float64)."""

    def __init__(self) -> None:
        super().__init__()
        from ahnet_fast.nn import BNActConv3d, ConvBNAct3d

        self.layer1 = nn.Sequential(ConvBNAct3d(1, 8, (3, 3, 1), padding=(1, 1, 0)))
        self.dense0 = BNActConv3d(8, 8, (1, 1, 3), padding=(0, 0, 1))
        self.norm = nn.BatchNorm3d(8)
        self.head = nn.Conv3d(8, K, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.head.weight.dtype)
        return self.head(torch.relu(self.norm(self.dense0(self.layer1(x)))))


def _case():
    import nibabel as nib

    from ahnet_fast.data import Case
    from ahnet_fast.data.mni import make_labels, template_paths

    paths = template_paths()
    sl = np.s_[40:152:3, 50:178:3, 60:124:4]
    t1, gm, wm = (np.asarray(nib.load(str(paths[k])).dataobj[sl], dtype=np.float32) for k in ("t1", "gm", "wm"))
    lab = make_labels(t1, gm, wm).astype(np.uint8)
    img = (t1 - t1.mean()) / t1.std()
    return Case(img, lab, (3.0, 3.0, 4.0), "mni", "t1.nii.gz", "lab.nii.gz")


def _trainer(out, batch: int, steps: int):
    from ahnet_fast.data import AugmentConfig, IntensityConfig, PatchDataset
    from ahnet_fast.train.trainer import TrainConfig, Trainer

    class Trainer64(Trainer):
        def _loss(self, logits, target):  # the trainer's cross-entropy, kept in float64
            return nn.functional.cross_entropy(logits, target)

    torch.manual_seed(7)
    model = TinyNet().double()
    ds = PatchDataset([], K, IntensityConfig("none"), PATCH, fg_ratio=0.7, augment=AugmentConfig(), seed=11,
                      cases=[_case()])
    cfg = TrainConfig(steps=steps, steps_per_epoch=2, batch_size=batch, grad_accum=2, lr=1e-2, device="cpu",
                      seed=3, checkpointing=True, sync_bn=True, loss="ce")
    return Trainer64(model, {"kind": "tiny"}, ds, cfg, out, K, stage="t", progress=False, log=lambda m: None)


def _train_worker(rank: int, store: str, out: str) -> None:
    from ahnet_fast.train.distributed import preload_group_pinning_modules

    torch.set_num_threads(1)
    preload_group_pinning_modules()  # as distributed.setup does (else gloo can abort at exit)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        tr = _trainer(out, batch=2, steps=3)
        assert isinstance(tr.net, nn.parallel.DistributedDataParallel)
        from ahnet_fast.nn import is_sync_batchnorm

        assert sum(is_sync_batchnorm(m) for m in tr.model.modules()) == 3
        tr.fit(stop_at_step=2)  # "killed" after step 2 (epoch end: checkpoint written)
        if rank == 0:
            os.replace(os.path.join(out, "last.pt"), os.path.join(out, "step2.pt"))
            import shutil

            shutil.copyfile(os.path.join(out, "step2.pt"), os.path.join(out, "last.pt"))
        dist.barrier()
        # every rank resumes from the same checkpoint and finishes
        tr2 = _trainer(out, batch=2, steps=3)
        res = tr2.fit(resume=True)
        assert res["steps"] == 3 and res["finished"]
        dist.barrier()  # both ranks done before either tears down (gloo aborted a rank otherwise)
    finally:
        dist.destroy_process_group()


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert list(got) == list(want), what
    for k, v in want.items():
        if not torch.is_floating_point(v):
            assert torch.equal(got[k], v), f"{what}: {k}"
            continue
        err = (got[k].double() - v.double()).abs().max().item()
        assert err <= 1e-9 * max(1.0, v.abs().max().item()), f"{what}: {k} differs by {err:.3e}"


@pytest.mark.timeout(240)
def test_ddp_two_processes_equal_one_process_and_resume(tmp_path):
    import json

    from ahnet_fast.train.checkpoint import load_checkpoint

    attempt = spawn_ranks(_train_worker, WORLD,
                          lambda a: (str(tmp_path / f"store{a}"), str(tmp_path / f"ddp{a}")))
    ddp_out = tmp_path / f"ddp{attempt}"

    single = _trainer(tmp_path / "one", batch=4, steps=3)
    single.fit(stop_at_step=2)
    one2 = load_checkpoint(tmp_path / "one" / "last.pt")
    single = _trainer(tmp_path / "one", batch=4, steps=3)
    single.fit(resume=True)
    one3 = load_checkpoint(tmp_path / "one" / "last.pt")

    ddp2 = load_checkpoint(ddp_out / "step2.pt")
    ddp3 = load_checkpoint(ddp_out / "last.pt")
    assert ddp2["step"] == 2 and ddp3["step"] == 3 and ddp3["finished"]
    _assert_same_state(ddp2["model"], one2["model"], "after 2 steps")
    _assert_same_state(ddp3["model"], one3["model"], "after resuming to step 3")
    # the optimizer moments of the checkpoint resumed from too (step 3 would differ otherwise); a finished
    # stage's last.pt keeps weights only
    for pid, st in one2["optimizer"]["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = ddp2["optimizer"]["state"][pid][key], st[key]
            assert (a - b).abs().max().item() <= 1e-9 * b.abs().max().item(), (pid, key)
    assert "optimizer" not in ddp3 and "optimizer" not in one3
    # rank 0 alone logged; the effective batch is reported
    events = [json.loads(line) for line in (ddp_out / "log.jsonl").read_text().splitlines()]
    dist_ev = [e for e in events if e.get("event") == "distributed"]
    assert dist_ev and dist_ev[0]["effective_batch"] == 8 and dist_ev[0]["world_size"] == 2
    assert len([e for e in events if e.get("event") == "epoch"]) == 2  # epochs end at steps 2 and 3
    assert sorted(p.name for p in ddp_out.iterdir()) == ["best.pt", "last.pt", "log.jsonl", "step2.pt"]


def test_rank_sampler_splits_the_single_process_stream():
    from ahnet_fast.data.loader import StepBatchSampler
    from ahnet_fast.train.distributed import RankStepBatchSampler

    one = list(StepBatchSampler(4, 3, start_step=2))
    ranks = [list(RankStepBatchSampler(2, 3, start_step=2, rank_=r, world=2)) for r in range(2)]
    for s in range(3):
        assert ranks[0][s] + ranks[1][s] == one[s]
    assert list(RankStepBatchSampler(4, 3, start_step=2)) == one
    with pytest.raises(ValueError, match="rank"):
        RankStepBatchSampler(2, 3, rank_=2, world=2)


# ----------------------------------------------------------------------------- failures
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli_rank(rank: int, port: int, argv: list, err_path: str) -> None:
    """One torchrun-style worker: environment as torchrun sets it, then the real CLI."""
    import sys

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    sys.stderr = open(err_path, "w", buffering=1)
    from ahnet_fast.cli import main

    code = main(argv[rank])
    sys.stderr.flush()
    os._exit(code)


@pytest.mark.timeout(180)
def test_rank_missing_file_ends_the_job_with_a_clear_error(tmp_path):
    """Rank 1 sees a dataset whose image file is missing: both ranks exit non-zero, quickly, and
    rank 0 says which rank failed and why (no hang until the collective timeout)."""
    import json

    from ahnet_fast.data.mni import build_mni_dataset

    good = str(build_mni_dataset(tmp_path / "mni", inplane_step=4))
    spec = json.loads(open(good).read())
    base = os.path.dirname(good)
    spec["training"] = [{k: (v if os.path.isabs(v) else os.path.join(base, v)) for k, v in it.items()}
                        for it in spec["training"]]
    spec["training"][0]["image"] = str(tmp_path / "mni" / "missing_on_rank1.nii.gz")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    common = ["--out", str(tmp_path / "run"), "--stages", "2d", "--steps-2d", "1", "--device", "cpu", "--no-progress",
              "--dist-timeout", "30", "--workers", "0"]
    argv = [["train", good, *common], ["train", str(bad), *common]]
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    errs = [str(tmp_path / f"err{r}.txt") for r in range(WORLD)]
    procs = [ctx.Process(target=_cli_rank, args=(r, port, argv, errs[r])) for r in range(WORLD)]
    t0 = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not any(alive), "a rank hung"
    assert time.time() - t0 < 100
    codes = [p.exitcode for p in procs]
    text = [open(e).read() for e in errs]
    assert all(c not in (0, None) for c in codes), (codes, text)
    assert "missing_on_rank1" in text[1], text[1]
    assert "rank 1" in text[0] and "missing_on_rank1" in text[0], text[0]


def _timeout_worker(rank: int, store: str, q) -> None:
    from ahnet_fast.train.distributed import preload_group_pinning_modules

    torch.set_num_threads(1)
    preload_group_pinning_modules()
    # start-up with a generous timeout: on a loaded machine spawning and importing a rank can
    # take longer than the 2 s under test (gloo then aborts the process during rendezvous)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    dist.barrier()
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))  # the collective timeout under test
    from ahnet_fast.train.distributed import describe_failure

    if rank == 1:
        time.sleep(9)  # a rank stuck elsewhere (never joins the collective in time)
        q.put((1, "slept"))
        return
    t0 = time.time()
    try:
        dist.all_reduce(torch.ones(3), group=group)
        q.put((0, "no error"))
    except Exception as exc:  # the collective's timeout fires
        q.put((0, f"{time.time() - t0:.1f}|{describe_failure(exc)}"))


@pytest.mark.timeout(120)
def test_collective_timeout_ends_a_waiting_rank(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    mp.spawn(_timeout_worker, args=(str(tmp_path / "store"), q), nprocs=WORLD, join=True)
    got = dict(q.get() for _ in range(WORLD))
    secs, msg = got[0].split("|", 1)
    assert float(secs) < 7.0, got  # the 2 s timeout (with slack for a loaded machine), not the 9 s sleep
    assert msg.startswith("[rank 0/2]") and "collective failed" in msg, msg
