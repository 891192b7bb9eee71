"""Synchronized fused BatchNorm across 2 processes (gloo, CPU) == one process on the whole batch.

Every rank builds the same global batch (fixed seed), keeps its own slice (rank 0: 2 samples,
rank 1: 1 sample, so the global statistics must weight the ranks by their counts), and runs the
synchronized op; the oracle is the plain torch composition (nn.Conv3d / nn.MaxPool3d /
nn.BatchNorm3d / ReLU) on the whole batch in float64, which is by definition what
nn.SyncBatchNorm computes (torch's own SyncBatchNorm refuses CPU tensors). Checked: outputs,
input gradients (the rank's slice), parameter gradients (summed over ranks, as DDP does),
running statistics, for float64 and float32 on the reference backend and a tiny shape on the
Triton interpreter. The asserts run inside the workers; mp.spawn re-raises their failures.
"""
from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from _spawn import spawn_ranks

WORLD = 2
SPLIT = (2, 1)  # samples per rank


def _init(rank: int, store_file: str) -> None:
    from ahnet_fast.train.distributed import preload_group_pinning_modules

    torch.set_num_threads(1)
    preload_group_pinning_modules()  # else the group outlives destroy_process_group (see there)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))


def _slice(t: torch.Tensor, rank: int) -> torch.Tensor:
    lo = sum(SPLIT[:rank])
    return t[lo:lo + SPLIT[rank]]


def _sum_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone().to(torch.float64)
    dist.all_reduce(t)
    return t


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float, floor: float = 1e-12) -> None:
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), floor)
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def _bn_pair(c: int, rank_dtype: torch.dtype, seed: int) -> tuple[nn.BatchNorm3d, nn.BatchNorm3d]:
    """(BN for the synchronized op in ``rank_dtype``, float64 oracle BN) with equal random state."""
    g = torch.Generator().manual_seed(seed)
    ref = nn.BatchNorm3d(c, momentum=0.3).double()
    with torch.no_grad():
        ref.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
        ref.weight[0] = -ref.weight[0]  # a negative scale (pool-before must stay a max of the raw value)
        ref.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64) * 0.3)
        ref.running_mean.copy_(torch.randn(c, generator=g, dtype=torch.float64))
        ref.running_var.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    bn = nn.BatchNorm3d(c, momentum=0.3).to(rank_dtype)
    bn.load_state_dict(ref.state_dict())
    return bn, ref


def _case_conv_bn_act(rank: int, dtype: torch.dtype, tol: float, zpool: str, residual: bool, cl: bool,
                      shape=(9, 5, 4, 4), seed: int = 0) -> None:
    from ahnet_fast.nn.functional import conv_bn_act_modules
    from ahnet_fast.nn.sync import convert_sync_batchnorm

    cin, h, w, d = shape
    cout = 6
    g = torch.Generator().manual_seed(seed)
    n = sum(SPLIT)
    x_full = torch.randn(n, cin, h, w, d, generator=g, dtype=torch.float64) + 0.5
    conv_ref = nn.Conv3d(cin, cout, (3, 3, 1), padding=(1, 1, 0), bias=True).double()
    with torch.no_grad():
        for p in conv_ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)
    bn, bn_ref = _bn_pair(cout, dtype, seed + 1)
    d_out = d // 2 if zpool != "none" else d
    res_full = torch.randn(n, cout, h, w, d_out, generator=g, dtype=torch.float64) if residual else None
    w_out = torch.randn(n, cout, h, w, d_out, generator=g, dtype=torch.float64)

    # oracle: one process, whole batch, float64
    xr = x_full.clone().requires_grad_(True)
    rr = res_full.clone().requires_grad_(True) if residual else None
    t = conv_ref(xr)
    if zpool == "before_bn":
        t = nn.functional.max_pool3d(t, (1, 1, 2))
    t = bn_ref(t)
    if zpool == "after_bn":
        t = nn.functional.max_pool3d(t, (1, 1, 2))
    if residual:
        t = t + rr
    out_ref = torch.relu(t)
    (out_ref * w_out).sum().backward()

    # this rank: its slice, synchronized BN
    conv = nn.Conv3d(cin, cout, (3, 3, 1), padding=(1, 1, 0), bias=True).to(dtype)
    conv.load_state_dict(conv_ref.state_dict())
    convert_sync_batchnorm(bn)
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    x = _slice(x_full, rank).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    res = _slice(res_full, rank).to(dtype).contiguous(memory_format=fmt).requires_grad_(True) if residual else None
    out = conv_bn_act_modules(x, conv, bn, zpool=zpool, residual=res, relu=True)
    (out.to(torch.float64) * _slice(w_out, rank)).sum().backward()

    tag = f"conv_bn_act[{dtype}, zpool={zpool}, residual={residual}, cl={cl}]"
    _check(f"{tag} out", out, _slice(out_ref, rank), tol)
    _check(f"{tag} grad x", x.grad, _slice(xr.grad, rank), tol)
    if residual:
        _check(f"{tag} grad residual", res.grad, _slice(rr.grad, rank), tol)
    _check(f"{tag} grad conv weight", _sum_ranks(conv.weight.grad), conv_ref.weight.grad, tol)
    # a conv bias before a training-mode BN has a zero gradient: compare on the weight's scale
    _check(f"{tag} grad conv bias", _sum_ranks(conv.bias.grad), conv_ref.bias.grad, tol,
           floor=conv_ref.weight.grad.abs().max().item())
    _check(f"{tag} grad bn weight", _sum_ranks(bn.weight.grad), bn_ref.weight.grad, tol)
    _check(f"{tag} grad bn bias", _sum_ranks(bn.bias.grad), bn_ref.bias.grad, tol)
    _check(f"{tag} running_mean", bn.running_mean, bn_ref.running_mean, tol)
    _check(f"{tag} running_var", bn.running_var, bn_ref.running_var, tol)
    assert int(bn.num_batches_tracked) == 1


def _case_bn_act_conv(rank: int, dtype: torch.dtype, tol: float, relu: bool, cl: bool, affine: bool = True,
                      shape=(5, 4, 5, 3), seed: int = 10) -> None:
    from ahnet_fast.nn.functional import bn_act_conv_modules
    from ahnet_fast.nn.sync import convert_sync_batchnorm

    cin, h, w, d = shape
    cout = 4
    g = torch.Generator().manual_seed(seed)
    n = sum(SPLIT)
    x_full = torch.randn(n, cin, h, w, d, generator=g, dtype=torch.float64) * 2 + 1
    conv_ref = nn.Conv3d(cin, cout, (1, 1, 3), padding=(0, 0, 1), bias=False).double()
    with torch.no_grad():
        conv_ref.weight.copy_(torch.randn(conv_ref.weight.shape, generator=g, dtype=torch.float64) * 0.3)
    bn, bn_ref = _bn_pair(cin, dtype, seed + 1)
    if not affine:
        bn_ref = nn.BatchNorm3d(cin, momentum=0.3, affine=False).double()
        bn = nn.BatchNorm3d(cin, momentum=0.3, affine=False).to(dtype)
    w_out = torch.randn(n, cout, h, w, d, generator=g, dtype=torch.float64)

    xr = x_full.clone().requires_grad_(True)
    z = bn_ref(xr)
    if relu:
        z = torch.relu(z)
    out_ref = conv_ref(z)
    (out_ref * w_out).sum().backward()

    conv = nn.Conv3d(cin, cout, (1, 1, 3), padding=(0, 0, 1), bias=False).to(dtype)
    conv.load_state_dict(conv_ref.state_dict())
    convert_sync_batchnorm(bn)
    fmt = torch.channels_last_3d if cl else torch.contiguous_format
    x = _slice(x_full, rank).to(dtype).contiguous(memory_format=fmt).requires_grad_(True)
    out = bn_act_conv_modules(x, bn, conv, relu=relu)
    (out.to(torch.float64) * _slice(w_out, rank)).sum().backward()

    tag = f"bn_act_conv[{dtype}, relu={relu}, cl={cl}, affine={affine}]"
    _check(f"{tag} out", out, _slice(out_ref, rank), tol)
    _check(f"{tag} grad x", x.grad, _slice(xr.grad, rank), tol)
    _check(f"{tag} grad conv weight", _sum_ranks(conv.weight.grad), conv_ref.weight.grad, tol)
    if affine:
        _check(f"{tag} grad bn weight", _sum_ranks(bn.weight.grad), bn_ref.weight.grad, tol)
        _check(f"{tag} grad bn bias", _sum_ranks(bn.bias.grad), bn_ref.bias.grad, tol)
    _check(f"{tag} running_mean", bn.running_mean, bn_ref.running_mean, tol)
    _check(f"{tag} running_var", bn.running_var, bn_ref.running_var, tol)


def _case_module(rank: int, dtype: torch.dtype, tol: float) -> None:
    """A synchronized BN module called directly (2D and 3D), and no-grad dense-block writes."""
    from ahnet_fast.nn.sync import SyncBatchNorm2d, convert_sync_batchnorm

    g = torch.Generator().manual_seed(20)
    n = sum(SPLIT)
    for dims in (4, 5):
        shape = (n, 3, 5, 4) + ((3,) if dims == 5 else ())
        x_full = torch.randn(shape, generator=g, dtype=torch.float64) * 3 - 1
        ref = (nn.BatchNorm3d if dims == 5 else nn.BatchNorm2d)(3).double()
        xr = x_full.clone().requires_grad_(True)
        wout = torch.randn(shape, generator=g, dtype=torch.float64)
        (ref(xr) * wout).sum().backward()
        bn = convert_sync_batchnorm((nn.BatchNorm3d if dims == 5 else nn.BatchNorm2d)(3).to(dtype))
        assert dims == 5 or isinstance(bn, SyncBatchNorm2d)
        x = _slice(x_full, rank).to(dtype).requires_grad_(True)
        out = bn(x)
        (out.to(torch.float64) * _slice(wout, rank)).sum().backward()
        _check(f"module{dims}d out", out, _slice(_out_of(ref, xr), rank), tol)
        _check(f"module{dims}d grad x", x.grad, _slice(xr.grad, rank), tol)
        _check(f"module{dims}d grad weight", _sum_ranks(bn.weight.grad), ref.weight.grad, tol)
        _check(f"module{dims}d running_var", bn.running_var, ref.running_var, tol)


def _out_of(ref: nn.Module, xr: torch.Tensor) -> torch.Tensor:
    """The oracle's training-mode output again, without touching its running statistics."""
    with torch.no_grad():
        var, mean = torch.var_mean(xr, dim=[0] + list(range(2, xr.dim())), correction=0)
        shp = (1, -1) + (1,) * (xr.dim() - 2)
        return (xr - mean.view(shp)) / torch.sqrt(var.view(shp) + ref.eps) * ref.weight.view(shp) + ref.bias.view(shp)


def _worker_reference(rank: int, store_file: str) -> None:
    _init(rank, store_file)
    try:
        from ahnet_fast.ops import use_backend

        with use_backend("reference"):
            for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 2e-5)):
                for zpool, residual, cl in (("none", False, False), ("before_bn", True, True),
                                            ("after_bn", True, False), ("none", True, True)):
                    _case_conv_bn_act(rank, dtype, tol, zpool, residual, cl)
                _case_bn_act_conv(rank, dtype, tol, relu=True, cl=False)
                _case_bn_act_conv(rank, dtype, tol, relu=False, cl=True, affine=False)
                _case_module(rank, dtype, tol)
        # inference (no grad, eval) is untouched: identical to the plain op
        _case_eval_unchanged(rank)
        _done()
    finally:
        dist.destroy_process_group()


def _case_eval_unchanged(rank: int) -> None:
    from ahnet_fast.nn.functional import conv_bn_act_modules
    from ahnet_fast.nn.sync import convert_sync_batchnorm

    conv = nn.Conv3d(3, 4, (3, 3, 1), padding=(1, 1, 0))
    bn = nn.BatchNorm3d(4).eval()
    x = torch.randn(1, 3, 4, 4, 2)
    want = conv_bn_act_modules(x, conv, bn)
    convert_sync_batchnorm(bn)
    torch.testing.assert_close(conv_bn_act_modules(x, conv, bn), want, rtol=0, atol=0)


def _worker_triton(rank: int, store_file: str) -> None:
    _init(rank, store_file)
    try:
        from ahnet_fast.ops import use_backend

        with use_backend("triton"):
            _case_conv_bn_act(rank, torch.float32, 2e-5, "before_bn", True, True, shape=(4, 3, 4, 4))
            _case_bn_act_conv(rank, torch.float32, 2e-5, relu=True, cl=True, shape=(4, 3, 3, 3))
        _done()
    finally:
        dist.destroy_process_group()


def _done() -> None:
    """Both ranks finished before either tears its process group down: a rank whose peer
    destroyed the group first was seen to abort in gloo's teardown. Only on success: after a
    failure the peer may never arrive."""
    dist.barrier()


def _gloo_threads() -> list[str]:
    """Names of this process's gloo threads (Linux: /proc/self/task/*/comm)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(n for n in names if "gloo" in n)


def _worker_teardown(rank: int, store_file: str) -> None:
    """After the fused synchronized ops (torch.library custom ops, whose first call imports
    torch._dynamo) destroy_process_group must free the group and join gloo's threads; a group
    that outlives it lets gloo abort the process during interpreter shutdown."""
    _init(rank, store_file)
    try:
        from ahnet_fast.ops import use_backend

        with use_backend("reference"):
            _case_bn_act_conv(rank, torch.float32, 2e-5, relu=True, cl=False, shape=(4, 3, 3, 3))
        assert _gloo_threads(), "expected gloo's threads while the group exists"
        _done()
    finally:
        dist.destroy_process_group()
    left = _gloo_threads()
    assert not left, (f"gloo threads {left} still run after destroy_process_group: something holds the group "
                      "(ahnet_fast.train.distributed.preload_group_pinning_modules explains the known cause)")


def _spawn(fn, tmp_path) -> None:
    """Run ``fn`` on WORLD ranks, a rank killed by a signal retried once (tests/_spawn.py)."""
    spawn_ranks(fn, WORLD, lambda attempt: (str(tmp_path / f"store{attempt}"),))


@pytest.mark.timeout(120)
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names are read from Linux /proc")
def test_destroy_process_group_frees_gloo_after_fused_ops(tmp_path):
    mp.spawn(_worker_teardown, args=(str(tmp_path / "store"),), nprocs=WORLD, join=True)


@pytest.mark.timeout(180)
def test_sync_fused_bn_reference_matches_single_process(tmp_path):
    _spawn(_worker_reference, tmp_path)


@pytest.mark.timeout(180)
def test_sync_fused_bn_triton_interpreter_matches_single_process(tmp_path):
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.fail("the Triton interpreter must be on for CPU runs (tests/conftest.py sets TRITON_INTERPRET=1)")
    _spawn(_worker_triton, tmp_path)


def test_no_process_group_is_plain_batchnorm():
    """Without torch.distributed initialised the synchronized modules are the plain ones."""
    from ahnet_fast.models.fast import FastAHNet
    from ahnet_fast.nn import SyncBatchNorm3d, is_sync_batchnorm, revert_sync_batchnorm

    assert not dist.is_initialized()
    torch.manual_seed(0)
    plain = FastAHNet(layers=(1, 1, 1, 1), psp_block_num=0, upsample_mode="trilinear")
    torch.manual_seed(0)
    synced = FastAHNet(layers=(1, 1, 1, 1), psp_block_num=0, upsample_mode="trilinear", sync_bn=True)
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, SyncBatchNorm3d) and is_sync_batchnorm(m) for m in bns)
    assert list(plain.state_dict()) == list(synced.state_dict())
    x = torch.randn(2, 1, 32, 32, 32)
    out_p, out_s = plain(x), synced(x)
    torch.testing.assert_close(out_s, out_p, rtol=0, atol=0)
    for (k, a), b in zip(plain.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=k)
    revert_sync_batchnorm(synced)
    assert not any(is_sync_batchnorm(m) for m in synced.modules())


def test_bn_piece_ops_pass_opcheck():
    """The ops the synchronized path strings together (no collectives inside) are proper custom ops."""
    from ahnet_fast.ops._library import bn_act_apply_op, bn_act_backward_op, bn_stats_op

    y = torch.randn(2, 3, 4, 3, 4).contiguous(memory_format=torch.channels_last_3d)
    mean, var = bn_stats_op(y, "reference")
    torch.testing.assert_close(mean, y.mean(dim=(0, 2, 3, 4)))
    torch.testing.assert_close(var, y.var(dim=(0, 2, 3, 4), correction=0))
    invstd = torch.rsqrt(var + 1e-5)
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    res = torch.randn(2, 3, 4, 3, 2)
    g = torch.randn(2, 3, 4, 3, 2)
    out = bn_act_apply_op(y, scale, shift, res, True, True, "reference")
    gamma, beta = torch.rand(3) + 0.5, torch.randn(3)
    for op, args in ((bn_stats_op, (y, "reference")),
                     (bn_act_apply_op, (y, scale, shift, res, True, True, "reference")),
                     (bn_act_apply_op, (y, scale, shift, None, False, False, "reference")),
                     (bn_act_backward_op, (g, y, mean, invstd, gamma, beta, out, True, True, False, True,
                                           "reference")),
                     (bn_act_backward_op, (torch.randn_like(y), y, mean, invstd, None, None, None, False, True,
                                           True, False, "reference"))):
        torch.library.opcheck(op, args)
