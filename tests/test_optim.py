"""make_adam: torch's fused Adam where the device has it, the same update and checkpoint format
as the unfused Adam (resume across the change), and the plain Adam elsewhere."""
import copy

import torch

from ahnet_fast.train.optim import load_optimizer_state, make_adam


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv3d(1, 4, (3, 3, 1)), torch.nn.BatchNorm3d(4), torch.nn.ReLU(),
                               torch.nn.Conv3d(4, 2, 1))


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, n: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(2, 1, 6, 5, 3, generator=g)
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()


def test_fused_on_cpu_and_same_update_as_unfused_adam():
    a, b = _model(), _model()
    fused = make_adam(a.parameters(), lr=1e-2, weight_decay=1e-4)
    plain = torch.optim.Adam(b.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4,
                             foreach=False)
    assert fused.defaults["fused"] is True
    _steps(a, fused, 5)
    _steps(b, plain, 5)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_state_dict_interchangeable_with_unfused_adam():
    # a checkpoint written before the optimizer became fused resumes into it, and back
    a, b = _model(), _model()
    plain = torch.optim.Adam(a.parameters(), lr=1e-2, foreach=False)
    _steps(a, plain, 3)
    b.load_state_dict(a.state_dict())
    fused = make_adam(b.parameters(), lr=1e-2)
    # a copy, as from a checkpoint file (a live state_dict shares its tensors with `plain`)
    load_optimizer_state(fused, copy.deepcopy(plain.state_dict()))
    assert fused.param_groups[0]["fused"] is True   # the saved group said unfused
    _steps(a, plain, 2, seed=7)
    _steps(b, fused, 2, seed=7)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    back = torch.optim.Adam(a.parameters(), lr=1e-2)
    load_optimizer_state(back, copy.deepcopy(fused.state_dict()))
    assert not back.param_groups[0]["fused"]
    assert int(back.state_dict()["state"][0]["step"]) == 5


def test_unfused_where_torch_has_no_fused_kernel():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    assert not make_adam([p], lr=1e-3).defaults["fused"]
