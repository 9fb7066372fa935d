"""Builds ``_cuda_emulated``: the csrc/ kernels compiled for the CPU through shim.h (one
std::thread per CUDA thread), with the same pybind11 bindings as ``lpo_kernels._cuda``.

Only needs g++ (C++20), pybind11 and the CUDA headers (no driver, no GPU, no nvcc run).
Each ``kernel<<<grid, block, smem, stream>>>(args)`` in a copy of the .cu sources becomes
``emulate_launch(grid, block, smem, stream, kernel, args)``. Used by tests/test_cuda.py to
check the kernels' logic in CI; ``python csrc/emulate/build.py OUT_DIR`` builds it by hand.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

CSRC = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
KERNELS = ("listwise.cu", "loss_head.cu")
HEADERS = ("common.cuh", "lpo_cuda.h")
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<(.*?)>>>\(", re.S)
ERRORS_STUB = ('#include "lpo_cuda.h"\nnamespace lpo {\n'
               'const char* error_string(int) { return "emulated CUDA error"; }\n}\n')


def cuda_include() -> Path | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for root in filter(None, candidates):
        include = Path(root) / "include"
        if (include / "cuda_bf16.h").is_file() and (include / "cuda_runtime.h").is_file():
            return include
    return None


def sources_digest() -> str:
    h = hashlib.sha256()
    for path in sorted([*(CSRC / n for n in (*KERNELS, *HEADERS, "bindings.cpp")), HERE / "shim.h", Path(__file__)]):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def build(out_dir: Path) -> Path:
    """Compiles (or reuses, keyed by the sources' hash) the module; returns its path."""
    include = cuda_include()
    if include is None:
        raise RuntimeError("CUDA headers (cuda_bf16.h) not found: set CUDA_HOME")
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"C++ compiler {compiler!r} not found")
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    work = Path(out_dir) / f"emulated-{sources_digest()}"
    module = work / f"_cuda_emulated{suffix}"
    if module.is_file():
        return module
    work.mkdir(parents=True, exist_ok=True)
    for name in HEADERS:
        shutil.copy2(CSRC / name, work / name)
    shutil.copy2(HERE / "shim.h", work / "shim.h")
    for name in KERNELS:
        text = (CSRC / name).read_text()
        text = text.replace('#include "common.cuh"', '#include "shim.h"\n#include "common.cuh"')
        (work / name.replace(".cu", ".cpp")).write_text(LAUNCH.sub(r"emulate_launch(\2, \1, ", text))
    (work / "errors.cpp").write_text(ERRORS_STUB)
    bindings = (CSRC / "bindings.cpp").read_text().replace("PYBIND11_MODULE(_cuda,", "PYBIND11_MODULE(_cuda_emulated,")
    (work / "bindings.cpp").write_text(bindings)
    tmp = module.with_suffix(".tmp")
    cmd = [compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f"-I{work}", f"-I{include}",
           f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}",
           *(str(work / n) for n in ("bindings.cpp", "listwise.cpp", "loss_head.cpp", "errors.cpp")),
           "-o", str(tmp)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"emulated build failed:\n{' '.join(cmd)}\n{proc.stdout[-4000:]}")
    tmp.replace(module)  # atomic: concurrent builders never import a half-written file
    return module


def load(out_dir: Path):
    """Builds if needed and imports the emulated module."""
    import importlib.util

    path = build(out_dir)
    spec = importlib.util.spec_from_file_location("_cuda_emulated", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    print(build(Path(sys.argv[1] if len(sys.argv) > 1 else "build")))
