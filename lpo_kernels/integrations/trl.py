"""TRL adapter: ``LPOTrainer``, a ``trl.GRPOTrainer`` whose loss is LPO.

What it changes in TRL's GRPO pipeline (TRL >= 1.x; checked against trl 1.16):

1. **Group ids and rewards reach the loss.** ``_calculate_rewards`` keeps the per-function
   rewards (gathered over processes); ``_generate_and_score_completions`` adds two per-row
   tensors to the batch it returns: ``lpo_group_ids`` (global prompt index: TRL's sampler
   puts the ``num_generations`` completions of a prompt on consecutive global rows) and
   ``lpo_rewards`` (the weighted reward sum TRL normalises into its advantages).
2. **Groups stay whole inside micro-batches** (``lpo_groups="whole"``). TRL shuffles the
   generation batch row by row before splitting it into ``steps_per_generation`` micro-batches;
   here groups are shuffled as units, and with ``per_device_train_batch_size`` a multiple of
   ``num_generations`` every micro-batch holds whole groups on every process. Otherwise the
   group-stats pre-pass below.
3. **The loss.** Per micro-batch: the LPO divergence averaged over its groups, divided by the
   gradient-accumulation steps (TRL's ``loss_type="grpo"`` convention: the accumulated gradient
   is the mean over all groups of the optimizer step). Two heads give the per-token log-probs:
   ``lpo_head="lpo"`` runs the backbone, takes its last hidden state and ``lm_head`` (ZeRO-3
   gathered, routed through the wrapped model's forward like TRL's former Liger path) and calls
   the fused LPO head with the model's logit soft-capping/scaling (``lm_head_transform``): one
   fused pass, or, when token gradient weights or ``beta > 0`` need the log-probs first,
   ``fused_linear_logprobs`` + ``lpo_loss``. ``lpo_head="trl"`` uses TRL's own chunked log-prob
   head (needed for MoE aux losses, images, and the entropy bonus, whose entropy must be
   differentiable). ``"auto"``: ``"lpo"`` where it applies.
4. **Metrics**: TRL's ``entropy``, ``kl`` (when ``beta > 0``), ``clip_ratio/low_mean``,
   ``clip_ratio/high_mean``, ``clip_ratio/region_mean`` plus ``lpo/divergence``,
   ``lpo/listwise_entropy``, ``lpo/target_entropy``, ``lpo/mean_abs_coef``, ``lpo/n_groups``.

Every TRL 1.16 ``GRPOConfig`` option that changes the loss is honoured with an LPO meaning or
refused with an error naming it (``check_trl_options``; the table is in the README, TRL
section). Options that act on single tokens or sequences after the policy's log-probs exist
(vLLM importance-sampling ratios, ``top_entropy_quantile``, ``off_policy_mask_threshold``,
``importance_sampling_level="sequence"``) become **token gradient weights**: each token's
gradient ``d loss / d logp[k,t]`` is multiplied by its weight while the listwise scores, the
target and the loss value stay those of the whole responses (``weight_token_grads``). LPO's
mask is not used for this: a non-binary mask re-weights the *score* too and is divided out of
the gradient by ``N_k = sum m`` (a per-sequence IS ratio would cancel exactly).

Groups split across micro-batches (``lpo_groups="stats"``, automatic when
``per_device_train_batch_size`` is not a multiple of ``num_generations``): at the first
micro-batch of each optimizer step a no-grad pass over the step's micro-batches records every
sequence's score (all-gathered over processes with ``lpo_kernels.distributed``); each
micro-batch's loss finishes its groups with the others' records (``lpo_kernels.group_stats``),
so the accumulated gradient is exactly the whole step's (one extra no-grad forward per
micro-batch). Needs ``steps_per_generation`` a multiple of ``gradient_accumulation_steps``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer as _trl_grpo_module
except ImportError as error:  # pragma: no cover - exercised only without trl
    raise ImportError("lpo_kernels.integrations.trl needs TRL: pip install trl transformers") from error

from ..functional import lpo_loss
from ..fused_linear import fused_linear_logprobs, fused_linear_lpo_loss
from ..options import LPOOptions

HEADS = ("auto", "lpo", "trl")
GROUP_MODES = ("auto", "whole", "stats")
LOSS_TYPE = "lpo"  # LPOConfig's loss_type: TRL's GRPO loss types are refused
# scale_rewards -> the LPO target whose logits are TRL's advantages for that scaling
_TARGET_OF_SCALING = {"group": "grpo", "none": "dr_grpo", "batch": "advantages"}
# reward-based targets -> the scale_rewards they imply (their own normalisation)
_SCALING_OF_TARGET = {"grpo": "group", "dr_grpo": "none", "rloo": "none", "maxrl": "none", "softmax": "none"}

# LPOOptions fields set from LPOConfig's lpo_* fields (clip eps come from TRL's epsilon).
_LPO_FIELDS = ("target", "divergence", "alpha", "tau", "eps", "seq_reduce", "clip")


@dataclass
class LPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the LPO options (see ../shared/docs/lpo-math.md).

    ``lpo_target="advantages"`` uses TRL's own advantages as target logits (``A / lpo_tau``);
    the other targets are computed from the rewards; ``"auto"`` picks the target that equals
    TRL's advantages for ``scale_rewards`` (group: ``grpo``, none: ``dr_grpo``, batch or
    ``multi_objective_aggregation="normalize_then_sum"``: ``advantages``). The clip range is
    ``epsilon`` / ``epsilon_high``; ``loss_type`` is ``"lpo"``."""

    loss_type: str = field(default=LOSS_TYPE, metadata={"help": "'lpo' (TRL's GRPO loss types are refused)"})
    lpo_target: str = field(default="auto", metadata={"help": "LPO target: auto (from scale_rewards), grpo, dr_grpo, "
                                                      "rloo, maxrl, softmax, advantages"})
    lpo_divergence: str = field(default="forward_kl", metadata={"help": "forward_kl, reverse_kl, alpha, js"})
    lpo_alpha: float = field(default=0.5, metadata={"help": "alpha of the alpha-divergence"})
    lpo_tau: float = field(default=1.0, metadata={"help": "target temperature (softmax/advantages targets)"})
    lpo_eps: float = field(default=1e-4, metadata={"help": "std epsilon of the grpo/maxrl targets (TRL's 1e-4)"})
    lpo_seq_reduce: str = field(default="mean", metadata={"help": "sequence score: mean or sum of token log-ratios"})
    lpo_clip: str = field(default="clamp", metadata={"help": "clamp, ppo or none"})
    lpo_head: str = field(default="auto", metadata={"help": "auto, lpo (fused head from hidden states) or trl"})
    lpo_groups: str = field(default="auto", metadata={"help": "whole (groups whole in micro-batches), stats "
                                                      "(group-stats pre-pass) or auto"})
    lpo_backend: str = field(default="auto", metadata={"help": "lpo_kernels backend: auto, torch, triton, cuda"})


def lpo_options_from_args(args, overrides: dict | None = None) -> dict:
    """LPO keyword options from an ``LPOConfig`` (or a plain ``GRPOConfig``: defaults) plus
    ``overrides`` (keys without the ``lpo_`` prefix). Validated through ``LPOOptions``."""
    defaults = LPOConfig.__dataclass_fields__
    options = {name: getattr(args, f"lpo_{name}", defaults[f"lpo_{name}"].default) for name in _LPO_FIELDS}
    epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    options.update(clip_eps_low=args.epsilon, clip_eps_high=epsilon_high)
    overrides = dict(overrides or {})
    if "reduction" in overrides:
        raise ValueError("lpo_options: 'reduction' is fixed by the trainer (mean over groups)")
    options.update(overrides)
    options["target"] = resolve_target(options["target"], args)
    LPOOptions(**options)  # raises ValueError/TypeError naming a bad option
    return options


def resolve_target(target: str, args) -> str:
    """The LPO target for TRL's ``scale_rewards`` / ``multi_objective_aggregation``: ``"auto"``
    picks the target equal to TRL's advantages; an explicit reward-based target must agree
    with them (else ValueError naming the TRL option)."""
    scaling = getattr(args, "scale_rewards", "group")
    scaling = {True: "group", False: "none"}.get(scaling, scaling)
    aggregation = getattr(args, "multi_objective_aggregation", "sum_then_normalize")
    if target == "auto":
        return "advantages" if aggregation == "normalize_then_sum" else _TARGET_OF_SCALING.get(scaling, "advantages")
    if target in _SCALING_OF_TARGET:
        if aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation={aggregation!r} normalises each reward function before "
                             f"summing; lpo_target={target!r} is computed from the summed rewards. Use "
                             "lpo_target='advantages' (TRL's advantages) or 'auto'")
        if scaling != _SCALING_OF_TARGET[target]:
            raise ValueError(f"scale_rewards={scaling!r} disagrees with lpo_target={target!r}, which scales the "
                             f"rewards its own way (scale_rewards={_SCALING_OF_TARGET[target]!r}); set that, or "
                             "lpo_target='auto' / 'advantages'")
    return target


def check_trl_options(args, lpo_options: dict | None = None) -> None:
    """Refuse, with a ValueError naming it, every TRL option that changes the GRPO loss and has
    no LPO meaning (the honoured ones are read where they act). Pure: tested without a run."""
    if args.loss_type != LOSS_TYPE:
        raise ValueError(f"loss_type={args.loss_type!r} is a GRPO token loss; LPOTrainer's loss is LPO's listwise "
                         f"divergence: set loss_type={LOSS_TYPE!r} (LPOConfig's default; the token weighting "
                         "inside a response is lpo_seq_reduce)")
    if args.delta is not None:
        raise ValueError("delta (TRL's two-sided clip of negative-advantage ratios) has no LPO counterpart: "
                         "lpo_clip='clamp' bounds every token's ratio to [1-epsilon, 1+epsilon_high] on both "
                         "sides already; leave delta=None")
    if args.importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{args.importance_sampling_level!r}")
    clip = (lpo_options or {}).get("clip", getattr(args, "lpo_clip", "clamp"))
    if args.importance_sampling_level == "sequence" and clip == "ppo":
        raise ValueError("importance_sampling_level='sequence' gates whole responses on their sequence ratio "
                         "(lpo_clip='clamp') or not at all ('none'); lpo_clip='ppo' is token-level")


def group_shuffle_permutation(group_ids: torch.Tensor) -> torch.Tensor:
    """A row permutation that shuffles groups as units (rows of a group stay together and in
    order). Groups are runs of equal ``group_ids``, as TRL lays them out."""
    _, counts = torch.unique_consecutive(group_ids.cpu(), return_counts=True)  # once per generation
    starts = torch.cumsum(counts, 0) - counts
    order = torch.randperm(len(counts))  # TRL's RNG, as its row shuffle uses
    counts, starts = counts[order], starts[order]
    new_starts = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - new_starts, counts) + torch.arange(group_ids.shape[0])


def shuffle_groups_dict(seq_dict: dict) -> dict:
    """``trl.trainer.utils.shuffle_sequence_dict`` with groups (``lpo_group_ids``) as units."""
    permutation = group_shuffle_permutation(seq_dict["lpo_group_ids"])

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[permutation.to(value.device)]
        return [value[i] for i in permutation.tolist()]

    return {key: permute(value) for key, value in seq_dict.items()}


@contextlib.contextmanager
def _group_shuffle_in_trl():
    """Within ``GRPOTrainer._prepare_inputs``, shuffle whole groups instead of rows."""
    original = _trl_grpo_module.shuffle_sequence_dict
    _trl_grpo_module.shuffle_sequence_dict = shuffle_groups_dict
    try:
        yield
    finally:
        _trl_grpo_module.shuffle_sequence_dict = original


def maybe_gather_lm_head_ctx(*params):
    """TRL's ZeRO-3 gather of the LM head for a direct weight access (a null context when
    ZeRO-3 is off, or with a TRL too old to have it)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx as gather
    except ImportError:
        return contextlib.nullcontext()
    return gather(*params)


def lm_head_transform(config) -> tuple[float | None, float]:
    """``(softcap, logit_scale)`` of a transformers model's logits, read from its config by
    the rules of TRL 1.16's ``add_fused_lm_head`` (``final_logit_softcapping``; the scale from
    ``logit_scale``, ``output_multiplier``, ``lm_head_multiplier``, or ``1/logits_scaling``
    except HyperCLOVA X, which multiplies). The fused heads apply them in TRL's order."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if getattr(text_config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return (None if softcap is None else float(softcap)), (1.0 if scale is None else float(scale))


def plain_lm_head(config) -> bool:
    """True when logits are exactly ``lm_head(h)`` (no soft-capping or logit scaling)."""
    return lm_head_transform(config) == (None, 1.0)


def weight_token_grads(logp: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``logp`` with the same values whose gradient is multiplied by ``weights`` (broadcast):
    per-token importance weights / gates on LPO's token gradient that leave the listwise
    scores, the target and the loss value unchanged."""
    if weights is None:
        return logp
    detached = logp.detach()
    return detached + (logp - detached) * weights.to(logp.dtype)


class LPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with the LPO loss. Pass an :class:`LPOConfig` as ``args`` (or a
    ``GRPOConfig`` plus ``lpo_options={...}``, keys as in :func:`lpo_kernels.lpo_loss`)."""

    def __init__(self, *args, lpo_options: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.args
        self.lpo_options = lpo_options_from_args(config, lpo_options)
        check_trl_options(config, self.lpo_options)
        self.lpo_backend = getattr(config, "lpo_backend", "auto")
        self.lpo_groups = self._resolve_group_mode(getattr(config, "lpo_groups", "auto"))
        model = self.accelerator.unwrap_model(self.model)
        self.lpo_softcap, self.lpo_logit_scale = lm_head_transform(model.config)
        self.lpo_head = self._resolve_head(getattr(config, "lpo_head", "auto"))
        self._lpo_rewards_per_func = None
        self._lpo_window_others = None  # stats mode: per micro-batch of the window, the others' records

    def _resolve_group_mode(self, mode: str) -> str:
        if mode not in GROUP_MODES:
            raise ValueError(f"lpo_groups must be one of {GROUP_MODES}, got {mode!r}")
        whole_fits = self.args.per_device_train_batch_size % self.num_generations == 0
        if mode == "auto":
            mode = "whole" if whole_fits else "stats"
        if mode == "whole" and not whole_fits:
            raise ValueError(
                f"lpo_groups='whole' needs whole groups in every micro-batch: per_device_train_batch_size "
                f"({self.args.per_device_train_batch_size}) must be a multiple of num_generations "
                f"({self.num_generations}); or use lpo_groups='stats'")
        if mode == "whole" and not hasattr(_trl_grpo_module, "shuffle_sequence_dict"):
            raise RuntimeError("this TRL version has no grpo_trainer.shuffle_sequence_dict to replace by a "
                               "group shuffle; use lpo_groups='stats'")
        if mode == "stats" and self.args.steps_per_generation % self.args.gradient_accumulation_steps:
            raise ValueError("lpo_groups='stats' needs steps_per_generation to be a multiple of "
                             "gradient_accumulation_steps (an optimizer step's micro-batches come from one generation)")
        return mode

    def _resolve_head(self, head: str) -> str:
        if head not in HEADS:
            raise ValueError(f"lpo_head must be one of {HEADS}, got {head!r}")
        aux = getattr(self, "aux_loss_enabled", False)
        bonus = getattr(self, "_entropy_bonus_enabled", False)
        if head == "lpo" and (aux or bonus):
            raise ValueError("lpo_head='lpo' has no MoE aux loss (router_aux_loss_coef) and no differentiable "
                             "entropy (entropy_coef / use_adaptive_entropy); use lpo_head='trl'")
        if head == "auto":
            head = "trl" if (aux or bonus) else "lpo"
        return head

    def _lpo_weights_need_logp(self) -> bool:
        """Whether token gradient weights depend on the current log-probs or entropies (the lpo
        head then takes its log-prob route instead of the one-pass fused loss)."""
        return (self.top_entropy_quantile < 1.0 or self.off_policy_mask_threshold is not None
                or self._lpo_sequence_gate())

    def _lpo_is_ratio(self, inputs):
        """TRL's vLLM importance-sampling ratio pi_old / pi_sampler (its mode, caps and masking
        already applied; [B, T] token modes, [B, 1] sequence modes), or None when off."""
        if self.use_vllm and self.vllm_importance_sampling_correction:
            return inputs["importance_sampling_ratio"]
        return None

    def _lpo_sequence_gate(self) -> bool:
        return self.importance_sampling_level == "sequence" and self.lpo_options["clip"] == "clamp"

    # -- 1. rewards and group ids travel with the batch -------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._lpo_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        device = output["completion_ids"].device
        n_local = output["completion_ids"].size(0)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        first_row = self.accelerator.process_index * n_local
        rows = torch.arange(first_row, first_row + n_local, device=device)
        output["lpo_group_ids"] = rows // group_size
        per_func = self._lpo_rewards_per_func.to(device)
        rewards = (per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(dim=1)
        # A completion no reward function scored gets its group's mean (TRL gives it zero advantage).
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = rewards.masked_fill(unscorable, float("nan")).view(-1, group_size)
        rewards = torch.where(rewards.isnan(), rewards.nanmean(dim=1, keepdim=True), rewards)
        output["lpo_rewards"] = torch.nan_to_num(rewards.view(-1), nan=0.0)[first_row:first_row + n_local]
        self._lpo_rewards_per_func = None
        return output

    # -- 2. groups shuffled as units --------------------------------------------------------
    def _prepare_inputs(self, generation_batch):
        if not self.model.training:
            return super()._prepare_inputs(generation_batch)
        if self.lpo_groups == "whole":
            with _group_shuffle_in_trl():
                return super()._prepare_inputs(generation_batch)
        # stats mode: rows shuffled, groups may split. At the first micro-batch of an optimizer
        # step, a no-grad pass over the step's micro-batches (all processes) records every
        # sequence's score; each micro-batch's loss then finishes its groups with the others'
        # records (lpo_kernels.group_stats). Exact: weights do not change within the step.
        inputs = super()._prepare_inputs(generation_batch)
        window = self.args.gradient_accumulation_steps
        if self._step % window == 0 or self._lpo_window_others is None:
            first = self._step % self.args.steps_per_generation
            first -= first % window
            model = getattr(self, "model_wrapped", None) or self.model
            self._lpo_window_others = self._group_stats_pre_pass(model, self._buffered_inputs[first:first + window])
        return {**inputs, "lpo_group_stats": self._lpo_window_others[self._step % window]}

    @torch.no_grad()
    def _group_stats_pre_pass(self, model, micro_batches):
        from ..distributed import all_gather_group_stats
        from ..group_stats import combine_group_stats, lpo_group_stats

        records = []
        for batch in micro_batches:
            if self.lpo_head == "lpo":
                from trl.models.utils import _ForwardRedirection

                unwrapped = self.accelerator.unwrap_model(model)
                with self.compute_loss_context_manager():  # the same autocast as the gradient pass
                    logp = _ForwardRedirection()(model, unwrapped, self._lpo_head_logps, unwrapped, batch)
            else:
                logp, _, _ = self._get_per_token_logps_and_entropies(
                    model, *self._lpo_model_inputs(batch), **self._multimodal_inputs(batch))
            records.append(lpo_group_stats(
                logp, batch.get("old_per_token_logps"), self._lpo_mask(batch), batch["lpo_group_ids"],
                batch["lpo_rewards"], self._lpo_advantages(batch), target=self.lpo_options["target"],
                seq_reduce=self.lpo_options["seq_reduce"]))
        remote = []
        if self.accelerator.num_processes > 1:
            remote = [all_gather_group_stats(combine_group_stats(records))]
        others = []
        for index in range(len(records)):
            parts = remote + records[:index] + records[index + 1:]
            others.append(combine_group_stats(parts) if parts else None)
        return others

    # -- 3. the loss ------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError("The LPOTrainer does not support returning outputs")
        if self.lpo_head == "lpo":
            # Through the wrapper's forward, so DDP/FSDP/ZeRO-3 hooks fire (TRL's Liger path did this).
            from trl.models.utils import _ForwardRedirection

            unwrapped = self.accelerator.unwrap_model(model)
            return _ForwardRedirection()(model, unwrapped, self._compute_lpo_loss, unwrapped, inputs)
        return self._compute_lpo_loss(model, inputs)

    def _compute_loss(self, model, inputs):
        return self._compute_lpo_loss(model, inputs)

    @staticmethod
    def _lpo_model_inputs(batch):
        completion_ids = batch["completion_ids"]
        input_ids = torch.cat([batch["prompt_ids"], completion_ids], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        return input_ids, attention_mask, completion_ids.size(1)

    @staticmethod
    def _multimodal_inputs(batch):
        return {key: batch.get(key) for key in (
            "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
            "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")}

    @staticmethod
    def _lpo_mask(batch):
        mask = batch["completion_mask"]
        return mask if "tool_mask" not in batch else mask * batch["tool_mask"]

    @staticmethod
    def _lpo_advantages(batch):
        advantages = batch["advantages"]
        return advantages[:, 0] if advantages.dim() == 2 else advantages  # LPO: one per sequence

    def _compute_lpo_loss(self, model, inputs):
        completion_mask = inputs["completion_mask"]
        mask = self._lpo_mask(inputs)
        advantages = self._lpo_advantages(inputs)
        old_logp = inputs.get("old_per_token_logps")  # None: on-policy
        group_ids, rewards = inputs["lpo_group_ids"], inputs["lpo_rewards"]
        others = inputs.get("lpo_group_stats")  # stats mode: the step's other sequences
        mode = "train" if self.model.training else "eval"

        aux_loss, entropy_mask, sequence_clip = None, None, None
        if self.lpo_head == "lpo" and not self._lpo_weights_need_logp() and self.beta == 0.0:
            loss, stats, entropies = self._lpo_head_loss(model, inputs, mask, advantages, old_logp, others)
            logp = None
        else:
            if self.lpo_head == "lpo":  # log-prob route: differentiable log-probs, then the listwise loss
                logp, entropies = self._lpo_head_logps(model, inputs, return_entropy=True)
            else:
                input_ids, attention_mask, logits_to_keep = self._lpo_model_inputs(inputs)
                logp, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                    model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
                    compute_aux_loss=getattr(self, "aux_loss_enabled", False), **self._multimodal_inputs(inputs))
            entropies = entropies * completion_mask  # TRL: positions labelled -100 have entropy 0
            weights, entropy_mask, sequence_clip = self._lpo_token_weights(inputs, logp, entropies, mask,
                                                                           advantages, old_logp)
            options = dict(self.lpo_options, clip="none") if sequence_clip is not None else self.lpo_options
            loss, stats = self._lpo_loss_from_logps(weight_token_grads(logp, weights), old_logp, mask, group_ids,
                                                    rewards, advantages, others, options)

        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if others is None:  # the mean over this micro-batch's groups
            loss = loss / normalizer
        else:
            # The value is the whole step's loss (every call returns it): log it once per step.
            # The gradient is this micro-batch's share of the whole step's gradient; DDP averages
            # over processes, hence the factor.
            loss = loss.detach() / normalizer + (loss - loss.detach()) * self.accelerator.num_processes
        policy_loss = loss.detach() * normalizer
        per_token_kl = None
        if self.beta != 0.0:  # GRPO's k3 KL to the reference, token mean per sequence, mean over sequences
            ref_logp = inputs["ref_per_token_logps"]
            per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
            if self.args.use_bias_correction_kl:  # TRL: times the (differentiable) importance ratio
                per_token_kl = per_token_kl * torch.exp(self._lpo_log_ratio(logp, old_logp, mask))
            seq_kl = (per_token_kl * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
            loss = loss + self.beta * seq_kl.mean() / normalizer
        if getattr(self, "_entropy_bonus_enabled", False):
            loss = loss - self._lpo_entropy_bonus(mode, entropies, mask, entropy_mask, policy_loss)
        if aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_lpo_metrics(mode, stats, entropies, mask, per_token_kl, sequence_clip)
        return loss

    def _lpo_log_ratio(self, logp, old_logp, mask):
        """TRL's log importance weight: per token, or the masked mean per sequence ([B, 1])."""
        log_ratio = logp - (logp.detach() if old_logp is None else old_logp)
        if self.importance_sampling_level == "sequence":
            return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        return log_ratio

    def _lpo_token_weights(self, inputs, logp, entropies, mask, advantages, old_logp):
        """Token gradient weights ([B, T] or [B, 1], None: all 1) from TRL's per-token options,
        the high-entropy mask, and (sequence level) the clip of each response's sequence ratio."""
        weights, entropy_mask, sequence_clip = None, None, None

        def times(w):
            nonlocal weights
            w = w.to(logp.dtype)
            weights = w if weights is None else weights * w

        if self._lpo_is_ratio(inputs) is not None:
            times(self._lpo_is_ratio(inputs))
        if self.top_entropy_quantile < 1.0:
            entropy_mask = self.get_high_entropy_mask(entropies.detach(), mask, 1 - self.top_entropy_quantile)
            times(entropy_mask)
        if self.off_policy_mask_threshold is not None:
            old = logp.detach() if old_logp is None else old_logp
            times(self.get_off_policy_mask(advantages.unsqueeze(1), logp, inputs.get("sampling_per_token_logps", old),
                                           mask, self.off_policy_mask_threshold))
        if self._lpo_sequence_gate():
            seq_log_ratio = self._lpo_log_ratio(logp.detach(), old_logp, mask)
            low = seq_log_ratio < math.log1p(-self.lpo_options["clip_eps_low"])
            high = seq_log_ratio > math.log1p(self.lpo_options["clip_eps_high"])
            sequence_clip = (low, high)
            times(~(low | high))
        return weights, entropy_mask, sequence_clip

    def _lpo_entropy_bonus(self, mode, entropies, mask, entropy_mask, policy_loss):
        """TRL's entropy bonus ``coef * mean entropy`` over the tokens the policy loss acts on,
        with its static or adaptive (Skywork-OR1) coefficient; needs TRL's differentiable entropy."""
        effective = mask if entropy_mask is None else mask * entropy_mask
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        entropy_term = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
        if self.use_adaptive_entropy:
            coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        else:
            coef = self.entropy_coef
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if self.use_adaptive_entropy and mode == "train":  # window-global entropy -> next step's coefficient
            window = torch.stack([(entropies * effective).sum(), effective.sum()]).detach()
            self._entropy_window_stats = window if self._entropy_window_stats is None else self._entropy_window_stats + window
            if self.accelerator.sync_gradients:
                totals = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world_entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
                step = self.args.entropy_coef_delta
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + step, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - step, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef * entropy_term

    def _lpo_loss_from_logps(self, logp, old_logp, mask, group_ids, rewards, advantages, others, options=None):
        options = self.lpo_options if options is None else options
        if others is None:
            return lpo_loss(logp, old_logp, mask, group_ids, rewards, advantages, backend=self.lpo_backend,
                            **options)
        from ..group_stats import lpo_loss_with_group_stats

        return lpo_loss_with_group_stats(logp, old_logp, mask, group_ids, rewards, advantages,
                                         group_stats=others, **options)

    def _lpo_head_inputs(self, model, batch):
        """Backbone last hidden states of the completion-predicting positions, and the head's
        weight/bias. Multimodal inputs are not passed: use the trl head for those."""
        model = self.accelerator.unwrap_model(model)
        if hasattr(model, "get_base_model"):  # PEFT
            model = model.get_base_model()
        input_ids, attention_mask, logits_to_keep = self._lpo_model_inputs(batch)
        backbone_out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = backbone_out.last_hidden_state[:, -logits_to_keep - 1:-1, :]  # predicts each completion token
        lm_head = model.get_output_embeddings()
        weight, bias = lm_head.weight, lm_head.bias
        return hidden.to(weight.dtype), weight, bias  # cast_lm_head_to_fp32: the head runs in fp32

    def _lpo_head_kwargs(self, bias):
        return dict(bias=bias, temperature=self.temperature, softcap=self.lpo_softcap,
                    logit_scale=self.lpo_logit_scale, backend=self.lpo_backend)

    def _lpo_head_loss(self, model, inputs, mask, advantages, old_logp, others):
        """The loss from the backbone's last hidden state and ``lm_head`` in one fused pass
        (never [B*T, V] logits); soft-capped/scaled logits as the model's config says."""
        hidden, weight, bias = self._lpo_head_inputs(model, inputs)
        completion_ids, group_ids, rewards = inputs["completion_ids"], inputs["lpo_group_ids"], inputs["lpo_rewards"]
        with maybe_gather_lm_head_ctx(weight, bias):
            loss, stats, head_outputs = fused_linear_lpo_loss(
                hidden, weight, completion_ids, mask, group_ids, rewards, advantages, old_logp=old_logp,
                group_stats=others, return_entropy=True, token_grad_weights=self._lpo_is_ratio(inputs),
                **self._lpo_head_kwargs(bias), **self.lpo_options)
        return loss, stats, head_outputs.entropy * inputs["completion_mask"]

    def _lpo_head_logps(self, model, batch, return_entropy=False):
        """Per-token log-probs (+ detached entropy) through the lpo head: differentiable
        (``fused_linear_logprobs`` recomputes each chunk's logits in its backward)."""
        hidden, weight, bias = self._lpo_head_inputs(model, batch)
        with maybe_gather_lm_head_ctx(weight, bias):
            # Padding-free: the GEMMs run over the completion's real tokens only.
            return fused_linear_logprobs(hidden, weight, batch["completion_ids"], mask=batch["completion_mask"],
                                         return_entropy=return_entropy, **self._lpo_head_kwargs(bias))

    # -- 4. metrics -------------------------------------------------------------------------
    def _log_lpo_metrics(self, mode, stats, entropies, mask, per_token_kl, sequence_clip=None):
        mask = mask.to(torch.float32)
        entropy_sum = (entropies.detach().float() * mask).sum()
        kl_sum = (per_token_kl.detach().float() * mask).sum() if per_token_kl is not None else mask.new_zeros(())
        # One reduce for the token sums, one gather for the per-process means: two host syncs per micro-batch.
        totals = self.accelerator.reduce(torch.stack([entropy_sum, kl_sum, mask.sum()]), reduction="sum")
        count = totals[2].clamp(min=1.0)
        names = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "lpo/divergence",
                 "lpo/listwise_entropy", "lpo/target_entropy", "lpo/mean_abs_coef", "lpo/n_groups")
        clip = [stats.clip_fraction_low, stats.clip_fraction_high, stats.clip_fraction]
        if sequence_clip is not None:  # sequence-level gate: share of counted tokens in gated responses
            n_local = mask.sum().clamp(min=1.0)  # this process's tokens (count is every process's)
            low, high = (torch.broadcast_to(x, mask.shape).float() for x in sequence_clip)
            clip = [(low * mask).sum() / n_local, (high * mask).sum() / n_local,
                    ((low + high) * mask).sum() / n_local]
        local = torch.stack([*clip, stats.divergence, stats.listwise_entropy, stats.target_entropy,
                             stats.mean_abs_coef, stats.n_groups]).float().to(mask.device)
        means = self.accelerator.gather(local.unsqueeze(0)).mean(0)
        values = dict(zip(names, means.tolist()))
        values["entropy"] = float(totals[0] / count)
        if per_token_kl is not None:
            values["kl"] = float(totals[1] / count)
        for name, value in values.items():
            self._metrics[mode][name].append(value)


__all__ = ["LPOConfig", "LPOTrainer", "lpo_options_from_args", "group_shuffle_permutation",
           "shuffle_groups_dict", "plain_lm_head", "lm_head_transform", "check_trl_options", "resolve_target",
           "weight_token_grads"]
