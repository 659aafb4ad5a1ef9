"""`EditR2Config`: the training arguments of [`EditR2Trainer`], TRL-style.

Every field states its default and, where the paper (Edit-R2, arXiv 2606.05950, whose code trains BAGEL) fixes one,
the paper's value. Defaults follow the paper; the few places where they cannot (LoRA targets name Qwen-Image modules,
not BAGEL's) say so.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

# The paper's reward weights: reward = 0.3 IF + 0.3 CC + 0.4 GA.
PAPER_REWARD_WEIGHTS = {"IF": 0.3, "CC": 0.3, "GA": 0.4}

# Attention and MLP projections of every QwenImageTransformerBlock (image and text streams). The paper adapts BAGEL's
# generation expert (attention + MLP); these are the same roles in Qwen-Image's MMDiT.
QWEN_TRANSFORMER_LORA_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
]  # fmt: skip

# The language model of Qwen2.5-VL only (its vision tower also has `gate_proj`/`up_proj`/`down_proj`; a regex keeps
# the reasoning LoRA off the image encoder, as the paper adapts BAGEL's understanding expert's q/k/v/o + MLP).
QWEN_TEXT_ENCODER_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

TRAJECTORY_FILTERS = ("if_zero", "threshold", "none")
GROUP_KEYS = ("session", "turn")
REASONING_MODES = ("intent", "none")


@dataclass
class EditR2Config(TrainingArguments):
    r"""
    Configuration class for [`EditR2Trainer`]: joint reasoning + flow-matching RL over multi-turn editing sessions.

    Only the parameters specific to Edit-R2 are listed here; see [`~transformers.TrainingArguments`] for the rest
    (`output_dir`, `max_steps`, `save_steps`, `report_to`, `seed`, ...). One training step rolls out
    `per_device_train_batch_size` sessions per process, `num_generations` rollouts each, `num_turns` turns each.

    Parameters:
        > Parameters that control the rollout

        num_generations (`int`, *optional*, defaults to `6`):
            Rollouts per session (the group size G). Paper: 6.
        num_turns (`int`, *optional*, defaults to `3`):
            Turns rolled out per session (sessions with fewer instructions use all they have). Paper: 3.
        batch_sessions (`bool`, *optional*, defaults to `True`):
            Whether the process's sessions of a step share the text encoder's and the transformer's batches during
            the rollout: each turn's reasoning answers are sampled in one `generate` call and each denoising step runs
            once for all `per_device_train_batch_size x num_generations` rollouts
            (`trl_editr2.rollout.rollout_sessions`) instead of once per session. Every session keeps its own seeds
            (each rollout's reasoning generator, noise, SDE window and noise), so the rollouts equal the per-session
            ones to float rounding (a larger batch sums in another order); `False` rolls the sessions out one by one.
            See docs/trainer.md (throughput).
        same_initial_noise (`bool`, *optional*, defaults to `True`):
            Whether the G rollouts of a session start every turn from the same initial noise, so that diversity comes
            only from the SDE window and the sampled reasoning. Paper: `True`.
        num_inference_steps (`int`, *optional*, defaults to `15`):
            Denoising steps per turn during rollouts. Paper: 15 (50 at evaluation).
        timestep_shift (`float` or `None`, *optional*, defaults to `3.0`):
            Static shift `s` of the timestep schedule `t' = s t / (1 + (s - 1) t)` (`editr2.flow.shifted_sigmas`).
            `None` uses the pipeline's own schedule (`EditR2Pipeline.prepare_timesteps`: Qwen-Image's
            resolution-dependent shift), i.e. what inference uses. Paper: 3.0. With a float, sample at inference with
            the same schedule (`FlowMatchEulerDiscreteScheduler(shift=s, use_dynamic_shifting=False)`).
        sde_window_size (`int`, *optional*, defaults to `2`):
            Number of consecutive denoising steps sampled with the SDE (and trained); all other steps are ODE steps.
            Paper: 2.
        sde_window_range (`list[int]`, *optional*, defaults to `[0, 7]`):
            The window's first step is drawn uniformly from `[lo, hi)` (high-noise steps), once per session and
            turn, shared by the session's G rollouts. Paper: (0, 7).
        noise_level (`float`, *optional*, defaults to `1.3`):
            SDE noise level `a` in `sigma_t = a sqrt(t / (1 - t))`. `0` makes the SDE the ODE. Paper: 1.3.
        true_cfg_scale (`float`, *optional*, defaults to `4.0`):
            True classifier-free guidance scale of the image model during rollouts and learning (`1.0` disables the
            unconditional branch). Paper: 4.0 (BAGEL's text scale); Qwen-Image-Edit's default is also 4.0.
        negative_prompt (`str`, *optional*, defaults to `" "`):
            Negative prompt of the unconditional branch when `true_cfg_scale > 1`.
        resolution (`int`, *optional*):
            Resize every session's source image to `resolution x resolution` before rolling out. `None` keeps the
            source size. Paper: 512.
        reference_area (`int` or `None`, *optional*, defaults to `1048576`):
            Pixels at which the source is VAE-encoded as the first turn's reference (the pipeline's
            `reference_area`; upstream Qwen-Image-Edit uses 1024 x 1024). `None` encodes it at the working size.
        condition_area (`int`, *optional*, defaults to `147456`):
            Pixels of the images shown to the text encoder (the pipeline's `condition_area`; upstream: 384 x 384).
        reasoning_condition_area (`int` or `None`, *optional*, defaults to `None`):
            Pixels of the image shown to the reasoner when it writes the intent (the pipeline's
            `reasoning_condition_area`, e.g. a separate reasoning model's training size). `None`: `condition_area`.
        keep_unedited (`float` or `None`, *optional*, defaults to `None`):
            The pipeline's `keep_unedited`: after sampling, each rollout's latent takes the current image's back
            wherever it changed by at most this much (RMS per latent pixel), so the rewarded image and the next turn's
            source are what inference with the same setting gives. The SDE log-probs are those of the sampled steps,
            unchanged. Needs `reference_area=None`. `None`: off.

        > Parameters that control the reasoning (IC-CoT)

        reasoning (`str`, *optional*, defaults to `"intent"`):
            `"intent"`: the text encoder writes the operative intent before every turn (sampled, and trained when
            `train_reasoning`); `"none"`: the raw instruction conditions the edit (image-only RL).
        reason_at_first_turn (`bool`, *optional*, defaults to `True`):
            Whether the intent is written (and trained) at the first turn too. `False` conditions turn 1 on the raw
            instruction (no reasoning tokens, no text loss there) and reasons only from turn 2 on. Paper: `False` (the
            official code rewrites the instruction only for turns > 1). The default differs because
            `EditR2Pipeline` reasons at every turn at inference, and the shipped model's editor was trained on
            intents: with the raw instruction at turn 1 its IF falls from 0.69 to 0.04 on cm (docs/results.md,
            `editr2-none` vs `editr2-intent`, turn 1), so rollouts would train on turn-1 states inference never
            produces. See docs/trainer.md.
        train_reasoning (`bool`, *optional*, defaults to `True`):
            Whether the reasoning text is trained (a LoRA on the text encoder's language model and the clipped token
            loss). Paper: `True`.
        reasoning_temperature (`float`, *optional*, defaults to `0.7`):
            Sampling temperature of the reasoning; the token log-probs of the loss use the same temperature.
            Paper: 0.7.
        max_reasoning_tokens (`int`, *optional*, defaults to `150`):
            Most new tokens of one reasoning answer. Paper: 150 (300 at evaluation).
        reasoning_template (`str`, *optional*, defaults to `None`):
            The user-message template of the reasoning request (`editr2.intent.build_messages`; `None` = its default
            IC-CoT template). Set it to the template the model was trained with, e.g. the `template` of a model
            folder's `editr2_call_defaults.json`, so rollouts ask as inference does.

        > Parameters that control rewards, advantages and filtering

        reward_weights (`dict[str, float]` or `str`, *optional*, defaults to `{"IF": 0.3, "CC": 0.3, "GA": 0.4}`):
            Weight of each reward function, keyed by its name (`reward_fn.__name__`). Reward functions absent from the
            dict get weight 1 (with a warning); a key that names no reward function (a typo such as `"GAA"`) is an
            error when the trainer is built, before any model is loaded. Paper: 0.3 IF + 0.3 CC + 0.4 GA.
        reward_retries (`int`, *optional*, defaults to `1`):
            How many times a reward function that raises is called again before its scores are marked missing
            (`None`, never a default score). A non-finite score (NaN, inf) is also marked missing, and counted
            (`rewards/{name}/nonfinite`).
        max_steps_without_reward (`int`, *optional*, defaults to `1`):
            Training stops with an error once this many optimizer steps in a row had no valid reward at all (every
            sample's combined reward missing: judges down, a reward function that always raises or returns None),
            since such steps train nothing. The fraction of missing rewards is logged as `rewards/missing_frac` and
            warned about at every log where it is above 0.
        group_key (`str`, *optional*, defaults to `"session"`):
            Which samples share a group for advantage normalisation: `"session"` (all G rollouts x T turns of a
            session, 18 samples in the paper) or `"turn"` (the G rollouts of one turn). Paper: `"session"`.
        global_std (`bool`, *optional*, defaults to `True`):
            Divide advantages by the std of the whole step's batch (Flow-GRPO's `global_std`) instead of each
            group's std. The batch is every session of the optimizer step: all processes, and all
            `gradient_accumulation_steps` micro-batches (all are rolled out before the first backward). Paper: `True`
            (the official run normalises over 288 samples).
        global_std_min_samples (`int`, *optional*, defaults to `72`):
            With `global_std`, warn (once) when the std is taken over fewer valid rewards than this: over a batch
            of one or two sessions a group whose rewards differ only by judge noise gets advantages of order 1
            (raise `per_device_train_batch_size`, `gradient_accumulation_steps` or the number of processes). The
            number used each step is logged as `advantages/std_samples`. 72 = four sessions of the paper's 6 x 3.
        adv_clip_max (`float`, *optional*, defaults to `5.0`):
            Advantages are clipped to `[-adv_clip_max, adv_clip_max]`. Paper: 5.
        trajectory_filter (`str`, *optional*, defaults to `"if_zero"`):
            `"if_zero"`: once a rollout's IF score is exactly 0 at turn k, its turns after k get no gradient (state
            contamination); `"threshold"`: the same with `IF <= filter_threshold`; `"none"`: no filtering.
            Filtered samples still count in the group statistics. Paper: `"if_zero"`.
        filter_threshold (`float`, *optional*, defaults to `0.0`):
            Threshold of `trajectory_filter="threshold"`.
        filter_text (`bool`, *optional*, defaults to `False`):
            Whether filtered turns still train the reasoning: `True` keeps the text loss of filtered turns (only their
            image loss is dropped); `False` drops both. Paper: `False` in effect (the paper's code multiplies the
            whole loss by 0, although its comments intend the text loss to stay).
        filter_reward_name (`str`, *optional*, defaults to `"IF"`):
            Name of the reward function whose per-turn score drives the trajectory filter.

        > Parameters that control the loss

        clip_range_text (`float`, *optional*, defaults to `1e-5`):
            PPO clip range `epsilon` of the per-token ratio of the reasoning. Paper: 1e-5.
        clip_range_image (`float`, *optional*, defaults to `1e-5`):
            PPO clip range of the per-step ratio of the SDE window (log-probs are means over latent dims, so ratios
            stay close to 1). Paper: 1e-5.
        beta (`float`, *optional*, defaults to `0.01`):
            Weight of the KL between the policy's and the adapter-off reference's SDE means, `|mu - mu_ref|^2 /
            (2 std^2)`. `0` skips the reference pass. Paper: 0.01.

        > Parameters that control the adapters (LoRA)

        lora_r (`int`, *optional*, defaults to `64`):
            LoRA rank of the transformer adapter. Paper: 64.
        lora_alpha (`int`, *optional*, defaults to `128`):
            LoRA alpha of the transformer adapter. Paper: 128.
        lora_dropout (`float`, *optional*, defaults to `0.0`):
            LoRA dropout (must stay 0 for on-policy ratios to be exactly 1).
        lora_init (`str`, *optional*, defaults to `"gaussian"`):
            peft `init_lora_weights` of new adapters. Paper: Gaussian.
        lora_target_modules (`list[str]`, *optional*):
            Transformer modules to adapt; defaults to the attention and MLP projections of QwenImage's blocks.
        text_lora_r (`int`, *optional*, defaults to `64`):
            LoRA rank of the reasoning adapter on the text encoder. Paper: 64.
        text_lora_alpha (`int`, *optional*, defaults to `128`):
            LoRA alpha of the reasoning adapter. Paper: 128.
        text_lora_target_modules (`str`, *optional*):
            Text-encoder modules to adapt (peft target: a regex string or comma-separated names); defaults to the
            attention and MLP projections of Qwen2.5-VL's language model.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["reward_weights"]

    # --- Overridden TrainingArguments defaults (RL steps are few and slow) ---
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Initial AdamW learning rate. Paper: 1e-4 (AdamW, betas (0.9, 0.999))."}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay. Paper: 1e-4."})
    per_device_train_batch_size: int = field(
        default=1, metadata={"help": "Sessions rolled out per process and step (each gives G x T samples)."}
    )
    logging_steps: float = field(default=1, metadata={"help": "Log every X optimizer steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep every dataset column: reward functions receive them as kwargs."}
    )

    # --- Rollout ---
    num_generations: int = field(default=6, metadata={"help": "Rollouts per session (group size G). Paper: 6."})
    num_turns: int = field(default=3, metadata={"help": "Turns rolled out per session. Paper: 3."})
    batch_sessions: bool = field(
        default=True,
        metadata={"help": "Batch the reasoning and transformer calls of all the process's sessions of a step."},
    )
    same_initial_noise: bool = field(
        default=True, metadata={"help": "G rollouts of a session share each turn's initial noise. Paper: True."}
    )
    num_inference_steps: int = field(default=15, metadata={"help": "Denoising steps per turn. Paper: 15."})
    timestep_shift: float | None = field(
        default=3.0, metadata={"help": "Static timestep shift (None: the pipeline's schedule). Paper: 3.0."}
    )
    sde_window_size: int = field(default=2, metadata={"help": "SDE (trained) steps per turn. Paper: 2."})
    sde_window_range: list[int] = field(
        default_factory=lambda: [0, 7],
        metadata={"help": "The SDE window starts at a step drawn from [lo, hi). Paper: 0 7."},
    )
    noise_level: float = field(default=1.3, metadata={"help": "SDE noise level a. Paper: 1.3."})
    true_cfg_scale: float = field(default=4.0, metadata={"help": "True CFG scale (1 disables). Paper: 4.0."})
    negative_prompt: str = field(default=" ", metadata={"help": "Negative prompt of the unconditional branch."})
    resolution: int | None = field(
        default=None, metadata={"help": "Resize source images to this square size (None keeps them). Paper: 512."}
    )
    reference_area: int | None = field(
        default=1024 * 1024, metadata={"help": "Pixels of the source's VAE reference (None: the working size)."}
    )
    condition_area: int = field(default=384 * 384, metadata={"help": "Pixels of the images shown to the VLM."})
    reasoning_condition_area: int | None = field(
        default=None, metadata={"help": "Pixels of the image the reasoner sees (None: condition_area)."}
    )
    keep_unedited: float | None = field(
        default=None,
        metadata={"help": "Keep the current image's latent where a rollout changed it by at most this (None: off)."},
    )

    # --- Reasoning ---
    reasoning: str = field(
        default="intent", metadata={"help": "'intent' (write the operative intent first) or 'none' (image-only RL)."}
    )
    reason_at_first_turn: bool = field(
        default=True,
        metadata={"help": "Write (and train) the intent at turn 1 too. Paper: False (reasons only at turns > 1)."},
    )
    train_reasoning: bool = field(
        default=True, metadata={"help": "Train the reasoning (text-encoder LoRA + token loss). Paper: True."}
    )
    reasoning_temperature: float = field(default=0.7, metadata={"help": "Reasoning temperature. Paper: 0.7."})
    max_reasoning_tokens: int = field(default=150, metadata={"help": "Most reasoning tokens. Paper: 150."})
    reasoning_template: str | None = field(
        default=None,
        metadata={"help": "Reasoning request template with {history}, {rules}, {instruction} (None = the default)."},
    )

    # --- Rewards, advantages, filtering ---
    reward_weights: dict | str | None = field(
        default_factory=lambda: dict(PAPER_REWARD_WEIGHTS),
        metadata={"help": 'Reward weights by function name (JSON). Paper: {"IF": 0.3, "CC": 0.3, "GA": 0.4}.'},
    )
    reward_retries: int = field(
        default=1, metadata={"help": "Retries of a raising reward function before its scores are marked missing."}
    )
    max_steps_without_reward: int = field(
        default=1, metadata={"help": "Stop after this many optimizer steps in a row without any valid reward."}
    )
    group_key: str = field(
        default="session", metadata={"help": "Advantage groups: 'session' (G x T samples) or 'turn'. Paper: session."}
    )
    global_std: bool = field(default=True, metadata={"help": "Normalise by the step's batch std. Paper: True."})
    global_std_min_samples: int = field(
        default=72, metadata={"help": "Warn when the global std is taken over fewer valid rewards than this."}
    )
    adv_clip_max: float = field(default=5.0, metadata={"help": "Advantage clip. Paper: 5."})
    trajectory_filter: str = field(
        default="if_zero", metadata={"help": "'if_zero', 'threshold' or 'none'. Paper: if_zero."}
    )
    filter_threshold: float = field(default=0.0, metadata={"help": "IF threshold of trajectory_filter=threshold."})
    filter_text: bool = field(
        default=False,
        metadata={"help": "Filtered turns still train the reasoning text (True) or get no gradient at all (False)."},
    )
    filter_reward_name: str = field(default="IF", metadata={"help": "Reward whose score drives the filter."})

    # --- Loss ---
    clip_range_text: float = field(default=1e-5, metadata={"help": "Token ratio clip range. Paper: 1e-5."})
    clip_range_image: float = field(default=1e-5, metadata={"help": "SDE-step ratio clip range. Paper: 1e-5."})
    beta: float = field(default=0.01, metadata={"help": "KL weight against the adapter-off model. Paper: 0.01."})

    # --- Adapters ---
    lora_r: int = field(default=64, metadata={"help": "Transformer LoRA rank. Paper: 64."})
    lora_alpha: int = field(default=128, metadata={"help": "Transformer LoRA alpha. Paper: 128."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 keeps ratios exactly 1)."})
    lora_init: str = field(default="gaussian", metadata={"help": "peft init_lora_weights. Paper: gaussian."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Transformer modules to adapt (default: QwenImage attention + MLP)."}
    )
    text_lora_r: int = field(default=64, metadata={"help": "Reasoning LoRA rank. Paper: 64."})
    text_lora_alpha: int = field(default=128, metadata={"help": "Reasoning LoRA alpha. Paper: 128."})
    text_lora_target_modules: str | None = field(
        default=None, metadata={"help": "Text-encoder modules to adapt (default: Qwen2.5-VL language model)."}
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.reward_weights, str):
            self.reward_weights = json.loads(self.reward_weights) if self.reward_weights.strip() else None
        if self.reward_weights is None:
            self.reward_weights = dict(PAPER_REWARD_WEIGHTS)
        if self.lora_target_modules is None:
            self.lora_target_modules = list(QWEN_TRANSFORMER_LORA_TARGETS)
        if self.text_lora_target_modules is None:
            self.text_lora_target_modules = QWEN_TEXT_ENCODER_LORA_TARGETS
        self.sde_window_range = [int(v) for v in self.sde_window_range]
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        need(self.num_generations >= 2, f"num_generations must be >= 2 (a group needs a spread), got "
             f"{self.num_generations}; the paper uses 6.")
        need(self.num_turns >= 1, f"num_turns must be >= 1, got {self.num_turns}.")
        need(self.num_inference_steps >= 2, f"num_inference_steps must be >= 2, got {self.num_inference_steps}.")
        need(self.timestep_shift is None or self.timestep_shift > 0,
             f"timestep_shift must be > 0 or None (the pipeline's schedule), got {self.timestep_shift}.")
        need(1 <= self.sde_window_size <= self.num_inference_steps,
             f"sde_window_size must be in [1, num_inference_steps={self.num_inference_steps}], got "
             f"{self.sde_window_size}.")
        need(len(self.sde_window_range) == 2, f"sde_window_range must be two integers [lo, hi), got "
             f"{self.sde_window_range}.")
        lo, hi = self.sde_window_range
        need(0 <= lo < hi, f"sde_window_range [lo, hi) needs 0 <= lo < hi, got {self.sde_window_range}.")
        need(hi - 1 + self.sde_window_size <= self.num_inference_steps,
             f"an SDE window starting at step {hi - 1} with size {self.sde_window_size} runs past "
             f"num_inference_steps={self.num_inference_steps}: lower sde_window_range's hi to at most "
             f"{self.num_inference_steps - self.sde_window_size + 1}.")
        need(self.noise_level >= 0, f"noise_level must be >= 0, got {self.noise_level}.")
        need(self.keep_unedited is None or (math.isfinite(self.keep_unedited) and self.keep_unedited >= 0),
             f"keep_unedited must be a finite change >= 0 or None (off), got {self.keep_unedited}.")
        need(self.keep_unedited is None or self.reference_area is None,
             "keep_unedited copies the current image's latent back, which needs it at the output's size: pass "
             "reference_area=None (the source encoded at the working size).")
        need(self.true_cfg_scale >= 1.0, f"true_cfg_scale must be >= 1 (1 disables CFG), got {self.true_cfg_scale}.")
        need(self.resolution is None or (self.resolution > 0 and self.resolution % 16 == 0),
             f"resolution must be a positive multiple of 16 (VAE x patch size) or None, got {self.resolution}.")
        need(self.reasoning in REASONING_MODES, f"reasoning must be one of {REASONING_MODES}, got "
             f"{self.reasoning!r}.")
        need(self.reasoning_template is None or "{instruction}" in self.reasoning_template,
             "reasoning_template must contain {instruction} (and usually {history} and {rules}), or be None for the "
             "default template.")
        need(not (self.reasoning == "none" and self.train_reasoning),
             "train_reasoning=True needs reasoning='intent': with reasoning='none' there is no text to train; set "
             "train_reasoning=False.")
        need(self.reasoning_temperature > 0, f"reasoning_temperature must be > 0 (the token log-probs divide by it), "
             f"got {self.reasoning_temperature}.")
        need(self.max_reasoning_tokens >= 1, f"max_reasoning_tokens must be >= 1, got {self.max_reasoning_tokens}.")
        need(isinstance(self.reward_weights, dict) and all(isinstance(v, (int, float)) for v in
                                                           self.reward_weights.values()),
             f"reward_weights must map reward names to numbers, e.g. {PAPER_REWARD_WEIGHTS}, got "
             f"{self.reward_weights!r}.")
        need(self.reward_retries >= 0, f"reward_retries must be >= 0, got {self.reward_retries}.")
        need(self.max_steps_without_reward >= 1,
             f"max_steps_without_reward must be >= 1, got {self.max_steps_without_reward}.")
        need(self.global_std_min_samples >= 0,
             f"global_std_min_samples must be >= 0 (0 never warns), got {self.global_std_min_samples}.")
        need(self.group_key in GROUP_KEYS, f"group_key must be one of {GROUP_KEYS}, got {self.group_key!r}.")
        need(self.adv_clip_max > 0, f"adv_clip_max must be > 0, got {self.adv_clip_max}.")
        need(self.trajectory_filter in TRAJECTORY_FILTERS,
             f"trajectory_filter must be one of {TRAJECTORY_FILTERS}, got {self.trajectory_filter!r}.")
        need(self.clip_range_text > 0 and self.clip_range_image > 0,
             f"clip ranges must be > 0, got text={self.clip_range_text}, image={self.clip_range_image}; the paper "
             "uses 1e-5.")
        need(self.beta >= 0, f"beta must be >= 0, got {self.beta}.")
        need(self.lora_r >= 1 and self.text_lora_r >= 1, "lora_r and text_lora_r must be >= 1.")
        need(self.lora_dropout == 0.0,
             f"lora_dropout must be 0 (dropout makes on-policy ratios differ from 1), got {self.lora_dropout}.")
        need(not self.auto_find_batch_size,
             "auto_find_batch_size is not supported: a step must hold whole sessions of num_generations rollouts; "
             "lower per_device_train_batch_size instead.")
