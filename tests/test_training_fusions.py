"""Training-path fusions, checked against plain PyTorch on tiny tensors (Triton interpreter):

* the Pseudo3D chain: bn2..bn4's batch statistics come from the epilogue of the conv before
  them, finalized (affine + next running statistics) in that conv's merge launch;
* the Pseudo3D residual (x3x3x1 feeds both the 1x1x3 conv's BN and its residual): its two
  gradients summed by the BN backward's apply pass;
* running statistics and batch counters committed once per forward (ops/_running.py).

Outputs, every gradient, running statistics and counters must equal the unfused module's.
"""
from __future__ import annotations

import pytest
import torch

from ahnet_fast import use_backend
from ahnet_fast.launches import record_launches
from ahnet_fast.models.ahnet import Pseudo3DLayer
from ahnet_fast.models.fast import FusedPseudo3DLayer
from ahnet_fast.nn.functional import conv_bn_act_modules
from ahnet_fast.ops import _running


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _layers(seed: int = 0) -> tuple[Pseudo3DLayer, FusedPseudo3DLayer]:
    torch.manual_seed(seed)
    ref = Pseudo3DLayer(3, num_input_features=12, growth_rate=4, bn_size=2, dropout_prob=0.0)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
            m.running_mean.uniform_(-0.2, 0.2)
    fused = FusedPseudo3DLayer(3, num_input_features=12, growth_rate=4, bn_size=2, dropout_prob=0.0)
    fused.load_state_dict(ref.state_dict())
    return ref.train(), fused.train()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_pseudo3d_chain_equals_the_plain_layer(backend, layout):
    """Two training steps of the chained layer: output, input and parameter gradients, running
    statistics and batch counters equal the plain PyTorch layer's."""
    ref, fused = _layers()
    for step in range(2):
        x = torch.randn(2, 12, 5, 4, 6, generator=torch.Generator().manual_seed(step)).contiguous(
            memory_format=layout)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        g = torch.randn(2, 16, 5, 4, 6, generator=torch.Generator().manual_seed(10 + step))
        yr = ref(xr)
        (yr * g).sum().backward()
        with use_backend(backend), _running.deferred_running_updates():
            yf = fused(xf)
        (yf * g).sum().backward()
        assert _rel(yf, yr) <= 1e-5
        assert _rel(xf.grad, xr.grad) <= 1e-5
        for (name, pr), pf in zip(ref.named_parameters(), fused.parameters()):
            assert _rel(pf.grad, pr.grad) <= 1e-5, name
        for (name, br), bf in zip(ref.named_buffers(), fused.buffers()):
            if br.is_floating_point():
                assert _rel(bf, br) <= 1e-5, name
            else:
                assert torch.equal(bf, br), name  # num_batches_tracked


def test_pseudo3d_chain_reads_each_activation_once_for_its_statistics():
    """Only bn1 (whose input comes from outside the layer) has a statistics pass; bn2..bn4 are
    finalized by the merge launch of the conv before them; the residual's gradient adds no pass."""
    _, fused = _layers()
    x = torch.randn(2, 12, 5, 4, 6, requires_grad=True)
    with use_backend("triton"), record_launches() as log:
        with _running.deferred_running_updates():
            y = fused(x)
        y.sum().backward()
    kernels = [r.kernel for r in log.triton]
    assert kernels.count("_stats_partial_kernel") == 1, log.summary()
    assert kernels.count("stats_merge_kernel") == 4, log.summary()
    # the only autograd sum is the cat's: the residual's gradient went into the BN backward
    assert log.torch_ops.get("aten::add", 0) <= 1, log.summary()
    assert log.torch_ops.get("aten::_foreach_copy_", 0) == 1, log.summary()


def test_deferred_running_updates_commit_once_and_only_on_success():
    """Inside the block the buffers keep their values; they change when the block ends, and not
    at all when it raises. A layer run twice in one block (shared weights) advances from its
    latest values, as nn.BatchNorm does."""
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(3, 4, (3, 3, 1), padding=(1, 1, 0), bias=False)
    bn = torch.nn.BatchNorm3d(4).train()
    x = torch.randn(2, 3, 4, 4, 2)
    rm0, nbt0 = bn.running_mean.clone(), bn.num_batches_tracked.clone()
    with use_backend("triton"), torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            with _running.deferred_running_updates():
                conv_bn_act_modules(x, conv, bn)
                raise RuntimeError("boom")
        assert torch.equal(bn.running_mean, rm0) and torch.equal(bn.num_batches_tracked, nbt0)
        with _running.deferred_running_updates():
            conv_bn_act_modules(x, conv, bn)
            assert torch.equal(bn.running_mean, rm0) and torch.equal(bn.num_batches_tracked, nbt0)
            conv_bn_act_modules(x, conv, bn)
    ref = torch.nn.BatchNorm3d(4).train()
    with torch.no_grad():
        c = conv(x)
        ref(c)
        ref(c)
    assert int(bn.num_batches_tracked) == 2
    assert _rel(bn.running_mean, ref.running_mean) <= 1e-5 and _rel(bn.running_var, ref.running_var) <= 1e-5


def test_cumulative_average_reads_the_pending_counter():
    """momentum=None (cumulative moving average) inside a deferred block uses the counter value
    nn.BatchNorm would read, pending increments included."""
    torch.manual_seed(2)
    conv = torch.nn.Conv3d(3, 4, (1, 1, 3), padding=(0, 0, 1), bias=False)
    bn = torch.nn.BatchNorm3d(4, momentum=None).train()
    ref = torch.nn.BatchNorm3d(4, momentum=None).train()
    xs = [torch.randn(2, 3, 3, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with use_backend("triton"), torch.no_grad(), _running.deferred_running_updates():
        for x in xs:
            conv_bn_act_modules(x, conv, bn)
    with torch.no_grad():
        for x in xs:
            ref(conv(x))
    assert int(bn.num_batches_tracked) == 3
    assert _rel(bn.running_mean, ref.running_mean) <= 1e-5 and _rel(bn.running_var, ref.running_var) <= 1e-5
