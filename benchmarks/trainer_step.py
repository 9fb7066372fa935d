"""One optimizer step of a real trainer, side by side in one process: TRL ``GRPOTrainer``,
``GRPOTrainer(use_liger_kernel=True)`` and ``LPOTrainer`` (``lpo_kernels.integrations.trl``,
fused head), on a randomly initialised Qwen2.5-0.5B / 1.5B (configs written here: no
downloads) with fixed synthetic completions whose lengths spread over 10-100% of the maximum.

    python -m benchmarks.trainer_step                       # GPU: both models
    python -m benchmarks.trainer_step --smoke               # CPU: a tiny model (CI)
    python -m benchmarks.trainer_step --models qwen2.5-0.5b --groups 16 --group-size 8 --max-len 1024

A step = ``trainer.compute_loss`` (the trainer's own loss path: backbone, head, loss) +
backward + ``optimizer.step()`` + ``zero_grad``; generation is not part of it (the batch
TRL's ``_generate_and_score_completions`` would hand the loss is built directly: prompts,
padded completions, masks, group-normalised advantages, LPO's group ids and rewards).
Reported per trainer: median step time after a warm-up step, real completion tokens / s,
and the peak memory of the step (``max_memory_allocated``; CPU: not measured). Writes
``trainer_step.csv`` and ``trainer_step.png`` into ``--out``. CPU numbers (``--smoke``) are
not product numbers.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

from benchmarks.cases import _lengths_mask, group_advantages  # noqa: E402

# Qwen2.5 configs (the published config.json values that set the cost), written in code.
MODELS = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
}
TRAINERS = ("trl_grpo", "trl_grpo_liger", "lpo_trainer")
FIELDS = ["model", "trainer", "status", "note", "device", "groups", "group_size", "prompt_len",
          "max_completion_len", "real_tokens", "padded_tokens", "step_ms", "tokens_per_s",
          "peak_mem_gib", "loss"]


def qwen2_config(name: str):
    import transformers

    return transformers.Qwen2Config(**MODELS[name], max_position_embeddings=32768,
                                    rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu",
                                    pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                    use_sliding_window=False)


def _tokenizer():
    import tokenizers
    import transformers

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(13)]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                               unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def synthetic_batch(vocab, groups, group_size, prompt_len, max_len, device, seed=0):
    """The batch the loss sees: left-padded prompts, completions of lengths uniform in
    [0.1, 1.0] x max_len (fixed seed), group-normalised advantages of random rewards."""
    g = torch.Generator().manual_seed(seed)
    b = groups * group_size
    prompt_lengths = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (b,), generator=g)
    prompt_mask = (torch.arange(prompt_len)[None, :] >= prompt_len - prompt_lengths[:, None]).long()
    completion_mask = _lengths_mask(b, max_len, "cpu", g, min_frac=0.1).long()
    prompt_ids = torch.randint(3, vocab, (b, prompt_len), generator=g) * prompt_mask
    completion_ids = torch.randint(3, vocab, (b, max_len), generator=g) * completion_mask
    rewards = torch.randn(b, generator=g)
    advantages = group_advantages(rewards, group_size)
    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=advantages,
                 num_items_in_batch=completion_mask.sum().float(),
                 lpo_group_ids=torch.arange(b) // group_size, lpo_rewards=rewards)
    return {k: v.to(device) for k, v in batch.items()}


def build_trainer(kind, model_name, out_dir, groups, group_size, max_len, device, dtype):
    import datasets
    import transformers
    import trl

    from lpo_kernels.integrations.trl import LPOConfig, LPOTrainer

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(qwen2_config(model_name)).to(dtype)
    common = dict(output_dir=out_dir, per_device_train_batch_size=groups * group_size,
                  num_generations=group_size, max_completion_length=max_len, max_steps=1,
                  learning_rate=1e-6, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                  logging_steps=1, use_cpu=device.type == "cpu", bf16=dtype == torch.bfloat16)
    if kind == "lpo_trainer":
        cls, args = LPOTrainer, LPOConfig(**common, lpo_head="lpo")
    else:
        cls = trl.GRPOTrainer
        args = trl.GRPOConfig(**common, use_liger_kernel=kind == "trl_grpo_liger")
    dataset = datasets.Dataset.from_dict({"prompt": ["w3 w4 w5"] * (groups * group_size)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=args, train_dataset=dataset, processing_class=_tokenizer())
    trainer.model.to(device)
    trainer.model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by the loss
    return trainer


def one_step(trainer, batch):
    loss = trainer.compute_loss(trainer.model, batch)
    trainer.accelerator.backward(loss)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(kind, model_name, *, groups, group_size, prompt_len, max_len, device, dtype, steps):
    row = dict(model=model_name, trainer=kind, device=str(device), groups=groups,
               group_size=group_size, prompt_len=prompt_len, max_completion_len=max_len,
               status="ok", note="")
    if kind == "trl_grpo_liger" and importlib.util.find_spec("liger_kernel") is None:
        return dict(row, status="skipped", note="liger-kernel is not installed")
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            trainer = build_trainer(kind, model_name, out_dir, groups, group_size, max_len, device, dtype)
            if kind == "lpo_trainer":
                row["note"] = f"lpo_head={trainer.lpo_head}"
            vocab = trainer.model.config.vocab_size
            batch = synthetic_batch(vocab, groups, group_size, prompt_len, max_len, device)
            row.update(real_tokens=int(batch["completion_mask"].sum()),
                       padded_tokens=batch["completion_mask"].numel())
            one_step(trainer, batch)  # warm-up (allocations, autotuning, lazy imports)
            times = []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                _sync(device)
                t0 = time.perf_counter()
                loss = one_step(trainer, batch)
                _sync(device)
                times.append(time.perf_counter() - t0)
            step_s = statistics.median(times)
            row.update(step_ms=round(step_s * 1e3, 3), loss=loss,
                       tokens_per_s=round(row["real_tokens"] / step_s, 1))
            if device.type == "cuda":
                row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
            if not math.isfinite(loss):
                row.update(status="error", note="non-finite loss")
        except Exception as error:  # noqa: BLE001 - one trainer failing must not stop the others
            row.update(status="error", note=f"{type(error).__name__}: {str(error)[:200]}")
        finally:
            trainer = batch = None  # noqa: F841
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    models = sorted({r["model"] for r in ok})
    metrics = [("step_ms", "step time (ms)"), ("tokens_per_s", "real tokens / s"),
               ("peak_mem_gib", "peak memory (GiB)")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    width = 0.8 / max(len(TRAINERS), 1)
    for ax, (key, label) in zip(axes, metrics):
        for i, kind in enumerate(TRAINERS):
            values = [next((float(r[key]) for r in ok if r["model"] == m and r["trainer"] == kind
                            and r.get(key) not in (None, "")), 0.0) for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=kind)
        ax.set_xticks([j + width for j in range(len(models))], models)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    device = ok[0]["device"] if ok else "?"
    fig.suptitle(f"one optimizer step ({device})" + ("; CPU: not product numbers" if device == "cpu" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model, few tokens (CI)")
    p.add_argument("--models", default="qwen2.5-0.5b,qwen2.5-1.5b")
    p.add_argument("--trainers", default=",".join(TRAINERS))
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="out/trainer_step")
    p.add_argument("--cpu", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.groups, args.group_size, args.prompt_len, args.max_len, args.steps = \
            "tiny", 2, 4, 8, 24, 1
        args.cpu = True
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "trainer_step.csv")
    rows = []
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for model_name in args.models.split(","):
            for kind in args.trainers.split(","):
                row = measure(kind, model_name, groups=args.groups, group_size=args.group_size,
                              prompt_len=args.prompt_len, max_len=args.max_len, device=device,
                              dtype=dtype, steps=args.steps)
                rows.append(row)
                writer.writerow({k: row.get(k, "") for k in FIELDS})
                f.flush()
                print(f"{model_name:14s} {kind:16s} {row['status']:8s} step {row.get('step_ms', '-')} ms, "
                      f"{row.get('tokens_per_s', '-')} tok/s, peak {row.get('peak_mem_gib', '-')} GiB "
                      f"{row['note']}", flush=True)
    plot(rows, os.path.join(args.out, "trainer_step.png"))
    print(f"CSV: {csv_path}" + ("  (CPU: not product numbers)" if device.type == "cpu" else ""))
    return 0 if all(r["status"] != "error" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
