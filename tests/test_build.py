"""The build path: setup.py's decisions, the extension loader's metadata check, csrc's structure.

setup.py is imported as a module (its __main__ guard keeps setup() from running), so these tests
exercise exactly the functions `pip install` uses, without compiling anything.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ahnet_fast import _cuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_mod():
    spec = importlib.util.spec_from_file_location("ahnet_fast_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fresh_loader(monkeypatch):
    """The loader with its once-only cache cleared (restored afterwards by monkeypatch)."""
    monkeypatch.setattr(_cuda, "_loaded", None)
    monkeypatch.setattr(_cuda, "_load_error", None)
    monkeypatch.setattr(_cuda, "_implemented", None)
    return _cuda


def _write_info(path: Path, **fields) -> Path:
    info = {"cuda_extension": True, "reason": "test", "torch_version": "2.14.1+cu130", "torch_cuda": "13.0",
            "nvcc_version": "13.0.88", "cuda_arch_list": "8.0;9.0", "python": "3.11.7",
            "build_date": "2026-01-01T00:00:00+00:00"}
    info.update(fields)
    path.write_text(json.dumps(info))
    return path


# ------------------------------------------------------------------------------------------------
# loader: metadata check and readable errors
# ------------------------------------------------------------------------------------------------
def test_metadata_for_another_torch_gives_readable_error(tmp_path, monkeypatch, fresh_loader):
    other = "2.11.0+cu126" if not torch.__version__.startswith("2.11.0") else "2.14.1+cu130"
    path = _write_info(tmp_path / "_build_info.json", torch_version=other, torch_cuda="12.6")
    monkeypatch.setattr(_cuda, "BUILD_INFO_PATH", str(path))
    with pytest.raises(_cuda.CudaExtensionError) as err:
        _cuda.load()
    msg = str(err.value)
    assert f"built for torch {other}" in msg and f"running torch {torch.__version__}" in msg
    assert "--no-build-isolation" in msg
    ok, why = _cuda.status()
    assert not ok and why == msg
    assert _cuda.implemented() == set()
    # a launcher of a backend that cannot load is simply absent, as the ops layer expects
    assert getattr(_cuda, "zmaxpool_forward", None) is None


@pytest.mark.parametrize("built,running,running_cuda,fragment", [
    (("2.14.1+cu130", "13.0"), "2.14.1+cu130", "13.0", None),
    (("2.14.1+cu130", "13.0"), "2.14.1+cu130", "13.0.1", None),   # CUDA compared as major.minor
    (("2.14.1+cu130", "13.0"), "2.14.0+cu130", "13.0", "running torch 2.14.0+cu130"),
    (("2.14.1+cu130", "13.0"), "2.14.1+cu126", "12.6", "(CUDA 12.6)"),
    (("2.14.1+cu130", "13.0"), "2.14.1+cpu", None, "CPU build"),
])
def test_check_build_info_matrix(built, running, running_cuda, fragment):
    info = {"cuda_extension": True, "torch_version": built[0], "torch_cuda": built[1]}
    reason = _cuda.check_build_info(info, running, running_cuda)
    if fragment is None:
        assert reason is None
    else:
        assert fragment in reason and f"built for torch {built[0]}" in reason


def test_cpu_only_install_and_missing_metadata_reasons(tmp_path):
    info = {"cuda_extension": False, "reason": "torch 2.13.0+cpu is a CPU-only build"}
    assert _cuda.check_build_info(info, "2.13.0+cpu", None) == (
        "extension not built (CPU-only install): torch 2.13.0+cpu is a CPU-only build")
    assert "extension not built" in _cuda.check_build_info(None, "2.13.0", None)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert _cuda.build_info(str(bad))["cuda_extension"] is False
    assert _cuda.build_info(str(tmp_path / "absent.json")) is None


def test_broken_shared_object_is_translated(tmp_path, monkeypatch, fresh_loader):
    """A .so the dynamic loader rejects (as with `undefined symbol` after a torch upgrade) becomes a
    CudaExtensionError naming both torch versions, with the raw error kept as __cause__."""
    pkg = tmp_path / "ahf_fake_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / f"_C{importlib.machinery.EXTENSION_SUFFIXES[0]}").write_bytes(b"\x7fELF not really a library")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_cuda, "EXTENSION", "ahf_fake_pkg._C")
    cuda = torch.version.cuda
    path = _write_info(tmp_path / "_build_info.json", torch_version=torch.__version__, torch_cuda=cuda)
    monkeypatch.setattr(_cuda, "BUILD_INFO_PATH", str(path))
    with pytest.raises(_cuda.CudaExtensionError) as err:
        _cuda.load()
    msg = str(err.value)
    assert "failed to load" in msg and f"built for torch {torch.__version__}" in msg
    assert f"this is torch {torch.__version__}" in msg
    assert isinstance(err.value.__cause__, (ImportError, OSError))


def test_metadata_says_built_but_module_missing(tmp_path, monkeypatch, fresh_loader):
    monkeypatch.setattr(_cuda, "EXTENSION", "ahf_no_such_pkg_xyz._C")
    path = _write_info(tmp_path / "_build_info.json", torch_version=torch.__version__, torch_cuda=torch.version.cuda)
    monkeypatch.setattr(_cuda, "BUILD_INFO_PATH", str(path))
    with pytest.raises(_cuda.CudaExtensionError, match="no compiled ahf_no_such_pkg_xyz._C module"):
        _cuda.load()


def test_wrapper_argument_checks_need_no_extension():
    with pytest.raises(ValueError, match="zpool='before_affine' is not accepted"):
        _cuda._WRAPPERS["bn_act_apply"](torch.zeros(1, 1, 1, 1, 2), torch.ones(1), torch.zeros(1),
                                        zpool="before_affine")
    out = torch.zeros(1, 3, 2, 2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        _cuda._channel_slice("bn_act_apply", out, 2, 2, (1, 2, 2, 2, 4), out.dtype)
    with pytest.raises(ValueError, match=r"\(N, H, W, D\)"):
        _cuda._channel_slice("bn_act_apply", out, 0, 2, (1, 2, 2, 2, 2), out.dtype)
    view = _cuda._channel_slice("bn_act_apply", out, 1, 2, (1, 2, 2, 2, 4), out.dtype)
    assert view.shape == (1, 2, 2, 2, 4) and view.data_ptr() == out[:, 1:].data_ptr()


# ------------------------------------------------------------------------------------------------
# setup.py decisions
# ------------------------------------------------------------------------------------------------
def test_build_mode_switch(setup_mod):
    assert setup_mod.build_mode({}) == "auto"
    assert setup_mod.build_mode({"AHNET_FAST_BUILD_CUDA": "0"}) == "off"
    assert setup_mod.build_mode({"AHNET_FAST_BUILD_CUDA": "1"}) == "on"
    with pytest.raises(setup_mod.BuildConfigError, match="'yes' is not understood"):
        setup_mod.build_mode({"AHNET_FAST_BUILD_CUDA": "yes"})


FULL = {"torch_version": "2.14.1+cu130", "torch_cuda": "13.0", "torch_error": None, "cuda_home": "/usr/local/cuda",
        "nvcc": "/usr/local/cuda/bin/nvcc", "nvcc_version": "13.0.88", "ninja": True, "gpu_capabilities": []}


def test_forced_build_fails_naming_what_is_missing_here(setup_mod):
    """AHNET_FAST_BUILD_CUDA=1 on this machine, with the real probe: whatever is missing is named."""
    facts = setup_mod.probe_toolchain()
    if facts["torch_cuda"] and facts["nvcc"] and facts["cuda_home"] and facts["ninja"]:
        assert setup_mod.decide_cuda_build("on", facts)[0] is True  # a full toolchain: builds
        return
    with pytest.raises(setup_mod.BuildConfigError) as err:
        setup_mod.decide_cuda_build("on", facts)
    msg = str(err.value)
    assert msg.startswith("AHNET_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: ")
    if not facts["torch_cuda"]:
        assert f"torch {torch.__version__} is a CPU-only build" in msg
    built, reason = setup_mod.decide_cuda_build("auto", facts)
    assert built is False and reason in msg


@pytest.mark.parametrize("change,fragment", [
    ({"torch_version": None, "torch_cuda": None, "torch_error": "ModuleNotFoundError: No module named 'torch'"},
     "--no-build-isolation"),
    ({"torch_cuda": None}, "CPU-only build"),
    ({"nvcc": None, "nvcc_version": None}, "nvcc not found"),
    ({"cuda_home": None}, "set CUDA_HOME"),
    ({"ninja": False}, "ninja not found"),
])
def test_decide_cuda_build_each_missing_piece(setup_mod, change, fragment):
    facts = {**FULL, **change}
    with pytest.raises(setup_mod.BuildConfigError, match=re.escape(fragment)):
        setup_mod.decide_cuda_build("on", facts)
    built, reason = setup_mod.decide_cuda_build("auto", facts)
    assert not built and fragment in reason
    assert setup_mod.decide_cuda_build("off", FULL) == (False, "AHNET_FAST_BUILD_CUDA=0")


def test_decide_cuda_build_full_toolchain(setup_mod):
    built, reason = setup_mod.decide_cuda_build("auto", FULL)
    assert built and "2.14.1+cu130" in reason and "13.0.88" in reason
    old_gpu = {**FULL, "gpu_capabilities": [(7, 5)]}
    assert setup_mod.decide_cuda_build("auto", old_gpu)[0] is False
    assert setup_mod.decide_cuda_build("on", old_gpu)[0] is True  # forced: the user's arch list decides


def test_arch_list(setup_mod):
    assert setup_mod.resolve_arch_list({}, []) == "8.0;9.0a"  # no visible GPU: sm_90a for the wgmma conv
    assert setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "9.0"}, [(8, 0)]) == "9.0"  # user wins
    assert setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"}, []) == "8.0;9.0+PTX"
    assert setup_mod.resolve_arch_list({}, [(9, 0), (8, 6), (9, 0)]) == "8.6;9.0a"  # visible GPUs (9.0 -> 9.0a)
    assert setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "8.0;9.0a"}, []) == "8.0;9.0a"
    with pytest.raises(setup_mod.BuildConfigError, match="contains 7.5"):
        setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "7.5;8.0"}, [])
    with pytest.raises(setup_mod.BuildConfigError, match="not understood"):
        setup_mod.resolve_arch_list({"TORCH_CUDA_ARCH_LIST": "sm90"}, [])


def test_max_jobs_bounded_by_memory(setup_mod):
    gib = 2**30
    assert setup_mod.resolve_max_jobs({}, 10 * gib, 16)[0] == 4
    assert setup_mod.resolve_max_jobs({}, 100 * gib, 2)[0] == 2
    assert setup_mod.resolve_max_jobs({}, gib, 16)[0] == 1
    assert setup_mod.resolve_max_jobs({"MAX_JOBS": "7"}, gib, 2) == (7, "MAX_JOBS set by the user")
    with pytest.raises(setup_mod.BuildConfigError, match="not an integer"):
        setup_mod.resolve_max_jobs({"MAX_JOBS": "many"}, gib, 2)


def test_nvidia_library_headers_are_discovered(setup_mod, tmp_path, monkeypatch):
    for lib, header in (("cu13", "cusparse.h"), ("cudnn", "cudnn.h")):
        inc = tmp_path / "nvidia" / lib / "include"
        inc.mkdir(parents=True)
        (inc / header).write_text("/* test */\n")
    (tmp_path / "nvidia" / "empty" / "include").mkdir(parents=True)  # no headers: not added
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nvidia", raising=False)
    importlib.invalidate_caches()
    dirs = setup_mod.nvidia_include_dirs()
    assert str(tmp_path / "nvidia" / "cu13" / "include") in dirs
    assert str(tmp_path / "nvidia" / "cudnn" / "include") in dirs
    assert not any(d.endswith(os.path.join("empty", "include")) for d in dirs)
    flags = setup_mod.extra_compile_args(dirs)
    assert flags["nvcc"][-len(dirs):] == [f"-I{d}" for d in dirs]  # trailing: nvcc's own headers win
    assert "--use_fast_math" not in flags["nvcc"]


def test_build_metadata_fields(setup_mod):
    meta = setup_mod.build_metadata(FULL, True, "ok", "8.0;9.0")
    assert meta["cuda_extension"] is True and meta["torch_version"] == "2.14.1+cu130"
    assert meta["torch_cuda"] == "13.0" and meta["nvcc_version"] == "13.0.88" and meta["cuda_arch_list"] == "8.0;9.0"
    assert re.match(r"\d{4}-\d\d-\d\dT", meta["build_date"])
    assert _cuda.check_build_info(meta, "2.14.1+cu130", "13.0") is None
    not_built = setup_mod.build_metadata({**FULL, "torch_cuda": None}, False, "CPU-only", None)
    assert not_built["cuda_extension"] is False and not_built["cuda_arch_list"] is None


def test_csrc_layout_one_defining_unit(setup_mod):
    """TORCH_LIBRARY in exactly one translation unit (listed first); each .cu registers its CUDA
    kernels with TORCH_LIBRARY_IMPL; every impl'd op has a schema and every launch is checked."""
    sources = setup_mod.csrc_sources()
    assert sources[0] == os.path.join("csrc", "ahnet_fast_cuda.cpp")
    cu = [s for s in sources if s.endswith(".cu")]
    assert cu, "no CUDA sources"
    defining = (ROOT / sources[0]).read_text()
    schemas = set(re.findall(r'm\.def\("(\w+)\(', defining))
    for src in sources:
        text = (ROOT / src).read_text()
        assert ("TORCH_LIBRARY(" in text) == (src == sources[0]), src
    for src in cu:
        text = (ROOT / src).read_text()
        assert "TORCH_LIBRARY_IMPL(ahnet_fast_cuda, CUDA, m)" in text, src
        impls = set(re.findall(r'm\.impl\("(\w+)"', text))
        assert impls and impls <= schemas, (src, impls - schemas)
        launches = len(re.findall(r">>>\(", text))
        checks = len(re.findall(r"AHF_CHECK_LAUNCH\(", text))
        assert launches and checks >= 1, src
    # every wrapper name the loader knows maps to schemas that exist or are not yet defined at all
    for wrapper, needed in _cuda._WRAPPER_OPS.items():
        assert all(n in schemas for n in needed) or not any(n in schemas for n in needed), wrapper


def test_setup_py_keeps_kernels_inside_the_package():
    text = (ROOT / "setup.py").read_text()
    assert 'package_dir={"ahnet_fast.kernels": "kernels"}' in text
    assert '+ ["ahnet_fast.kernels"]' in text


def test_wgmma_ptx_header_is_what_the_generator_writes():
    """csrc/cuda/wgmma_ptx.cuh is generated (one asm wrapper per dtype and tile width): never stale."""
    proc = subprocess.run([sys.executable, str(ROOT / "csrc" / "gen_wgmma_ptx.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    header = (ROOT / "csrc" / "cuda" / "wgmma_ptx.cuh").read_text()
    # the tile widths the host can pick (conv_wgmma.cuh, wgmma_tile_n) all have a wrapper
    wgmma = (ROOT / "csrc" / "cuda" / "conv_wgmma.cuh").read_text()
    picked = {int(bn) for _, bn in re.findall(r"cout <= (\d+) \? (\d+)", wgmma)} | {128}
    assert picked == {8, 24, 64, 80, 128}
    for t in ("__nv_bfloat16", "__half"):
        for n in picked:
            assert f"struct Wgmma<{t}, {n}>" in header, (t, n)
            assert f"m64n{n}k16.f32.{'bf16.bf16' if t == '__nv_bfloat16' else 'f16.f16'}" in header


def test_conv_kernel_policy_default_env_and_errors():
    """The wgmma conv is not chosen unless asked for until it is verified on a GPU; the environment
    variable and set_conv_kernel accept exactly wmma/wgmma/auto and say so otherwise."""
    assert _cuda.default_conv_kernel({}) == ("auto" if _cuda.WGMMA_VERIFIED_ON_GPU else "wmma")
    assert _cuda.default_conv_kernel({"AHNET_FAST_CUDA_CONV": " WGMMA "}) == "wgmma"
    assert _cuda.default_conv_kernel({"AHNET_FAST_CUDA_CONV": ""}) in ("wmma", "auto")
    with pytest.raises(ValueError, match=r"AHNET_FAST_CUDA_CONV='fast' is not accepted; use one of wmma, wgmma, auto"):
        _cuda.default_conv_kernel({"AHNET_FAST_CUDA_CONV": "fast"})
    with pytest.raises(ValueError, match=r"set_conv_kernel\('fast'\): accepted: wmma, wgmma, auto"):
        _cuda.set_conv_kernel("fast")
    if not _cuda.status()[0]:
        # without a usable extension: nothing can run it, and asking for the policy says why
        assert _cuda.wgmma_supported() is False
        with pytest.raises(_cuda.CudaExtensionError):
            _cuda.conv_kernel()
