"""Runs verl 0.9.1's real actor update on a CPU and checks it against whole-batch ``lpo_loss``.

Run with the python of an environment where verl is installed (``/work/venvs/verl`` in CI):

    python tests/verl_actor_harness.py CASE [--world 2]

Nothing here copies verl's code: the batch is built as verl's trainers store it, goes
through verl's own trainer code (``RayPPOTrainer._balance_batch`` / ``_update_actor`` for
the legacy trainer, the v1 trainer's balancing and its worker-side TransferQueue layout),
and the update runs in verl's ``ActorRolloutRefWorker.update_actor`` -> ``TrainingWorker``
-> ``FSDPEngine`` -> ``ppo_loss`` -> the registered LPO loss. The only stand-ins are the
ones that let verl run without a GPU: a CPU platform registered through verl's plugin point
(``PlatformRegistry.register`` + ``set_platform``), ``VERL_ENGINE_DEVICE=cuda`` (verl's
override that selects the FSDP engine), gloo, and the Ray worker group replaced by calling
the worker directly in each process (what Ray's dispatch does: rank r gets chunk r).

The check: with SGD (lr=1, no weight decay, no clipping) the parameter update is minus the
gradient; it must equal the gradient of ``lpo_loss`` over the whole mini-batch (rows in
their original order, groups from ``uid``) computed with the plain HF model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types

os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")  # selects verl's FSDP engine on any device
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VERL_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# verl 0.9.1 patches TRL's value-head model when TRL is importable and fails with TRL >= 1.0
# (``trl.experimental.ppo`` is gone); an environment that shares the system's site-packages
# sees TRL, so hide it from verl (find_spec returns None for a None entry).
sys.modules.setdefault("trl", None)

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

N_GROUPS, GROUP, PROMPT, RESPONSE, VOCAB = 4, 4, 5, 6, 48


# -- a CPU platform through verl's plugin point -------------------------------------------
def install_cpu_platform():
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry, set_platform

    memory = types.SimpleNamespace(
        max_memory_allocated=lambda *a, **k: 0, max_memory_reserved=lambda *a, **k: 0,
        memory_allocated=lambda *a, **k: 0, memory_reserved=lambda *a, **k: 0,
        empty_cache=lambda: None, synchronize=lambda *a, **k: None, is_available=lambda: True,
        current_device=lambda: "cpu", device_count=lambda: 1, set_device=lambda *a: None,
        manual_seed=torch.manual_seed, manual_seed_all=torch.manual_seed,
        reset_peak_memory_stats=lambda *a, **k: None, mem_get_info=lambda *a, **k: (0, 0),
        memory_stats=lambda *a, **k: {}, get_rng_state=torch.get_rng_state, set_rng_state=torch.set_rng_state,
        get_device_name=lambda *a, **k: "cpu")

    @PlatformRegistry.register(platform="lpo_test_cpu")
    class PlatformCPU(PlatformBase):
        device_name = "cpu"
        vendor_name = "cpu"
        device_module = memory

        def is_available(self):
            return True

        def is_platform_available(self, use_smi_check=False):
            return True

        def current_device(self):
            return "cpu"  # verl moves micro-batches with .to(get_device_id())

        def device_count(self):
            return 1

        def set_device(self, device_index):
            pass

        def synchronize(self, device_index=None):
            pass

        def manual_seed(self, seed):
            torch.manual_seed(seed)

        def manual_seed_all(self, seed):
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings):
            pass

        def empty_cache(self):
            pass

        def get_device_capability(self, device_index=0):
            return None, None

        def communication_backend_name(self):
            return "gloo"

        def visible_devices_envvar(self):
            return "CUDA_VISIBLE_DEVICES"

        def nvtx_range(self, msg):
            import contextlib
            return contextlib.nullcontext()

        def profiler_start(self):
            pass

        def profiler_stop(self):
            pass

        def ray_resource_name(self):
            return "GPU"

        def ray_noset_envvars(self):
            return []

        def is_ipc_supported(self):
            return False

        def cudart(self):
            return None

    set_platform(PlatformCPU())


# -- a tiny random Qwen2 and a tokenizer, built locally (no downloads) ------------------------
def make_model_dir(root: str, seed: int = 0, hidden: int = 32, layers: int = 2) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(root, "tiny_qwen2")
    vocab = {f"t{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<pad>": VOCAB - 2, "<eos>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, pad_token_id=VOCAB - 2, eos_token_id=VOCAB - 1,
                         bos_token_id=VOCAB - 1, attn_implementation="sdpa")
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def compose_config(model_path: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir
    import verl.trainer.config as config_pkg

    config_dir = os.path.dirname(config_pkg.__file__)
    base = [
        f"actor_rollout_ref.model.path={model_path}",
        "actor_rollout_ref.model.external_lib=lpo_kernels.integrations.verl",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.model.enable_gradient_checkpointing=False",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
        "actor_rollout_ref.actor.optim.optimizer=SGD",
        "actor_rollout_ref.actor.optim.lr=1.0",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        "actor_rollout_ref.actor.optim.clip_grad=1e9",
        f"actor_rollout_ref.rollout.n={GROUP}",
        "actor_rollout_ref.rollout.name=vllm",
        "algorithm.adv_estimator=grpo",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return compose(config_name="ppo_trainer", overrides=base + overrides)


# -- the batch, as the legacy trainer holds it after rewards, old log-probs and advantages ----
def make_batch(seed: int, model, device="cpu"):
    """A DataProto laid out as ray_trainer.py has it at _update_actor: left-padded prompts,
    right-padded responses, ``uid`` per row (groups consecutive, as rollout produced them),
    ``token_level_scores``/``token_level_rewards`` (reward on the last response token),
    ``old_log_probs`` (the rollout policy: the model's own log-probs plus noise, off-policy),
    ``advantages`` from verl's GRPO estimator."""
    import numpy as np
    from verl import DataProto
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    g = torch.Generator().manual_seed(seed)
    b = N_GROUPS * GROUP
    prompt_len = torch.randint(2, PROMPT + 1, (b,), generator=g)
    resp_len = torch.randint(1, RESPONSE + 1, (b,), generator=g)
    # one prompt per group: rows of a group share prompt tokens and length
    prompt_len = prompt_len.view(N_GROUPS, GROUP)[:, :1].expand(N_GROUPS, GROUP).reshape(-1)
    prompt_tokens = torch.randint(0, VOCAB - 2, (N_GROUPS, PROMPT), generator=g).repeat_interleave(GROUP, 0)
    prompts = torch.full((b, PROMPT), VOCAB - 2)
    prompt_mask = torch.zeros(b, PROMPT, dtype=torch.long)
    for i in range(b):
        n = int(prompt_len[i])
        prompts[i, PROMPT - n:] = prompt_tokens[i, :n]
        prompt_mask[i, PROMPT - n:] = 1
    responses = torch.randint(0, VOCAB - 2, (b, RESPONSE), generator=g)
    response_mask = (torch.arange(RESPONSE)[None, :] < resp_len[:, None]).long()
    responses = torch.where(response_mask.bool(), responses, torch.full_like(responses, VOCAB - 2))
    input_ids = torch.cat([prompts, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0) * attention_mask
    reward = torch.randint(0, 3, (b,), generator=g).float() / 2
    scores = torch.zeros(b, RESPONSE)
    scores[torch.arange(b), resp_len - 1] = reward
    uid = np.array([f"prompt-{seed}-{i // GROUP}" for i in range(b)], dtype=object)
    advantages, returns = compute_grpo_outcome_advantage(scores, response_mask.float(), uid)
    with torch.no_grad():
        logp = response_log_probs(model, input_ids, attention_mask, position_ids)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g)
    data = DataProto.from_dict(
        tensors=dict(prompts=prompts, responses=responses, input_ids=input_ids, attention_mask=attention_mask,
                     position_ids=position_ids, response_mask=response_mask, old_log_probs=old.float(),
                     advantages=advantages, returns=returns, token_level_scores=scores,
                     token_level_rewards=scores.clone()),
        non_tensors=dict(uid=uid), meta_info={})
    return data


def response_log_probs(model, input_ids, attention_mask, position_ids):
    """The response tokens' log-probs under ``model`` (as verl computes them, temperature 1)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, PROMPT - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, PROMPT:, None]).squeeze(-1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("case")
    parser.add_argument("--world", type=int, default=1)
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.rank is None and args.world > 1:
        return launch(args)
    return run_rank(args, args.rank or 0)


def launch(args):
    import subprocess
    import socket
    workdir = args.workdir or tempfile.mkdtemp(prefix="lpo_verl_")
    if not args.port:
        with socket.socket() as sock:  # a free port for the gloo rendezvous
            sock.bind(("127.0.0.1", 0))
            args.port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, __file__, args.case, "--world", str(args.world), "--rank", str(r),
                               "--port", str(args.port), "--workdir", workdir]
                              + (["--out", args.out] if args.out and r == 0 else []))
             for r in range(args.world)]
    codes = [p.wait() for p in procs]
    return max(codes)


CASES = {}


def run_rank(args, rank):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.world), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    install_cpu_platform()
    # verl would ask for "cpu:gloo,<device>:<backend>", which on a CPU names gloo twice
    torch.distributed.init_process_group("gloo", rank=rank, world_size=args.world)
    workdir = args.workdir or tempfile.mkdtemp(prefix="lpo_verl_")
    result = CASES[args.case](args, rank, workdir)
    if rank == 0:
        print("LPO_VERL_RESULT " + json.dumps(result))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f)
    return 0



# -- the legacy trainer's path: RayPPOTrainer._balance_batch / _update_actor ------------------
class DirectWorkerGroup:
    """Stands in for Ray's worker group: verl's own dispatch split (rank r gets chunk r of
    ``_split_args_kwargs_data_proto``), then this process's worker runs its chunk."""

    def __init__(self, worker, rank, world):
        self.worker, self.rank, self.world = worker, rank, world
        self.world_size = world

    def update_actor(self, batch_td):
        from verl.single_controller.base.decorator import _split_args_kwargs_data_proto
        (chunks,), _ = _split_args_kwargs_data_proto(self.world, batch_td)
        chunk = chunks[self.rank].clone().unlock_()  # what arrives through Ray: a fresh copy
        return self.worker.update_actor(chunk)


def build_worker(config):
    from verl.workers.engine_workers import ActorRolloutRefWorker
    worker = ActorRolloutRefWorker(config.actor_rollout_ref, role="actor")
    worker.init_model()
    return worker


def full_params(worker):
    """The actor's parameters, gathered from FSDP2's shards, by name."""
    out = {}
    for name, p in worker.actor.engine.module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone().double()
    return out


def legacy_update(config, worker, batch, rank, world, balance):
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    trainer = types.SimpleNamespace(config=config, actor_rollout_wg=DirectWorkerGroup(worker, rank, world),
                                    distillation_config=None, _get_dp_size=lambda wg, role: world)
    if balance:
        RayPPOTrainer._balance_batch(trainer, batch, metrics={})
    return RayPPOTrainer._update_actor(trainer, batch)


def smoke(args, rank, workdir):
    from transformers import AutoModelForCausalLM
    path = make_model_dir(os.path.join(workdir, f"rank{rank}"))
    config = compose_config(path, ["actor_rollout_ref.actor.ppo_mini_batch_size=4",
                                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
                                   "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4"])
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    batch = make_batch(0, model)
    worker = build_worker(config)
    before = full_params(worker)
    out = legacy_update(config, worker, batch, rank, args.world, balance=True)
    after = full_params(worker)
    delta = sum(float((after[k] - before[k]).abs().sum()) for k in before)
    return {"delta": delta, "metrics": sorted(out.meta_info["metrics"])}


CASES["smoke"] = smoke



# -- the checks -------------------------------------------------------------------------------
def reference_grads(model_path, batch, loss_mode, options, loss_agg_mode):
    """Gradient of whole-mini-batch ``lpo_loss`` (rows in the rollout's order, groups from
    ``uid``) w.r.t. the plain HF model's parameters, in fp64."""
    from transformers import AutoModelForCausalLM

    from lpo_kernels import lpo_loss
    from lpo_kernels.integrations.verl import LOSS_DIVERGENCES, LOSS_AGG_MODES
    from lpo_kernels.integrations.verl_minibatch import uid_to_group_ids

    model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=torch.float64)
    t = batch.batch
    logp = response_log_probs(model, t["input_ids"], t["attention_mask"], t["position_ids"])
    mask = t["response_mask"].bool()
    group_ids = uid_to_group_ids(batch.non_tensor_batch["uid"])
    target = options.get("target", "advantages")
    rewards = t["token_level_rewards"].double().sum(-1)
    adv = (t["advantages"].double() * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    loss, _ = lpo_loss(logp, t["old_log_probs"].double(), mask, group_ids,
                       None if target == "advantages" else rewards, adv if target == "advantages" else None,
                       target=target, divergence=LOSS_DIVERGENCES[loss_mode], tau=float(options.get("tau", 1.0)),
                       clip=options.get("clip", "clamp"), clip_eps_low=0.2, clip_eps_high=0.28,
                       seq_reduce=LOSS_AGG_MODES.get(loss_agg_mode, "mean"), backend="torch")
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}, float(loss)


def spy_on_loss_calls():
    """Counts the LPO loss calls and how many of them held a group only in part (the layout
    the pre-pass exists for), so a test can tell that the split really happened."""
    from lpo_kernels.integrations import verl as lpo_verl
    from lpo_kernels.integrations.verl_minibatch import current_micro_rows, current_plan

    seen = {"calls": 0, "partial_group_calls": 0, "groups_across_ranks": 0}
    inner = lpo_verl.compute_policy_loss_lpo

    def spy(*a, **k):
        plan, rows = current_plan(), current_micro_rows()
        if plan is not None and rows is not None:
            seen["calls"] += 1
            own = plan.local.group_ids[rows]
            everyone = plan.local.group_ids if plan.remote is None else torch.cat([plan.local.group_ids,
                                                                                   plan.remote.group_ids])
            if any(int((own == g).sum()) < int((everyone == g).sum()) for g in own.unique()):
                seen["partial_group_calls"] += 1
            if plan.remote is not None:
                seen["groups_across_ranks"] = int(torch.isin(plan.local.group_ids.unique(),
                                                             plan.remote.group_ids).sum())
        return inner(*a, **k)

    lpo_verl.compute_policy_loss_lpo = spy
    seen_restore = lambda: setattr(lpo_verl, "compute_policy_loss_lpo", inner)  # noqa: E731
    return seen, seen_restore


def check_case(args, rank, workdir, *, overrides=(), loss_mode="lpo_fwd", options=None, balance=True,
               shuffle_rows=False, loss_agg_mode="seq-mean-token-mean", seed=0, trainer="legacy"):
    options = dict(options or {})
    os.environ["LPO_VERL_OPTIONS"] = ",".join(f"{k}={v}" for k, v in options.items())
    path = make_model_dir(os.path.join(workdir, f"rank{rank}"))
    config = compose_config(path, [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
                                   f"actor_rollout_ref.actor.loss_agg_mode={loss_agg_mode}",
                                   f"actor_rollout_ref.actor.ppo_mini_batch_size={N_GROUPS}",
                                   "actor_rollout_ref.actor.clip_ratio_low=0.2",
                                   "actor_rollout_ref.actor.clip_ratio_high=0.28"] + list(overrides))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    batch = make_batch(seed, model)
    expected, ref_loss = reference_grads(path, batch, loss_mode, options, loss_agg_mode)
    if shuffle_rows:  # rows in any order (e.g. a custom trainer or a replay buffer)
        perm = torch.randperm(len(batch), generator=torch.Generator().manual_seed(seed + 7))
        batch.reorder(perm)
    worker = build_worker(config)
    seen, restore = spy_on_loss_calls()
    before = full_params(worker)
    try:
        if trainer == "v1":
            out = v1_update(config, worker, batch, rank, args.world)
        else:
            out = legacy_update(config, worker, batch, rank, args.world, balance=balance)
    except Exception as exc:  # the error path: reported, not raised
        from lpo_kernels.integrations.verl_minibatch import LPOVerlError
        if not isinstance(exc, LPOVerlError):
            raise
        return {"error": type(exc).__name__, "message": str(exc)}
    finally:
        restore()
    after = full_params(worker)
    num = sum(float(((after[k] - before[k]) + expected[k]).pow(2).sum()) for k in expected)
    den = sum(float(expected[k].pow(2).sum()) for k in expected)
    metrics = {k: v for k, v in out.meta_info["metrics"].items() if k.startswith("actor/")}
    return {"rel_err": (num / den) ** 0.5, "grad_norm": den ** 0.5, "ref_loss": ref_loss, **seen,
            "metrics": {k: float(sum(map(float, v)) / len(v)) if isinstance(v, list) else float(v)
                        for k, v in metrics.items()}}


DYNAMIC = ["actor_rollout_ref.actor.use_dynamic_bsz=True", "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=40",
           "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=40"]
FIXED = ["actor_rollout_ref.actor.use_dynamic_bsz=False", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"]
CASES["defaults"] = lambda a, r, w: check_case(a, r, w, overrides=DYNAMIC)
CASES["micro"] = lambda a, r, w: check_case(a, r, w, overrides=FIXED, loss_mode="lpo_rev", seed=1)
CASES["shuffled"] = lambda a, r, w: check_case(a, r, w, overrides=FIXED + ["actor_rollout_ref.actor.shuffle=True"],
                                               shuffle_rows=True, balance=False, loss_mode="lpo_js", seed=2)
CASES["rloo"] = lambda a, r, w: check_case(a, r, w, overrides=DYNAMIC, options={"target": "rloo", "clip": "ppo"},
                                           loss_mode="lpo_alpha", seed=3)



# -- the default v1 trainer's path: PPOTrainer._balance_batch / _update_actor on KVBatchMeta ---
def v1_samples(batch):
    """The per-sample fields as the v1 trainer holds them in TransferQueue after
    ``_compute_advantage``: unpadded prompt/response tensors (agent_loop_tq.py), response
    fields as nested ``[response_len]`` (``response_to_nested``), ``rm_scores`` (the reward on
    the last token), ``uid`` per sample. Keys ``{uid}_{session}_{index}``; tags carry seq_len."""
    t = batch.batch
    keys, samples, tags = [], [], []
    for i in range(len(batch)):
        pm, rm = t["attention_mask"][i, :PROMPT].bool(), t["response_mask"][i].bool()
        prompts, responses = t["prompts"][i][pm], t["responses"][i][rm]
        n = int(rm.sum())
        input_ids = torch.cat([prompts, responses])
        uid = batch.non_tensor_batch["uid"][i]
        samples.append(dict(prompts=prompts, responses=responses, input_ids=input_ids,
                            attention_mask=torch.ones_like(input_ids), position_ids=torch.arange(len(input_ids)),
                            response_mask=torch.ones(n, dtype=torch.int64), loss_mask=torch.ones(n, dtype=torch.int64),
                            rm_scores=t["token_level_scores"][i, :n].float(), old_log_probs=t["old_log_probs"][i, :n],
                            advantages=t["advantages"][i, :n], uid=uid))
        keys.append(f"{uid}_{i % GROUP}_0")
        tags.append({"status": "success", "prompt_len": len(prompts), "response_len": n,
                     "seq_len": len(input_ids)})
    return keys, samples, tags


class DirectKVWorkerGroup(DirectWorkerGroup):
    """The v1 worker group: verl's dispatch split of the KVBatchMeta, then what the worker's
    ``tqbridge`` does with it (fetch the chunk's samples, stacked by verl's
    ``list_of_dict_to_tensordict`` as they were put, plus ``extra_info`` as non-tensor data)."""

    def __init__(self, worker, rank, world, store):
        super().__init__(worker, rank, world)
        self.store = store
        self._dispatch_info = {"actor": list(range(world))}

    def update_actor(self, meta):
        from verl.utils import tensordict_utils as tu
        # dispatch: rank r gets the r-th of dp equal contiguous chunks (verl's BatchData.chunk,
        # which for a KVBatchMeta goes through TransferQueue's controller)
        per = len(meta.keys) // self.world
        keys = meta.keys[self.rank * per:(self.rank + 1) * per]
        data = tu.list_of_dict_to_tensordict([self.store[k] for k in keys])
        for key, val in meta.extra_info.items():
            tu.assign_non_tensor_data(tensor_dict=data, key=key, val=val)
        out = self.worker.update_actor(data)
        return {"metrics": tu.get(out, "metrics")}


def v1_update(config, worker, batch, rank, world):
    from verl.protocol import KVBatchMeta
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer
    keys, samples, tags = v1_samples(batch)
    store = dict(zip(keys, samples))
    meta = KVBatchMeta(keys=keys, tags=tags, partition_id="train", fields=None, extra_info={})
    trainer = types.SimpleNamespace(config=config, actor_rollout_wg=DirectKVWorkerGroup(worker, rank, world, store),
                                    distillation_config=None, use_critic=False, global_steps=1,
                                    tokenizer=types.SimpleNamespace(eos_token_id=VOCAB - 1))
    trainer._get_required_batch_multiple = types.MethodType(PPOTrainer._get_required_batch_multiple, trainer)
    meta = PPOTrainer._balance_batch(trainer, meta, metrics={})  # unconditional in the v1 trainer
    metrics = {}
    PPOTrainer._update_actor(trainer, meta, metrics)
    return types.SimpleNamespace(meta_info={"metrics": metrics})
CASES["v1"] = lambda a, r, w: check_case(a, r, w, overrides=DYNAMIC, trainer="v1", loss_mode="lpo_fwd",
                                         options={"target": "grpo"}, seed=4)

# errors: a reward target with groups spread over two optimizer steps; verl's default token-mean
CASES["error_split"] = lambda a, r, w: check_case(
    a, r, w, overrides=DYNAMIC + ["actor_rollout_ref.actor.ppo_mini_batch_size=2"],
    options={"target": "rloo"}, shuffle_rows=True, seed=5)
CASES["error_agg"] = lambda a, r, w: check_case(a, r, w, overrides=DYNAMIC, loss_agg_mode="token-mean", seed=6)


def run_all(args, rank, workdir):
    """Every single-process case in one process (verl's import costs ~10 s)."""
    import time
    out = {}
    for name in ("readme_config", "defaults", "micro", "shuffled", "rloo", "v1", "two_steps", "error_split",
                 "error_agg"):
        start = time.perf_counter()
        out[name] = CASES[name](args, rank, os.path.join(workdir, name))
        out[name]["seconds"] = round(time.perf_counter() - start, 2)
    return out


CASES["all"] = run_all



def cost(args, rank, workdir):
    """Not a test: the pre-pass's share of the actor update's time on a larger model
    (hidden 512, 4 layers, vocab 4096, 8 groups of 8, responses up to 256 tokens)."""
    import time

    from verl.workers.engine.base import BaseEngine
    global N_GROUPS, GROUP, PROMPT, RESPONSE, VOCAB
    N_GROUPS, GROUP, PROMPT, RESPONSE, VOCAB = 8, 8, 64, 256, 4096
    path = make_model_dir(os.path.join(workdir, f"rank{rank}"), hidden=512, layers=4)
    spent = {"prepass": 0.0}
    infer = BaseEngine.infer_batch

    def timed_infer(self, *a, **k):
        start = time.perf_counter()
        try:
            return infer(self, *a, **k)
        finally:
            spent["prepass"] += time.perf_counter() - start

    BaseEngine.infer_batch = timed_infer
    out = {}
    for mode in ("lpo_fwd", "vanilla"):
        config = compose_config(path, [f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}",
                                       "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                                       f"actor_rollout_ref.actor.ppo_mini_batch_size={N_GROUPS}",
                                       "actor_rollout_ref.actor.use_dynamic_bsz=True",
                                       "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=4096",
                                       "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu=4096"])
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
        batch = make_batch(0, model)
        worker = build_worker(config)
        legacy_update(config, worker, make_batch(1, model), rank, args.world, balance=True)  # warm-up
        spent["prepass"] = 0.0
        start = time.perf_counter()
        for _ in range(2):
            legacy_update(config, worker, batch, rank, args.world, balance=True)
        total = time.perf_counter() - start
        out[mode] = {"update_s": total / 2, "prepass_s": spent["prepass"] / 2}
    out["prepass_share_of_lpo_update"] = out["lpo_fwd"]["prepass_s"] / out["lpo_fwd"]["update_s"]
    out["lpo_update_over_vanilla"] = out["lpo_fwd"]["update_s"] / out["vanilla"]["update_s"]
    return out


CASES["cost"] = cost



def two_steps(args, rank, workdir):
    """Two optimizer steps per batch (``ppo_mini_batch_size`` = half the prompts), rows
    shuffled so groups straddle the steps, target 'advantages': each step's SGD update must
    equal the gradient of ``lpo_loss`` over the rows of that step's mini-batch (groups = the
    members it holds, target from verl's whole-group advantages), at that step's weights."""
    from transformers import AutoModelForCausalLM

    import lpo_kernels.integrations.verl  # noqa: F401  (installs the pre-pass before we wrap it)
    from lpo_kernels import lpo_loss
    from lpo_kernels.integrations.verl_minibatch import uid_to_group_ids
    from verl.workers.engine.base import BaseEngine

    os.environ["LPO_VERL_OPTIONS"] = ""
    path = make_model_dir(os.path.join(workdir, f"rank{rank}"))
    config = compose_config(path, ["actor_rollout_ref.actor.policy_loss.loss_mode=lpo_fwd",
                                   "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean",
                                   f"actor_rollout_ref.actor.ppo_mini_batch_size={N_GROUPS // 2}",
                                   "actor_rollout_ref.actor.clip_ratio_low=0.2",
                                   "actor_rollout_ref.actor.clip_ratio_high=0.28"] + DYNAMIC)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float64)
    batch = make_batch(8, model.float())
    batch.reorder(torch.randperm(len(batch), generator=torch.Generator().manual_seed(3)))
    batch.batch["row_tag"] = torch.arange(len(batch))
    t = {k: v.clone() for k, v in batch.batch.items()}
    uids = list(batch.non_tensor_batch["uid"])
    steps = []
    inner = BaseEngine.train_batch

    def record(self, data, loss_function):
        steps.append(data["row_tag"].clone())
        return inner(self, data, loss_function)

    BaseEngine.train_batch = record
    worker = build_worker(config)
    before = full_params(worker)
    try:
        legacy_update(config, worker, batch, rank, args.world, balance=True)
    finally:
        BaseEngine.train_batch = inner
    after = full_params(worker)
    model = model.double()
    mask_all = t["response_mask"].bool()
    adv_all = (t["advantages"].double() * mask_all).sum(-1) / mask_all.sum(-1).clamp(min=1)
    gid_all = uid_to_group_ids(uids)
    for rows in steps:  # SGD, lr=1, on the plain model, step by step
        rows = rows.long()
        model.zero_grad()
        logp = response_log_probs(model, t["input_ids"][rows], t["attention_mask"][rows], t["position_ids"][rows])
        loss, _ = lpo_loss(logp, t["old_log_probs"][rows].double(), mask_all[rows], gid_all[rows], None,
                           adv_all[rows], target="advantages", clip_eps_low=0.2, clip_eps_high=0.28, backend="torch")
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= p.grad
    expected = dict(model.named_parameters())
    num = sum(float((after[k] - expected[k].detach()).pow(2).sum()) for k in after)
    den = sum(float((after[k] - before[k]).pow(2).sum()) for k in after)
    straddling = len(set(uids[int(i)] for i in steps[0]) & set(uids[int(i)] for i in steps[1]))
    return {"rel_err": (num / den) ** 0.5, "update_norm": den ** 0.5, "steps": len(steps),
            "groups_in_both_steps": straddling}


CASES["two_steps"] = two_steps



def readme_config(args, rank, workdir):
    """The README's verl command line composes with verl 0.9.1's hydra config and its actor
    section validates as verl's FSDPActorConfig (nothing is launched)."""
    import shlex

    from hydra import compose, initialize_config_dir
    import verl.trainer.config as config_pkg
    from verl.utils.config import omega_conf_to_dataclass

    text = open(os.path.join(REPO, "README.md")).read()
    block = text[text.index("python3 -m verl.trainer.main_ppo"):]
    block = block[:block.index("```")].replace("\\\n", " ")
    overrides = shlex.split(block)[3:]
    with initialize_config_dir(config_dir=os.path.dirname(config_pkg.__file__), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides)
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    from lpo_kernels.integrations.verl import parse_env_options
    options = parse_env_options(cfg.ray_kwargs.ray_init.runtime_env.env_vars.LPO_VERL_OPTIONS)
    return {"adv_estimator": cfg.algorithm.adv_estimator, "loss_mode": actor.policy_loss.loss_mode,
            "loss_agg_mode": actor.loss_agg_mode, "external_lib": cfg.actor_rollout_ref.model.external_lib,
            "options": options, "n_overrides": len(overrides)}


CASES["readme_config"] = readme_config


if __name__ == "__main__":
    sys.exit(main())
