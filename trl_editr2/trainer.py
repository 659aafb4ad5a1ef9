"""`EditR2Trainer`: joint reasoning + flow-matching RL over multi-turn editing sessions, as a `transformers.Trainer`.

The trainer subclasses `transformers.Trainer` (like TRL's GRPOTrainer, not a subclass of it) and follows
GRPOTrainer's structure and names: `_prepare_inputs` hands each micro-step its part of the optimizer step's batch,
made once per step by `_generate_and_score_completions`; `compute_loss(model, inputs)` (-> `_compute_loss`) is the
Edit-R2 loss of a batch dict; `log` adds the TRL-named metrics; `_save` / `_load_from_checkpoint` write and read the
LoRA adapters in the pipeline's formats + an exact trainable state for resuming. Everything else is the Trainer's:
the optimizer and schedule, gradient accumulation and clipping, `accelerate` (DDP / FSDP), checkpoints with RNG
state, `trainer_state.json`, callbacks and `report_to`. All the objective's math is in `editr2.rl` (pure functions);
this module wires it:

1. rollout (`rollout`): `trl_editr2.rollout.rollout_sessions` (G rollouts x T turns per session, the transformer
   batched over all the process's sessions; `rollout_session` per session with `batch_sessions=False`), for every
   micro-batch of the optimizer step before the first backward (the weights do not change within a step, so this is
   the same as rolling out each micro-batch just before its backward);
2. score (`score`): the reward functions (`trl_editr2.rewards.score_samples`), combined by `editr2.rewards.combine`;
   missing rewards (None, NaN, inf, a raising function) are counted, and steps without any valid reward stop the run
   (`max_steps_without_reward`);
3. advantage: `editr2.rl.group_advantages` over the whole step's batch (every process, every micro-batch), in the
   groups of `editr2.rl.session_group_ids` (`group_key`);
4. filter: `editr2.rl.trajectory_filter` on the filter reward (IF), `editr2.rl.training_masks`;
5. loss (`training_step`): `compute_loss` on each (session, turn) of the micro-batch, one backward each (only one
   turn's graph is alive at a time); `EditR2Policy.forward` re-scores the turn and returns
   `editr2.rl.joint_clipped_loss`. A non-finite loss on any process skips the optimizer step (all gradients dropped)
   and is counted in `skipped_steps`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from dataclasses import replace
from typing import Callable, Sequence

import torch
from torch import Tensor
from transformers import Trainer

from editr2.rewards import combine
from editr2.rl import (frac_reward_zero_std, group_advantages, is_finite_loss, missing_rewards, session_group_ids,
                       std_sample_count, training_masks, trajectory_filter)

from .config import PAPER_REWARD_WEIGHTS, EditR2Config
from .data import collate_sessions
from .policy import (REASONING_ADAPTER, TRANSFORMER_ADAPTER, EditR2Policy, LossWeights, add_lora_adapters,
                     disable_dropout, prepare_reasoning_sampling)
from .rewards import load_reward_funcs, reward_name, score_samples
from .rollout import SessionRollout, derive_seed, rollout_session, rollout_sessions

logger = logging.getLogger(__name__)

TRAINABLE_STATE_NAME = "trainable_state.safetensors"  # exact trainable weights, for resuming
REASONING_LORA_DIR = "reasoning_lora"  # the reasoning LoRA in peft's format (EditR2Pipeline.load_reasoning_lora)
CONFIG_NAME = "editr2_config.json"
TRAINER_STATE_NAME = "trainer_state.json"  # written last by `transformers.Trainer._save_checkpoint`
# A checkpoint is complete when the files a save writes last are there: the trainable state (first), the config (end
# of `_save`) and trainer_state.json (the Trainer's last write, after the optimizer and RNG states), and the latter
# parses (a killed write leaves it truncated).
CHECKPOINT_FILES = (TRAINABLE_STATE_NAME, CONFIG_NAME, TRAINER_STATE_NAME)

# MICE per-turn fields: reward functions receive this turn's entry (the judges' convention).
PER_TURN_FIELDS = ("task_type", "formatted_instruction", "bg_consistency", "unchanged_objects",
                   "available_objects", "all_objects", "gold_intent")
NOT_FORWARDED = ("instruction", "source_image")


SAMPLE_KEYS = ("rewards", "advantages", "image_mask", "text_mask")  # the (B, G, T) entries of a batch dict


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

        # Rewards first: a bad name or weight is an error before any model work
        self.set_reward_funcs(reward_funcs, args.reward_weights, args)

        # Model: the pipeline, its adapters, and the policy module the Trainer optimises
        pipeline = self._load_pipeline(model, args)
        add_lora_adapters(pipeline, args)
        prepare_reasoning_sampling(pipeline)
        policy = EditR2Policy(pipeline, args)
        disable_dropout(policy)
        pipeline.to(args.device)
        self.pipeline = pipeline

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
        self._step_inputs: list = []  # the micro-batches of the current optimizer step (from get_batch_samples)
        self._buffered_inputs: list[dict] | None = None  # their batch dicts, rolled out and scored together
        self._loss_sums: dict[str, float] = defaultdict(float)  # loss diagnostics of the current micro-step
        self._steps_without_reward = 0  # optimizer steps in a row without any valid reward
        self._warned_std_samples = False

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
        """Reward weights by name: a dict (missing names weigh 1, unknown names are an error), or a list aligned with
        the reward functions (TRL). The default, the paper's `{"IF": 0.3, "CC": 0.3, "GA": 0.4}`, applies to the
        functions of those names; its other keys are ignored (e.g. with custom reward functions only)."""
        if isinstance(weights, (list, tuple)):
            if len(weights) != len(names):
                raise ValueError(f"reward_weights has {len(weights)} entries for {len(names)} reward functions "
                                 f"{names}; pass one weight per function or a dict by name.")
            return {n: float(w) for n, w in zip(names, weights)}
        if dict(weights) == PAPER_REWARD_WEIGHTS:
            weights = {k: v for k, v in weights.items() if k in names}
        unknown = [k for k in weights if k not in names]
        if unknown:
            raise ValueError(
                f"reward_weights has weights for {unknown}, but no reward function has that name (the reward "
                f"functions are {names}); fix the name or drop the key, e.g. reward_weights="
                f"{ {n: float(weights.get(n, 1.0)) for n in names} }."
            )
        missing = [n for n in names if n not in weights]
        if missing:
            logger.warning("reward_weights has no entry for %s; they get weight 1.0.", missing)
        return {n: float(weights.get(n, 1.0)) for n in names}

    @property
    def policy(self) -> EditR2Policy:
        """The (unwrapped) policy module."""
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------------------------------------
    # 1-4. Rollout, score, advantage, filter: `_generate_and_score_completions`
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
                seeds = [self.rollout_seed(record) for record in records]
                if self.args.batch_sessions and len(records) > 1:
                    rollouts = rollout_sessions(policy, records, self.args, seeds)
                else:
                    rollouts = [rollout_session(policy, r, self.args, seed) for r, seed in zip(records, seeds)]
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

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """Roll out the local sessions `inputs` (see [`rollout`]), then score them (see [`score`]): the batch dict."""
        return self.score(self.rollout(inputs))

    def score(self, rollouts: list[SessionRollout]) -> dict:
        """Rewards, advantages (over all processes' samples) and the trajectory filter's masks; logs the metrics.

        Returns:
            The batch dict of B sessions x G rollouts x T turns: `rollouts` (B `SessionRollout`s; each turn keeps
            what the loss re-scores, with the old log-probs computed at rollout time, TRL's `old_per_token_logps`:
            `old_log_probs (G, K)` of the SDE steps, `text.old_logps (G, L)` of the reasoning), `rewards`
            (B, G, T) (NaN = missing), `advantages` (B, G, T), `image_mask` / `text_mask` (B, G, T) bool (which
            samples train their SDE steps / reasoning tokens) and `num_valid_rewards` (over all processes).
        """
        args = self.args
        num_gen, num_turns = args.num_generations, args.num_turns

        # 2. Score: one call per reward function on all local samples
        start = time.perf_counter()
        prompts, images, kwargs = self.reward_kwargs(rollouts)
        reward_times: dict[str, float] = {}
        scores, failures, nonfinite = score_samples(self.reward_funcs, prompts, images, args.reward_retries,
                                                    reward_times, **kwargs)
        combined = combine(scores, self.reward_weights)
        reward_time = time.perf_counter() - start

        def as_tensor(values) -> Tensor:  # (B, G, T), NaN = missing
            return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32).view(
                len(rollouts), num_gen, num_turns
            )

        rewards = as_tensor(combined)

        # 3. Advantages over the batch gathered from every process (sessions are whole on one process)
        all_rewards = self._gather(rewards.view(-1))  # (P * B * G * T,)
        group_ids = session_group_ids(all_rewards.numel() // (num_gen * num_turns), num_gen, num_turns, args.group_key)
        all_adv = group_advantages(all_rewards, group_ids, global_std=args.global_std, clip=args.adv_clip_max)
        std_samples = std_sample_count(all_rewards, group_ids, global_std=args.global_std)
        self._check_std_samples(std_samples)
        local = self.accelerator.process_index * rewards.numel()
        advantages = all_adv[local : local + rewards.numel()].view_as(rewards)

        # 4. Trajectory filter (filtered samples still counted in the group statistics above)
        if args.trajectory_filter == "none":
            keep = torch.ones_like(rewards, dtype=torch.bool)
        else:
            keep = trajectory_filter(as_tensor(scores[args.filter_reward_name]), args.trajectory_filter,
                                     args.filter_threshold)  # (B, G, T)
        image_mask, text_mask = training_masks(rewards, keep, args.filter_text)
        # a turn that restored an earlier state sampled no image of its own: only its reasoning trains
        restored = torch.tensor([[[bool(turn.restored) and turn.restored[g] for turn in ro.turns]
                                  for g in range(num_gen)] for ro in rollouts], dtype=torch.bool).view_as(image_mask)
        image_mask = image_mask & ~restored

        # Metrics (TRL names), over the gathered batch
        metrics = self._metrics
        metrics["reward"].append(_nanmean(all_rewards))
        metrics["rewards/missing_frac"].append(float(missing_rewards(all_rewards).float().mean()))
        metrics["advantages/std_samples"].append(float(std_samples))
        metrics["reward_std"].append(_mean_group_std(all_rewards, group_ids))
        metrics["frac_reward_zero_std"].append(frac_reward_zero_std(all_rewards, group_ids))
        for name in self.reward_func_names:
            values = self._gather(as_tensor(scores[name]).view(-1))
            metrics[f"rewards/{name}/mean"].append(_nanmean(values))
            metrics[f"rewards/{name}/std"].append(_nanstd(values))
            metrics[f"rewards/{name}/missing"].append(float(torch.isnan(values).float().mean()))
            metrics[f"rewards/{name}/failures"].append(float(self._gather(torch.tensor([failures.get(name, 0)])).sum()))
            metrics[f"rewards/{name}/nonfinite"].append(
                float(self._gather(torch.tensor([nonfinite.get(name, 0)])).sum()))
        per_turn = all_rewards.view(-1, num_turns)
        for t in range(num_turns):
            metrics[f"rewards/turn_{t + 1}/mean"].append(_nanmean(per_turn[:, t]))
        metrics["filter/frac_filtered"].append(float(1 - self._gather(keep.view(-1).float()).mean()))
        if args.filter_reward_name in scores:  # hard failures, and what the if_zero filter masks (whatever the mode)
            filter_scores = as_tensor(scores[args.filter_reward_name])
            metrics["filter/frac_if_zero"].append(float(self._gather((filter_scores == 0).view(-1).float()).mean()))
            would_keep = trajectory_filter(filter_scores, "if_zero")
            metrics["filter/frac_if_zero_masks"].append(float(1 - self._gather(would_keep.view(-1).float()).mean()))
        if args.reasoning == "intent":
            fallbacks = torch.tensor(  # over the turns that reasoned (same count on every process)
                [i.fallback_reason is not None for ro in rollouts for turn in ro.turns if turn.reasoned
                 for i in turn.intents],
                dtype=torch.float32,
            )
            if fallbacks.numel():
                metrics["reasoning/fallback_rate"].append(float(self._gather(fallbacks).mean()))
            lengths = [float(turn.text.completion_mask.sum(1).float().mean()) for ro in rollouts for turn in ro.turns
                       if turn.text is not None]
            if lengths:
                metrics["reasoning/mean_length"].append(sum(lengths) / len(lengths))
        metrics["timing/reward"].append(reward_time)
        for name, seconds in reward_times.items():  # per reward function (e.g. each judge's server round trips)
            metrics[f"timing/reward/{name}"].append(seconds)
        return {
            "rollouts": rollouts,
            "rewards": rewards,
            "advantages": advantages,
            "image_mask": image_mask,
            "text_mask": text_mask,
            "num_valid_rewards": int((~missing_rewards(all_rewards)).sum()),
        }

    def _check_std_samples(self, count: int) -> None:
        """Warn once when the global std is taken over fewer valid rewards than `global_std_min_samples`."""
        args = self.args
        if args.global_std and count < args.global_std_min_samples and not self._warned_std_samples:
            self._warned_std_samples = True
            logger.warning(
                "global_std: the advantage std of step %d is taken over %d valid rewards (< global_std_min_samples=%d;"
                " the paper's run uses 288): groups whose rewards differ only by judge noise get large advantages. "
                "Raise per_device_train_batch_size, gradient_accumulation_steps or the number of processes.",
                self.state.global_step, count, args.global_std_min_samples,
            )

    def check_rewards(self, batch: dict) -> None:
        """Stop when `max_steps_without_reward` optimizer steps in a row had no valid reward (on any process).

        Raises:
            RuntimeError: naming the missing reward functions' failures, when the limit is reached.
        """
        if batch["num_valid_rewards"] > 0:
            self._steps_without_reward = 0
            return
        self._steps_without_reward += 1
        limit = self.args.max_steps_without_reward
        logger.warning("step %d has no valid reward (%d step(s) in a row, limit max_steps_without_reward=%d).",
                       self.state.global_step, self._steps_without_reward, limit)
        if self._steps_without_reward >= limit:
            details = ", ".join(
                f"{name}: missing {self._metrics[f'rewards/{name}/missing'][-1]:.0%}, failed calls "
                f"{self._metrics[f'rewards/{name}/failures'][-1]:g}, non-finite "
                f"{self._metrics[f'rewards/{name}/nonfinite'][-1]:g}"
                for name in self.reward_func_names
            )
            raise RuntimeError(
                f"No valid reward in {self._steps_without_reward} optimizer step(s) in a row (up to step "
                f"{self.state.global_step}): every sample's combined reward is missing, so nothing trains. "
                f"Reward functions: {details}. Check the reward functions / judges (their warnings above), or raise "
                f"max_steps_without_reward to ride out an outage."
            )

    # ------------------------------------------------------------------------------------------------------------------
    # 5. Loss: `training_step` -> `_prepare_inputs`, then `compute_loss` and a backward per (session, turn)
    # ------------------------------------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's micro-batches of one optimizer step, kept so that the first `training_step` of the step rolls
        out and scores all of them together (advantages normalised over the whole step's batch)."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_inputs, self._buffered_inputs = list(batch_samples), None
        return batch_samples, num_items_in_batch

    def _prepare_inputs(self, inputs: list[dict]) -> dict:
        """This micro-batch's batch dict (TRL's buffered generation batch): at the optimizer step's first micro-step,
        every micro-batch of the step is rolled out and scored together (`_generate_and_score_completions`); a call
        outside the training loop scores `inputs` alone. Adds `loss_scale`, so that every local sample of the step
        weighs the same in the accumulated gradient."""
        index = next((i for i, micro in enumerate(self._step_inputs) if micro is inputs), None)
        if index is None:
            self._step_inputs, self._buffered_inputs, index = [inputs], None, 0
        if self._buffered_inputs is None:
            batch = self._generate_and_score_completions([record for micro in self._step_inputs for record in micro])
            self.check_rewards(batch)
            self._buffered_inputs = _split_batch(batch, [len(micro) for micro in self._step_inputs])
        batch = self._buffered_inputs[index]
        return {**batch, "loss_scale": 1.0 / (batch["advantages"].numel() * self._accumulation_steps())}

    def training_step(self, model, inputs: list[dict], num_items_in_batch=None) -> Tensor:
        """TRL's step (`_prepare_inputs`, `compute_loss`, backward) with one backward per (session, turn) of the
        micro-batch, so that only one turn's graph is alive at a time (gradients are synchronised at the last one).

        A non-finite loss on any process drops every gradient of the current optimizer step (all processes agree).

        Returns:
            The micro-batch's summed (scaled) loss, detached (0 when the step is skipped).
        """
        if self._accum_index == 0:
            self._skip_update = False
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        start = time.perf_counter()
        inputs = self._prepare_inputs(inputs)
        learn_start = time.perf_counter()
        total = self.learn(model, inputs)
        self._log_loss_metrics()
        end = time.perf_counter()
        self._metrics["timing/learn"].append(end - learn_start)
        self._metrics["timing/step"].append(end - start)
        self._metrics["skipped_steps"].append(float(self._skipped_steps))
        self._accum_index = (self._accum_index + 1) % self._accumulation_steps()
        return total

    def learn(self, model, inputs: dict) -> Tensor:
        """Forward + backward of every (session, turn) of the micro-batch `inputs` (a batch dict of
        `_prepare_inputs`); returns the summed (scaled) loss, detached. A non-finite loss on any process drops every
        gradient of the current optimizer step (all processes agree), and the loss returned is 0."""
        model.train()
        turns = _turn_batches(inputs)
        total, finite = torch.zeros((), device=self.accelerator.device), True
        for k, turn in enumerate(turns):
            context = contextlib.nullcontext() if k == len(turns) - 1 else self.accelerator.no_sync(model)
            with context:
                with self.compute_loss_context_manager():
                    loss = self.compute_loss(model, turn)
                self.accelerator.backward(loss)
            finite = finite and is_finite_loss(loss)
            total = total + loss.detach()
        # All processes skip together: a NaN/inf anywhere drops this optimizer step's gradients everywhere
        if not bool(self._gather(torch.tensor([float(finite)])).min() > 0) or self._skip_update:
            if not self._skip_update:
                self._skipped_steps += 1
                logger.warning("Non-finite loss at step %d: the optimizer step is skipped.", self.state.global_step)
            self._skip_update = True
            model.zero_grad(set_to_none=True)  # optimizers skip parameters without a gradient
            total = torch.zeros((), device=self.accelerator.device)
        return total

    def compute_loss(self, model, inputs: dict, return_outputs=False, num_items_in_batch=None) -> Tensor:
        """The Edit-R2 loss of a batch dict (see [`_compute_loss`]); `training_step` calls it per (session, turn)."""
        if return_outputs:
            raise ValueError("EditR2Trainer.compute_loss returns the loss only; pass return_outputs=False.")
        return self._compute_loss(model, inputs)

    def _compute_loss(self, model, inputs: dict) -> Tensor:
        """`loss_scale * sum` over the batch's sessions, turns and rollouts of the Edit-R2 loss
        (`editr2.rl.joint_clipped_loss` through `EditR2Policy.forward`, which re-scores the turn under the current
        policy); adds the clip and KL diagnostics to the micro-step's metrics."""
        device = self.accelerator.device
        scale = inputs.get("loss_scale", 1.0 / inputs["advantages"].numel())
        total = torch.zeros((), device=device)
        for b, ro in enumerate(inputs["rollouts"]):
            for t, turn in enumerate(ro.turns):
                weights = LossWeights(
                    advantages=inputs["advantages"][b, :, t].to(device),
                    image_mask=inputs["image_mask"][b, :, t].to(device),
                    text_mask=inputs["text_mask"][b, :, t].to(device),
                    scale=scale,
                )
                out = model(turn, weights)
                total = total + out["loss"]
                for key in ("clip_image", "n_image", "clip_text", "n_text"):
                    self._loss_sums[key] += float(out.get(key, 0))
                self._loss_sums["kl"] += float(out["kl"][weights.image_mask].sum())
        return total

    def _log_loss_metrics(self) -> None:
        """The micro-step's clip ratios and KL (TRL's names), summed over every process."""
        keys = ("clip_image", "n_image", "clip_text", "n_text", "kl")
        totals = self._gather(torch.tensor([float(self._loss_sums[k]) for k in keys])).view(-1, len(keys)).sum(0)
        sums = dict(zip(keys, totals.tolist()))
        self._loss_sums.clear()
        self._metrics["clip_ratio/image"].append(sums["clip_image"] / max(sums["n_image"], 1))
        if self.args.train_reasoning:
            self._metrics["clip_ratio/text"].append(sums["clip_text"] / max(sums["n_text"], 1))
        self._metrics["kl"].append(sums["kl"] / max(sums["n_image"], 1))

    def _accumulation_steps(self) -> int:
        """Micro-steps in the current optimizer step (the Trainer sets it per step; fewer at an epoch's end)."""
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        raise NotImplementedError("EditR2Trainer has no evaluation loop; evaluate with `editr2 bench`.")

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged Edit-R2 metrics (TRL's convention: the mean over the steps since the last log)."""
        for key, values in self._metrics.items():
            valid = [v for v in values if not math.isnan(v)]
            logs[key] = sum(valid) / len(valid) if valid else None
        if self._metrics.get("skipped_steps"):
            logs["skipped_steps"] = float(self._skipped_steps)
        missing = logs.get("rewards/missing_frac")
        if missing:
            per_function = {name: logs.get(f"rewards/{name}/missing") for name in self.reward_func_names}
            logger.warning("%.1f%% of the rewards since the last log are missing (they train nothing); missing per "
                           "reward function: %s.", 100 * missing, per_function)
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

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None,
              **kwargs):
        """`transformers.Trainer.train`, resuming from a complete checkpoint only.

        Args:
            resume_from_checkpoint: a checkpoint folder, or `True` / `"true"` / `"latest"` for the latest complete
                `checkpoint-N` in `output_dir` (complete: see `is_complete_checkpoint`; incomplete ones, e.g. from a
                killed save, are skipped with a warning). A named folder that is incomplete is an error. The chosen
                folder is logged.
        """
        path = resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)
        if path is not None:
            logger.warning("Resuming from %s.", path)
        return super().train(resume_from_checkpoint=path, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
                             **kwargs)

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
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def missing_checkpoint_files(folder: str | os.PathLike) -> list[str]:
    """The files of `CHECKPOINT_FILES` that `folder` lacks (trainer_state.json counts as missing when it does not
    parse, e.g. cut short by a killed save); empty for a complete checkpoint."""
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(folder, name))]
    if TRAINER_STATE_NAME not in missing:
        try:
            with open(os.path.join(folder, TRAINER_STATE_NAME)) as f:
                json.load(f)
        except (OSError, ValueError):
            missing.append(f"{TRAINER_STATE_NAME} (unreadable)")
    return missing


def is_complete_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether a save into `folder` finished: `CHECKPOINT_FILES` (the trainable state, the config and the Trainer's
    last write, trainer_state.json) are there and trainer_state.json parses."""
    return os.path.isdir(folder) and not missing_checkpoint_files(folder)


def latest_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-N` folder of `output_dir` with the largest N (None if there is none); incomplete
    ones with a larger N are skipped with a warning naming what they lack."""
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, number = name.partition("-")
        if prefix == "checkpoint" and number.isdigit() and os.path.isdir(os.path.join(output_dir, name)):
            steps.append((int(number), os.path.join(output_dir, name)))
    for _, folder in sorted(steps, reverse=True):
        missing = missing_checkpoint_files(folder)
        if not missing:
            return folder
        logger.warning("Skipping incomplete checkpoint %s (no %s: its save did not finish).", folder,
                       ", ".join(missing))
    return None


def resolve_checkpoint(resume_from_checkpoint, output_dir: str | os.PathLike) -> str | None:
    """The checkpoint folder to resume from (see [`EditR2Trainer.train`]), or None to start afresh.

    Raises:
        ValueError: `True` with no complete checkpoint in `output_dir`, or a named folder that is not a complete
            checkpoint (the message names what it lacks and the latest complete one).
    """
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("", "false", "no"):
        return None
    latest = resume_from_checkpoint is True or (
        isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "yes", "latest")
    )
    if latest:
        path = latest_complete_checkpoint(output_dir)
        if path is None:
            raise ValueError(f"resume_from_checkpoint=true: no complete checkpoint-N folder in output_dir={output_dir} "
                             f"(complete: {', '.join(CHECKPOINT_FILES)} present); start without it or name a folder.")
        return path
    path = os.fspath(resume_from_checkpoint)
    if not os.path.isdir(path):
        raise ValueError(f"resume_from_checkpoint={path}: no such folder; pass a checkpoint-N folder or `true` for the "
                         f"latest complete one in output_dir.")
    missing = missing_checkpoint_files(path)
    if missing:
        parent = os.path.dirname(os.path.abspath(path))
        latest = latest_complete_checkpoint(parent)
        hint = f"; the latest complete one there is {latest}" if latest else ""
        raise ValueError(f"{path} is not a complete EditR2Trainer checkpoint (no {', '.join(missing)}: its save did "
                         f"not finish){hint}.")
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: batch dicts, FSDP, adapter files, statistics for logging
# ---------------------------------------------------------------------------------------------------------------------


def _split_batch(batch: dict, sizes: Sequence[int]) -> list[dict]:
    """The batch dict cut into consecutive parts of `sizes` sessions each (one per micro-batch of the step)."""
    parts, start = [], 0
    for size in sizes:
        end = start + size
        part = {**batch, "rollouts": batch["rollouts"][start:end]}
        part.update({key: batch[key][start:end] for key in SAMPLE_KEYS})
        parts.append(part)
        start = end
    return parts


def _turn_batches(batch: dict) -> list[dict]:
    """The batch dict cut into one batch dict per (session, turn): the unit of one forward and one backward."""
    parts = []
    for b, ro in enumerate(batch["rollouts"]):
        for t, turn in enumerate(ro.turns):
            part = {**batch, "rollouts": [replace(ro, turns=[turn])]}
            part.update({key: batch[key][b : b + 1, :, t : t + 1] for key in SAMPLE_KEYS})  # (1, G, 1)
            parts.append(part)
    return parts


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
