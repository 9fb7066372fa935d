"""End-to-end RLVR demo: train a tiny causal transformer with LPO and with GRPO.

    python -m lpo_kernels.demo                      # default run, a few minutes on 2 CPU cores
    python -m lpo_kernels.demo --device cuda --steps 400 --seeds 5
    python -m lpo_kernels.demo --study              # the learning study (lpo_kernels.study)

The task has a verifiable reward. A prompt names a target number t; the response is a
string of digits ended by EOS, and earns reward 1 when its digits sum to t (0 otherwise,
including for a malformed response). A short supervised warm-up teaches the *format* only
(random digit strings of random length), so the untrained policy is valid but rarely right.

Each RL step samples K responses per prompt from the current policy, recording the
sampling log-probs (``old_logp``), scores them, and trains on the loss computed from the
model's final hidden states and its LM-head weight with the library's fused loss head
(``lpo_kernels.fused_linear``: no [tokens x vocab] logits on the training path).
The same warmed-up model, the same prompts and the same matched target (GRPO's
group-normalised advantage, i.e. LPO ``target="grpo"``) are used for every method, so the
methods differ only in the loss. Everything is self-contained: plain ``torch.nn``, no
downloads. Results: a table on stdout, ``curves.png`` and ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# The one place that picks the loss head (hidden states + LM-head weight -> loss): the
# fused head (backend "auto": Triton on CUDA, its torch backend on CPU). The naive eager
# head, ``reference.naive_linear_{lpo_loss,grpo_loss,logprobs}``, is a drop-in swap.
from .fused_linear import fused_linear_grpo_loss as linear_grpo_loss
from .fused_linear import fused_linear_logprobs as linear_logprobs
from .fused_linear import fused_linear_lpo_loss as linear_lpo_loss
from . import study_stats

LOSS_HEAD = linear_lpo_loss.__module__

METHODS = {
    # name: (loss, options). LPO and GRPO share the target: GRPO's advantage (tau = sigma_G).
    "lpo_forward_kl": ("lpo", {"target": "grpo", "divergence": "forward_kl"}),
    "lpo_reverse_kl": ("lpo", {"target": "grpo", "divergence": "reverse_kl"}),
    "grpo": ("grpo", {"loss_type": "grpo"}),
    # TRL's default GRPOConfig.loss_type (TRL 1.16): token mean over the batch.
    "grpo_dapo": ("grpo", {"loss_type": "dapo"}),
}
DEMO_METHODS = ["lpo_forward_kl", "lpo_reverse_kl", "grpo"]  # the default run's three


def mask_through_first_eos(response: torch.Tensor, eos: int) -> torch.Tensor:
    """1 up to and including the first EOS (the tokens the policy chose), 0 after."""
    is_eos = (response == eos).long()
    return ((torch.cumsum(is_eos, dim=1) - is_eos) == 0).float()


def trailing_mean(curves: torch.Tensor, smooth: int) -> torch.Tensor:
    """Trailing moving average of each row of ``[runs, steps]`` curves (float64), the first
    steps padded by replication."""
    kernel = torch.ones(1, 1, smooth, dtype=torch.float64) / smooth
    padded = F.pad(curves.double()[:, None], (smooth - 1, 0), mode="replicate")
    return F.conv1d(padded, kernel)[:, 0]


# --------------------------------------------------------------------------- the task
@dataclass(frozen=True)
class DigitSumTask:
    """Prompt ``[BOS, <t>]``; response: 1..max_digits digits then EOS; reward 1 iff the
    digits sum to t. Token ids: digits 0..9, then EOS, BOS, then one token per target."""

    max_digits: int = 3
    max_target: int = 18

    digits = 10
    eos = 10
    bos = 11
    prompt_len = 2
    name = "digit sum"

    @property
    def vocab_size(self) -> int:
        return 12 + self.max_target + 1

    def sample_targets(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """``n`` training prompts (as target ids), uniform over the targets."""
        return torch.randint(0, self.max_target + 1, (n,), generator=generator, device=device)

    def eval_targets(self, device) -> torch.Tensor:
        """The evaluation prompts: every target once."""
        return torch.arange(self.max_target + 1, device=device)

    @property
    def response_len(self) -> int:  # digits + EOS
        return self.max_digits + 1

    def prompts(self, targets: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full_like(targets, self.bos), 12 + targets], dim=1)

    def response_mask(self, response: torch.Tensor) -> torch.Tensor:
        return mask_through_first_eos(response, self.eos)

    def rewards(self, targets: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
        mask = self.response_mask(response).bool()
        is_eos = response == self.eos
        ended = is_eos.any(dim=1)
        eos_pos = torch.where(ended, is_eos.float().argmax(dim=1), torch.full_like(targets, -1))
        positions = torch.arange(response.shape[1], device=response.device)
        digit_slot = positions[None, :] < eos_pos[:, None]
        well_formed = ended & (eos_pos >= 1) & ((response < self.digits) | ~digit_slot).all(dim=1)
        total = torch.where(digit_slot & mask, response, torch.zeros_like(response)).sum(dim=1)
        return (well_formed & (total == targets)).float()

    def format_examples(self, targets: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Random well-formed responses (uniform length, uniform digits), EOS-padded: the
        warm-up data. They teach the format, not the sum."""
        n, device = targets.shape[0], targets.device
        length = torch.randint(1, self.max_digits + 1, (n,), generator=generator, device=device)
        digits = torch.randint(0, self.digits, (n, self.response_len), generator=generator,
                               device=device)
        positions = torch.arange(self.response_len, device=device)
        return torch.where(positions[None, :] < length[:, None], digits,
                           torch.full_like(digits, self.eos))


# --------------------------------------------------------------------------- the model
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyCausalLM(nn.Module):
    """A GPT in miniature. ``hidden_states`` returns what a trainer hands the fused loss
    head: the final (normed) hidden states; ``lm_head.weight`` is the head's weight."""

    def __init__(self, vocab_size: int, max_len: int, dim: int = 64, layers: int = 2,
                 heads: int = 4):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab_size, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# --------------------------------------------------------------------------- rollouts
@dataclass
class Rollout:
    targets: torch.Tensor    # [B] one per response (groups are consecutive rows of K)
    sequences: torch.Tensor  # [B, P + L] prompt + response
    response: torch.Tensor   # [B, L]
    mask: torch.Tensor       # [B, L] tokens that count
    old_logp: torch.Tensor   # [B, L] sampling log-probs, recorded while sampling
    entropy: torch.Tensor    # [B, L] entropy of the sampling distribution at each token
    rewards: torch.Tensor    # [B]


@torch.no_grad()
def sample(model: TinyCausalLM, task: DigitSumTask, targets: torch.Tensor,
           generator: torch.Generator, temperature: float = 1.0) -> Rollout:
    """Sample one response per row of ``targets`` (ancestral sampling at ``temperature``,
    no KV cache: the model is tiny). After EOS the response is EOS-padded and masked."""
    seq = task.prompts(targets)
    prompt_len = seq.shape[1]
    weight = model.lm_head.weight
    logps, entropies = [], []
    done = torch.zeros(targets.shape[0], dtype=torch.bool, device=targets.device)
    for _ in range(task.response_len):
        hidden = model.hidden_states(seq)[:, -1]
        logits = model.lm_head(hidden).float() / temperature
        token = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
        token = torch.where(done, torch.full_like(token, task.eos), token)
        logp, entropy = linear_logprobs(hidden, weight, token, temperature=temperature,
                                        return_entropy=True)
        logps.append(logp)
        entropies.append(entropy)
        done = done | (token == task.eos)
        seq = torch.cat([seq, token[:, None]], dim=1)
    response = seq[:, prompt_len:]
    return Rollout(targets, seq, response, task.response_mask(response),
                   torch.stack(logps, 1), torch.stack(entropies, 1),
                   task.rewards(targets, response))


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's advantage: (R - mean_g R) / (std_g R + eps), Bessel-corrected std — the same
    statistics as LPO's ``target="grpo"`` (so both methods aim at the same target)."""
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(centered)
    return (centered / (std + eps)).reshape(-1)


def policy_loss(method: str, model: TinyCausalLM, rollout: Rollout, group_size: int,
                temperature: float):
    """The training loss from the final hidden states and the LM-head weight."""
    kind, options = METHODS[method]
    prompt_len = rollout.sequences.shape[1] - rollout.response.shape[1]
    # hidden state at position i predicts token i + 1: the response is predicted from the
    # last prompt position onwards.
    hidden = model.hidden_states(rollout.sequences[:, :-1])[:, prompt_len - 1:]
    weight = model.lm_head.weight
    if kind == "lpo":
        group_ids = torch.arange(rollout.rewards.shape[0], device=hidden.device) // group_size
        loss, stats = linear_lpo_loss(hidden, weight, rollout.response, rollout.mask, group_ids,
                                      rollout.rewards, temperature=temperature,
                                      old_logp=rollout.old_logp, group_size=group_size,
                                      **options)
    else:
        advantages = group_advantages(rollout.rewards, group_size)
        loss, stats = linear_grpo_loss(hidden, weight, rollout.response, rollout.mask,
                                       advantages, temperature=temperature,
                                       old_logp=rollout.old_logp, **options)
    return loss, stats


# --------------------------------------------------------------------------- training
@dataclass
class Config:
    steps: int = 150
    seeds: int = 3
    group_size: int = 8
    prompts_per_step: int = 16
    updates_per_batch: int = 2   # >1: later updates are off-policy (ratios, clipping matter)
    lr: float = 2e-3
    warmup_steps: int = 150
    warmup_lr: float = 3e-3
    temperature: float = 1.0
    max_digits: int = 3
    max_target: int = 18
    dim: int = 64
    layers: int = 2
    heads: int = 4
    eval_every: int = 20
    eval_samples: int = 16       # responses per target at evaluation (pass@k uses these)
    threshold: float = 0.5       # "steps to reach": moving-average train reward >= this
    smooth: int = 10             # moving-average window for the threshold
    methods: list = field(default_factory=lambda: list(DEMO_METHODS))
    device: str = "cpu"
    threads: int = 1             # CPU threads: the model is tiny, more threads only contend


def warmed_up_model(cfg: Config, task: DigitSumTask, seed: int) -> TinyCausalLM:
    """A fresh model, taught the response format by supervised learning on random
    well-formed digit strings (no information about the sum)."""
    torch.manual_seed(seed)
    device = torch.device(cfg.device)
    model = TinyCausalLM(task.vocab_size, task.prompt_len + task.response_len, cfg.dim, cfg.layers,
                         cfg.heads).to(device)
    generator = torch.Generator(device=device).manual_seed(10_000 + seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.warmup_lr)
    n = cfg.prompts_per_step * cfg.group_size
    for _ in range(cfg.warmup_steps):
        targets = task.sample_targets(n, generator, device)
        response = task.format_examples(targets, generator)
        seq = torch.cat([task.prompts(targets), response], dim=1)
        logits = model.lm_head(model.hidden_states(seq[:, :-1])[:, task.prompt_len - 1:])
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                     response.reshape(-1), reduction="none")
        mask = task.response_mask(response).reshape(-1)
        loss = (token_loss * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def pass_at_k(n: int, c: torch.Tensor, k: int) -> torch.Tensor:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021), per prompt."""
    k = min(k, n)
    fail = torch.ones_like(c, dtype=torch.float64)
    for i in range(k):  # prod_{i<k} (n - c - i) / (n - i)
        fail = fail * ((n - c - i).clamp(min=0).double() / (n - i))
    return 1.0 - fail


@torch.no_grad()
def evaluate(model, task: DigitSumTask, cfg: Config, generator) -> dict:
    """Every evaluation prompt, ``eval_samples`` responses each: mean reward, pass@K, entropy."""
    device = torch.device(cfg.device)
    targets = task.eval_targets(device).repeat_interleave(cfg.eval_samples)
    rollout = sample(model, task, targets, generator, cfg.temperature)
    correct = rollout.rewards.view(-1, cfg.eval_samples).sum(dim=1)
    return {
        "reward": float(rollout.rewards.mean()),
        f"pass@{cfg.group_size}": float(pass_at_k(cfg.eval_samples, correct, cfg.group_size).mean()),
        "entropy": float((rollout.entropy * rollout.mask).sum() / rollout.mask.sum()),
        "per_target_reward": (correct / cfg.eval_samples).tolist(),
    }


def train(method: str, initial: TinyCausalLM, task: DigitSumTask, cfg: Config, seed: int,
          progress=None) -> dict:
    """One RL run from a copy of ``initial``; per-step curves and evaluations."""
    device = torch.device(cfg.device)
    model = copy.deepcopy(initial)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    # Same seed -> same prompts and sampling noise for every method (matched comparison).
    generator = torch.Generator(device=device).manual_seed(seed)
    eval_generator = torch.Generator(device=device).manual_seed(20_000 + seed)
    curves = {"reward": [], "entropy": [], "loss": [], "clip_fraction": []}
    evals = [{"step": 0, **evaluate(model, task, cfg, eval_generator)}]
    for step in range(1, cfg.steps + 1):
        targets = task.sample_targets(cfg.prompts_per_step, generator, device)
        model.eval()
        rollout = sample(model, task, targets.repeat_interleave(cfg.group_size), generator,
                         cfg.temperature)
        model.train()
        for _ in range(cfg.updates_per_batch):
            loss, stats = policy_loss(method, model, rollout, cfg.group_size, cfg.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        curves["reward"].append(float(rollout.rewards.mean()))
        curves["entropy"].append(float((rollout.entropy * rollout.mask).sum() / rollout.mask.sum()))
        curves["loss"].append(float(loss.detach()))
        curves["clip_fraction"].append(float(stats.clip_fraction))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            evals.append({"step": step, **evaluate(model, task, cfg, eval_generator)})
        if progress is not None:
            progress.advance(f"{method} seed {seed} step {step}/{cfg.steps} "
                             f"reward {curves['reward'][-1]:.2f}")
    return {"method": method, "seed": seed, "curves": curves, "evals": evals,
            "final": evals[-1], "steps_to_threshold": steps_to_threshold(curves["reward"], cfg)}


def steps_to_threshold(rewards: list, cfg: Config):
    """First step whose trailing ``smooth``-step mean train reward reaches ``threshold``;
    None when it never does."""
    for step in range(1, len(rewards) + 1):
        window = rewards[max(0, step - cfg.smooth):step]
        if len(window) == min(cfg.smooth, len(rewards)) and sum(window) / len(window) >= cfg.threshold:
            return step
    return None


# --------------------------------------------------------------------------- reproducibility
@contextlib.contextmanager
def reproducible(cfg: Config):
    """What a run needs to give the same numbers twice: every random draw comes from a
    seeded generator (``warmed_up_model``/``train``), a fixed CPU thread count (how BLAS
    and reductions split a sum depends on it) and deterministic algorithms. Restores the
    caller's settings afterwards. Same machine + same settings -> bit-identical runs;
    another CPU (other vector width / BLAS code path) rounds differently, and an RL run
    amplifies that, so there the per-seed numbers differ (see ``docs/study``)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def machine_info(cfg: Config) -> dict:
    """What the numbers depend on beyond the seed: library versions, CPU and its code path."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": cfg.threads if torch.device(cfg.device).type == "cpu" else None}
    if torch.device(cfg.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    return info


# --------------------------------------------------------------------------- reporting
class Progress:
    """A plain-text progress bar on stderr (redrawn in place on a terminal, a line every
    ~5% otherwise), with the elapsed time and an estimate of what is left."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done = total, width, 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_line = -1

    def advance(self, message: str = ""):
        self.done += 1
        frac = self.done / self.total
        elapsed = time.perf_counter() - self.start
        left = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "." * (self.width - int(frac * self.width))
        line = f"[{bar}] {100 * frac:5.1f}% {elapsed:5.0f}s (~{left:.0f}s left) {message}"
        if self.tty:
            sys.stderr.write("\r" + line[:150].ljust(150) + ("\n" if self.done == self.total else ""))
        elif int(frac * 20) != self.last_line or self.done == self.total:
            self.last_line = int(frac * 20)
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def mean_std(values: list):
    """Mean and Bessel-corrected std of the values that are not None; (None, None) if none."""
    values = [v for v in values if v is not None]
    return study_stats.mean_std(values) if values else (None, None)


def summarize(runs: list, cfg: Config) -> dict:
    k = f"pass@{cfg.group_size}"
    summary = {}
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        row = {}
        for key in ("reward", k, "entropy"):
            row[key] = mean_std([r["final"][key] for r in mine])
        reached = [r["steps_to_threshold"] for r in mine]
        row["steps_to_threshold"] = mean_std(reached)
        row["reached"] = f"{sum(s is not None for s in reached)}/{len(reached)}"
        row["initial_reward"] = mean_std([r["evals"][0]["reward"] for r in mine])
        summary[method] = row
    return summary


def format_table(summary: dict, cfg: Config) -> str:
    k = f"pass@{cfg.group_size}"

    def cell(pair, digits=3):
        mean, std = pair
        return "n/a" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"

    header = ["method", "initial reward", "final reward", f"final {k}", "entropy (nats)",
              f"steps to reward {cfg.threshold:g}"]
    rows = []
    for method, row in summary.items():
        steps = row["steps_to_threshold"]
        steps_cell = "never" if steps[0] is None else f"{steps[0]:.0f} ± {steps[1]:.0f}"
        rows.append([method, cell(row["initial_reward"]), cell(row["reward"]), cell(row[k]),
                     cell(row["entropy"]), f"{steps_cell} ({row['reached']} seeds)"])
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a note) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
        return None
    return plt


def plot(runs: list, cfg: Config, path: str) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = torch.arange(1, cfg.steps + 1).double()
    for method in cfg.methods:
        for ax, key in zip(axes, ("reward", "entropy")):
            curves = torch.tensor([r["curves"][key] for r in runs if r["method"] == method]).double()
            smooth = trailing_mean(curves, cfg.smooth)  # then mean +- std over seeds
            mean = smooth.mean(0)
            std = smooth.std(0) if smooth.shape[0] > 1 else torch.zeros_like(mean)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    axes[0].set(xlabel="RL step", ylabel="train reward (moving avg)",
                title="Reward: digits sum to target")
    axes[1].set(xlabel="RL step", ylabel="mean token entropy (nats)", title="Response entropy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"LPO vs GRPO, matched GRPO target, K={cfg.group_size}, "
                 f"{cfg.seeds} seeds (mean ± std)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- entry point
def run(cfg: Config, out: str | None = None, verbose: bool = True) -> dict:
    """Warm up one model per seed, train every method from it, summarize. Returns the
    JSON-able results (also written to ``out``/results.json with a PNG when ``out``)."""
    task = DigitSumTask(cfg.max_digits, cfg.max_target)
    start = time.perf_counter()
    progress = Progress(cfg.seeds * len(cfg.methods) * cfg.steps) if verbose else None
    runs = []
    with reproducible(cfg):
        for seed in range(cfg.seeds):
            initial = warmed_up_model(cfg, task, seed)
            for method in cfg.methods:
                runs.append(train(method, initial, task, cfg, seed, progress))
    summary = summarize(runs, cfg)
    results = {
        "config": asdict(cfg), "loss_head": LOSS_HEAD, "task": "digit sum",
        "seconds": time.perf_counter() - start, "summary": summary, "runs": runs,
        **machine_info(cfg),
    }
    if out is not None:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
        results["plot"] = plot(runs, cfg, os.path.join(out, "curves.png"))
    if verbose:
        print(f"\nDigit-sum RLVR, {cfg.steps} steps x {cfg.prompts_per_step} prompts x "
              f"K={cfg.group_size}, {cfg.seeds} seeds, device {cfg.device}, loss head "
              f"{LOSS_HEAD}; {results['seconds']:.0f}s")
        print(f"final = evaluation after the last step ({task.max_target + 1} targets x "
              f"{cfg.eval_samples} samples); mean ± std over seeds\n")
        print(format_table(summary, cfg))
        if out is not None:
            print(f"\nwrote {os.path.join(out, 'results.json')}"
                  + (f" and {os.path.join(out, 'curves.png')}" if results["plot"] else ""))
    return results


def parse_args(argv=None) -> tuple[Config, str]:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m lpo_kernels.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=d.device, help="cpu or cuda")
    p.add_argument("--steps", type=int, default=d.steps, help="RL steps per run")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per method")
    p.add_argument("--group-size", type=int, default=d.group_size, help="K responses per prompt")
    p.add_argument("--prompts", type=int, default=d.prompts_per_step, help="prompts per step")
    p.add_argument("--updates-per-batch", type=int, default=d.updates_per_batch,
                   help="optimizer steps per sampled batch (later ones are off-policy)")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate (all methods)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="supervised format warm-up steps (random digit strings)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help="reward for the 'steps to reach' column")
    p.add_argument("--methods", nargs="+", default=d.methods, choices=list(METHODS))
    p.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default 1)")
    p.add_argument("--out", default="demo_out", help="folder for results.json and curves.png")
    a = p.parse_args(argv)
    if a.group_size < 2:
        p.error("--group-size must be >= 2")
    cfg = Config(steps=a.steps, seeds=a.seeds, group_size=a.group_size, prompts_per_step=a.prompts,
                 updates_per_batch=a.updates_per_batch, lr=a.lr, warmup_steps=a.warmup_steps,
                 temperature=a.temperature, threshold=a.threshold, methods=a.methods,
                 device=a.device, threads=a.threads)
    return cfg, a.out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--study" in argv:  # the learning study: many seeds, two tasks (lpo_kernels.study)
        from . import study

        return study.main([a for a in argv if a != "--study"])
    cfg, out = parse_args(argv)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    run(cfg, out)


if __name__ == "__main__":
    main()
