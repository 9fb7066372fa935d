"""Installs the pure-Python package; the CUDA extension (lpo_kernels._cuda) is added by
the CUDA backend where nvcc is found (see csrc/)."""

from setuptools import setup

setup()
