"""auto's measured choice (ops/_autoselect.py): timing once per shape class, remembered on disk
per GPU and versions. The timing itself needs a GPU; the policy around it is checked here with a
stand-in timer, and the whole path in the GPU test."""
from __future__ import annotations

import json

import pytest
import torch

from ahnet_fast.ops import _autoselect

DEV = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(_autoselect.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(_autoselect, "_machine_key", lambda device: "Test GPU|sm_90|torch x|triton y|ahnet_fast z")
    _autoselect.clear()
    yield tmp_path / "backend_choice.json"
    _autoselect.clear()  # the next test reads its own cache folder


def test_fastest_backend_is_chosen_once_and_remembered(cache):
    times = {"triton": 2.0, "reference": 1.5}
    ran = []

    def timer(run, device):
        run()
        return times[ran[-1]]

    key = "conv_bn_act|t1|float32|cl|C64|[1, 64, 64, 32]|[(64, 64, 3, 3, 1)]"
    assert _autoselect.choose(key, DEV, ["triton", "reference"], ran.append, timer) == "reference"
    assert ran == ["triton", "reference"]
    # a second call (and a new process: the file) measures nothing
    assert _autoselect.choose(key, DEV, ["triton", "reference"], ran.append, timer) == "reference"
    _autoselect.clear()
    assert _autoselect.choose(key, DEV, ["triton", "reference"], ran.append, timer) == "reference"
    assert ran == ["triton", "reference"]
    saved = json.loads(cache.read_text())
    rec = saved["Test GPU|sm_90|torch x|triton y|ahnet_fast z"][key]
    assert rec == {"choice": "reference", "ms": {"triton": 2.0, "reference": 1.5}}
    # a remembered choice that can no longer serve the call is measured again
    assert _autoselect.choose(key, DEV, ["triton", "cuda"], ran.append,
                              lambda run, d: (run(), {"triton": 1.0, "cuda": 3.0}[ran[-1]])[1]) == "triton"


def test_decided_calls_cost_one_lookup(cache, monkeypatch):
    """A call whose signature was decided neither measures nor asks every backend again: one
    dict lookup and one check that the remembered backend can still serve it."""
    monkeypatch.setattr(_autoselect, "enabled", lambda: True)
    x = torch.empty(1, 8, 16, 16, 4)
    w = torch.empty(8, 8, 3, 3, 1)
    asked, ran = [], []

    def servable(name):
        asked.append(name)
        return True

    def run(name):
        ran.append(name)

    monkeypatch.setattr(_autoselect, "_time_ms", lambda fn, d: (fn(), {"triton": 2.0, "reference": 1.0}[ran[-1]])[1])
    order = ("triton", "reference")
    assert _autoselect.decide("conv_bn_act", (True,), [x, w], order, servable, run) == "reference"
    assert ran == ["triton", "reference"] and asked == ["triton", "reference"]
    asked.clear()
    assert _autoselect.decide("conv_bn_act", (True,), [x, w], order, servable, run) == "reference"
    assert ran == ["triton", "reference"] and asked == ["reference"]
    # a remembered backend that cannot serve the call now: the fixed order decides
    assert _autoselect.decide("conv_bn_act", (True,), [x, w], order, lambda n: False, run) is None
    # one servable backend: nothing to choose, nothing measured
    assert _autoselect.decide("zmaxpool", (), [x], order, lambda n: n == "triton", run) is None
    assert ran == ["triton", "reference"]


def test_key_buckets_sizes_but_not_channels():
    def k(*shape, layout=torch.contiguous_format, w=(8, 16, 3, 3, 1)):
        x = torch.empty(shape).contiguous(memory_format=layout)
        return _autoselect.key_for("conv_bn_act", "t1", [x, torch.empty(w)])

    assert k(1, 16, 60, 64, 30) == k(1, 16, 64, 50, 32)          # same powers of two
    assert k(1, 16, 64, 64, 32) != k(1, 16, 64, 64, 33)          # next power of two
    assert k(1, 16, 64, 64, 32) != k(1, 17, 64, 64, 32, w=(8, 17, 3, 3, 1))   # channels are exact
    assert k(1, 16, 64, 64, 32) != k(1, 16, 64, 64, 32, layout=torch.channels_last_3d)
    assert k(1, 16, 8, 8, 8) != k(1, 16, 8, 8, 8, w=(8, 16, 1, 1, 3))


def test_measuring_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(_autoselect.ENV_SWITCH, "0")
    assert not _autoselect.enabled()


def test_unwritable_cache_keeps_choices_in_memory(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(_autoselect.ENV_DIR, str(blocker / "sub"))  # a folder under a file
    monkeypatch.setattr(_autoselect, "_machine_key", lambda device: "m")
    _autoselect.clear()
    try:
        assert _autoselect.choose("k", DEV, ["a", "b"], lambda n: None,
                                  lambda run, d: 1.0) == "a"
        assert _autoselect.choose("k", DEV, ["a", "b"], lambda n: pytest.fail("measured again"),
                                  lambda run, d: pytest.fail("measured again")) == "a"
    finally:
        _autoselect.clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_auto_measures_on_a_gpu(cache):
    from ahnet_fast.ops import conv_bn_act

    x = torch.randn(1, 16, 32, 32, 8, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(16, 16, 3, 3, 1, device="cuda").contiguous(memory_format=torch.channels_last_3d)
    g, b = torch.ones(16, device="cuda"), torch.zeros(16, device="cuda")
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    with torch.no_grad():
        conv_bn_act(x, w, g, b, rm, rv, padding=(1, 1, 0), training=False)
    saved = json.loads(cache.read_text())
    (recs,) = saved.values()
    (rec,) = [r for k, r in recs.items() if k.startswith("conv_bn_act|")]
    assert rec["choice"] in ("triton", "reference") and set(rec["ms"]) >= {"triton", "reference"}
