"""Host time of one listwise call (``lpo_loss(backend="triton")``) with the Triton launches
stubbed: what the Python wrapper costs per call (argument checks, tensor ops, launch
parameters), without the launches themselves (a GPU's launch overhead comes on top).

    python -m benchmarks.host_time                 # prints a table, median of many calls
    python -m benchmarks.host_time --json out.json

Runs on the CPU (no GPU needed). Tensors are on the ``meta`` device by default, so the
torch ops cost their dispatch only, as asynchronous CUDA ops do (``--device cpu``: real CPU
tensors, whose ops also compute). Every ``@triton.jit`` kernel object in
``lpo_kernels/ops/listwise.py`` gets a no-op ``run`` that counts the launches.
``validate=False`` as on CUDA (the value checks synchronise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

CASES = {  # name: (groups, group size, tokens per sequence, group_size given)
    "4096x8x32 group_size": (4096, 8, 32, True),
    "4096x8x32 group_ids": (4096, 8, 32, False),
    "8x8x32 group_size": (8, 8, 32, True),
    "8x8x32 group_ids": (8, 8, 32, False),
}


@contextlib.contextmanager
def stubbed_launches():
    """Replace each Triton kernel's ``run`` in ops/listwise.py by a counting no-op."""
    from lpo_kernels.ops import listwise

    launches = []
    kernels = [obj for obj in vars(listwise).values() if hasattr(obj, "run") and hasattr(obj, "fn")]
    for k in kernels:
        k.run = (lambda name: lambda *a, **kw: launches.append(name))(k.fn.__name__)
    try:
        yield launches
    finally:
        for k in kernels:
            del k.run


def inputs(n_groups, k, t, device):
    g = torch.Generator().manual_seed(0)
    b = n_groups * k
    logp = -3.0 * torch.rand(b, t, generator=g)
    old = logp + 0.1 * torch.randn(b, t, generator=g)
    mask = torch.arange(t)[None, :] < torch.randint(t // 2, t + 1, (b, 1), generator=g)
    tensors = (logp, old, mask, torch.arange(b) // k, torch.randn(b, generator=g))
    logp, *rest = (x.to(device) for x in tensors)
    return (logp.requires_grad_(), *rest)


def measure(case, device="meta", calls=400, backward=False):
    """Median host µs per call (and the launches of one call)."""
    from lpo_kernels import lpo_loss

    n_groups, k, t, with_size = CASES[case]
    logp, old, mask, ids, rewards = inputs(n_groups, k, t, device)
    kw = dict(group_size=k) if with_size else {}

    def call():
        loss, stats = lpo_loss(logp, old, mask, None if with_size else ids, rewards,
                               backend="triton", validate=False, **kw)
        if backward:  # on meta/CPU tensors the backward is plain torch (no Triton launch)
            torch.autograd.grad(loss, [logp])
        return loss

    with stubbed_launches() as launches:
        for _ in range(20):
            call()
        launches.clear()
        call()
        per_call = list(launches)
        times = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            call()
            times.append(time.perf_counter_ns() - t0)
    return statistics.median(times) / 1e3, per_call


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="meta", choices=("meta", "cpu"))
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--json", default=None)
    parser.add_argument("--backward", action="store_true",
                        help="also time forward + backward (use --device cpu: on meta tensors the "
                             "backward's elementwise ops run Python meta kernels, not representative)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for case in CASES:
        us, launches = measure(case, args.device, args.calls)
        row = dict(case=case, device=args.device, host_us_median=round(us, 1),
                   launches=len(launches), kernels=launches)
        extra = ""
        if args.backward:
            us_bwd, _ = measure(case, args.device, args.calls, backward=True)
            row["host_us_median_with_backward"] = round(us_bwd, 1)
            extra = f", {us_bwd:8.1f} with backward"
        rows.append(row)
        print(f"{case:24s} {args.device}: {us:8.1f} us/call forward{extra} (median of {args.calls}), "
              f"{len(launches)} forward launches: {', '.join(launches)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
