"""`EditR2Policy`: the trainable part of an `EditR2Pipeline`, as the `nn.Module` the Trainer optimises.

It registers the pipeline's transformer and text encoder as submodules (with a LoRA adapter each; everything else
frozen), and its `forward` is the Edit-R2 loss of one turn's G rollouts. Going through `forward` is what lets
`accelerate` wrap the policy (DDP, FSDP) and synchronise gradients. This module only makes the model calls (the
pipeline's velocities, and the text encoder's teacher-forced logits of the reasoning, which the pipeline does not
offer); all math comes from `editr2.flow` (SDE step log-probs) and `editr2.rl` (the loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from editr2.flow import sde_step_with_logprob
from editr2.rl import gaussian_mean_kl, joint_clipped_loss, token_logps_from_logits

if TYPE_CHECKING:
    from .config import EditR2Config
    from .rollout import TextSample, TurnRollout

REASONING_ADAPTER = "reasoning"  # the name EditR2Pipeline.load_reasoning_lora / save_reasoning_lora use
TRANSFORMER_ADAPTER = "default"


# ---------------------------------------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------------------------------------


def _has_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def add_lora_adapters(pipeline, args: EditR2Config) -> None:
    """Freeze the pipeline and add fresh LoRA adapters: one on the transformer, one ("reasoning") on the VLM that
    writes the intents (`pipeline.reasoner`: its separate reasoning model when it has one, else the text encoder).

    The adapters start as the identity (peft's Gaussian init zeroes `lora_B`), so the policy starts equal to the
    adapter-off reference. Their random `lora_A` is drawn after seeding with `args.seed` inside `torch.random.fork_rng`
    (every process and every run starts from the same adapters; the global RNG state is restored afterwards). Trainable weights are kept in float32
    whatever the base dtype.

    Raises:
        ValueError: when the pipeline already carries adapters (the KL reference is "adapters off", so an earlier
            adapter must be part of the base weights: `pipe.fuse_lora(); pipe.unload_lora_weights()` first).
    """
    for module in (pipeline.transformer, pipeline.text_encoder, pipeline.vae, pipeline.reasoner):
        module.requires_grad_(False)
    for name, module in (("transformer", pipeline.transformer), ("reasoner", pipeline.reasoner)):
        if _has_adapters(module):
            raise ValueError(
                f"The pipeline's {name} already has LoRA adapters. The trainer adds its own and uses 'adapters off' as "
                "the KL reference, so fuse earlier adapters into the base weights first: pipe.fuse_lora(); "
                "pipe.unload_lora_weights() (transformer) or pipe.reasoner.merge_and_unload() (reasoning LoRA)."
            )
    devices = [pipeline.transformer.device] if pipeline.transformer.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(args.seed)
        _add_adapters(pipeline, args)
    for module in (pipeline.transformer, pipeline.reasoner):
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def _add_adapters(pipeline, args: EditR2Config) -> None:
    config = _lora_config(args, args.lora_r, args.lora_alpha, list(args.lora_target_modules))
    pipeline.transformer.add_adapter(config, adapter_name=TRANSFORMER_ADAPTER)
    if args.train_reasoning:
        targets = args.text_lora_target_modules
        if "," in targets and not any(c in targets for c in "*\\|()"):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        config = _lora_config(args, args.text_lora_r, args.text_lora_alpha, targets)
        pipeline.reasoner.add_adapter(config, adapter_name=REASONING_ADAPTER)


def _lora_config(args: EditR2Config, r: int, lora_alpha: int, target_modules):
    """A peft `LoraConfig` with the dropout and initialisation both adapters share."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=args.lora_dropout, init_lora_weights=args.lora_init,
                      target_modules=target_modules)


def vision_token_ids(text_encoder: nn.Module) -> list[int]:
    """The text encoder's vision placeholder tokens (image/video pads, vision start/end): never valid in an answer."""
    config = text_encoder.config
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return sorted({int(getattr(config, n)) for n in names if getattr(config, n, None) is not None})


def prepare_reasoning_sampling(pipeline) -> list[int]:
    """Make the reasoning sampler draw from exactly the distribution the loss scores.

    The loss scores tokens with `log_softmax(logits / temperature)` over the vocabulary minus the vision placeholder
    tokens. So the text encoder's generation config is set to match: those tokens suppressed (a generated
    `<|image_pad|>` would also break the teacher-forced pass, which counts image placeholders), and no repetition
    penalty (real Qwen2.5-VL configs ship 1.05). `EditR2Pipeline.generate_reasoning` already sets temperature and
    disables top-k / top-p.

    Returns:
        The suppressed token ids.
    """
    suppressed = vision_token_ids(pipeline.reasoner)
    config = pipeline.reasoner.generation_config
    config.suppress_tokens = suppressed
    config.repetition_penalty = 1.0
    return suppressed


def disable_dropout(model: nn.Module) -> None:
    """Set every dropout probability to 0 (on-policy ratios must be exactly 1; TRL's `disable_dropout_in_model`)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


# ---------------------------------------------------------------------------------------------------------------------
# Reasoning log-probs (the one model call the pipeline does not offer)
# ---------------------------------------------------------------------------------------------------------------------


def completion_logps(text_encoder: nn.Module, text: TextSample, temperature: float) -> Tensor:
    """Teacher-forced token log-probs of the reasoning answers, at the sampling temperature.

    Added here, wrapping the pipeline's text encoder: one forward over `[prompt | completion]` (with the reasoning
    adapter as it is set, normally active) gives the logits, and `editr2.rl.token_logps_from_logits` the
    `log_softmax(logits / temperature)` of each completion token over the vocabulary without the vision placeholders
    (the sampler suppresses them, see [`prepare_reasoning_sampling`]).
    The rollout calls it without gradients for the old log-probs (the paper recomputes them this way rather than
    keeping the sampler's: the same batch through the same kernels gives ratios of exactly 1) and the loss calls it
    with gradients on the same batch.

    Args:
        text_encoder: the pipeline's `Qwen2_5_VLForConditionalGeneration`.
        text: the batched prompts `(G, P)` (+ images) and completions `(G, L)`.
        temperature: the reasoning temperature (> 0).

    Returns:
        `(G, L)` float32 log-probs (0 at padding; use `text.completion_mask`).
    """
    inputs = dict(text.prompt_inputs)
    prompt_len = inputs["input_ids"].shape[1]
    completion_ids = text.completion_ids  # (G, L)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)  # (G, P + L)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], text.completion_mask.long()], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat(
            [inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1
        )
    logits = text_encoder(**inputs, use_cache=False).logits  # (G, P + L, V)
    return token_logps_from_logits(  # position P - 1 + k predicts completion token k
        logits[:, prompt_len - 1 : -1], completion_ids, text.completion_mask, temperature=temperature,
        suppressed_ids=vision_token_ids(text_encoder),  # as the sampler (SuppressTokensLogitsProcessor)
    )


# ---------------------------------------------------------------------------------------------------------------------
# The policy module
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LossWeights:
    """Per-rollout inputs of the loss of one turn, all `(G,)`.

    Args:
        advantages: float32 advantages (one scalar per (rollout, turn), shared by the text and the image).
        image_mask: True where the image steps train (False: filtered turn, or missing reward).
        text_mask: True where the reasoning tokens train.
        scale: the loss is `scale * sum over rollouts`; the trainer passes 1 / (samples in the local step).
    """

    advantages: Tensor
    image_mask: Tensor
    text_mask: Tensor
    scale: float


class EditR2Policy(nn.Module):
    """The transformer and text encoder of an `EditR2Pipeline` (LoRA-adapted), with the Edit-R2 loss as `forward`.

    Args:
        pipeline: an `EditR2Pipeline` whose adapters were added by [`add_lora_adapters`]. It is kept as a plain
            attribute (not a submodule): the policy's submodules are the same objects the pipeline uses.
        args: the [`EditR2Config`].
    """

    def __init__(self, pipeline, args: EditR2Config):
        super().__init__()
        self.transformer = pipeline.transformer
        # the VLM that writes the intents (`pipeline.reasoner`); named `text_encoder` in the policy's state dict
        self.text_encoder = pipeline.reasoner
        self.pipeline = pipeline
        self.args = args
        self.config = None  # read by some Trainer code paths; this module has no transformers config

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Recompute activations in the backward pass (called by the Trainer for `activation_checkpointing=True`)."""
        self.transformer.enable_gradient_checkpointing()
        self.text_encoder.activation_checkpointing_enable(
            activation_checkpointing_kwargs=activation_checkpointing_kwargs, every_n_layers=every_n_layers,
            offload=offload,
        )

    # -- model calls --------------------------------------------------------------------------------------------------

    def velocity(self, latents: Tensor, timestep: Tensor, conditioning, reference: bool = False) -> Tensor:
        """`(G, N, C)` velocity at `timestep` (scheduler units, `(G,)`), true CFG as configured.

        With `reference=True`, the transformer's adapter is disabled (the KL reference: the base model).
        """
        from diffusers_editr2.pipeline_editr2 import adapters_disabled

        cfg = self.args.true_cfg_scale if conditioning.negative_prompt_embeds is not None else 1.0
        if not reference:
            return self.pipeline.predict_velocity(latents, timestep, conditioning, cfg)
        with adapters_disabled(self.transformer):
            return self.pipeline.predict_velocity(latents, timestep, conditioning, cfg)

    def token_logps(self, text: TextSample) -> Tensor:
        """`(G, L)` reasoning log-probs with the reasoning adapter active (see [`completion_logps`])."""
        return completion_logps(self.text_encoder, text, self.args.reasoning_temperature)

    # -- the loss ------------------------------------------------------------------------------------------------------

    def forward(self, turn: TurnRollout, weights: LossWeights) -> dict[str, Tensor]:
        """The Edit-R2 loss of one turn's G rollouts ([`editr2.rl.joint_clipped_loss`]).

        Re-scores each SDE-window step of the stored trajectory under the current policy (and, with `beta > 0`, under
        the adapter-off reference for the KL) and the reasoning tokens, then hands the log-probs to the loss.

        Returns:
            `joint_clipped_loss`'s dict: `loss` (`scale * sum_g loss_g`) and detached diagnostics: `ratio_image (G, K)`,
            `ratio_text (G, L)` (when the text trains), `kl (G, K)`, `clip_image`/`clip_text` and
            `n_image`/`n_text`.
        """
        args = self.args
        num_rollouts = weights.advantages.shape[0]
        log_probs, kls = [], []
        for j in range(len(turn.sde_steps)):  # one transformer batch of the G rollouts per step, as at rollout time
            x, x_next = turn.latents[j], turn.next_latents[j]  # (G, N, C)
            timestep = turn.step_timesteps[j].expand(num_rollouts).to(x.dtype)  # (G,)
            sigma, sigma_next = turn.step_sigmas[j], turn.step_sigmas_next[j]
            v = self.velocity(x, timestep, turn.conditioning)
            _, log_prob, mean, std = sde_step_with_logprob(
                v, x, sigma, sigma_next, args.noise_level, prev_sample=x_next, sigma_max=turn.sigma_max
            )
            log_probs.append(log_prob)  # (G,)
            if args.beta > 0:
                with torch.no_grad():
                    v_ref = self.velocity(x, timestep, turn.conditioning, reference=True)
                    _, _, ref_mean, _ = sde_step_with_logprob(
                        v_ref, x, sigma, sigma_next, args.noise_level, prev_sample=x_next, sigma_max=turn.sigma_max
                    )
                kls.append(gaussian_mean_kl(mean, ref_mean, std))  # (G,)
        text = {}
        if turn.text is not None and args.train_reasoning:
            text = dict(
                token_logps=self.token_logps(turn.text),  # (G, L)
                old_token_logps=turn.text.old_logps,
                token_mask=turn.text.completion_mask & weights.text_mask.unsqueeze(1),  # (G, L)
                clip_range_text=args.clip_range_text,
            )
        return joint_clipped_loss(
            weights.advantages,
            torch.stack(log_probs, dim=1) if log_probs else turn.old_log_probs.new_zeros(num_rollouts, 0),  # (G, K)
            turn.old_log_probs,
            weights.image_mask,
            args.clip_range_image,
            step_kl=torch.stack(kls, dim=1) if kls else None,  # (G, K)
            beta=args.beta,
            scale=weights.scale,
            **text,
        )
