"""Benchmark suite of ahnet_fast (kernel micro-benchmarks and whole-model runs).

Modules:
    bench.common  environment record, ceilings, timing, correctness gate, memory
    bench.ops     per-op contenders at the AH-Net shapes (``python -m bench.ops``)
    bench.model   whole AH-Net against MONAI and torch.compile (``python -m bench.model``)
    bench.report  JSON + markdown + roofline plot (``python -m bench.report DIR``)

Nothing here touches CUDA at import time. ``bench/gpu_check.sh`` runs the whole
GPU pass (install, info, tests, ops, model) in one command.
"""
