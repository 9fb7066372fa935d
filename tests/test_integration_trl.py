"""LPOTrainer against a real TRL GRPOTrainer run on the CPU: a tiny random Llama, a local
word-level tokenizer, a toy reward; no downloads (HF_HUB_OFFLINE=1)."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from lpo_kernels import lpo_loss  # noqa: E402
from lpo_kernels.integrations.trl import (  # noqa: E402
    LPOConfig, LPOTrainer, group_shuffle_permutation, lpo_options_from_args)
from tests.utils import assert_close  # noqa: E402

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]
K = 4  # num_generations


def make_tokenizer():
    vocab = {word: i for i, word in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def make_model(seed=0, kind="llama"):
    """A tiny random model: Llama (plain head), Gemma-2 (final_logit_softcapping, small so that
    it bites), Cohere (logit_scale)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0,
                  eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    if kind == "gemma2":
        config = transformers.Gemma2Config(**common, head_dim=8, final_logit_softcapping=1.5,
                                           attn_logit_softcapping=None, sliding_window=16)
        return transformers.Gemma2ForCausalLM(config)
    if kind == "cohere":
        return transformers.CohereForCausalLM(transformers.CohereConfig(**common, logit_scale=0.4))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


def toy_reward(completions, **kwargs):
    """Counts of 'w3' plus a length bonus: varied, finite rewards."""
    return [float(text.count("w3")) + 0.1 * len(text.split()) for text in completions]


def make_trainer(tmp_path, trainer_cls=LPOTrainer, config_cls=LPOConfig, model_kind="llama", reward_funcs=None,
                 **overrides):
    dataset = datasets.Dataset.from_dict({"prompt": [f"w{i} w{i + 1} w{i + 2}" for i in range(16)]})
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=2 * K, num_generations=K,
                    max_completion_length=6, max_steps=2, learning_rate=1e-2, logging_steps=1,
                    report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True,
                    temperature=1.3)
    settings.update(overrides)
    model = make_model(kind=model_kind)
    if settings.get("beta", 0.0) > 0:  # TRL builds the reference model from a path: a local one
        model.save_pretrained(tmp_path / "tiny-llama")
        model = str(tmp_path / "tiny-llama")
    return trainer_cls(model=model, reward_funcs=reward_funcs or toy_reward, args=config_cls(**settings),
                       train_dataset=dataset, processing_class=make_tokenizer())


def run_and_check(trainer):
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == trainer.args.max_steps
    for entry in logs:
        assert math.isfinite(entry["loss"]) and math.isfinite(entry["grad_norm"])
        for name in ("entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
            assert math.isfinite(entry[name]), name
    changed = [name for name, p in trainer.model.named_parameters() if not torch.equal(before[name], p)]
    assert "lm_head.weight" in changed and len(changed) >= len(before) // 2
    return logs


@pytest.mark.parametrize("head", ["lpo", "trl"])
def test_lpo_trainer_trains(tmp_path, head):
    if head == "lpo":  # steps_per_generation > accumulation: off-policy micro-batches too
        trainer = make_trainer(tmp_path, lpo_head=head, per_device_train_batch_size=2 * K,
                               steps_per_generation=2, max_steps=3)
    else:
        trainer = make_trainer(tmp_path, lpo_head=head, lpo_divergence="reverse_kl")
    assert trainer.lpo_head == head
    logs = run_and_check(trainer)
    for entry in logs:
        for name in ("lpo/divergence", "lpo/listwise_entropy", "lpo/target_entropy", "lpo/mean_abs_coef"):
            assert math.isfinite(entry[name]), name
        assert entry["lpo/n_groups"] == 2  # per micro-batch: 2 whole groups of K
        assert entry["lpo/divergence"] > 0  # random rewards: target is not uniform


def test_lpo_trainer_off_policy_with_kl_and_accumulation(tmp_path):
    """steps_per_generation > grad accumulation makes TRL compute old_per_token_logps (off-policy
    micro-batches); beta > 0 adds the reference KL and TRL's `kl` metric."""
    trainer = make_trainer(tmp_path, per_device_train_batch_size=K, gradient_accumulation_steps=2,
                           steps_per_generation=4, beta=0.05, lpo_target="advantages",
                           lpo_clip="ppo", max_steps=3)
    assert trainer.lpo_head == "lpo"  # the KL term takes its differentiable log-prob route
    logs = run_and_check(trainer)
    assert all(math.isfinite(entry["kl"]) and entry["kl"] >= 0 for entry in logs)


def test_plain_grpo_trainer_same_setup(tmp_path):
    """The same tiny run through TRL's own GRPO loss: the wiring the LPO run is compared to."""
    trainer = make_trainer(tmp_path, trainer_cls=trl.GRPOTrainer, config_cls=trl.GRPOConfig)
    run_and_check(trainer)


def test_batches_hold_whole_groups_with_their_rewards(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=K, steps_per_generation=4)
    trainer.model.train()
    generation_batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = trainer.processing_class
    seen_groups = []
    for step in range(4):
        trainer._step = step
        inputs = trainer._prepare_inputs(generation_batch)
        group_ids = inputs["lpo_group_ids"]
        assert group_ids.shape == (K,) and torch.all(group_ids == group_ids[0])  # one whole group
        seen_groups.append(int(group_ids[0]))
        assert torch.all(inputs["prompt_ids"] == inputs["prompt_ids"][:1])  # same prompt
        texts = tokenizer.batch_decode(inputs["completion_ids"] * inputs["completion_mask"], skip_special_tokens=True)
        assert_close(inputs["lpo_rewards"], torch.tensor(toy_reward(texts)), atol=1e-6, rtol=0, name="rewards")
        rewards = inputs["lpo_rewards"]
        expected_adv = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        assert_close(inputs["advantages"], expected_adv, atol=1e-5, rtol=1e-5, name="advantages")
    assert sorted(seen_groups) == list(range(4))


def test_group_shuffle_permutation_keeps_groups_together():
    torch.manual_seed(1)
    group_ids = torch.tensor([5, 5, 5, 2, 2, 9, 9, 9, 9, 0])
    perm = group_shuffle_permutation(group_ids)
    assert sorted(perm.tolist()) == list(range(10))
    shuffled = group_ids[perm]
    runs = torch.unique_consecutive(shuffled)
    assert sorted(runs.tolist()) == [0, 2, 5, 9]  # every group one contiguous run


@pytest.mark.parametrize("model_kind", ["llama", "gemma2", "cohere"])
def test_loss_matches_lpo_loss_and_heads_agree(tmp_path, model_kind):
    """One micro-batch: the trainer's loss and lm_head gradient equal lpo_loss (fp64) on
    log-probs from the model's full tempered logits, for both heads. Gemma-2 soft-caps its
    logits and Cohere scales them: the lpo head applies both (fused, no fallback)."""
    trainer = make_trainer(tmp_path, lpo_head="auto", lpo_clip="none", lpo_divergence="js", bf16=False,
                           model_kind=model_kind)
    assert trainer.lpo_head == "lpo"
    assert (trainer.lpo_softcap, trainer.lpo_logit_scale) == {"llama": (None, 1.0), "gemma2": (1.5, 1.0),
                                                              "cohere": (None, 0.4)}[model_kind]
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model
    # Off-policy: perturb old log-probs so the listwise distribution is not uniform.
    completion_ids, mask = inputs["completion_ids"], inputs["completion_mask"]
    inputs["old_per_token_logps"] = -2.0 + 0.3 * torch.randn(completion_ids.shape, generator=torch.Generator().manual_seed(3))

    def reference_loss_and_grad():
        model.zero_grad()
        input_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
        attention = torch.cat([inputs["prompt_mask"], mask], 1)
        logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -completion_ids.size(1) - 1:-1]
        logp = torch.log_softmax(logits.double() / trainer.temperature, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
        loss, _ = lpo_loss(logp, inputs["old_per_token_logps"].double(), mask, inputs["lpo_group_ids"],
                           inputs["lpo_rewards"].double(), **lpo_options_from_args(trainer.args))
        loss.backward()
        return loss.detach().float(), model.lm_head.weight.grad.clone()

    expected_loss, expected_grad = reference_loss_and_grad()
    assert expected_loss > 0
    trainer.current_gradient_accumulation_steps = 2  # set by the training loop; the loss is divided by it
    for head in ("lpo", "trl"):
        trainer.lpo_head = head
        model.zero_grad()
        loss = trainer.compute_loss(model, inputs) * 2
        loss.backward()
        # fp32 (bf16=False: TRL's default autocasts to bf16 on the CPU too)
        slack = 1e-5
        assert_close(loss.detach(), expected_loss, atol=slack * float(expected_loss), rtol=1e-5, name=f"{head} loss")
        assert_close(model.lm_head.weight.grad, expected_grad, atol=slack * float(expected_grad.abs().max()),
                     rtol=1e-4, name=f"{head} grad")


def full_logits_reference(trainer, batches):
    """fp64 lpo_loss over the union of micro-batches, log-probs from the model's full logits."""
    model = trainer.model
    cat = {key: torch.cat([b[key] for b in batches]) for key in
           ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps",
            "lpo_group_ids", "lpo_rewards")}
    completion_ids, mask = cat["completion_ids"], cat["completion_mask"]
    model.zero_grad()
    input_ids = torch.cat([cat["prompt_ids"], completion_ids], 1)
    attention = torch.cat([cat["prompt_mask"], mask], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, -completion_ids.size(1) - 1:-1]
    logp = torch.log_softmax(logits.double() / trainer.temperature, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    loss, _ = lpo_loss(logp, cat["old_per_token_logps"].double(), mask, cat["lpo_group_ids"],
                       cat["lpo_rewards"].double(), **lpo_options_from_args(trainer.args))
    loss.backward()
    return loss.detach().float(), model.lm_head.weight.grad.clone()


@pytest.mark.parametrize("head", ["lpo", "trl"])
def test_split_groups_use_the_group_stats_pre_pass(tmp_path, head):
    """per_device_train_batch_size=6 with groups of 4: groups straddle micro-batches. With the
    pre-pass, the accumulated gradient equals the whole step's gradient."""
    trainer = make_trainer(tmp_path, per_device_train_batch_size=6, gradient_accumulation_steps=2,
                           steps_per_generation=2, lpo_head=head,
                           lpo_divergence="reverse_kl", lpo_clip="none", bf16=False)
    assert trainer.lpo_groups == "stats"
    trainer.model.train()
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # generate, split in 2
    batches = trainer._buffered_inputs
    shared = set(batches[0]["lpo_group_ids"].tolist()) & set(batches[1]["lpo_group_ids"].tolist())
    assert shared  # 6 rows per micro-batch, groups of 4: some group is split
    gen = torch.Generator().manual_seed(4)
    for batch in batches:  # off-policy, so the listwise distribution is not uniform
        batch["old_per_token_logps"] = -2.0 + 0.3 * torch.randn(batch["completion_ids"].shape, generator=gen)
    expected_loss, expected_grad = full_logits_reference(trainer, batches)
    others = trainer._group_stats_pre_pass(trainer.model, batches)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.zero_grad()
    for batch, other in zip(batches, others):
        loss = trainer.compute_loss(trainer.model, {**batch, "lpo_group_stats": other})
        assert_close(loss.detach() * 2, expected_loss, atol=1e-5 * float(expected_loss), rtol=1e-5, name="loss")
        loss.backward()
    slack = 1e-5
    assert_close(trainer.model.lm_head.weight.grad, expected_grad, atol=slack * float(expected_grad.abs().max()),
                 rtol=1e-4, name="grad")


def test_split_groups_training_run(tmp_path):
    trainer = make_trainer(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                           steps_per_generation=4, lpo_head="lpo", max_steps=2)
    assert trainer.lpo_groups == "stats"
    run_and_check(trainer)


def test_bad_configs_raise(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_generations"):
        make_trainer(tmp_path, per_device_train_batch_size=6, steps_per_generation=2, lpo_groups="whole")
    with pytest.raises(ValueError, match="steps_per_generation"):
        make_trainer(tmp_path, per_device_train_batch_size=K, gradient_accumulation_steps=2,
                     steps_per_generation=3, lpo_groups="stats")
    with pytest.raises(ValueError, match="divergence"):
        make_trainer(tmp_path, lpo_divergence="kl")
    with pytest.raises(ValueError, match="lpo_head"):
        make_trainer(tmp_path, lpo_head="liger")
    with pytest.raises(ValueError, match="entropy_coef"):
        make_trainer(tmp_path, lpo_head="lpo", entropy_coef=0.01)


def test_plain_grpo_config_with_lpo_options(tmp_path):
    trainer = make_trainer(tmp_path, config_cls=trl.GRPOConfig, epsilon=0.1, epsilon_high=0.3, loss_type="lpo",
                           scale_rewards="none")
    assert trainer.lpo_options["divergence"] == "forward_kl"
    trainer = LPOTrainer(model=make_model(), reward_funcs=toy_reward, args=trainer.args,
                         train_dataset=trainer.train_dataset, processing_class=make_tokenizer(),
                         lpo_options={"divergence": "alpha", "alpha": 0.3, "target": "dr_grpo"})
    assert trainer.lpo_options == dict(divergence="alpha", alpha=0.3, target="dr_grpo", tau=1.0, eps=1e-4,
                                       seq_reduce="mean", clip="clamp", clip_eps_low=0.1, clip_eps_high=0.3)
    with pytest.raises(ValueError, match="reduction"):
        lpo_options_from_args(trainer.args, {"reduction": "sum"})
    with pytest.raises(ValueError, match="alpha"):
        lpo_options_from_args(trainer.args, {"divergence": "alpha", "alpha": 1.5})


def _ddp_worker():
    """One rank of test_two_processes_groups_split_across_ranks (run as a subprocess)."""
    import json
    import pathlib

    import torch.distributed as dist

    out, rank = pathlib.Path(os.environ["LPO_TEST_OUT"]), int(os.environ["RANK"])
    # per-rank generation batch of 6 rows, groups of 4: a group straddles the two ranks
    settings = dict(per_device_train_batch_size=6, gradient_accumulation_steps=1, steps_per_generation=1,
                    lpo_clip="none", bf16=False, max_steps=2)
    trainer = make_trainer(out / f"exact{rank}", lpo_head=os.environ["LPO_TEST_HEAD"], **settings)
    assert trainer.accelerator.num_processes == 2 and trainer.lpo_groups == "stats"
    trainer.model.train()
    model = trainer.model_wrapped = trainer.accelerator.prepare(trainer.model)  # DDP (gloo)
    trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    batch = trainer._buffered_inputs[0]
    batch["old_per_token_logps"] = -2.0 + 0.3 * torch.randn(batch["completion_ids"].shape,
                                                            generator=torch.Generator().manual_seed(10 + rank))
    others = trainer._group_stats_pre_pass(model, [batch])[0]  # all-gathers the other rank's records
    trainer.current_gradient_accumulation_steps = 1
    model.zero_grad()
    loss = trainer.compute_loss(model, {**batch, "lpo_group_stats": others})
    loss.backward()  # DDP averages the two ranks' shares
    grad = trainer.model.lm_head.weight.grad.clone()
    both = [None, None]
    keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "old_per_token_logps",
            "lpo_group_ids", "lpo_rewards")
    dist.all_gather_object(both, {key: batch[key] for key in keys})
    expected_loss, expected_grad = full_logits_reference(trainer, both)
    result = dict(split=bool(set(both[0]["lpo_group_ids"].tolist()) & set(both[1]["lpo_group_ids"].tolist())),
                  loss=float(loss.detach()), expected_loss=float(expected_loss),
                  grad_err=float((grad - expected_grad).abs().max()), grad_max=float(expected_grad.abs().max()))
    # and a real two-step run in the same setting
    trainer = make_trainer(out / f"run{rank}", lpo_head=os.environ["LPO_TEST_HEAD"], **settings)
    trainer.train()
    result["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result["param_sum"] = float(sum(p.double().sum() for p in trainer.model.parameters()))
    (out / f"result{rank}.json").write_text(json.dumps(result))
    # Leave without interpreter teardown: gloo's threads can abort a process at exit
    # ("terminate called without an active exception") after the work is done and saved.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_processes_groups_split_across_ranks(tmp_path):
    """Two CPU processes (gloo DDP), groups split across ranks: the stats pre-pass all-gathers
    the other rank's records and the DDP-averaged gradient equals the single-process gradient
    of the whole batch; a two-step run stays finite and in sync."""
    import json
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
               OMP_NUM_THREADS="1", LPO_TEST_OUT=str(tmp_path), LPO_TEST_HEAD="lpo", PYTHONPATH=root)
    procs = [subprocess.Popen([sys.executable, "-c", "import tests.test_integration_trl as t; t._ddp_worker()"],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-3000:]
    results = [json.loads((tmp_path / f"result{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["split"]
        assert result["loss"] == pytest.approx(result["expected_loss"], rel=1e-5)
        assert result["grad_err"] <= 1e-5 * result["grad_max"]
        assert len(result["losses"]) == 2 and all(math.isfinite(x) for x in result["losses"])
    assert results[0]["param_sum"] == results[1]["param_sum"]  # DDP kept the ranks in sync


# --------------------------------------------------------------------------- TRL options
# One test per row of the README's "TRL option -> what LPOTrainer does" table.
from lpo_kernels.integrations.trl import check_trl_options, resolve_target  # noqa: E402


def micro_batch(trainer, seed=3, near_policy=False):
    """One generated micro-batch with off-policy old log-probs (the listwise distribution is
    then not uniform). ``near_policy``: old = current + per-sequence offsets in [-0.4, 0.4]
    + noise, so sequence ratios fall on both sides of the clip range."""
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    gen = torch.Generator().manual_seed(seed)
    shape = inputs["completion_ids"].shape
    if near_policy:
        with torch.no_grad():
            logp, _ = full_logits_logp(trainer, inputs)
        offsets = torch.linspace(-0.4, 0.4, shape[0])[torch.randperm(shape[0], generator=gen)]
        inputs["old_per_token_logps"] = (logp + offsets[:, None] + 0.05 * torch.randn(shape, generator=gen,
                                                                                        dtype=torch.float64)).float()
    else:
        inputs["old_per_token_logps"] = -2.0 + 0.3 * torch.randn(shape, generator=gen)
    trainer.current_gradient_accumulation_steps = 2
    return inputs


def full_logits_logp(trainer, inputs):
    """fp64 log-probs and entropies of the completion tokens from the model's full logits
    (soft-capped/scaled by the model itself), tempered as TRL does."""
    completion_ids = inputs["completion_ids"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    logits = trainer.model(input_ids=input_ids, attention_mask=attention).logits[:, -completion_ids.size(1) - 1:-1]
    log_probs = torch.log_softmax(logits.double() / trainer.temperature, -1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1), entropy


def weighted_reference(trainer, inputs, token_weights=None, options=None, extra_loss=None):
    """Loss and lm_head gradient of the listwise loss on full-logit log-probs, each token's
    gradient times ``token_weights(logp, entropy)`` (formed independently of the trainer:
    grad-logp of the fp64 loss, weighted, back-propagated through the logits)."""
    model = trainer.model
    model.zero_grad()
    logp, entropy = full_logits_logp(trainer, inputs)
    leaf = logp.detach().requires_grad_()
    loss, _ = lpo_loss(leaf, inputs["old_per_token_logps"].double(), inputs["completion_mask"],
                       inputs["lpo_group_ids"], inputs["lpo_rewards"].double(), inputs["advantages"].double(),
                       **(options or lpo_options_from_args(trainer.args)))
    (grad_logp,) = torch.autograd.grad(loss, leaf)
    if token_weights is not None:
        grad_logp = grad_logp * token_weights(logp.detach(), entropy.detach())
    total = (logp * grad_logp).sum()
    value = loss.detach()
    if extra_loss is not None:
        extra = extra_loss(logp, entropy)
        total, value = total + extra, value + extra.detach()
    total.backward()
    return value, model.lm_head.weight.grad.clone()


def trainer_loss_and_grad(trainer, inputs, head):
    trainer.lpo_head = head
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs) * 2  # / gradient-accumulation steps
    loss.backward()
    return loss.detach(), trainer.model.lm_head.weight.grad.clone()


def assert_matches(actual, expected, name):
    (loss, grad), (ref_loss, ref_grad) = actual, expected
    assert_close(loss, ref_loss, atol=2e-5 * max(1.0, float(ref_loss.abs())), rtol=1e-5, name=f"{name} loss")
    assert float(ref_grad.abs().max()) > 0
    assert_close(grad, ref_grad, atol=2e-5 * float(ref_grad.abs().max()), rtol=1e-4, name=f"{name} grad")


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"])
def test_row_loss_type_grpo_types_refused(tmp_path, loss_type):
    with pytest.raises(ValueError, match="loss_type"):
        make_trainer(tmp_path, loss_type=loss_type)
    assert LPOConfig(output_dir=str(tmp_path), use_cpu=True).loss_type == "lpo"


def test_row_delta_refused(tmp_path):
    with pytest.raises(ValueError, match="delta"):
        make_trainer(tmp_path, delta=1.5)


def test_row_epsilon_is_the_clip_range(tmp_path):
    trainer = make_trainer(tmp_path, epsilon=0.1, epsilon_high=0.3, lpo_clip="clamp", bf16=False)
    assert (trainer.lpo_options["clip_eps_low"], trainer.lpo_options["clip_eps_high"]) == (0.1, 0.3)
    inputs = micro_batch(trainer, near_policy=True)
    expected = weighted_reference(trainer, inputs)
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)


def test_row_importance_sampling_level_sequence_gates_responses(tmp_path):
    trainer = make_trainer(tmp_path, importance_sampling_level="sequence", bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    mask = inputs["completion_mask"]
    eps_low, eps_high = trainer.lpo_options["clip_eps_low"], trainer.lpo_options["clip_eps_high"]

    def gate(logp, entropy):
        seq = ((logp - inputs["old_per_token_logps"].double()) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        keep = (seq >= math.log(1 - eps_low)) & (seq <= math.log(1 + eps_high))
        assert 0 < int(keep.sum()) < keep.numel()  # both gated and kept responses
        return keep[:, None].double()

    expected = weighted_reference(trainer, inputs, gate, options=dict(lpo_options_from_args(trainer.args), clip="none"))
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        make_trainer(tmp_path, importance_sampling_level="sequence", lpo_clip="ppo")


@pytest.mark.parametrize("shape", ["token", "sequence"])
def test_row_vllm_importance_sampling_ratio_weights_token_gradients(tmp_path, shape):
    """use_vllm + vllm_importance_sampling_correction: TRL's ratio (its mode and caps already
    applied; token modes [B, T], sequence modes [B, 1], masked entries 0) multiplies each
    token's gradient. vLLM is not installed here: the ratio is injected as TRL would."""
    trainer = make_trainer(tmp_path, bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    gen = torch.Generator().manual_seed(7)
    rows, cols = inputs["completion_ids"].shape
    ratio = torch.rand(rows, cols if shape == "token" else 1, generator=gen) * 2.5
    ratio[0] = 0.0  # a masked (out of [clip_min, clip_max]) ratio
    inputs["importance_sampling_ratio"] = ratio
    trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
    expected = weighted_reference(trainer, inputs, lambda logp, entropy: ratio.double())
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)


def test_row_top_entropy_quantile_masks_token_gradients(tmp_path):
    trainer = make_trainer(tmp_path, top_entropy_quantile=0.3, bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    mask = inputs["completion_mask"].bool()

    def high_entropy(logp, entropy):
        threshold = torch.quantile(entropy[mask], 0.7)
        keep = (entropy >= threshold) & mask
        assert 0 < int(keep.sum()) < int(mask.sum())
        return keep.double()

    expected = weighted_reference(trainer, inputs, high_entropy)
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)


def test_row_off_policy_mask_threshold_masks_sequences(tmp_path):
    trainer = make_trainer(tmp_path, bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    mask = inputs["completion_mask"]
    with torch.no_grad():
        logp, _ = full_logits_logp(trainer, inputs)
    seq_kl = ((inputs["old_per_token_logps"].double() - logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    ordered = seq_kl.sort().values
    threshold = float(ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2  # between two values
    trainer.off_policy_mask_threshold = threshold
    keep = (inputs["advantages"] >= 0) | (seq_kl <= threshold)
    assert 0 < int(keep.sum()) < keep.numel()
    expected = weighted_reference(trainer, inputs, lambda logp, entropy: keep[:, None].double())
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_row_beta_and_use_bias_correction_kl(tmp_path, bias_correction):
    """beta > 0: TRL's k3 KL (token mean per response, mean over responses), times the
    differentiable ratio with use_bias_correction_kl; both heads (lpo: its log-prob route)."""
    trainer = make_trainer(tmp_path, beta=0.2, use_bias_correction_kl=bias_correction, bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    mask = inputs["completion_mask"]
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        logp, _ = full_logits_logp(trainer, inputs)
    inputs["ref_per_token_logps"] = (logp + 0.2 * torch.randn(logp.shape, generator=gen, dtype=torch.float64)).float()

    def kl_term(logp, entropy):
        ref = inputs["ref_per_token_logps"].double()
        kl = torch.exp(ref - logp) - (ref - logp) - 1
        if bias_correction:
            kl = kl * torch.exp(logp - inputs["old_per_token_logps"].double())
        return 0.2 * ((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()

    expected = weighted_reference(trainer, inputs, extra_loss=kl_term)
    for head in ("lpo", "trl"):
        assert_matches(trainer_loss_and_grad(trainer, inputs, head), expected, head)


def test_row_entropy_coef_bonus(tmp_path):
    trainer = make_trainer(tmp_path, entropy_coef=0.3, bf16=False)
    assert trainer.lpo_head == "trl"  # auto: the bonus needs TRL's differentiable entropy
    inputs = micro_batch(trainer, near_policy=True)
    mask = inputs["completion_mask"]
    expected = weighted_reference(
        trainer, inputs, extra_loss=lambda logp, entropy: -0.3 * (entropy * mask).sum() / mask.sum())
    assert_matches(trainer_loss_and_grad(trainer, inputs, "trl"), expected, "trl")


def test_row_use_adaptive_entropy_updates_the_coefficient(tmp_path):
    trainer = make_trainer(tmp_path, use_adaptive_entropy=True, entropy_coef=0.01, entropy_coef_delta=0.005,
                           entropy_target=100.0)  # entropy below target: the coefficient grows each step
    logs = run_and_check(trainer)
    assert [round(entry["entropy_coef"], 6) for entry in logs] == [0.015, 0.02]
    assert all(math.isfinite(entry["policy_loss"]) for entry in logs)


def test_row_mask_truncated_completions_leave_the_simplex(tmp_path):
    """TRL zeroes a truncated completion's mask; LPO then leaves it out of its group's simplex
    (spec section 3): the loss equals lpo_loss on the other rows alone."""
    trainer = make_trainer(tmp_path, mask_truncated_completions=True, bf16=False)
    inputs = micro_batch(trainer, near_policy=True)
    inputs["completion_mask"] = inputs["completion_mask"].clone()
    inputs["completion_mask"][[0, K + 1]] = 0  # as TRL writes for truncated rows
    keep = inputs["completion_mask"].sum(-1) > 0
    with torch.no_grad():
        logp, _ = full_logits_logp(trainer, inputs)
        expected, _ = lpo_loss(logp[keep], inputs["old_per_token_logps"][keep].double(),
                               inputs["completion_mask"][keep], inputs["lpo_group_ids"][keep],
                               inputs["lpo_rewards"][keep].double(), **lpo_options_from_args(trainer.args))
    for head in ("lpo", "trl"):
        trainer.lpo_head = head
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, inputs) * 2
        assert_close(loss, expected, atol=1e-5, rtol=1e-5, name=head)
    trainer = make_trainer(tmp_path, mask_truncated_completions=True, max_completion_length=3)
    trainer.train()  # a random model rarely stops within 3 tokens: most responses leave their simplex
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(math.isfinite(entry["loss"]) and entry["lpo/n_groups"] <= 2 for entry in logs)


@pytest.mark.parametrize("scale_rewards,target", [("group", "grpo"), ("none", "dr_grpo")])
def test_row_scale_rewards_picks_the_target_equal_to_trl_advantages(tmp_path, scale_rewards, target):
    trainer = make_trainer(tmp_path, scale_rewards=scale_rewards, bf16=False)
    assert trainer.lpo_options["target"] == target
    inputs = micro_batch(trainer, near_policy=True)
    with torch.no_grad():
        logp, _ = full_logits_logp(trainer, inputs)
    args = (logp, inputs["old_per_token_logps"].double(), inputs["completion_mask"], inputs["lpo_group_ids"])
    options = lpo_options_from_args(trainer.args)
    from_rewards, _ = lpo_loss(*args, inputs["lpo_rewards"].double(), **options)
    from_advantages, _ = lpo_loss(*args, None, inputs["advantages"].double(), **dict(options, target="advantages"))
    assert_close(from_rewards, from_advantages, atol=1e-6, rtol=1e-6, name="target")


def test_row_scale_rewards_and_multi_objective_aggregation_consistency(tmp_path):
    args = lambda **kw: trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, **kw)  # noqa: E731
    assert resolve_target("auto", args(scale_rewards="batch")) == "advantages"
    assert resolve_target("auto", args(multi_objective_aggregation="normalize_then_sum")) == "advantages"
    assert resolve_target("rloo", args(scale_rewards="none")) == "rloo"
    assert resolve_target("advantages", args(scale_rewards="batch")) == "advantages"
    with pytest.raises(ValueError, match="scale_rewards"):
        resolve_target("grpo", args(scale_rewards="none"))
    with pytest.raises(ValueError, match="scale_rewards"):
        resolve_target("rloo", args(scale_rewards="group"))
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        resolve_target("grpo", args(multi_objective_aggregation="normalize_then_sum"))


def test_row_reward_weights_sum_into_lpo_rewards(tmp_path):
    def length_reward(completions, **kwargs):
        return [float(len(text.split())) for text in completions]

    trainer = make_trainer(tmp_path, reward_funcs=[toy_reward, length_reward], reward_weights=[2.0, -0.5])
    trainer.model.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    texts = trainer.processing_class.batch_decode(inputs["completion_ids"] * inputs["completion_mask"],
                                                  skip_special_tokens=True)
    expected = 2.0 * torch.tensor(toy_reward(texts)) - 0.5 * torch.tensor(length_reward(texts))
    assert_close(inputs["lpo_rewards"], expected, atol=1e-5, rtol=0, name="rewards")


def test_row_num_iterations_reuses_generations_off_policy(tmp_path):
    """num_iterations=2: TRL reuses each generation twice and records old log-probs; the
    second pass is off-policy (P not uniform, divergence moves)."""
    trainer = make_trainer(tmp_path, num_iterations=2, max_steps=2)
    logs = run_and_check(trainer)
    assert logs[0]["lpo/divergence"] != logs[1]["lpo/divergence"]


def test_row_cast_lm_head_to_fp32(tmp_path):
    trainer = make_trainer(tmp_path, cast_lm_head_to_fp32=True, bf16=False)
    assert trainer.model.lm_head.weight.dtype == torch.float32
    inputs = micro_batch(trainer, near_policy=True)
    expected = weighted_reference(trainer, inputs)
    assert_matches(trainer_loss_and_grad(trainer, inputs, "lpo"), expected, "lpo")


def test_row_router_aux_loss_needs_the_trl_head(tmp_path):
    """MoE aux loss (router_aux_loss_coef): TRL's head adds it; the lpo head refuses."""
    config = transformers.MixtralConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                        num_local_experts=2, num_experts_per_tok=1, max_position_embeddings=64,
                                        pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                        output_router_logits=True, router_aux_loss_coef=0.01)
    dataset = datasets.Dataset.from_dict({"prompt": ["w1 w2 w3"] * 8})
    args = LPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=K, num_generations=K, use_cpu=True,
                     report_to=[], max_completion_length=4, lpo_head="lpo")
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        LPOTrainer(model=transformers.MixtralForCausalLM(config), reward_funcs=toy_reward, args=args,
                   train_dataset=dataset, processing_class=make_tokenizer())
    args.lpo_head = "auto"
    trainer = LPOTrainer(model=transformers.MixtralForCausalLM(config), reward_funcs=toy_reward, args=args,
                         train_dataset=dataset, processing_class=make_tokenizer())
    assert trainer.lpo_head == "trl" and trainer.aux_loss_enabled


def test_row_use_liger_kernel_is_not_a_loss_option(tmp_path):
    """TRL 1.16 applies only Liger's layer kernels (the model's forward); the loss is LPO's."""
    check_trl_options(LPOConfig(output_dir=str(tmp_path), use_cpu=True, use_liger_kernel=True))


@pytest.mark.parametrize("head", ["lpo", "trl"])
def test_entropy_is_zero_where_the_label_is_masked(tmp_path, head):
    """TRL writes entropy 0 at positions labelled -100 (completion padding); so does LPOTrainer
    in what it logs and uses (the high-entropy mask, the entropy bonus)."""
    trainer = make_trainer(tmp_path, lpo_head=head, bf16=False)
    inputs = micro_batch(trainer)
    inputs["completion_mask"] = inputs["completion_mask"].clone()
    inputs["completion_mask"][::3, 4:] = 0  # completion padding after an early EOS
    seen = {}
    original = trainer._log_lpo_metrics

    def capture(mode, stats, entropies, *args):
        seen["entropies"] = entropies.detach()
        return original(mode, stats, entropies, *args)

    trainer._log_lpo_metrics = capture
    padding = inputs["completion_mask"] == 0
    assert padding.any()
    with torch.no_grad():
        trainer.compute_loss(trainer.model, inputs)
    assert torch.all(seen["entropies"][padding] == 0) and torch.all(seen["entropies"][~padding] > 0)
