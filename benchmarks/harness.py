"""Timing, peak-memory and result rows: the measuring half of the benchmark.

Times are CUDA-event times per call (host clock on CPU), after warm-up; we report the
median and the min. Peak extra memory = ``max_memory_allocated`` during one call minus
the allocation before it (so the gradients a call returns count, the inputs do not).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import gc
import os
import platform
import signal
import statistics
import subprocess
import time

import torch

from .schema import COLUMNS, CPU_WARNING, read_csv  # noqa: F401 (re-exported)

class Skip(Exception):
    """A method that cannot run here (not installed, needs CUDA, ...): a 'skipped' row."""


class CaseTimeout(Exception):
    pass


class ContextLost(Exception):
    """The CUDA context is unusable (illegal address, device-side assert): every later
    call would fail. The run stops; gpu_check.sh resumes it without the method."""


def cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        return torch.ones(1, device="cuda").add_(1).item() == 2.0
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return False


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except Exception:
        return ""
    version = getattr(module, "__version__", "")
    if not version:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(module_name.replace("_", "-"))
        except Exception:
            version = "installed"
    return str(version)


def _git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                             capture_output=True, text=True, timeout=5)
        commit = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if commit and dirty else "")
    except Exception:
        return ""


def environment(device: torch.device) -> dict:
    """The run's metadata, repeated on every row so a row read alone is self-describing."""
    if device.type == "cuda":
        gpu_name = torch.cuda.get_device_name(device)
    else:
        gpu_name = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": device.type,
        "gpu_name": gpu_name,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "lpo_kernels": _version("lpo_kernels"),
        "liger_kernel": _version("liger_kernel"),
        "cut_cross_entropy": _version("cut_cross_entropy"),
        "git_commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Return freed blocks to the driver between cases (CUDA only: gc.collect costs ~0.1 s
    a call, which tiny CPU cases would pay ~100 times)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _timed_once(fn, device: torch.device) -> float:
    """Milliseconds of one call; its outputs are dropped before returning."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        del out
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = fn()
    elapsed = (time.perf_counter() - t0) * 1e3
    del out
    return elapsed


def time_call(fn, device: torch.device, *, warmup: int = 1, min_reps: int = 3,
              max_reps: int = 50, target_ms: float = 300.0):
    """(median_ms, min_ms, reps): warm-up calls (compilation, autotuning) untimed, then
    as many timed calls as fit ``target_ms`` within [min_reps, max_reps]."""
    for _ in range(warmup):
        out = fn()
        del out
    synchronize(device)
    first = _timed_once(fn, device)
    reps = int(min(max_reps, max(min_reps, target_ms / max(first, 1e-3))))
    times = [first] + [_timed_once(fn, device) for _ in range(reps - 1)]
    return statistics.median(times), min(times), len(times)


def peak_extra_gib(fn, device: torch.device):
    """(GiB, outputs) of one more call: its peak memory above what was allocated before
    it (None on CPU), and what it returned (for the parity check)."""
    free_memory(device)
    if device.type != "cuda":
        return None, fn()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30, out


def relative_error(outputs, reference) -> float | None:
    """max over paired tensors of ||out - ref|| / ||ref|| (fp64), None if they don't pair."""
    outputs, reference = tuple(outputs), tuple(reference)
    if len(outputs) != len(reference):
        return None
    worst = 0.0
    for a, b in zip(outputs, reference):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
            return None
        a, b = a.detach().double(), b.detach().double()
        if not bool(torch.isfinite(a).all()):
            return float("inf")
        worst = max(worst, float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)))
    return worst


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise CaseTimeout in the main thread after ``seconds`` (SIGALRM; no-op elsewhere).
    Interrupts Python-side work such as torch.compile; a running kernel finishes first."""
    usable = (seconds and hasattr(signal, "setitimer")
              and signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None))
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"case exceeded its {seconds:.0f} s limit")

    signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def short_error(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("\r", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CsvWriter:
    """Appends rows as they are measured (flushed), so a run killed half-way keeps them."""

    def __init__(self, path: str, append: bool = False):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        append = append and os.path.exists(path) and os.path.getsize(path) > 0
        self._file = open(path, "a" if append else "w", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=COLUMNS, extrasaction="ignore")
        if not append:
            self._writer.writeheader()
        self._file.flush()

    def write(self, row: dict) -> None:
        self._writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in COLUMNS})
        self._file.flush()

    def close(self) -> None:
        self._file.close()
