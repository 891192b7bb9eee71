"""`python -m ahnet_fast.info` / `ahnet-fast info`: versions, devices, the three backends with reasons."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from ahnet_fast import info
from ahnet_fast.cli import main as cli_main


def _check_backends(backends: dict) -> None:
    assert set(backends) >= {"reference", "triton", "cuda"}
    for name, entry in backends.items():
        assert isinstance(entry["usable"], bool), name
        assert isinstance(entry["reason"], str) and entry["reason"].strip(), name
    assert backends["reference"]["usable"] is True
    if not torch.cuda.is_available():
        # without a GPU the compiled backend can never run, and says why
        assert backends["cuda"]["usable"] is False


def test_collect_reports_versions_and_backends():
    data = info.collect()
    v = data["versions"]
    assert v["torch"] == torch.__version__ and v["torch_cuda"] == torch.version.cuda
    assert v["ahnet_fast"] and v["python"]
    assert data["devices"] == [] or all("capability" in d for d in data["devices"])
    _check_backends(data["backends"])
    report = info.format_report(data)
    for name in ("reference", "triton", "cuda"):
        assert any(line.strip().startswith(name) for line in report.splitlines()), name
    assert f"torch    {torch.__version__}" in report


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "ahnet_fast.info", "--json"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    _check_backends(data["backends"])
    assert data["versions"]["torch"] == torch.__version__


def test_cli_subcommand(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ahnet_fast ")
    lines = [line.split() for line in out.splitlines()]
    names = {parts[0] for parts in lines if parts and parts[0] in ("reference", "triton", "cuda")}
    assert names == {"reference", "triton", "cuda"}
    assert "backends (AHNET_FAST_BACKEND=" in out


def test_fallback_when_ops_layer_is_not_importable(monkeypatch):
    monkeypatch.setitem(sys.modules, "ahnet_fast.ops", None)  # makes `import ahnet_fast.ops` fail
    backends, source = info.backend_status()
    assert source.startswith("own checks")
    _check_backends({k: {"usable": ok, "reason": why} for k, (ok, why) in backends.items()})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends, _ = info.backend_status()
    if not torch.cuda.is_available() and info._package_version("triton"):
        ok, why = backends["triton"]
        assert ok is True and "interpreter" in why
