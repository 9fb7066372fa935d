"""Parity with TRL 1.16's real ``GRPOTrainer._compute_loss`` (run, not transcribed): every
loss type x every loss option, through ``grpo_loss`` (on log-probs) and
``fused_linear_grpo_loss`` (from hidden states; TRL's side computes logits -> log-probs
with its own ``selective_log_softmax`` / ``entropy_from_logits``).

TRL's method runs on a stub ``self`` that carries a real ``GRPOConfig`` and the attributes
``_compute_loss`` reads (one process, one accumulation step, train mode), with TRL's own
``get_high_entropy_mask``, ``get_off_policy_mask`` and ``get_gamma_weights``. The vLLM
importance-sampling ratio is checked against TRL's own code block, cut out of
``_generate_and_score_completions`` and executed. fp64: 1e-12 relative. fp32 (CCE's
pattern): our error against TRL in fp64 is no worse than TRL's own fp32 error plus slack.
Cases ported from TRL's and Liger-Kernel's GRPO tests (shapes, scattered masks,
temperature 2, tolerances)."""

from __future__ import annotations

import copy
import functools
import inspect
import math
import tempfile
import textwrap
import types
from collections import defaultdict

import pytest
import torch

from lpo_kernels import fused_linear_grpo_loss, grpo_loss, vllm_importance_sampling_ratio
from lpo_kernels.grpo import GRPO_LOSS_TYPES, high_entropy_mask
from tests.utils import assert_close

trl = pytest.importorskip("trl")
from trl import GRPOConfig  # noqa: E402
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import entropy_from_logits, selective_log_softmax  # noqa: E402

F64, F32 = torch.float64, torch.float32
B, T, H, V = 6, 7, 8, 11
TEMPERATURE = 0.9
MCL = 9  # GRPOConfig.max_completion_length for dr_grpo (> T: TRL divides by it, not by T)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --------------------------------------------------------------------------- TRL, run
@functools.lru_cache(maxsize=None)
def _base_config():
    with tempfile.TemporaryDirectory() as tmp:
        return GRPOConfig(output_dir=tmp, report_to=[], use_cpu=True, bf16=False)


class _OneProcess:
    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TRLLoss:
    """What ``GRPOTrainer._compute_loss`` reads from ``self``, set as ``__init__`` sets it."""

    _compute_loss = GRPOTrainer._compute_loss
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask
    get_off_policy_mask = staticmethod(GRPOTrainer.get_off_policy_mask)
    get_gamma_weights = staticmethod(GRPOTrainer.get_gamma_weights)

    def __init__(self, use_vllm=False, **config):
        args = copy.copy(_base_config())
        for name, value in config.items():
            assert hasattr(args, name), name
            setattr(args, name, value)
        self.args = args
        for name in ("loss_type", "beta", "importance_sampling_level", "off_policy_mask_threshold",
                     "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy",
                     "max_completion_length", "vllm_importance_sampling_correction",
                     "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_min",
                     "vllm_importance_sampling_clip_max"):
            setattr(self, name, getattr(args, name))
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
        self._last_world_entropy = float("inf")
        self._entropy_window_stats = None
        self.use_vllm = use_vllm
        self.aux_loss_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.accelerator = _OneProcess()
        self.model = types.SimpleNamespace(training=True)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def __call__(self, logp, entropy, mask, advantages, **inputs):
        self._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropy, None)
        b, t = logp.shape
        batch = dict(prompt_ids=torch.zeros(b, 1, dtype=torch.long), prompt_mask=torch.ones(b, 1, dtype=torch.long),
                     completion_ids=torch.zeros(b, t, dtype=torch.long), completion_mask=mask.long(),
                     advantages=advantages)
        for key, value in inputs.items():
            if value is not None:
                batch[key] = value
        if "num_items_in_batch" not in batch:
            batch["num_items_in_batch"] = mask.long().sum()
        loss = self._compute_loss(None, batch)
        # Python floats -> fp64 tensors (torch.as_tensor would make them fp32)
        return loss, {k: torch.tensor(v[-1], dtype=torch.float64) for k, v in self._metrics["train"].items()}


def trl_vllm_is_ratio(old_logp, sampling_logp, mask, mode, clip_min, clip_max):
    """TRL's own IS-ratio block of ``_generate_and_score_completions``, executed."""
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    start = source.index("            if self.use_vllm and self.vllm_importance_sampling_correction:\n"
                         "                mask = ")
    end = source.index("# Compute the per-token log probabilities for the reference model", start)
    block = textwrap.dedent(source[start:end])
    stub = types.SimpleNamespace(use_vllm=True, vllm_importance_sampling_correction=True,
                                 vllm_importance_sampling_mode=mode,
                                 vllm_importance_sampling_clip_min=clip_min,
                                 vllm_importance_sampling_clip_max=clip_max)
    scope = dict(self=stub, torch=torch, math=math, old_per_token_logps=old_logp,
                 sampling_per_token_logps=sampling_logp, completion_mask=mask.long(), tool_mask=None)
    exec(compile(block, "trl_is_ratio_block", "exec"), scope)  # noqa: S102 - TRL's own code
    return scope["vllm_importance_sampling_ratio"]


# --------------------------------------------------------------------------- cases
def make_case(seed=0, b=B, t=T, h=H, v=V, spread=0.3, scattered=False, token_adv=False,
              temperature=TEMPERATURE):
    """Hidden states + LM head; logp/old/ref/sampling log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=F64)
    weight = torch.randn(v, h, generator=g, dtype=F64) * 0.7
    bias = torch.randn(v, generator=g, dtype=F64) * 0.3
    ids = torch.randint(0, v, (b, t), generator=g)
    if scattered:  # Liger's test: random positions masked, not only a padded tail
        mask = torch.ones(b, t, dtype=torch.bool)
        n = int(torch.randint(1, max(b * t // 2, 2), (1,), generator=g))
        mask.view(-1)[torch.randperm(b * t, generator=g)[:n]] = False
    else:
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = torch.arange(t)[None] < lengths[:, None]
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, bias)
        logp = selective_log_softmax(logits, ids, temperature=temperature)
    noise = lambda s: s * torch.randn(b, t, generator=g, dtype=F64)  # noqa: E731
    adv = torch.randn((b, t) if token_adv else (b,), generator=g, dtype=F64)
    return dict(hidden=hidden, weight=weight, bias=bias, ids=ids, mask=mask, advantages=adv,
                temperature=torch.tensor(float(temperature), dtype=F64),
                old_logp=logp + noise(spread), ref_logp=logp + noise(0.2),
                sampling_logp=logp + noise(spread) + noise(0.1))


# name -> (TRL config fields, extra inputs). Each runs for every loss type it applies to.
OPTIONS = {
    "defaults": ({}, {}),
    "epsilon_high": (dict(epsilon=0.1, epsilon_high=0.28), {}),
    "on_policy": ({}, dict(on_policy=True)),
    "token_advantages": ({}, dict(token_adv=True)),
    "gspo_sequence_level": (dict(importance_sampling_level="sequence"), {}),
    "delta_two_sided": (dict(delta=1.25), {}),
    "beta_bias_corrected_kl": (dict(beta=0.04), {}),
    "beta_plain_kl": (dict(beta=0.04, use_bias_correction_kl=False), {}),
    "gspo_beta": (dict(importance_sampling_level="sequence", beta=0.04), {}),
    "top_entropy_quantile": (dict(top_entropy_quantile=0.4), {}),
    "off_policy_mask": (dict(off_policy_mask_threshold=0.02), dict(sampling=True)),
    "off_policy_mask_old": (dict(off_policy_mask_threshold=0.0), {}),
    "off_policy_mask_on_policy": (dict(off_policy_mask_threshold=0.0), dict(on_policy=True)),  # KL = 0 <= 0
    "zero_advantages": (dict(beta=0.04), dict(zero_adv=True)),  # all-equal groups: A = 0 exactly
    "num_items_in_batch": ({}, dict(num_items=61)),
    "entropy_bonus": (dict(entropy_coef=0.05), {}),
    "entropy_bonus_quantile": (dict(entropy_coef=0.05, top_entropy_quantile=0.5), {}),
    "sapo_vespo_params": (dict(sapo_temperature_pos=0.7, sapo_temperature_neg=1.6, vespo_k_pos=1.5,
                               vespo_lambda_pos=2.5, vespo_k_neg=2.0, vespo_lambda_neg=1.5), {}),
    "cispo_eps_max": (dict(epsilon_high=1.1), {}),
}
IS_MODES = {  # vLLM IS correction: mode -> (clip_min, clip_max)
    "token_truncate": (0.8, 1.2), "token_mask": (0.8, 1.25),
    "sequence_truncate": (None, 1.3), "sequence_mask": (0.5, 2.0),
}
OUR_NAMES = {"epsilon", "epsilon_high", "delta", "beta", "use_bias_correction_kl",
             "importance_sampling_level", "top_entropy_quantile", "off_policy_mask_threshold",
             "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
             "vespo_k_neg", "vespo_lambda_neg", "entropy_coef", "loss_type", "max_completion_length"}


def build(loss_type, option, dtype=F64, seed=0, is_mode=None, case=None):
    """(TRL stub, our options, tensors) for one cell of the matrix."""
    config, extra = OPTIONS[option]
    config = dict(config, loss_type=loss_type, max_completion_length=MCL)
    case = case or make_case(seed=seed, token_adv=extra.get("token_adv", False))
    if extra.get("zero_adv"):
        case = dict(case, advantages=case["advantages"].clone())
        case["advantages"][::2] = 0.0
    case = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.items()}
    inputs = dict(old_logp=None if extra.get("on_policy") else case["old_logp"],
                  ref_logp=case["ref_logp"] if config.get("beta") else None,
                  sampling_logp=case["sampling_logp"] if extra.get("sampling") else None,
                  num_items_in_batch=extra.get("num_items"), importance_sampling_ratio=None)
    use_vllm = is_mode is not None
    if use_vllm:
        clip_min, clip_max = IS_MODES[is_mode]
        config.update(vllm_importance_sampling_mode=is_mode, vllm_importance_sampling_clip_min=clip_min,
                      vllm_importance_sampling_clip_max=clip_max)
        inputs["importance_sampling_ratio"] = vllm_importance_sampling_ratio(
            case["old_logp"], case["sampling_logp"], case["mask"], mode=is_mode,
            clip_min=clip_min, clip_max=clip_max)
    trl_loss = TRLLoss(use_vllm=use_vllm, **config)
    ours = {k: v for k, v in config.items() if k in OUR_NAMES}
    return trl_loss, ours, case, inputs


def trl_head(case, requires_grad=True):
    """TRL's path from hidden states: logits, selective_log_softmax, entropy_from_logits,
    0 at masked positions (TRL's fused head writes 0 where the label is -100)."""
    leaves = {k: case[k].clone().requires_grad_(requires_grad) for k in ("hidden", "weight", "bias")}
    logits = torch.nn.functional.linear(leaves["hidden"], leaves["weight"], leaves["bias"])
    temperature = float(case["temperature"])
    logp = selective_log_softmax(logits, case["ids"], temperature=temperature)
    entropy = entropy_from_logits(logits / temperature)
    return leaves, logp.masked_fill(~case["mask"], 0.0), entropy.masked_fill(~case["mask"], 0.0)


def run_trl(trl_loss, case, inputs):
    leaves, logp, entropy = trl_head(case)
    trl_inputs = dict(old_per_token_logps=inputs["old_logp"], ref_per_token_logps=inputs["ref_logp"],
                      sampling_per_token_logps=inputs["sampling_logp"],
                      importance_sampling_ratio=inputs["importance_sampling_ratio"])
    if inputs["num_items_in_batch"] is not None:
        trl_inputs["num_items_in_batch"] = torch.tensor(inputs["num_items_in_batch"])
    loss, metrics = trl_loss(logp, entropy, case["mask"], case["advantages"], **trl_inputs)
    grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"], leaves["bias"]])
    return loss.detach(), grads, metrics, (logp.detach(), entropy.detach())


def run_ours_logp(ours, case, inputs, logp, entropy):
    """grpo_loss on TRL's log-probs (leaves), gradient chained back through TRL's head."""
    leaves, logp_t, entropy_t = trl_head(case)
    loss, stats = grpo_loss(logp_t, inputs["old_logp"], case["mask"], case["advantages"],
                            ref_logp=inputs["ref_logp"], entropy=entropy_t,
                            sampling_logp=inputs["sampling_logp"],
                            importance_sampling_ratio=inputs["importance_sampling_ratio"],
                            num_items_in_batch=inputs["num_items_in_batch"], **ours)
    grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"], leaves["bias"]])
    return loss.detach(), grads, stats


def run_ours_fused(ours, case, inputs, chunk_tokens=2 * T, backend="torch"):
    leaves = {k: case[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    ids = case["ids"].masked_fill(~case["mask"], -100)  # TRL's label convention at padding
    loss, stats, out = fused_linear_grpo_loss(
        leaves["hidden"], leaves["weight"], ids, case["mask"], case["advantages"], bias=leaves["bias"],
        temperature=float(case["temperature"]), old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"],
        sampling_logp=inputs["sampling_logp"], importance_sampling_ratio=inputs["importance_sampling_ratio"],
        num_items_in_batch=inputs["num_items_in_batch"], chunk_tokens=chunk_tokens, backend=backend,
        return_logp=True, return_entropy=True, **ours)
    grads = torch.autograd.grad(loss, [leaves["hidden"], leaves["weight"], leaves["bias"]])
    return loss.detach(), grads, stats, out


def applies(loss_type, option):
    if option == "delta_two_sided":
        return loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    if option == "sapo_vespo_params":
        return loss_type in ("sapo", "vespo")
    if option == "cispo_eps_max":
        return loss_type == "cispo"
    return True


MATRIX = [(lt, op) for lt in GRPO_LOSS_TYPES for op in OPTIONS if applies(lt, op)]
IS_MATRIX = [(lt, mode) for lt in GRPO_LOSS_TYPES for mode in IS_MODES
             if not (lt == "vespo" and mode.startswith("sequence"))]
_MAX_ERR = defaultdict(float)


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-300))


def check_fp64(loss_type, option, is_mode=None, seed=0):
    trl_loss, ours, case, inputs = build(loss_type, option, is_mode=is_mode, seed=seed)
    want, want_grads, metrics, (trl_logp, trl_entropy) = run_trl(trl_loss, case, inputs)
    name = f"{loss_type}/{option}/{is_mode}"
    for path, (loss, grads, stats) in (("grpo_loss", run_ours_logp(ours, case, inputs, trl_logp, trl_entropy)),
                                       ("fused", run_ours_fused(ours, case, inputs)[:3])):
        assert_close(loss, want, atol=1e-15, rtol=1e-12, name=f"{name} {path} loss")
        for g, w, n in zip(grads, want_grads, ("hidden", "weight", "bias")):
            scale = float(w.abs().max())
            assert_close(g, w, atol=1e-12 * scale + 1e-300, rtol=1e-12, name=f"{name} {path} grad {n}")
            _MAX_ERR[f"fp64 {path}"] = max(_MAX_ERR[f"fp64 {path}"], _rel(g, w))
        _MAX_ERR[f"fp64 {path} loss"] = max(_MAX_ERR[f"fp64 {path} loss"], _rel(loss, want))
        if "clip_ratio/region_mean" in metrics:
            assert_close(stats.clip_fraction, metrics["clip_ratio/region_mean"], atol=1e-7, rtol=0, name="region")  # TRL: fp32 (.float()) fractions
            assert_close(stats.clip_fraction_low, metrics["clip_ratio/low_mean"], atol=1e-7, rtol=0, name="low")
            assert_close(stats.clip_fraction_high, metrics["clip_ratio/high_mean"], atol=1e-7, rtol=0, name="high")
        if "cispo_clip_ratio" in metrics:
            assert_close(stats.clip_fraction, metrics["cispo_clip_ratio"], atol=1e-7, rtol=0, name="cispo clip")
        if "kl" in metrics:
            assert_close(stats.kl, metrics["kl"], atol=1e-15, rtol=1e-12, name="kl")
        if "policy_loss" in metrics:
            assert_close(stats.policy_loss, metrics["policy_loss"], atol=1e-14, rtol=1e-12, name="policy_loss")
        assert_close(stats.entropy, metrics["entropy"], atol=1e-15, rtol=1e-12, name=f"{path} entropy")
    return case


@pytest.mark.parametrize("loss_type,option", MATRIX, ids=[f"{a}-{b}" for a, b in MATRIX])
def test_fp64_matches_trl(loss_type, option):
    check_fp64(loss_type, option)


@pytest.mark.parametrize("loss_type,is_mode", IS_MATRIX, ids=[f"{a}-{b}" for a, b in IS_MATRIX])
def test_vllm_importance_sampling_fp64_matches_trl(loss_type, is_mode):
    check_fp64(loss_type, "defaults", is_mode=is_mode)


@pytest.mark.parametrize("mode", list(IS_MODES))
def test_vllm_is_ratio_is_trls_block(mode):
    case = make_case(seed=3, spread=0.4)
    case["sampling_logp"][0, 0] = float("nan")  # a token vLLM could not score: ratio 1
    clip_min, clip_max = IS_MODES[mode]
    want = trl_vllm_is_ratio(case["old_logp"], case["sampling_logp"], case["mask"], mode, clip_min, clip_max)
    got = vllm_importance_sampling_ratio(case["old_logp"], case["sampling_logp"], case["mask"], mode=mode,
                                         clip_min=clip_min, clip_max=clip_max)
    assert torch.equal(got, want)
    if mode.endswith("mask"):
        assert (got == 0).any() and (got != 0).any(), "the case must mask some and keep some"
    else:
        assert (got == clip_max).any()


def test_vllm_is_defaults_are_trls():
    config = _base_config()
    sig = inspect.signature(vllm_importance_sampling_ratio).parameters
    assert sig["mode"].default == config.vllm_importance_sampling_mode
    assert sig["clip_min"].default == config.vllm_importance_sampling_clip_min
    assert sig["clip_max"].default == config.vllm_importance_sampling_clip_max


def test_defaults_are_trls():
    from lpo_kernels.grpo import GRPOOptions

    config, opts = _base_config(), GRPOOptions(max_completion_length=512)
    for name in ("loss_type", "epsilon", "delta", "beta", "use_bias_correction_kl",
                 "importance_sampling_level", "top_entropy_quantile", "off_policy_mask_threshold",
                 "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos", "vespo_lambda_pos",
                 "vespo_k_neg", "vespo_lambda_neg", "entropy_coef", "max_completion_length"):
        assert getattr(opts, name) == getattr(config, name), name
    assert opts.loss_type == "dapo"
    assert opts.epsilon_high == (config.epsilon_high or config.epsilon)


def test_vespo_refuses_sequence_level_is_ratio_like_trl():
    case = make_case(seed=1)
    ratio = vllm_importance_sampling_ratio(case["old_logp"], case["sampling_logp"], case["mask"])
    assert ratio.shape == (B, 1)
    with pytest.raises(ValueError, match="importance_sampling_ratio"):
        grpo_loss(case["old_logp"], None, case["mask"], case["advantages"], loss_type="vespo",
                  importance_sampling_ratio=ratio)


def test_dapo_normalises_by_the_generation_batch():
    """Two accumulated micro-batches: TRL's dapo divides each by the whole generation
    batch's token count, so their sum is the token mean of the whole batch (not bnpo's)."""
    case = make_case(seed=5)
    halves = [slice(0, 3), slice(3, 6)]
    total = int(case["mask"].sum())
    logp = case["old_logp"] + 0.1
    parts = [grpo_loss(logp[s], case["old_logp"][s], case["mask"][s], case["advantages"][s],
                       num_items_in_batch=total)[0] for s in halves]
    whole, _ = grpo_loss(logp, case["old_logp"], case["mask"], case["advantages"])
    assert_close(sum(parts), whole, atol=1e-15, rtol=1e-12, name="sum of micro-batches")
    bnpo = [grpo_loss(logp[s], case["old_logp"][s], case["mask"][s], case["advantages"][s],
                      loss_type="bnpo")[0] for s in halves]
    assert abs(float(sum(bnpo) - whole)) > 1e-3


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_gradient_accumulation_convention(loss_type):
    """Two accumulation steps per generation (steps_per_generation = 2): TRL divides the
    grpo/bnpo/dr_grpo/luspo/sapo loss by the steps and normalises dapo/cispo/vespo by
    num_items_in_batch * steps / steps_per_generation — our loss is TRL's policy_loss."""
    trl_loss, ours, case, inputs = build(loss_type, "defaults")
    trl_loss.current_gradient_accumulation_steps = 2
    trl_loss.args.steps_per_generation = 2
    inputs["num_items_in_batch"] = 2 * int(case["mask"].sum())
    want, _, metrics, (logp, entropy) = run_trl(trl_loss, case, inputs)
    items = inputs["num_items_in_batch"] * 2 // 2  # as the docstring of lpo_kernels.grpo says
    loss, _, _ = run_ours_logp(ours, case, dict(inputs, num_items_in_batch=items), logp, entropy)
    per_item = loss_type in ("dapo", "cispo", "vespo")
    assert_close(want, loss if per_item else loss / 2, atol=1e-15, rtol=1e-12, name="TRL loss")


def test_high_entropy_mask_trl_examples_and_random():
    """TRL's own test example (top 20% of 10 counted tokens), then random cases against
    TRL's get_high_entropy_mask."""
    entropies = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6], [0.7, 0.8, 0.9, 1.0, 1.1, 1.2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(high_entropy_mask(entropies, mask, 0.2), expected)
    stub = TRLLoss()
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        ent = torch.rand(5, 9, generator=g, dtype=F64 if trial % 2 else F32) * 3
        m = torch.rand(5, 9, generator=g) < 0.7
        q = float(torch.rand((), generator=g)) if trial > 2 else (0.0, 1e-9, 0.999)[trial]
        want = stub.get_high_entropy_mask(ent, m.long(), 1 - q)
        assert torch.equal(high_entropy_mask(ent, m, q), want), trial
    empty = torch.zeros(3, 4, dtype=torch.bool)
    assert not high_entropy_mask(torch.rand(3, 4), empty, 0.2).any()


def test_fused_entropy_is_zero_where_trl_writes_zero():
    case = make_case(seed=2)
    ours = dict(loss_type="dapo")
    _, _, _, out = run_ours_fused(ours, case, dict(old_logp=case["old_logp"], ref_logp=None, sampling_logp=None,
                                                   importance_sampling_ratio=None, num_items_in_batch=None))
    _, logp, entropy = trl_head(case, requires_grad=False)
    assert_close(out.entropy, entropy, atol=1e-12, rtol=1e-12, name="entropy")
    assert_close(out.logp, logp, atol=1e-12, rtol=1e-12, name="logp")
    assert torch.all(out.entropy[~case["mask"]] == 0) and torch.all(out.entropy[case["mask"]] > 0)


# --------------------------------------------------------------------------- fp32 (CCE)
FP32_CASES = [(lt, op) for lt in GRPO_LOSS_TYPES
              for op in ("defaults", "gspo_sequence_level", "beta_bias_corrected_kl", "entropy_bonus")]


def _fp32_check(loss_type, option, backend="torch", case=None, slack=1e-6):
    trl_loss, ours, case64, inputs64 = build(loss_type, option, F64, case=case)
    case32 = {k: v.float() if v.is_floating_point() else v for k, v in case64.items()}
    up = {k: v.double() if v.is_floating_point() else v for k, v in case32.items()}
    trl64, ours64, up_case, in64 = build(loss_type, option, F64, case=up)
    truth_loss, truth_grads, _, _ = run_trl(trl64, up_case, in64)
    trl32, _, c32, in32 = build(loss_type, option, F32, case=case32)
    plain_loss, plain_grads, _, _ = run_trl(trl32, c32, in32)
    for path in ("grpo_loss", "fused"):
        if path == "grpo_loss":
            leaves_logp = trl_head(c32)
            loss, grads, _ = run_ours_logp(ours, c32, in32, leaves_logp[1], leaves_logp[2])
        else:
            loss, grads, _, _ = run_ours_fused(ours, c32, in32, backend=backend)
        for got, plain, truth, n in [(loss, plain_loss, truth_loss, "loss")] + list(
                zip(grads, plain_grads, truth_grads, ("hidden", "weight", "bias"))):
            assert got.dtype == F32
            err = float((got.double() - truth).abs().max())
            plain_err = float((plain.double() - truth).abs().max())
            # slack: a few fp32 ulps of the terms (a loss is a sum of O(1) terms that can cancel)
            scale = max(float(truth.abs().max()), 1.0) if n == "loss" else float(truth.abs().max())
            bound = 2 * plain_err + slack * scale
            assert err <= bound, f"{loss_type}/{option}/{path} {n}: err {err:.3g} > {bound:.3g} (TRL fp32 {plain_err:.3g})"
            key = f"fp32 {path} {backend}"
            _MAX_ERR[key] = max(_MAX_ERR[key], err / max(scale, 1e-30))
            _MAX_ERR["fp32 TRL itself"] = max(_MAX_ERR["fp32 TRL itself"], plain_err / max(scale, 1e-30))


@pytest.mark.parametrize("loss_type,option", FP32_CASES, ids=[f"{a}-{b}" for a, b in FP32_CASES])
def test_fp32_within_rounding_of_trl(loss_type, option):
    _fp32_check(loss_type, option)


TRITON_CASES = [("dapo", "beta_bias_corrected_kl"), ("grpo", "gspo_beta"), ("cispo", "defaults"),
                ("sapo", "entropy_bonus"), ("luspo", "top_entropy_quantile")]


@pytest.mark.parametrize("loss_type,option", TRITON_CASES, ids=[f"{a}-{b}" for a, b in TRITON_CASES])
def test_fp32_triton_head_within_rounding(loss_type, option):
    _fp32_check(loss_type, option, backend="triton")


def test_bf16_head_within_liger_tolerance():
    """Liger's bf16 tolerance (atol 5e-2, rtol 5e-1) against TRL in fp64 on the same
    bf16-rounded inputs."""
    case = make_case(seed=12, b=3, t=17, h=31, v=123, spread=0.01, scattered=True)
    case = {k: v.bfloat16().double() if v.is_floating_point() else v for k, v in case.items()}
    trl_loss, ours, c, inputs = build("dapo", "beta_bias_corrected_kl", F64, case=case)
    want, want_grads, _, _ = run_trl(trl_loss, c, inputs)
    low = {k: v.bfloat16() if k in ("hidden", "weight", "bias") else v for k, v in c.items()}
    in32 = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    loss, grads, _, _ = run_ours_fused(ours, dict(low, advantages=c["advantages"].float()), in32)
    assert_close(loss, want, atol=5e-2, rtol=5e-1, name="bf16 loss")
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.bfloat16
        assert_close(g, w, atol=5e-2, rtol=5e-1, name="bf16 grad")


def test_liger_case_shape_scattered_mask_temperature():
    """Liger's GRPO test case: (B, T, H, V) = (3, 47, 31, 123), random scattered mask,
    temperature 2, advantages in [0, 1), old log-probs 0.01 off; fp32 within rounding of TRL."""
    case = make_case(seed=11, b=3, t=47, h=31, v=123, spread=0.01, scattered=True, temperature=2.0)
    case["advantages"] = torch.rand(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    _fp32_check("bnpo", "beta_bias_corrected_kl", case=case)
    _fp32_check("dapo", "epsilon_high", case=case)
    trl_loss, ours, case, inputs = build("grpo", "beta_bias_corrected_kl", case=case)
    want, want_grads, _, _ = run_trl(trl_loss, case, inputs)
    loss, grads, _, _ = run_ours_fused(ours, case, inputs)
    assert_close(loss, want, atol=1e-15, rtol=1e-12, name="fp64 loss")
    for g, w in zip(grads, want_grads):
        assert_close(g, w, atol=1e-12 * float(w.abs().max()), rtol=1e-12, name="fp64 grad")


def test_report_max_errors():
    """Prints the max relative errors measured above (run with -s to see them)."""
    for key, value in sorted(_MAX_ERR.items()):
        print(f"max rel err {key}: {value:.3g}")


# --------------------------------------------------------------------------- TRL's own fused head
@pytest.mark.parametrize("loss_type,option", [("dapo", "entropy_bonus_quantile"), ("grpo", "gspo_beta"),
                                              ("sapo", "entropy_bonus")])
def test_trl_fused_head_softcap_fp32(loss_type, option):
    """TRL's real fused LM head (``trl.kernels.ChunkedLogProbFunction``, fp32, soft-cap and
    logit scale, differentiable entropy) feeding TRL's ``_compute_loss``, against our fused
    head with ``softcap``/``logit_scale``: both within fp32 rounding of the fp64 truth."""
    from trl.kernels import ChunkedLogProbFunction

    softcap, logit_scale = 3.0, 1.7
    case64 = make_case(seed=13, b=4, t=9, h=16, v=50, temperature=1.3)
    case64 = {k: v.float().double() if v.is_floating_point() else v for k, v in case64.items()}
    temperature = float(case64["temperature"])

    def transformed(c):
        u = torch.nn.functional.linear(c["hidden"], c["weight"], c["bias"]) * logit_scale
        return torch.tanh(u / softcap) * softcap

    def trl_side(c, fused):
        leaves = {k: c[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
        if fused:  # as trl.trainer.utils.add_fused_lm_head scores every position off Triton
            flat = leaves["hidden"].reshape(-1, leaves["hidden"].shape[-1])
            logp, entropy, *_ = ChunkedLogProbFunction.apply(
                flat, leaves["weight"], leaves["bias"], c["ids"].reshape(-1), temperature, 32, softcap,
                logit_scale, ("log_probs", "entropy"))
            logp, entropy = (x.view(c["mask"].shape).masked_fill(~c["mask"], 0) for x in (logp, entropy))
        else:
            logits = transformed(dict(c, **leaves))
            logp = selective_log_softmax(logits, c["ids"], temperature=temperature).masked_fill(~c["mask"], 0)
            entropy = entropy_from_logits(logits / temperature).masked_fill(~c["mask"], 0)
        trl_loss, _, _, inputs = build(loss_type, option, c["hidden"].dtype, case=c)
        loss, _ = trl_loss(logp, entropy, c["mask"], c["advantages"], old_per_token_logps=inputs["old_logp"],
                           ref_per_token_logps=inputs["ref_logp"], num_items_in_batch=c["mask"].long().sum())
        return [loss.detach()] + list(torch.autograd.grad(loss, list(leaves.values())))

    truth = trl_side(case64, fused=False)
    case32 = {k: v.float() if v.is_floating_point() else v for k, v in case64.items()}
    trl32 = trl_side(case32, fused=True)
    _, ours_opts, _, inputs = build(loss_type, option, F32, case=case32)
    leaves = {k: case32[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")}
    loss, _ = fused_linear_grpo_loss(leaves["hidden"], leaves["weight"], case32["ids"], case32["mask"],
                                     case32["advantages"], bias=leaves["bias"], temperature=temperature,
                                     old_logp=inputs["old_logp"], ref_logp=inputs["ref_logp"], chunk_tokens=18,
                                     softcap=softcap, logit_scale=logit_scale, **ours_opts)
    ours = [loss.detach()] + list(torch.autograd.grad(loss, list(leaves.values())))
    for name, got, trl_fp32, want in zip(("loss", "hidden", "weight", "bias"), ours, trl32, truth):
        scale = max(float(want.abs().max()), 1.0) if name == "loss" else float(want.abs().max())
        err = float((got.double() - want).abs().max())
        trl_err = float((trl_fp32.double() - want).abs().max())
        assert err <= 2 * trl_err + 1e-6 * scale, f"{name}: {err:.3g} vs TRL's fused head {trl_err:.3g}"
