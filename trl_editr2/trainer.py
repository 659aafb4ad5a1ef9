"""`EditR2Trainer`: joint reasoning + flow-matching RL over multi-turn editing sessions, as a `transformers.Trainer`.

The trainer subclasses `transformers.Trainer` (like TRL's GRPOTrainer, not a subclass of it) and overrides
`training_step` (rollout -> rewards -> advantages -> filter -> loss), `log` (TRL-named metrics), `_save` /
`_load_from_checkpoint` (LoRA adapters in the pipeline's formats + an exact trainable state for resuming). Everything
else is the Trainer's: the optimizer and schedule, gradient accumulation and clipping, `accelerate` (DDP / FSDP),
checkpoints with RNG state, `trainer_state.json`, callbacks and `report_to`. The steps are small functions:

1. rollout: `trl_editr2.rollout.rollout_session` per session (G rollouts x T turns);
2. score: the reward functions (`trl_editr2.rewards.score_samples`), combined by `editr2.rewards.combine`;
3. advantage: `editr2.rl.group_advantages` over the batch gathered from every process, grouped per `group_key`;
4. filter: `editr2.rl.trajectory_filter` on the filter reward (IF);
5. loss: `EditR2Policy.forward` per (session, turn), one backward each; a non-finite loss on any process skips the
   optimizer step (all gradients dropped) and is counted in `skipped_steps`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformers import Trainer

from editr2.rewards import combine
from editr2.rl import frac_reward_zero_std, group_advantages, is_finite_loss, trajectory_filter

from .config import EditR2Config
from .data import collate_sessions
from .policy import (REASONING_ADAPTER, TRANSFORMER_ADAPTER, EditR2Policy, LossWeights, add_lora_adapters,
                     disable_dropout, prepare_reasoning_sampling)
from .rewards import load_reward_funcs, reward_name, score_samples
from .rollout import SessionRollout, derive_seed, rollout_session

logger = logging.getLogger(__name__)

TRAINABLE_STATE_NAME = "trainable_state.safetensors"  # exact trainable weights, for resuming
REASONING_LORA_DIR = "reasoning_lora"  # the reasoning LoRA in peft's format (EditR2Pipeline.load_reasoning_lora)
CONFIG_NAME = "editr2_config.json"

# MICE per-turn fields: reward functions receive this turn's entry (the judges' convention).
PER_TURN_FIELDS = ("task_type", "formatted_instruction", "bg_consistency", "unchanged_objects",
                   "available_objects", "all_objects", "gold_intent")
NOT_FORWARDED = ("instruction", "source_image")


@dataclass
class StepBatch:
    """What one training step learns from (local to this process). N = B sessions x G rollouts x T turns.

    Args:
        rollouts: the B sessions' rollouts.
        advantages: `(B, G, T)` float32.
        image_mask, text_mask: `(B, G, T)` bool: which (rollout, turn) trains its image steps / reasoning tokens.
    """

    rollouts: list[SessionRollout]
    advantages: Tensor
    image_mask: Tensor
    text_mask: Tensor


class EditR2Trainer(Trainer):
    """Edit-R2 RL trainer for an `EditR2Pipeline` (Qwen-Image-Edit family).

    Args:
        model (`EditR2Pipeline` or `str`):
            The pipeline to train, or a path / Hub id loaded with `EditR2Pipeline.from_pretrained` (dtype from
            `args.bf16` / `args.fp16`). It must not carry LoRA adapters yet: the trainer adds its own (transformer
            LoRA, and a "reasoning" LoRA on the text encoder when `args.train_reasoning`).
        reward_funcs (callable, `str`, or a list of them):
            Reward functions `fn(prompts, images, **kwargs) -> list[float | None]` (see docs/trainer.md for the
            kwargs), registry names (`"shapes_oracle"` = MICE-Shapes IF + CC + GA) or dotted import paths. They are
            combined with `args.reward_weights` (by name).
        args ([`EditR2Config`], *optional*): the configuration; defaults to `EditR2Config("editr2-output")`.
        train_dataset (`torch.utils.data.Dataset`): session records (see `trl_editr2.data`).
        callbacks, optimizers: as for `transformers.Trainer`.
    """

    _tag_names = ["trl", "editr2"]

    def __init__(
        self,
        model,
        reward_funcs: Callable | str | Sequence[Callable | str],
        args: EditR2Config | None = None,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
        optimizers=(None, None),
    ):
        if args is None:
            args = EditR2Config(output_dir="editr2-output")
        if not isinstance(args, EditR2Config):
            raise ValueError(f"args must be an EditR2Config, got {type(args).__name__}.")
        if eval_dataset is not None:
            raise ValueError(
                "EditR2Trainer has no evaluation loop; evaluate checkpoints with `editr2 bench` instead and pass "
                "eval_dataset=None."
            )
        if train_dataset is None:
            raise ValueError("Pass train_dataset= (session records, e.g. trl_editr2.data.ShapesSessionDataset).")

        # Model: the pipeline, its adapters, and the policy module the Trainer optimises
        pipeline = self._load_pipeline(model, args)
        add_lora_adapters(pipeline, args)
        prepare_reasoning_sampling(pipeline)
        policy = EditR2Policy(pipeline, args)
        disable_dropout(policy)
        pipeline.to(args.device)
        self.pipeline = pipeline

        # Rewards
        self.set_reward_funcs(reward_funcs, args.reward_weights, args)

        super().__init__(
            model=policy,
            args=args,
            data_collator=collate_sessions,
            train_dataset=train_dataset,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._skipped_steps = 0
        self._accum_index = 0  # micro-steps done in the current optimizer step
        self._skip_update = False  # a non-finite loss was seen in the current optimizer step

    # ------------------------------------------------------------------------------------------------------------------
    # Setup helpers
    # ------------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _load_pipeline(model, args: EditR2Config):
        if not isinstance(model, (str, os.PathLike)):
            return model
        from diffusers_editr2 import EditR2Pipeline

        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
        pipeline = EditR2Pipeline.from_pretrained(model, dtype=dtype)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def set_reward_funcs(self, reward_funcs, reward_weights=None, args: EditR2Config | None = None) -> None:
        """Set the reward functions and their weights (a dict by name, or a list aligned with the functions)."""
        args = args if args is not None else self.args
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        self.reward_funcs = load_reward_funcs(funcs)
        self.reward_func_names = [reward_name(f) for f in self.reward_funcs]
        weights = args.reward_weights if reward_weights is None else reward_weights
        self.reward_weights = self._resolve_weights(weights, self.reward_func_names)
        if args.trajectory_filter != "none" and args.filter_reward_name not in self.reward_func_names:
            raise ValueError(
                f"trajectory_filter={args.trajectory_filter!r} reads the reward {args.filter_reward_name!r}, but the "
                f"reward functions are {self.reward_func_names}; set filter_reward_name to one of them or "
                "trajectory_filter='none'."
            )

    @staticmethod
    def _resolve_weights(weights, names: list[str]) -> dict[str, float]:
        """Reward weights by name: a dict (missing names weigh 1), or a list aligned with the reward functions (TRL)."""
        if isinstance(weights, (list, tuple)):
            if len(weights) != len(names):
                raise ValueError(f"reward_weights has {len(weights)} entries for {len(names)} reward functions "
                                 f"{names}; pass one weight per function or a dict by name.")
            return {n: float(w) for n, w in zip(names, weights)}
        missing = [n for n in names if n not in weights]
        if missing:
            logger.warning("reward_weights has no entry for %s; they get weight 1.0.", missing)
        return {n: float(weights.get(n, 1.0)) for n in names}

    @property
    def policy(self) -> EditR2Policy:
        """The (unwrapped) policy module."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------------------------
    # 1-4. Rollout, score, advantage, filter
    # ------------------------------------------------------------------------------------------------------------------

    def rollout_seed(self, record: dict) -> int:
        """The rollout seed of a session at the current step: from the run seed, the step and the session id only."""
        session_id = record.get("session_id")
        if session_id is None:
            raise ValueError("Every session record needs a stable 'session_id' (it seeds the session's rollouts).")
        return derive_seed(self.args.seed, "step", self.state.global_step, session_id)

    def reward_kwargs(self, rollouts: Sequence[SessionRollout]) -> tuple[list[str], list, dict[str, list]]:
        """The reward functions' batch: samples in (session, rollout, turn) order.

        Returns:
            `(prompts, images, kwargs)`, see docs/trainer.md for the keyword arguments.
        """
        prompts, images = [], []
        columns: dict[str, list] = defaultdict(list)
        for ro in rollouts:
            extra = [k for k in ro.record if k not in NOT_FORWARDED and k not in PER_TURN_FIELDS]
            for g in range(ro.num_generations):
                history = [ro.source_image]
                for t, turn in enumerate(ro.turns):
                    prompts.append(turn.instruction)
                    images.append(turn.images[g])
                    columns["completions"].append(turn.intents[g].text)
                    columns["turn"].append(t)
                    columns["rollout"].append(g)
                    columns["source_images"].append(ro.source_image)
                    columns["input_images"].append(history[-1])
                    columns["history_images"].append(list(history))
                    columns["history_prompts"].append([tt.instruction for tt in ro.turns[:t]])
                    columns["history_intents"].append([tt.intents[g].text for tt in ro.turns[:t]])
                    for key in PER_TURN_FIELDS:
                        if key in ro.record:
                            columns[key].append(ro.record[key][t])
                    for key in extra:
                        columns[key].append(ro.record[key])
                    history.append(turn.images[g])
        columns = dict(columns)
        columns["trainer_state"] = self.state
        return prompts, images, columns

    def _gather(self, tensor: Tensor) -> Tensor:
        return self.accelerator.gather(tensor.to(self.accelerator.device)).cpu()

    def rollout(self, records: list[dict]) -> list[SessionRollout]:
        """Roll out the local sessions (G rollouts x T turns each), logging the time per stage.

        The policy is in eval mode meanwhile (generation keeps its key/value cache even with activation checkpointing;
        no module has dropout, so eval and train compute the same numbers).
        """
        start = time.perf_counter()
        policy, was_training = self.policy, self.policy.training
        policy.eval()
        try:
            with _root_unsharded(self.model):
                rollouts = [rollout_session(policy, record, self.args, self.rollout_seed(record)) for record in records]
        finally:
            policy.train(was_training)
        self._metrics["timing/rollout"].append(time.perf_counter() - start)
        stage_times = defaultdict(float)
        for ro in rollouts:
            for turn in ro.turns:
                for key, value in turn.timings.items():
                    stage_times[key] += value
        for key, value in stage_times.items():
            self._metrics[f"timing/rollout/{key}"].append(value)
        return rollouts

    def generate_and_score(self, records: list[dict]) -> StepBatch:
        """Roll out the local sessions, then score them (see [`score`])."""
        return self.score(self.rollout(records))

    def score(self, rollouts: list[SessionRollout]) -> StepBatch:
        """Rewards, advantages (over all processes' samples) and the trajectory filter's masks; logs the metrics."""
        args = self.args
        num_gen, num_turns = args.num_generations, args.num_turns

        # 2. Score: one call per reward function on all local samples
        start = time.perf_counter()
        prompts, images, kwargs = self.reward_kwargs(rollouts)
        reward_times: dict[str, float] = {}
        scores, failures = score_samples(self.reward_funcs, prompts, images, args.reward_retries, reward_times,
                                         **kwargs)
        combined = combine(scores, self.reward_weights)
        reward_time = time.perf_counter() - start

        def as_tensor(values) -> Tensor:  # (B, G, T), NaN = missing
            return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32).view(
                len(rollouts), num_gen, num_turns
            )

        rewards = as_tensor(combined)

        # 3. Advantages over the batch gathered from every process (sessions are whole on one process)
        all_rewards = self._gather(rewards.view(-1))  # (P * B * G * T,)
        sample = torch.arange(all_rewards.numel())
        session_index = sample // (num_gen * num_turns)
        group_ids = session_index if args.group_key == "session" else session_index * num_turns + sample % num_turns
        all_adv = group_advantages(all_rewards, group_ids, global_std=args.global_std, clip=args.adv_clip_max)
        local = self.accelerator.process_index * rewards.numel()
        advantages = all_adv[local : local + rewards.numel()].view_as(rewards)

        # 4. Trajectory filter (filtered samples still counted in the group statistics above)
        if args.trajectory_filter == "none":
            keep = torch.ones_like(rewards, dtype=torch.bool)
        else:
            filter_scores = as_tensor(scores[args.filter_reward_name])
            keep = torch.stack([trajectory_filter(s, args.trajectory_filter, args.filter_threshold) for s in filter_scores])
        valid = ~torch.isnan(rewards)
        image_mask = keep & valid
        text_mask = (keep | args.filter_text) & valid

        # Metrics (TRL names), over the gathered batch
        metrics = self._metrics
        metrics["reward"].append(_nanmean(all_rewards))
        metrics["reward_std"].append(_mean_group_std(all_rewards, group_ids))
        metrics["frac_reward_zero_std"].append(frac_reward_zero_std(all_rewards, group_ids))
        for name in self.reward_func_names:
            values = self._gather(as_tensor(scores[name]).view(-1))
            metrics[f"rewards/{name}/mean"].append(_nanmean(values))
            metrics[f"rewards/{name}/std"].append(_nanstd(values))
            metrics[f"rewards/{name}/missing"].append(float(torch.isnan(values).float().mean()))
            metrics[f"rewards/{name}/failures"].append(float(self._gather(torch.tensor([failures.get(name, 0)])).sum()))
        per_turn = all_rewards.view(-1, num_turns)
        for t in range(num_turns):
            metrics[f"rewards/turn_{t + 1}/mean"].append(_nanmean(per_turn[:, t]))
        metrics["filter/frac_filtered"].append(float(1 - self._gather(keep.view(-1).float()).mean()))
        if args.reasoning == "intent":
            fallbacks = torch.tensor(
                [i.fallback_reason is not None for ro in rollouts for turn in ro.turns for i in turn.intents],
                dtype=torch.float32,
            )
            metrics["reasoning/fallback_rate"].append(float(self._gather(fallbacks).mean()))
            lengths = [float(turn.text.completion_mask.sum(1).float().mean()) for ro in rollouts for turn in ro.turns
                       if turn.text is not None]
            if lengths:
                metrics["reasoning/mean_length"].append(sum(lengths) / len(lengths))
        metrics["timing/reward"].append(reward_time)
        for name, seconds in reward_times.items():  # per reward function (e.g. each judge's server round trips)
            metrics[f"timing/reward/{name}"].append(seconds)
        return StepBatch(rollouts, advantages, image_mask, text_mask)

    # ------------------------------------------------------------------------------------------------------------------
    # 5. Loss
    # ------------------------------------------------------------------------------------------------------------------

    def learn(self, model, batch: StepBatch) -> Tensor:
        """Forward + backward of every (session, turn) of the batch; returns the summed (scaled) loss, detached.

        A non-finite loss on any process drops every gradient of the current optimizer step (all processes agree).
        """
        num_local = batch.advantages.numel()
        scale = 1.0 / (num_local * self._accumulation_steps())
        device = self.accelerator.device
        chunks = [(b, t) for b, ro in enumerate(batch.rollouts) for t in range(len(ro.turns))]
        total = torch.zeros((), device=device)
        finite = True
        sums = defaultdict(float)
        for k, (b, t) in enumerate(chunks):
            turn = batch.rollouts[b].turns[t]
            weights = LossWeights(
                advantages=batch.advantages[b, :, t].to(device),
                image_mask=batch.image_mask[b, :, t].to(device),
                text_mask=batch.text_mask[b, :, t].to(device),
                scale=scale,
            )
            sync = k == len(chunks) - 1
            context = contextlib.nullcontext() if sync else self.accelerator.no_sync(model)
            with context:
                with self.compute_loss_context_manager():
                    out = model(turn, weights)
                self.accelerator.backward(out["loss"])
            finite = finite and is_finite_loss(out["loss"])
            total = total + out["loss"].detach()
            sums["clip_image"] += float(out["clip_image"])
            sums["n_image"] += out["n_image"]
            sums["clip_text"] += float(out["clip_text"])
            sums["n_text"] += out["n_text"]
            kept = weights.image_mask
            sums["kl"] += float(out["kl"][kept].sum())
            sums["n_kl"] += int(kept.sum()) * out["kl"].shape[1]

        # All processes skip together: a NaN/inf anywhere drops this optimizer step's gradients everywhere
        all_finite = bool(self._gather(torch.tensor([float(finite)])).min() > 0)
        if not all_finite or self._skip_update:
            if not self._skip_update:
                self._skipped_steps += 1
                logger.warning("Non-finite loss at step %d: the optimizer step is skipped.", self.state.global_step)
            self._skip_update = True
            model.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient
            total = torch.zeros((), device=device)

        keys = ("clip_image", "n_image", "clip_text", "n_text", "kl", "n_kl")
        totals = self._gather(torch.tensor([float(sums[k]) for k in keys])).view(-1, len(keys)).sum(0)
        sums = dict(zip(keys, totals.tolist()))
        self._metrics["clip_ratio/image"].append(sums["clip_image"] / max(sums["n_image"], 1))
        if self.args.train_reasoning:
            self._metrics["clip_ratio/text"].append(sums["clip_text"] / max(sums["n_text"], 1))
        self._metrics["kl"].append(sums["kl"] / max(sums["n_kl"], 1))
        return total

    # ------------------------------------------------------------------------------------------------------------------
    # Trainer overrides
    # ------------------------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs: list[dict], num_items_in_batch=None) -> Tensor:
        """One micro-step: rollout + score + advantages + filter, then the loss and its backward."""
        if self._accum_index == 0:
            self._skip_update = False
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        start = time.perf_counter()
        batch = self.generate_and_score(inputs)
        model.train()
        learn_start = time.perf_counter()
        loss = self.learn(model, batch)
        end = time.perf_counter()
        self._metrics["timing/learn"].append(end - learn_start)
        self._metrics["timing/step"].append(end - start)
        self._metrics["skipped_steps"].append(float(self._skipped_steps))
        self._accum_index = (self._accum_index + 1) % self._accumulation_steps()
        return loss.detach()

    def _accumulation_steps(self) -> int:
        """Micro-steps in the current optimizer step (the Trainer sets it per step; fewer at an epoch's end)."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError("EditR2Trainer computes its loss in training_step (rollouts come first).")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        raise NotImplementedError("EditR2Trainer has no evaluation loop; evaluate with `editr2 bench`.")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged Edit-R2 metrics (TRL's convention: the mean over the steps since the last log)."""
        for key, values in self._metrics.items():
            valid = [v for v in values if not math.isnan(v)]
            logs[key] = sum(valid) / len(valid) if valid else None
        if self._metrics.get("skipped_steps"):
            logs["skipped_steps"] = float(self._skipped_steps)
        super().log(logs, start_time)
        self._metrics.clear()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save the adapters in the pipeline's formats, the exact trainable state and the config (no base weights).

        Writes `pytorch_lora_weights.safetensors` (transformer LoRA, diffusers' format: `pipe.load_lora_weights(dir)`),
        `reasoning_lora/` (text-encoder LoRA, peft's format: `pipe.load_reasoning_lora(dir + "/reasoning_lora")`),
        `trainable_state.safetensors` (every trainable tensor by name, for resuming) and `editr2_config.json`.
        """
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        from diffusers_editr2 import EditR2Pipeline

        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        policy = self.policy
        full = state_dict if state_dict is not None else policy.state_dict()
        trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
        tensors = {n: _full_tensor(full[n]).detach().cpu().contiguous() for n in sorted(trainable) if n in full}
        save_file(tensors, os.path.join(output_dir, TRAINABLE_STATE_NAME), metadata={"format": "pt"})

        layers = get_peft_model_state_dict(
            policy.transformer, state_dict=_submodule_state(tensors, "transformer."), adapter_name=TRANSFORMER_ADAPTER
        )
        metadata = policy.transformer.peft_config[TRANSFORMER_ADAPTER].to_dict()  # rank, alpha, targets
        EditR2Pipeline.save_lora_weights(
            output_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata
        )
        if self.args.train_reasoning:
            _save_reasoning_lora(policy.text_encoder, _submodule_state(tensors, "text_encoder."),
                                 os.path.join(output_dir, REASONING_LORA_DIR))
        with open(os.path.join(output_dir, CONFIG_NAME), "w") as f:
            f.write(self.args.to_json_string())

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load `trainable_state.safetensors` (every trainable tensor must be there, with the same shape)."""
        from safetensors.torch import load_file

        path = os.path.join(resume_from_checkpoint, TRAINABLE_STATE_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"{resume_from_checkpoint} has no {TRAINABLE_STATE_NAME}: not an EditR2Trainer checkpoint.")
        policy = self.accelerator.unwrap_model(model if model is not None else self.model)
        state = load_file(path)
        params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"{path} does not match this trainer's adapters (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                "resume with the same LoRA settings (lora_r, targets, train_reasoning)."
            )
        with torch.no_grad():
            for name, param in params.items():
                value = state[name].to(device=param.device, dtype=param.dtype)
                if hasattr(param, "device_mesh"):  # FSDP2: a DTensor shard of the parameter
                    from torch.distributed.tensor import distribute_tensor

                    value = distribute_tensor(value, param.device_mesh, param.placements)
                param.copy_(value)

    def create_model_card(self, *args, **kwargs) -> None:  # the Trainer's card assumes a transformers model
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Small statistics for logging
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _root_unsharded(model):
    """Under FSDP2, gather the root module's own parameters while the rollout calls the models outside the wrapped
    `forward` (each wrapped block still gathers its own on its forward); a no-op otherwise."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def _submodule_state(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix):]: value for name, value in tensors.items() if name.startswith(prefix)}


def _save_reasoning_lora(text_encoder, state: dict[str, Tensor], directory: str) -> None:
    """The reasoning LoRA in peft's format, as `EditR2Pipeline.save_reasoning_lora` writes it (and
    `load_reasoning_lora` reads it), from gathered tensors (so it also works when the live weights are sharded)."""
    from peft.utils import get_peft_model_state_dict

    from diffusers_editr2.pipeline_editr2 import write_peft_adapter

    adapter = get_peft_model_state_dict(text_encoder, state_dict=state, adapter_name=REASONING_ADAPTER)
    write_peft_adapter(directory, adapter, text_encoder.peft_config[REASONING_ADAPTER])


def _full_tensor(tensor: Tensor) -> Tensor:
    """A DTensor (FSDP2 shard) gathered to a full tensor; other tensors unchanged."""
    full = getattr(tensor, "full_tensor", None)
    return full() if callable(full) else tensor


def _nanmean(values: Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


def _nanstd(values: Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() else math.nan


def _mean_group_std(values: Tensor, group_ids: Tensor) -> float:
    """Mean over groups of the within-group std of the valid rewards (TRL's `reward_std`)."""
    stds = [_nanstd(values[group_ids == g]) for g in torch.unique(group_ids)]
    stds = [s for s in stds if not math.isnan(s)]
    return sum(stds) / len(stds) if stds else math.nan
