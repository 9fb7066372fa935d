"""Installs lpo_kernels; adds the CUDA extension ``lpo_kernels._cuda`` where nvcc is found.

The extension is torch-free (csrc/: raw pointers + cudaStream_t, pybind11 bindings), so it
builds in seconds with nvcc alone and does not depend on the torch ABI. Environment:

    LPO_KERNELS_CUDA=0   never build it (pure-Python install)
    LPO_KERNELS_CUDA=1   build it and fail the install if that fails
    (unset)              build it when nvcc is found; on failure install without it
    LPO_KERNELS_CUDA_ARCHS="80;90"   compute capabilities to compile for
    NVCC=/path/to/nvcc   the compiler (default: $CUDA_HOME/bin/nvcc, then nvcc on PATH)

Install with ``pip install --no-build-isolation -e .`` (add ``-v`` to see the build).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
SOURCES = ["errors.cu", "listwise.cu", "loss_head.cu", "bindings.cpp"]
DEFAULT_ARCHS = "80;90"


def log(message: str) -> None:
    print(f"lpo-kernels: {message}", file=sys.stderr, flush=True)


def cuda_mode() -> str:
    value = os.environ.get("LPO_KERNELS_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes"):
        return "on"
    raise SystemExit(f"LPO_KERNELS_CUDA must be 0, 1 or unset, got {value!r}")


def find_nvcc() -> str | None:
    candidates = [os.environ.get("NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}")


class BuildCudaExtension(build_ext):
    """Compiles csrc/ with nvcc (host code through nvcc's host compiler) and links with the
    static CUDA runtime, so the module needs only the NVIDIA driver at run time."""

    def build_extension(self, ext):
        mode = cuda_mode()
        nvcc = find_nvcc()
        if nvcc is None:
            message = "nvcc not found (set CUDA_HOME or NVCC)"
            if mode == "on":
                raise RuntimeError(f"LPO_KERNELS_CUDA=1 but {message}")
            log(f"{message}: installing without the CUDA backend (lpo_kernels._cuda)")
            return
        start = time.time()
        try:
            self.build_with_nvcc(ext, nvcc)
        except Exception as error:  # noqa: BLE001 - any failure falls back to pure Python
            if mode == "on":
                raise
            log(f"building lpo_kernels._cuda failed; installing without the CUDA backend.\n{error}")
            return
        log(f"built lpo_kernels._cuda with {nvcc} in {time.time() - start:.1f} s")

    def build_with_nvcc(self, ext, nvcc: str) -> None:
        import pybind11

        archs = [a.strip() for a in os.environ.get("LPO_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS).split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        build_dir = Path(self.build_temp) / "lpo_cuda"
        build_dir.mkdir(parents=True, exist_ok=True)
        common = [nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-I{CSRC}"]
        includes = [f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        jobs = []
        for name in SOURCES:
            obj = build_dir / (name + ".o")
            if name.endswith(".cu"):
                jobs.append(common + gencode + ["-c", str(CSRC / name), "-o", str(obj)])
            else:
                jobs.append(common + includes + ["-c", str(CSRC / name), "-o", str(obj)])
        with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
            list(pool.map(run, jobs))
        output = Path(self.get_ext_fullpath(ext.name))
        output.parent.mkdir(parents=True, exist_ok=True)
        objects = [str(build_dir / (name + ".o")) for name in SOURCES]
        run([nvcc, "-shared", "--cudart=static", *gencode, *objects, "-o", str(output)])


ext_modules = []
if cuda_mode() != "off":
    ext_modules.append(Extension("lpo_kernels._cuda", sources=[f"csrc/{name}" for name in SOURCES]))
else:
    log("LPO_KERNELS_CUDA=0: installing without the CUDA backend (lpo_kernels._cuda)")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildCudaExtension})
