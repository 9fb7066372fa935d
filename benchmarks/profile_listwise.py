"""Where the listwise step's time goes on a GPU: per backend, the host time of one
forward+backward call and the device time of each kernel it launches (torch.profiler).

    python -m benchmarks.profile_listwise            # 4096x8x32 and 4096x8x512
"""

from __future__ import annotations

import sys
import time

import torch


def _inputs(n_groups, k, t, device):
    gen = torch.Generator(device=device).manual_seed(0)
    b = n_groups * k
    logp = (-3.0 * torch.rand(b, t, device=device, generator=gen)).requires_grad_()
    old = logp.detach() + 0.1 * torch.randn(b, t, device=device, generator=gen)
    lengths = torch.randint(t // 2, t + 1, (b,), device=device, generator=gen)
    mask = torch.arange(t, device=device)[None, :] < lengths[:, None]
    rewards = torch.randn(b, device=device, generator=gen)
    return logp, old, mask, torch.arange(b, device=device) // k, rewards


def main(argv=None) -> int:
    from torch.profiler import ProfilerActivity, profile

    from lpo_kernels import lpo_loss

    if not torch.cuda.is_available():
        print("profile_listwise: no CUDA device")
        return 0
    for shape in ((4096, 8, 32), (4096, 8, 512)):
        logp, old, mask, ids, rewards = _inputs(*shape, "cuda")
        for backend in ("torch", "triton", "cuda"):
            def step():
                loss, _ = lpo_loss(logp, old, mask, ids, rewards, group_size=shape[1],
                                   backend=backend, validate=False)
                return torch.autograd.grad(loss, [logp])
            try:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(20):
                    step()
                host_ms = (time.perf_counter() - t0) / 20 * 1e3  # launches queue: host-bound
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{shape} {backend}: {type(e).__name__}: {e}")
                continue
            kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
            total = sum(e.self_device_time_total for e in kernels)
            print(f"\n== {shape[0]}x{shape[1]}x{shape[2]} backend={backend}: host {host_ms:.3f} ms/call "
                  f"(20 calls, no sync), device {total / 1e3:.3f} ms in {sum(e.count for e in kernels)} kernels")
            for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]:
                print(f"   {e.self_device_time_total / 1e3:8.3f} ms  x{e.count:<3d} {e.key[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
