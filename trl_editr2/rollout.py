"""Multi-turn rollouts: G rollouts of one session, turn by turn, with everything the loss re-scores.

Per turn, for each of the G rollouts: the text encoder writes the operative intent (sampled at the reasoning
temperature; old token log-probs recomputed by one teacher-forced pass; at the first turn only with
`reason_at_first_turn`, else the raw instruction is used there, as in the paper's code), the intent is encoded with the rollout's
current image, and the image is sampled from noise with the SDE on a short window of steps (log-probs kept) and the
ODE elsewhere (`editr2.flow.sample`). The new latent is carried to the next turn as the reference. A rollout whose
intent names an earlier session state ("Undo the last edit.", `editr2.intent.parse_restore`) continues from that
state exactly instead: its turn trains its reasoning tokens only (`TurnRollout.restored`). The G rollouts of a
session share the start and, with `same_initial_noise`, each turn's initial noise; they are batched through the
transformer, so the loss can re-run exactly the same batches (on-policy ratios of exactly 1).

All randomness comes from generators seeded by `(seed, session, turn, purpose)`, never from the global RNG: a
rollout does not depend on which process runs it or on what ran before (resume and scale-out reproduce it).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import PIL.Image
import torch
from torch import Tensor

from editr2.batching import pad_prompt_embeds
from editr2.flow import sample, sde_window, shifted_sigmas
from editr2.intent import Intent, parse_answer


@dataclass
class TextSample:
    """The G reasoning answers of one turn, batched for a teacher-forced pass.

    Args:
        prompt_inputs: the text encoder's prompt inputs, `input_ids`/`attention_mask` `(G, P)` (left-padded), plus
            the image inputs (`pixel_values` of all G images concatenated, `image_grid_thw` `(G, 3)`).
        completion_ids: `(G, L)` generated token ids, right-padded.
        completion_mask: `(G, L)` bool, False at padding.
        old_logps: `(G, L)` float32 teacher-forced log-probs at rollout time (0 at padding).
    """

    prompt_inputs: dict[str, Tensor]
    completion_ids: Tensor
    completion_mask: Tensor
    old_logps: Tensor


@dataclass
class TurnRollout:
    """One turn of a session's G rollouts: what the rewards score and the loss re-runs. K = SDE window size.

    Args:
        turn: 0-based turn index.
        instruction: the raw instruction of the turn.
        intents: G `editr2.intent.Intent`s (the text that conditioned each edit, its reasoning, fallback reason).
        text: the reasoning tokens (None when the reasoning is not trained).
        conditioning: the pipeline's `TurnConditioning`, batched over the G rollouts.
        sde_steps: the K step indices sampled with the SDE.
        step_timesteps, step_sigmas, step_sigmas_next: `(K,)` timestep (scheduler units) and sigmas of those steps.
        sigma_max: the schedule's second sigma (the SDE's guard at sigma = 1).
        latents, next_latents: K `(G, N, C)` latents before / after each SDE step.
        old_log_probs: `(G, K)` float32 log-probs of the SDE steps at rollout time.
        final_latents: `(G, N, C)` the turn's output latents (carried to the next turn).
        images: G output images.
        timings: seconds spent in `reasoning`, `encode`, `sampling`, `decode`.
        reasoned: whether an intent was written at this turn (False with `reasoning="none"`, and at the first turn
            with `reason_at_first_turn=False`: the raw instruction conditioned the edit).
        restored: per rollout, whether its intent named an earlier state (`Intent.restore`): that rollout's turn is an
            exact copy of the state (`EditR2Pipeline.restore_turn`), its image was not sampled, and its SDE steps (the
            batch still carries a row for it, so shapes stay `(G, ...)`) are discarded and never trained; its reasoning
            tokens train as usual. Empty means none.
    """

    turn: int
    instruction: str
    intents: list[Intent]
    text: TextSample | None
    conditioning: Any
    sde_steps: tuple[int, ...]
    step_timesteps: Tensor
    step_sigmas: Tensor
    step_sigmas_next: Tensor
    sigma_max: Tensor
    latents: list[Tensor]
    next_latents: list[Tensor]
    old_log_probs: Tensor
    final_latents: Tensor
    images: list[PIL.Image.Image]
    timings: dict[str, float] = field(default_factory=dict)
    reasoned: bool = True
    restored: list[bool] = field(default_factory=list)


@dataclass
class SessionRollout:
    """The G rollouts of one session: its record, source image, the turns and each rollout's final session."""

    record: dict
    source_image: PIL.Image.Image
    turns: list[TurnRollout]
    sessions: list[Any]

    @property
    def num_generations(self) -> int:
        return len(self.sessions)


# ---------------------------------------------------------------------------------------------------------------------
# Seeding
# ---------------------------------------------------------------------------------------------------------------------


def derive_seed(*keys: Any) -> int:
    """A 63-bit seed from any printable keys, stable across processes and Python runs (no `hash()`)."""
    digest = hashlib.sha256("/".join(str(k) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(*keys: Any) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(*keys)` (CPU, so a rollout is the same on every device)."""
    return torch.Generator().manual_seed(derive_seed(*keys))


# ---------------------------------------------------------------------------------------------------------------------
# Batching helpers
# ---------------------------------------------------------------------------------------------------------------------


def _pad_stack(rows: Sequence[Tensor], value, left: bool) -> Tensor:
    """Stack 1-D rows into `(G, max_len)`, padding with `value` on the left or the right."""
    length = max(r.shape[0] for r in rows)
    out = rows[0].new_full((len(rows), length), value)
    for i, r in enumerate(rows):
        if left:
            out[i, length - r.shape[0] :] = r
        else:
            out[i, : r.shape[0]] = r
    return out


def batch_text(inputs: Sequence[dict], completions: Sequence[Tensor], pad_token_id: int) -> tuple[dict, Tensor, Tensor]:
    """Batch G single-prompt encoder inputs (left-padded) and G completions `(1, L_g)` (right-padded).

    Returns:
        `(prompt_inputs, completion_ids (G, L), completion_mask (G, L) bool)`.
    """
    prompt = {
        "input_ids": _pad_stack([x["input_ids"][0] for x in inputs], pad_token_id, left=True),
        "attention_mask": _pad_stack([x["attention_mask"][0] for x in inputs], 0, left=True),
    }
    if "mm_token_type_ids" in inputs[0]:
        prompt["mm_token_type_ids"] = _pad_stack([x["mm_token_type_ids"][0] for x in inputs], 0, left=True)
    for key in ("pixel_values", "image_grid_thw"):
        if key in inputs[0]:
            prompt[key] = torch.cat([x[key] for x in inputs], dim=0)
    ids = [c[0] for c in completions]
    completion_ids = _pad_stack(ids, pad_token_id, left=False)  # (G, L)
    mask = _pad_stack([torch.ones_like(c, dtype=torch.bool) for c in ids], False, left=False)  # (G, L)
    return prompt, completion_ids, mask


def batch_conditioning(conditionings: Sequence[Any]):
    """Concatenate G batch-1 `TurnConditioning`s into one of batch G (prompt embeddings right-padded + masked)."""
    first = conditionings[0]
    if any(c.img_shapes != first.img_shapes for c in conditionings):
        raise ValueError("the G rollouts of a turn must share the image shapes (same working size and references)")
    embeds, mask = pad_prompt_embeds([c.prompt_embeds for c in conditionings], [c.prompt_embeds_mask for c in conditionings])
    neg_embeds = neg_mask = None
    if first.negative_prompt_embeds is not None:
        neg_embeds, neg_mask = pad_prompt_embeds(
            [c.negative_prompt_embeds for c in conditionings],
            [c.negative_prompt_embeds_mask for c in conditionings],
        )
    return replace(
        first,
        text=[c.text for c in conditionings],
        prompt_embeds=embeds,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg_embeds,
        negative_prompt_embeds_mask=neg_mask,
        image_latents=torch.cat([c.image_latents for c in conditionings], dim=0),  # (G, N_ref, C)
    )


# ---------------------------------------------------------------------------------------------------------------------
# Rollout
# ---------------------------------------------------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def schedule(pipeline, args, image_seq_len: int, device) -> tuple[Tensor, Tensor]:
    """`(timesteps (S,), sigmas (S + 1,))` of a turn.

    `args.timestep_shift=None` uses the pipeline's own schedule (`prepare_timesteps`, what inference uses); a float
    uses the static shift of the paper (`editr2.flow.shifted_sigmas`), with timesteps `1000 * sigma`.
    """
    if args.timestep_shift is None:
        return pipeline.prepare_timesteps(args.num_inference_steps, image_seq_len, device)
    sigmas = shifted_sigmas(args.num_inference_steps, args.timestep_shift, device=device)
    return sigmas[:-1] * pipeline.scheduler.config.num_train_timesteps, sigmas


def generate_answers(pipe, sessions: Sequence[Any], instruction: str, args, generator: torch.Generator):
    """Sample one reasoning answer per rollout, all G in one batched `generate` call.

    Added here (the pipeline's `generate_reasoning` writes one answer at a time): the same request
    (`pipe.prepare_reasoning_inputs`, i.e. the IC-CoT messages with the rollout's current image) and the same sampling
    (temperature, no top-k / top-p), on the G prompts left-padded into one batch. The global RNG is seeded from
    `generator` inside `fork_rng`, as the pipeline does.

    Returns:
        `(answers, prompt_inputs, completion_ids, completion_mask)`: the decoded answers, the batched prompt inputs
        `(G, P)`, the new tokens `(G, L)` up to and including each row's end-of-sequence token, and their mask.
    """
    text_encoder = pipe.text_encoder
    device = pipe._execution_device
    inputs = [pipe.prepare_reasoning_inputs(s, instruction, args.reasoning_template, args.condition_area)
              for s in sessions]
    pad = pipe.tokenizer.pad_token_id if pipe.tokenizer.pad_token_id is not None else 0
    prompt, _, _ = batch_text(inputs, [x["input_ids"][:, :1] for x in inputs], pad)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        sequences = text_encoder.generate(
            **prompt, max_new_tokens=args.max_reasoning_tokens, do_sample=True,
            temperature=args.reasoning_temperature, top_k=None, top_p=None,
        )
    new = sequences[:, prompt["input_ids"].shape[1] :]  # (G, L)
    eos = text_encoder.generation_config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=new.device)
    is_eos = torch.isin(new, eos)
    ended_before = is_eos.long().cumsum(1) - is_eos.long()  # eos tokens strictly before each position
    mask = ended_before == 0  # keep through the first eos
    completion_ids = torch.where(mask, new, torch.full_like(new, pad))
    answers = pipe.tokenizer.batch_decode(
        [row[m] for row, m in zip(completion_ids, mask)], skip_special_tokens=True
    )
    return answers, prompt, completion_ids, mask


def write_intents(policy, sessions: Sequence[Any], instruction: str, args, seed_keys: tuple) -> tuple[list, TextSample | None]:
    """Sample one intent per rollout at the reasoning temperature; keep the answers' tokens for the text loss."""
    pipe = policy.pipeline
    answers, prompt, ids, mask = generate_answers(
        pipe, sessions, instruction, args, seeded_generator(*seed_keys, "reasoning")
    )
    intents = [parse_answer(answer, instruction, num_turns=s.num_turns) for answer, s in zip(answers, sessions)]
    if not args.train_reasoning:
        return intents, None
    text = TextSample(prompt, ids, mask, old_logps=None)
    with torch.no_grad():
        text.old_logps = policy.token_logps(text)  # at `args.reasoning_temperature` (the policy's args)
    return intents, text


@torch.no_grad()
def rollout_turn(policy, sessions: list, instruction: str, turn: int, args, seed_keys: tuple) -> tuple[TurnRollout, list]:
    """Roll the G `sessions` forward by one turn; returns the turn's record and the G new sessions."""
    pipe = policy.pipeline
    device = pipe._execution_device
    num_rollouts = len(sessions)
    timings = {}
    start = _now(device)

    # 1. Reasoning: one sampled intent per rollout (or the raw instruction)
    reasoned = args.reasoning == "intent" and (turn > 0 or getattr(args, "reason_at_first_turn", True))
    if reasoned:
        intents, text = write_intents(policy, sessions, instruction, args, (*seed_keys, turn))
    else:
        intents, text = [Intent(instruction)] * num_rollouts, None
    timings["reasoning"] = _now(device) - start

    # 2. Conditioning of each rollout (its intent, its current image), batched
    negative = args.negative_prompt if args.true_cfg_scale > 1 else None
    conditionings = []
    for g in range(num_rollouts):
        conditioning = pipe.prepare_conditioning(
            sessions[g], intents[g].text, args.reasoning, negative, args.reference_area, args.condition_area,
            device=device,
        )
        if turn == 0 and g == 0:  # the source is VAE-encoded once, shared by all rollouts
            sessions = [conditioning.session] * num_rollouts
        conditionings.append(conditioning)
    conditioning = batch_conditioning(conditionings)
    timings["encode"] = _now(device) - start - timings["reasoning"]

    # 3. Initial noise (shared by the group with same_initial_noise) and the schedule
    num_latent_channels = pipe.transformer.config.in_channels // 4
    noise_batch = 1 if args.same_initial_noise else num_rollouts
    latents = pipe.prepare_latents(
        noise_batch, num_latent_channels, conditioning.height, conditioning.width, conditioning.prompt_embeds.dtype,
        device, seeded_generator(*seed_keys, turn, "noise"),
    )
    latents = latents.expand(num_rollouts, -1, -1).contiguous()  # (G, N, C)
    timesteps, sigmas = schedule(pipe, args, latents.shape[1], device)
    window = sde_window(
        args.num_inference_steps, args.sde_window_size, tuple(args.sde_window_range),
        generator=seeded_generator(*seed_keys, turn, "window"),
    )

    # 4. Sample: SDE on the window (log-probs kept), ODE elsewhere
    def velocity_fn(x: Tensor, sigma: Tensor) -> Tensor:
        step = int((sigmas == sigma).nonzero()[0])
        return policy.velocity(x, timesteps[step].expand(x.shape[0]).to(x.dtype), conditioning)

    out = sample(
        velocity_fn, latents, sigmas, sde_steps=window, noise_level=args.noise_level,
        generator=seeded_generator(*seed_keys, turn, "sde"),
    )
    timings["sampling"] = _now(device) - start - timings["reasoning"] - timings["encode"]

    # 5. Decode, and continue each rollout's session with its image and latent
    # (a rollout whose intent names an earlier state continues from that state exactly, not from its sample)
    decoded = pipe.decode_latents(out.latents, conditioning.height, conditioning.width)  # (G, 3, H, W)
    restored = [intent.restore is not None for intent in intents]
    new_sessions = [
        pipe.restore_turn(conditionings[g].session, instruction, intents[g]) if restored[g] else
        pipe.finish_turn(conditionings[g], out.latents[g : g + 1], instruction, intents[g], decoded[g : g + 1])
        for g in range(num_rollouts)
    ]
    timings["decode"] = _now(device) - start - sum(timings.values())

    steps = torch.tensor(out.sde_steps, dtype=torch.long, device=sigmas.device)
    record = TurnRollout(
        turn=turn,
        instruction=instruction,
        intents=list(intents),
        text=text,
        conditioning=conditioning,
        sde_steps=out.sde_steps,
        step_timesteps=timesteps[steps],
        step_sigmas=sigmas[steps],
        step_sigmas_next=sigmas[steps + 1],
        sigma_max=sigmas[1],
        latents=out.trajectory,
        next_latents=out.next_latents,
        old_log_probs=out.log_probs,
        final_latents=out.latents,
        images=[s.current_image for s in new_sessions],
        timings=timings,
        reasoned=reasoned,
        restored=restored,
    )
    return record, new_sessions


def source_image(record: dict) -> PIL.Image.Image:
    """The session's source image: `record["source_image"]` (PIL), else an error that says what to provide."""
    image = record.get("source_image")
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    raise ValueError(
        "A session record needs 'source_image' (a PIL image); build datasets with trl_editr2.data "
        "(ShapesSessionDataset, MiceSessionDataset), which load it."
    )


def rollout_session(policy, record: dict, args, seed: int) -> SessionRollout:
    """Run `args.num_generations` rollouts of one session for `args.num_turns` turns.

    Args:
        policy: the [`~trl_editr2.policy.EditR2Policy`].
        record: the session record (`source_image`, `instruction` list, MICE fields, ...).
        args: the [`EditR2Config`].
        seed: this session's rollout seed (the trainer derives it from the run seed, the step and the session id).
    """
    pipe = policy.pipeline
    instructions = list(record["instruction"])
    if len(instructions) < args.num_turns:
        raise ValueError(
            f"session {record.get('session_id')!r} has {len(instructions)} instructions but num_turns="
            f"{args.num_turns}; filter the dataset or lower num_turns."
        )
    image = source_image(record)
    if args.resolution is not None:
        height = width = args.resolution
    else:
        width, height = image.size
    session = pipe.start_session(image, height, width, args.reference_area)
    sessions = [session] * args.num_generations
    turns = []
    for turn, instruction in enumerate(instructions[: args.num_turns]):
        record_t, sessions = rollout_turn(policy, sessions, instruction, turn, args, (seed,))
        turns.append(record_t)
    return SessionRollout(record=record, source_image=session.source_image, turns=turns, sessions=sessions)
