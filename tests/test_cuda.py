"""The CUDA C++ backend (csrc/, lpo_kernels/cuda.py, setup.py).

CPU (CI: nvcc present, no GPU): the extension is built at install and imports; a launch
without a driver raises a Python error carrying CUDA's message; the wrappers reject CPU
tensors and bad dtypes/shapes/strides with ValueError/TypeError naming the argument; the
setup.py fallbacks (LPO_KERNELS_CUDA=0, a failing nvcc) give a working pure-Python package;
and a subset of the GPU tests runs the real wrapper on the kernels compiled for the CPU
(csrc/emulate: one std::thread per CUDA thread), so the kernels' logic is checked in CI.
GPU (``@pytest.mark.gpu``): parity of the listwise step and of the loss head's row kernels
with reference.py (fp64) and with the Triton backend, all options, fp32/bf16/fp16, every
output poisoned with NaN before the kernels write it."""

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lpo_kernels import cuda as cuda_backend
from lpo_kernels import lpo_loss
from lpo_kernels.inputs import InputDTypeError
from lpo_kernels.stats import LPOStats
from tests.utils import assert_close, call_lpo, make_listwise_case

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
STAT_FIELDS = list(LPOStats.__dataclass_fields__)
HALF = (torch.bfloat16, torch.float16)


# =========================================================================== CPU
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"),
                    reason="no nvcc: the install skips the extension")
def test_extension_is_built_and_imports():
    assert cuda_backend.cuda_extension_available(), (
        "lpo_kernels._cuda missing although nvcc is present: reinstall with "
        "LPO_KERNELS_CUDA=1 pip install --no-build-isolation -e . -v to see the build error")
    from lpo_kernels import _cuda

    for name in ("sequence_sums", "group_step", "token_grad", "logits_row_stats", "logits_grad_inplace"):
        assert callable(getattr(_cuda, name)), name


@pytest.mark.skipif(HAS_CUDA, reason="checks the error path of a machine without a usable driver")
def test_launch_without_driver_raises_cuda_message():
    if not cuda_backend.cuda_extension_available():
        pytest.skip("extension not built")
    from lpo_kernels import _cuda

    # Null pointers are never dereferenced: the launch itself fails without a driver.
    with pytest.raises(RuntimeError, match=r"logits_row_stats failed: CUDA error \d+: .+"):
        _cuda.logits_row_stats(0, 0, 1, 8, 8, 0, 1.0, 0, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"group_step failed: CUDA error"):
        _cuda.group_step(0, 0, 0, 0, 0, 2, 1, 0, 0, 0.5, 1.0, 1e-6, True, 0, 0, 0, 0, 0, 0, 0, 0)


def test_listwise_rejects_cpu_tensors():
    case = make_listwise_case(seed=3)
    with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors: logp is on cpu"):
        call_lpo(case, backend="cuda")


def test_listwise_rejects_float64_before_the_device():
    case = make_listwise_case(seed=3, dtype=torch.float64)
    with pytest.raises(InputDTypeError, match=r"logp must be float32, bfloat16 or float16"):
        call_lpo(case, backend="cuda")


def _rows(m=3, v=50, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(m, v, generator=g).to(dtype)
    targets = torch.randint(0, v, (m,), generator=g)
    return logits, targets


def test_row_kernels_reject_cpu_tensors():
    logits, targets = _rows()
    with pytest.raises(ValueError, match=r"needs CUDA tensors: logits is on cpu"):
        cuda_backend.logits_row_stats_cuda(logits, targets, 1.0, True)
    lse = torch.rand(3)
    with pytest.raises(ValueError, match=r"needs CUDA tensors: logits is on cpu"):
        cuda_backend.logits_grad_inplace_cuda(logits, targets, lse, torch.rand(3), 1.0)


@pytest.mark.parametrize("bad, error, pattern", [
    (lambda l, t: (l.double(), t), InputDTypeError, r"logits must be float32, bfloat16 or float16"),
    (lambda l, t: (l.int(), t), InputDTypeError, r"logits must be float32"),
    (lambda l, t: (l[None], t), ValueError, r"logits must be 2-D"),
    (lambda l, t: (l.t(), t[:1].expand(50).clone()), ValueError, r"unit column stride"),
    (lambda l, t: (l[:, ::2], t), ValueError, r"unit column stride"),
    (lambda l, t: (l, t.int()), InputDTypeError, r"targets must be int64"),
    (lambda l, t: (l, t[:2]), ValueError, r"targets must be \[3\]"),
    (lambda l, t: (l.numpy(), t), InputDTypeError, r"logits must be a torch.Tensor"),
])
def test_row_stats_validation(bad, error, pattern):
    logits, targets = bad(*_rows())
    with pytest.raises(error, match=pattern):
        cuda_backend.logits_row_stats_cuda(logits, targets, 1.0, False)


@pytest.mark.parametrize("inv_t, error", [(0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                                          (True, TypeError), (torch.tensor(1.0), TypeError)])
def test_row_stats_rejects_bad_inv_temperature(inv_t, error):
    logits, targets = _rows()
    with pytest.raises(error, match="inv_temperature"):
        cuda_backend.logits_row_stats_cuda(logits, targets, inv_t, False)


@pytest.mark.parametrize("name, value, error, pattern", [
    ("lse", torch.arange(3), InputDTypeError, r"lse must be a floating-point tensor"),
    ("lse", torch.rand(4), ValueError, r"lse must be \[3\]"),
    ("grad_logp", torch.ones(3, dtype=torch.bool), InputDTypeError, r"grad_logp must be a floating-point"),
    ("grad_logp", torch.rand(3, 1), ValueError, r"grad_logp must be \[3\]"),
])
def test_grad_inplace_validation(name, value, error, pattern):
    logits, targets = _rows()
    args = dict(lse=torch.rand(3), grad_logp=torch.rand(3))
    args[name] = value
    with pytest.raises(error, match=pattern):
        cuda_backend.logits_grad_inplace_cuda(logits, targets, args["lse"], args["grad_logp"], 1.0)


def test_missing_extension_gives_build_hint(monkeypatch):
    import lpo_kernels

    monkeypatch.setitem(sys.modules, "lpo_kernels._cuda", None)  # import now fails
    monkeypatch.delattr(lpo_kernels, "_cuda", raising=False)
    assert not cuda_backend.cuda_extension_available()
    with pytest.raises(RuntimeError, match=r"LPO_KERNELS_CUDA=1 pip install --no-build-isolation"):
        cuda_backend._extension()


# ---------------------------------------------------------------- the build (setup.py)
_PURE_PYTHON_CHECK = textwrap.dedent("""
    import sys, torch
    # Only the fresh build: drop an editable install's finder (it maps lpo_kernels.* to the tree).
    sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import lpo_kernels
    from lpo_kernels import cuda, lpo_loss
    assert lpo_kernels.__file__.startswith(sys.argv[1]), lpo_kernels.__file__
    assert not cuda.cuda_extension_available()
    logp = (-torch.rand(4, 5, dtype=torch.float64)).requires_grad_()
    loss, _ = lpo_loss(logp, logp.detach() + 0.1 * torch.randn(4, 5, dtype=torch.float64), None,
                       torch.tensor([0, 0, 1, 1]), torch.randn(4, dtype=torch.float64), backend="torch")
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    print("pure-python-ok")
""")


def _setup_py(tmp_path, env_update, *args):
    """Runs setup.py in a copy of the sources (so concurrent builds in the tree are not
    disturbed); returns (returncode, output, build_lib)."""
    src = tmp_path / "src"
    src.mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("csrc", "lpo_kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    build_lib = tmp_path / "lib"
    env = dict(os.environ, **env_update)
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build", "--build-lib", str(build_lib),
                           "--build-temp", str(tmp_path / "tmp"), *args],
                          cwd=src, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    return proc.returncode, proc.stdout, build_lib


def _import_from(build_lib):
    proc = subprocess.run([sys.executable, "-c", _PURE_PYTHON_CHECK, str(build_lib)],
                          cwd=build_lib, env=dict(os.environ, PYTHONPATH=str(build_lib)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0 and "pure-python-ok" in proc.stdout, proc.stdout


def test_build_without_cuda_is_pure_python(tmp_path):
    rc, out, build_lib = _setup_py(tmp_path, {"LPO_KERNELS_CUDA": "0"})
    assert rc == 0, out
    assert "LPO_KERNELS_CUDA=0: installing without the CUDA backend" in out
    assert not list(build_lib.rglob("_cuda*.so"))
    _import_from(build_lib)


def test_failed_nvcc_build_falls_back_unless_forced(tmp_path):
    fake = tmp_path / "nvcc"
    fake.write_text("#!/bin/sh\necho 'nvcc: simulated failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    rc, out, build_lib = _setup_py(tmp_path / "auto", {"NVCC": str(fake), "LPO_KERNELS_CUDA": ""})
    assert rc == 0, out
    assert "building lpo_kernels._cuda failed; installing without the CUDA backend" in out
    assert "simulated failure" in out
    assert not list(build_lib.rglob("_cuda*.so"))
    _import_from(build_lib)
    rc, out, _ = _setup_py(tmp_path / "forced", {"NVCC": str(fake), "LPO_KERNELS_CUDA": "1"})
    assert rc != 0 and "simulated failure" in out


# ---------------------------------------------------------------- kernels on the emulator
@pytest.fixture(scope="module")
def emulated_module():
    sys.path.insert(0, str(ROOT / "csrc"))
    try:
        from emulate import build as emulate_build
    finally:
        sys.path.remove(str(ROOT / "csrc"))
    if emulate_build.cuda_include() is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("needs g++ and the CUDA headers")
    cache = Path(os.environ.get("LPO_EMULATE_DIR", ROOT / "build" / "cuda-emulated"))
    return emulate_build.load(cache)


def route_cuda_backend_to_emulator(monkeypatch, module):
    """lpo_kernels.cuda as is, but launching ``module``'s CPU-compiled kernels on CPU tensors."""
    def type_check_only(name, x, device=None):
        if not isinstance(x, torch.Tensor):
            raise InputDTypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")

    monkeypatch.setattr(cuda_backend, "_extension", lambda: module)
    monkeypatch.setattr(cuda_backend, "_check_cuda", type_check_only)
    monkeypatch.setattr(cuda_backend, "_stream", lambda device: 0)
    monkeypatch.setattr(cuda_backend.torch.cuda, "device", lambda device: contextlib.nullcontext())


@pytest.fixture
def on_emulator(emulated_module, monkeypatch):
    """This module's tests on the emulator, CPU tensors, outputs poisoned."""
    route_cuda_backend_to_emulator(monkeypatch, emulated_module)
    monkeypatch.setattr(sys.modules[__name__], "DEVICE", "cpu")
    monkeypatch.setattr(sys.modules[__name__], "_triton_listwise_available", lambda: False)
    monkeypatch.setattr(sys.modules[__name__], "_compare_with_triton", lambda *args: False)
    monkeypatch.setenv("LPO_KERNELS_POISON", "1")


# Each option set once, layouts and dtypes rotating, short responses (threads are costly).
EMULATED_CASES = [(i, i % 4, (torch.float32, torch.bfloat16, torch.float16)[i % 3]) for i in range(8)]


@pytest.mark.parametrize("options_index, layout, dtype", EMULATED_CASES)
def test_emulated_listwise_parity(on_emulator, monkeypatch, options_index, layout, dtype):
    monkeypatch.setattr(sys.modules[__name__], "_options_case",
                        lambda options, layout_kw, seed, dtype: _options_case_short(options, layout_kw, seed, dtype))
    test_listwise_parity_with_reference(None, options_index, layout, dtype)


def test_emulated_listwise_degenerate_and_variants(on_emulator):
    test_listwise_degenerate_cases(None)
    test_listwise_input_variants(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_emulated_row_kernels(on_emulator, dtype):
    for shape, layout in (((5, 1003), "contiguous"), ((3, 1003), "padded"), ((2, 515), "unaligned")):
        test_row_stats_parity(None, shape, layout, dtype)
        test_grad_inplace_parity(shape, layout, dtype)


# =========================================================================== GPU
gpu = pytest.mark.gpu
DEVICE = "cuda"  # of the GPU tests


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer of lpo_kernels.cuda starts as NaN."""
    monkeypatch.setenv("LPO_KERNELS_POISON", "1")


def _triton_listwise_available():
    try:
        from lpo_kernels.ops import listwise  # noqa: F401
    except ImportError:
        return False
    return True


def _to(case, device, dtype):
    """The case on ``device`` with log-probs stored in ``dtype`` (rewards stay fp32/fp64)."""
    out = {}
    for key, value in case.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if key in ("logp", "old_logp"):
                value = value.to(dtype)
            value = value.to(device)
            if key == "logp":
                value.requires_grad_()
        out[key] = value
    return out


def _fp64(case):
    """The same stored values, promoted to fp64 on the CPU: the exact reference input."""
    out = {}
    for key, value in case.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.double()
            if key == "logp":
                value.requires_grad_()
        out[key] = value
    return out


def _call(case, backend, **options):
    """tests.utils.call_lpo with one grad_output for every dtype: drawn in fp64, then cast
    (a per-group grad_output drawn in fp32 and in fp64 from one seed differ)."""
    case = dict(case)
    logp = case.pop("logp").detach().clone().requires_grad_()
    old, mask, ids = case.pop("old_logp"), case.pop("mask"), case.pop("group_ids")
    loss, stats = lpo_loss(logp, old, mask, ids, **case, backend=backend, **options)
    grad_out = torch.randn(loss.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (loss * grad_out.to(loss.dtype).to(loss.device)).sum().backward()
    return loss.detach(), stats, logp.grad


def _compare(got, want, tol, what):
    loss, stats, grad = got
    ref_loss, ref_stats, ref_grad = want
    assert loss.shape == ref_loss.shape, what
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all(), what
    assert_close(loss, ref_loss, atol=tol, rtol=tol, name=f"{what} loss")
    assert_close(grad, ref_grad, atol=tol * 0.1, rtol=tol, name=f"{what} grad")
    for name in STAT_FIELDS:
        a, b = getattr(stats, name), getattr(ref_stats, name)
        assert a.dim() == 0 and not a.requires_grad, name
        assert a.dtype.is_floating_point == b.dtype.is_floating_point, name
        assert_close(a, b, atol=tol, rtol=tol, name=f"{what} {name}")


OPTION_SETS = [
    dict(),
    dict(target="dr_grpo", divergence="reverse_kl", clip="ppo", reduction="sum"),
    dict(target="rloo", divergence="alpha", alpha=0.3, seq_reduce="sum", clip="none"),
    dict(target="maxrl", divergence="js", clip="ppo", clip_eps_low=0.1, clip_eps_high=0.3, reduction="none"),
    dict(target="softmax", tau=0.7, seq_reduce="sum", reduction="none"),
    dict(target="advantages", divergence="reverse_kl", eps=0.0, clip_eps_low=1.0),
    dict(target="grpo", divergence="alpha", alpha=0.8, clip="ppo", reduction="sum"),
    dict(target="grpo", divergence="js", clip="clamp", clip_eps_high=0.05),
]
LAYOUTS = [
    dict(),                                                   # padded, consecutive ids
    dict(packed=True, shuffle=True, sparse_ids=True),         # packed, general ids
    dict(group_sizes=[1, 5, 3, 40], empty_prob=0.3, shuffle=True),  # uneven K > 32, empties
    dict(packed=True, empty_prob=0.2),
]


def _options_case_short(options, layout, seed, dtype):
    """_options_case with responses of at most 9 tokens (the emulator's threads are costly)."""
    extra = dict(binary_rewards=True) if options.get("target") == "maxrl" else {}
    case = make_listwise_case(n_groups=5, max_len=9, seed=seed, dtype=torch.float64,
                              target=options.get("target", "grpo"), score_scale=0.3, **layout, **extra)
    return _to(case, DEVICE, dtype)


def _options_case(options, layout, seed, dtype):
    """A random case for these options; odd seeds give long responses (up to 300 tokens)."""
    extra = dict(binary_rewards=True) if options.get("target") == "maxrl" else {}
    case = make_listwise_case(n_groups=5, max_len=300 if seed % 2 else 9, seed=seed, dtype=torch.float64,
                              target=options.get("target", "grpo"), score_scale=0.3, **layout, **extra)
    return _to(case, DEVICE, dtype)


# Every option set x every layout in fp32; each option set once more in bf16 and in fp16
# on rotating layouts (bf16 also against Triton: each Triton specialisation compiles once).
PARITY_CASES = ([(i, j, torch.float32) for i in range(len(OPTION_SETS)) for j in range(len(LAYOUTS))]
                + [(i, i % len(LAYOUTS), torch.bfloat16) for i in range(len(OPTION_SETS))]
                + [(i, (i + 2) % len(LAYOUTS), torch.float16) for i in range(len(OPTION_SETS))])


@gpu
@pytest.mark.parametrize("options_index, layout, dtype", PARITY_CASES)
def test_listwise_parity_with_reference(poison, options_index, layout, dtype):
    options, layout_kw = OPTION_SETS[options_index], LAYOUTS[layout]
    case = _options_case(options, layout_kw, seed=7 * options_index + layout, dtype=dtype)
    got = _call(case, "cuda", **options)
    want = _call(_fp64(case), "torch", **options)
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 3e-3
    _compare(got, want, tol, f"cuda vs fp64 reference {options} {layout_kw}")
    if dtype == torch.bfloat16 and _triton_listwise_available():
        _compare(got, _call(case, "triton", **options), tol, "cuda vs triton")


@gpu
@pytest.mark.parametrize("options", [dict(), dict(divergence="reverse_kl", reduction="none", clip="ppo")])
def test_listwise_group_size_fast_path(poison, options):
    case = _to(make_listwise_case(n_groups=64, group_sizes=[8] * 64, max_len=64, empty_prob=0.1, seed=11,
                                  dtype=torch.float64), DEVICE, torch.bfloat16)
    fast = dict(case, group_ids=None)
    got = _call(fast, "cuda", group_size=8, **options)
    want = _call(_fp64(case), "torch", **options)
    _compare(got, want, 3e-3, "group_size fast path")
    _compare(got, _call(case, "cuda", **options), 1e-6, "group_size vs ids")


@gpu
def test_listwise_degenerate_cases(poison):
    # Every response empty: loss 0, zero gradient, no NaN.
    case = _to(make_listwise_case(seed=1, empty_prob=1.0, dtype=torch.float64), DEVICE, torch.float32)
    loss, stats, grad = _call(case, "cuda")
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0 and int(stats.n_groups) == 0
    # Singleton groups: D = 0, c = 0, but they count in G.
    case = _to(make_listwise_case(group_sizes=[1, 1, 1], seed=2, dtype=torch.float64), DEVICE, torch.float32)
    loss, stats, grad = _call(case, "cuda")
    assert float(loss) == 0.0 and torch.count_nonzero(grad) == 0 and int(stats.n_groups) == 3
    # Scores of hundreds of nats and constant rewards stay finite and match fp64.
    for kw in (dict(score_scale=300.0), dict(score_scale=50.0, binary_rewards=True)):
        case = make_listwise_case(seed=4, max_len=5, dtype=torch.float64, **kw)
        if "binary_rewards" in kw:
            case["rewards"][:4] = 1.0  # one group with all-equal rewards: uniform target
        for divergence in ("forward_kl", "reverse_kl", "alpha", "js"):
            got = _call(_to(case, DEVICE, torch.float32), "cuda", divergence=divergence, clip="none")
            want = _call(_fp64(_to(case, DEVICE, torch.float32)), backend="torch", divergence=divergence,
                            clip="none")
            _compare(got, want, 3e-4, f"large scores {divergence}")


@gpu
def test_listwise_input_variants(poison):
    """On-policy (old_logp=None), weighted float and integer masks, mixed storage dtypes:
    each matches the fp64 reference on the same stored values."""
    base = _to(make_listwise_case(seed=9, max_len=40, empty_prob=0.2, dtype=torch.float64), DEVICE,
               torch.bfloat16)
    weights = torch.rand(base["mask"].shape, device=DEVICE) * base["mask"]
    variants = {
        "on-policy": dict(base, old_logp=None),
        "float mask": dict(base, mask=weights),
        "int mask": dict(base, mask=base["mask"].long()),
        "fp32 old_logp": dict(base, old_logp=base["old_logp"].float() + 1e-3),
    }
    for name, case in variants.items():
        for options in (dict(), dict(divergence="js", clip="ppo", reduction="none")):
            got = _call(case, "cuda", **options)
            want = _call(_fp64(case), "torch", **options)
            _compare(got, want, 3e-3, name)


@gpu
def test_listwise_matches_same_dtype_torch_error(poison):
    """CCE pattern: the kernel's error against fp64 is no worse than plain PyTorch's in the
    same storage dtype (fp32 math), plus slack."""
    case64 = make_listwise_case(n_groups=32, max_len=512, seed=5, dtype=torch.float64, packed=True)
    for dtype in (torch.float32, torch.bfloat16):
        case = _to(case64, DEVICE, dtype)
        ref = _call(_fp64(case), "torch")
        for name, got in (("cuda", _call(case, "cuda")), ("torch", _call(case, "torch"))):
            err = (got[2].double().cpu() - ref[2]).abs().max().item()
            if name == "cuda":
                cuda_err = err
            else:
                assert cuda_err <= 4 * err + 1e-7, (dtype, cuda_err, err)


# ---------------------------------------------------------------- loss head rows
def _row_reference(logits, targets, inv_t):
    z = logits.double() * inv_t
    lse = torch.logsumexp(z, -1)
    inside = (targets >= 0) & (targets < z.shape[1])
    picked = z.gather(1, targets.clamp(0, z.shape[1] - 1)[:, None])[:, 0]
    logp = torch.where(inside, picked - lse, torch.zeros_like(lse))
    p = torch.softmax(z, -1)
    entropy = lse - (p * z).sum(-1)
    return lse, logp, entropy, p, inside


def _row_case(m, v, dtype, seed, layout):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    # padded: 16-byte aligned rows wider than V (vector loads + scalar tail when V % 8);
    # unaligned: a view one element in (scalar path).
    width = {"padded": (v + 7) // 8 * 8 + 8, "unaligned": v + 1, "contiguous": v}[layout]
    buf = (torch.randn(m, width, device=DEVICE, generator=g) * 3).to(dtype)
    logits = buf[:, 1:] if layout == "unaligned" else buf[:, :v]
    targets = torch.randint(0, v, (m,), device=DEVICE, generator=g)
    targets[::5] = -100  # ignored tokens
    if m > 3:
        targets[3] = v       # out of range at the top
    return logits, targets


ROW_SHAPES = [(7, 1003), (5, 4099), (33, 32000), (3, 151936)]


def _compare_with_triton(shape, layout, dtype):
    """A few Triton comparisons (each new vocab/dtype compiles a Triton kernel)."""
    return layout == "contiguous" and dtype == torch.bfloat16 and shape[1] in (4099, 151936)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "unaligned"])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_row_stats_parity(poison, shape, layout, dtype):
    logits, targets = _row_case(*shape, dtype, seed=shape[1], layout=layout)
    inv_t = 1 / 0.7
    lse, logp, entropy = cuda_backend.logits_row_stats_cuda(logits, targets, inv_t, True)
    ref_lse, ref_logp, ref_entropy, _, _ = _row_reference(logits, targets, inv_t)
    for got, want, name in ((lse, ref_lse, "lse"), (logp, ref_logp, "logp"), (entropy, ref_entropy, "entropy")):
        assert got.dtype == torch.float32 and got.shape == (shape[0],)
        assert_close(got, want, atol=2e-4, rtol=2e-5, name=name)
    lse2, logp2, none = cuda_backend.logits_row_stats_cuda(logits, targets, inv_t, False)
    assert none is None
    assert_close(lse2, lse, atol=1e-6, rtol=1e-6, name="lse without entropy")
    assert_close(logp2, logp, atol=1e-6, rtol=1e-6, name="logp without entropy")
    if not _compare_with_triton(shape, layout, dtype):
        return
    try:
        from lpo_kernels.ops.loss_head import logits_row_stats_triton
    except ImportError:
        return
    t_lse, t_logp, t_entropy = logits_row_stats_triton(logits, targets, inv_t, True)
    for got, want, name in ((lse, t_lse, "lse"), (logp, t_logp, "logp"), (entropy, t_entropy, "entropy")):
        assert_close(got, want, atol=2e-4, rtol=2e-5, name=f"{name} vs triton")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "padded", "unaligned"])
@pytest.mark.parametrize("shape", ROW_SHAPES)
def test_grad_inplace_parity(shape, layout, dtype):
    logits, targets = _row_case(*shape, dtype, seed=shape[1] + 1, layout=layout)
    inv_t = 1 / 0.7
    ref_lse, _, _, p, inside = _row_reference(logits, targets, inv_t)
    grad_logp = torch.randn(shape[0], device=DEVICE)
    grad_logp[1::4] = 0.0  # masked tokens
    onehot = torch.zeros_like(p)
    onehot[inside] = onehot[inside].scatter(1, targets[inside][:, None], 1.0)
    want = (grad_logp.double()[:, None] * (onehot - p) * inv_t).to(dtype)
    work = logits.clone() if layout == "contiguous" else logits  # views: written in place
    if layout != "contiguous":
        guard = work._base.clone()
    cuda_backend.logits_grad_inplace_cuda(work, targets, ref_lse.float(), grad_logp, inv_t)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    assert_close(work, want, atol=1e-6 * inv_t, rtol=ulp, name="grad")
    assert torch.count_nonzero(work[1::4]) == 0
    if layout != "contiguous":  # bytes outside the [M, V] view are untouched
        base = work._base
        outside = torch.ones_like(base, dtype=torch.bool)
        if layout == "unaligned":
            outside[:, 1:] = False
        else:
            outside[:, :shape[1]] = False
        assert torch.equal(base[outside], guard[outside])
    try:
        from lpo_kernels.ops.loss_head import logits_grad_inplace_triton
    except ImportError:
        return
    if _compare_with_triton(shape, layout, dtype):  # logits is intact (the kernel wrote a clone)
        other = logits.clone()
        logits_grad_inplace_triton(other, targets, ref_lse.float(), grad_logp, inv_t)
        assert_close(work, other, atol=1e-6 * inv_t, rtol=ulp, name="grad vs triton")


@gpu
def test_row_kernels_use_the_current_stream(poison):
    logits, targets = _row_case(16, 4099, torch.bfloat16, seed=3, layout="contiguous")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        lse, logp, _ = cuda_backend.logits_row_stats_cuda(logits, targets, 1.0, False)
    torch.cuda.current_stream().wait_stream(side)
    assert_close(lse, _row_reference(logits, targets, 1.0)[0], atol=2e-4, rtol=2e-5, name="lse")
