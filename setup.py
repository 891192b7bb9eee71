"""Build script. Placeholder until the CUDA build path lands (see csrc/)."""
from setuptools import find_packages, setup

setup(
    # kernels/ is a top-level source folder but is only ever installed as
    # ahnet_fast.kernels; nothing is installed as a top-level `kernels`.
    packages=find_packages(include=["ahnet_fast", "ahnet_fast.*"]) + ["ahnet_fast.kernels"],
    package_dir={"ahnet_fast.kernels": "kernels"},
)
