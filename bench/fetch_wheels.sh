#!/usr/bin/env bash
# Download, on a machine with package access, the pure-Python wheels that the GPU image
# lacks (MONAI for the baselines and parity tests; nibabel and nilearn for the data
# tests) into .whl/ in the repo root (git-ignored). Then run the GPU pass carrying it:
#
#   bash bench/fetch_wheels.sh
#   device run: carry [".whl"], command "bash bench/gpu_check.sh"
#
# gpu_check.sh installs every wheel in .whl/ into /tmp/site and puts it on PYTHONPATH.
# Their own dependencies (numpy, torch, scipy, pandas, scikit-learn, joblib, lxml,
# requests, packaging) are already on the GPU image, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: -d .whl \
    "monai==${MONAI_VERSION:-1.6.1}" "nibabel==${NIBABEL_VERSION:-5.4.2}" "nilearn==${NILEARN_VERSION:-0.14.1}"
ls -l .whl
