"""Multi-turn rollouts: G rollouts of one session, turn by turn, with everything the loss re-scores.

Per turn, for each of the G rollouts: the text encoder writes the operative intent (sampled at the reasoning
temperature; old token log-probs recomputed by one teacher-forced pass; at the first turn only with
`reason_at_first_turn`, else the raw instruction is used there, as in the paper's code), the intent is encoded with the rollout's
current image, and the image is sampled from noise with the SDE on a short window of steps (log-probs kept) and the
ODE elsewhere (`editr2.flow.sample`). The new latent is carried to the next turn as the reference. A rollout whose
intent names an earlier session state ("Undo the last edit.", `editr2.intent.parse_restore`) continues from that
state exactly instead: its turn trains its reasoning tokens only (`TurnRollout.restored`). The G rollouts of a
session share the start and, with `same_initial_noise`, each turn's initial noise; they are batched through the
transformer, so the loss can re-run exactly the same batches (on-policy ratios of exactly 1). `rollout_sessions` rolls
several sessions out together: one `generate` call for all their reasoning answers per turn and one transformer batch
of all their rollouts per denoising step, each session (and each rollout's reasoning) with its own seeds; each turn's
record keeps the session's rows of that batch (prompt padding included), so the loss still re-runs exactly what was
sampled.

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
from editr2.flow import SampleOutput, ode_step, sample, sde_step_with_logprob, sde_window, shifted_sigmas
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


class RowSampler:
    """A logits processor that samples every row of a batched `generate` from its own generator (inverse CDF).

    At each new token, row `r` draws one uniform `u` from `generators[r]` and picks the token where `u` falls in the
    cumulative distribution of `softmax(scores / temperature)` (summed in float64); it returns scores that are 0 there
    and -inf elsewhere, so greedy decoding (the argmax) keeps that token: an exact sample of the tempered softmax. A
    row's draws depend only on its own generator, so its tokens do not depend on which other rows share the batch (up
    to the logits' float rounding, which padding can change: a token changes only if `u` lies within rounding of a
    boundary of the cumulative distribution). One uniform per row and token, whatever the vocabulary, drawn on the CPU
    (the same tokens on every device, to rounding). Every row draws at every generated position, also after it has
    ended, so the draws a row keeps (through its end-of-sequence token) are the same whatever the batch.

    Args:
        generators: one CPU `torch.Generator` per row of the batch, in row order.
        temperature: the sampling temperature (> 0).
    """

    def __init__(self, generators: Sequence[torch.Generator], temperature: float):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature}: pass a sampling temperature > 0.")
        self.generators = list(generators)
        self.temperature = float(temperature)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if scores.shape[0] != len(self.generators):
            raise ValueError(f"the batch has {scores.shape[0]} rows but {len(self.generators)} generators were given.")
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in self.generators])  # (rows,)
        cdf = torch.softmax(scores.double() / self.temperature, dim=-1).cumsum(-1)  # (rows, vocab)
        targets = (uniform.to(cdf.device) * cdf[:, -1]).unsqueeze(1)
        tokens = torch.searchsorted(cdf, targets, right=True).clamp_max(scores.shape[-1] - 1)  # first cdf > target
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tokens, 0.0)


def _trim_completions(new: Tensor, eos_ids, pad: int) -> tuple[Tensor, Tensor]:
    """`(completion_ids, mask)` of generated rows `new (R, L)`: each row kept through its first end-of-sequence token,
    padding after it, and the columns cut to the longest kept row."""
    eos = torch.tensor([eos_ids] if isinstance(eos_ids, int) else list(eos_ids or []), device=new.device)
    is_eos = torch.isin(new, eos)
    ended_before = is_eos.long().cumsum(1) - is_eos.long()  # eos tokens strictly before each position
    mask = ended_before == 0  # keep through the first eos
    length = int(mask.sum(1).max()) if new.shape[0] else 0
    mask = mask[:, :length]
    return torch.where(mask, new[:, :length], torch.full_like(new[:, :length], pad)), mask


def generate_answers_batched(pipe, requests: Sequence[tuple[Sequence[Any], str, Sequence[torch.Generator]]], args):
    """Sample one reasoning answer per rollout for several sessions' turns, all in one batched `generate` call.

    Added here (the pipeline's `generate_reasoning` writes one answer at a time): the same request
    (`pipe.prepare_reasoning_inputs`, i.e. the IC-CoT messages with the rollout's current image) and the same sampling
    distribution (temperature, no top-k / top-p), the prompts of every request left-padded into one batch. Each row
    samples from its own generator (`RowSampler`), so a session's answers are those of generating it alone, to the
    logits' float rounding (padding to a longer prompt changes the summation order).

    Args:
        pipe: the `EditR2Pipeline`.
        requests: per session, `(sessions, instruction, generators)`: its G rollouts' current sessions, the turn's
            instruction and one generator per rollout.
        args: the [`EditR2Config`] (`reasoning_template`, `(reasoning_)condition_area`, `max_reasoning_tokens`,
            `reasoning_temperature`).

    Returns:
        Per request, `(answers, prompt_inputs, completion_ids, completion_mask)`: the decoded answers, the request's
        own prompt inputs `(G, P)` (left-padded to its longest prompt, as when generated alone), the new tokens
        `(G, L)` up to and including each row's end-of-sequence token (L: its longest row), and their mask.
    """
    if not requests:
        return []
    for sessions, _, generators in requests:
        if len(generators) != len(sessions):
            raise ValueError(f"pass one generator per rollout; got {len(generators)} for {len(sessions)} rollouts.")
    reasoner, tokenizer = pipe.reasoner, pipe.reasoner_processor.tokenizer
    device = pipe._execution_device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    area = pipe.reasoning_area(args.condition_area, args.reasoning_condition_area)
    inputs = [[pipe.prepare_reasoning_inputs(s, instruction, args.reasoning_template, area)
               for s in sessions] for sessions, instruction, _ in requests]
    flat = [x for group in inputs for x in group]
    prompt, _, _ = batch_text(flat, [x["input_ids"][:, :1] for x in flat], pad)
    prompt = {k: v.to(device) for k, v in prompt.items()}
    sampler = RowSampler([g for _, _, generators in requests for g in generators], args.reasoning_temperature)
    sequences = reasoner.generate(
        **prompt, max_new_tokens=args.max_reasoning_tokens, do_sample=False, temperature=None, top_k=None,
        top_p=None, logits_processor=[sampler],
    )
    new = sequences[:, prompt["input_ids"].shape[1] :]  # (sum G, L)
    eos = reasoner.generation_config.eos_token_id
    results, start = [], 0
    for group in inputs:
        rows = slice(start, start + len(group))
        start += len(group)
        completion_ids, mask = _trim_completions(new[rows], eos, pad)
        own, _, _ = batch_text(group, [x["input_ids"][:, :1] for x in group], pad)
        answers = tokenizer.batch_decode([row[m] for row, m in zip(completion_ids, mask)],
                                              skip_special_tokens=True)
        results.append((answers, {k: v.to(device) for k, v in own.items()}, completion_ids, mask))
    return results


def reasoning_generators(seed_keys: tuple, num_rollouts: int) -> list[torch.Generator]:
    """One seeded generator per rollout for its reasoning tokens: `(*seed_keys, "reasoning", g)`."""
    return [seeded_generator(*seed_keys, "reasoning", g) for g in range(num_rollouts)]


def generate_answers(pipe, sessions: Sequence[Any], instruction: str, args, generators: Sequence[torch.Generator]):
    """[`generate_answers_batched`] for one session's G rollouts: `(answers, prompt_inputs, completion_ids, mask)`."""
    return generate_answers_batched(pipe, [(sessions, instruction, generators)], args)[0]


def write_intents_batched(policy, requests: Sequence[tuple[Sequence[Any], str, tuple]], args
                          ) -> list[tuple[list, TextSample | None]]:
    """Sample one intent per rollout for several sessions' turns in one `generate` call; keep each session's answer
    tokens for its text loss.

    Args:
        requests: per session, `(sessions, instruction, seed_keys)`; the rollouts' generators are
            `reasoning_generators(seed_keys, G)`.

    Returns:
        Per request, `(intents, text)`: the G parsed intents and the `TextSample` (None when the reasoning is not
        trained). The old log-probs are a teacher-forced pass over the session's own G rows, the batch the loss
        re-runs.
    """
    pipe = policy.pipeline
    generated = generate_answers_batched(
        pipe, [(sessions, instruction, reasoning_generators(keys, len(sessions)))
               for sessions, instruction, keys in requests], args)
    out = []
    for (sessions, instruction, _), (answers, prompt, ids, mask) in zip(requests, generated):
        intents = [parse_answer(answer, instruction, num_turns=s.num_turns) for answer, s in zip(answers, sessions)]
        text = None
        if args.train_reasoning:
            text = TextSample(prompt, ids, mask, old_logps=None)
            with torch.no_grad():
                text.old_logps = policy.token_logps(text)  # at `args.reasoning_temperature` (the policy's args)
        out.append((intents, text))
    return out


def write_intents(policy, sessions: Sequence[Any], instruction: str, args, seed_keys: tuple) -> tuple[list, TextSample | None]:
    """Sample one intent per rollout at the reasoning temperature; keep the answers' tokens for the text loss."""
    return write_intents_batched(policy, [(sessions, instruction, seed_keys)], args)[0]


@dataclass
class _TurnPlan:
    """One session's turn up to the denoising loop: what `_sample_plans` integrates and `_finish_turn` records."""

    sessions: list
    instruction: str
    turn: int
    intents: list
    text: TextSample | None
    reasoned: bool
    conditionings: list
    conditioning: Any
    latents: Tensor
    timesteps: Tensor
    sigmas: Tensor
    window: tuple[int, ...]
    sde_generator: torch.Generator
    timings: dict[str, float]
    keep_unedited: float | None = None
    out: Any = None


def _reasons_at(args, turn: int) -> bool:
    """Whether an intent is written (sampled) at `turn`."""
    return args.reasoning == "intent" and (turn > 0 or getattr(args, "reason_at_first_turn", True))


def _plan_turn(policy, sessions: list, instruction: str, turn: int, args, seed_keys: tuple,
               reasoning: tuple | None = None) -> _TurnPlan:
    """Reasoning, conditioning, initial noise, schedule and SDE window of one session's turn (steps 1-3).

    `reasoning`: `(intents, text, seconds)` already written for this turn (`rollout_sessions` writes every session's
    in one batched call); None writes them here.
    """
    pipe = policy.pipeline
    device = pipe._execution_device
    num_rollouts = len(sessions)
    timings = {}
    start = _now(device)

    # 1. Reasoning: one sampled intent per rollout (or the raw instruction)
    reasoned = _reasons_at(args, turn)
    if reasoning is not None:
        intents, text, seconds = reasoning
    elif reasoned:
        intents, text = write_intents(policy, sessions, instruction, args, (*seed_keys, turn))
        seconds = _now(device) - start
    else:
        intents, text, seconds = [Intent(instruction)] * num_rollouts, None, _now(device) - start
    timings["reasoning"] = seconds
    start = _now(device)

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
    timings["encode"] = _now(device) - start

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
    return _TurnPlan(sessions, instruction, turn, intents, text, reasoned, conditionings, conditioning, latents,
                     timesteps, sigmas, window, seeded_generator(*seed_keys, turn, "sde"), timings,
                     getattr(args, "keep_unedited", None))


def _batch_key(plan: _TurnPlan) -> tuple:
    """Plans with equal keys can share the transformer's batches (same shapes, schedule and guidance)."""
    c = plan.conditioning
    return (tuple(plan.latents.shape[1:]), plan.latents.dtype, str(c.img_shapes), c.height, c.width,
            tuple(c.image_latents.shape[1:]), c.negative_prompt_embeds is None, tuple(plan.sigmas.tolist()),
            tuple(plan.timesteps.tolist()))


def _rows_of(batched, own, rows: slice):
    """`own` (a session's batched `TurnConditioning`) with its tensors taken from `rows` of `batched`, the
    conditioning of several sessions: the same prompts, padded as they were in the shared batch."""

    def take(tensor):
        return None if tensor is None else tensor[rows]

    return replace(
        own,
        prompt_embeds=take(batched.prompt_embeds),
        prompt_embeds_mask=take(batched.prompt_embeds_mask),
        negative_prompt_embeds=take(batched.negative_prompt_embeds),
        negative_prompt_embeds_mask=take(batched.negative_prompt_embeds_mask),
        image_latents=take(batched.image_latents),
    )


def _sample_plans(policy, plans: Sequence[_TurnPlan], args) -> None:
    """Step 4 for several sessions' turns at once: one transformer call per denoising step for all of them.

    The rollouts of all `plans` are concatenated into one batch (prompt embeddings right-padded and masked to the
    longest); each plan keeps its own SDE window and its own SDE noise generator, and its rows take exactly the SDE /
    ODE update `editr2.flow.sample` would give them, so only the velocities' float rounding can differ from sampling
    each session alone (more prompt padding changes the attention's summation order). Sets `plan.out`, and sets
    `plan.conditioning` to the plan's rows of the shared batch (padded as sampled), so that the loss, re-running one
    session's turn, computes the velocities the samples were drawn with (on-policy ratios of exactly 1).
    """
    pipe = policy.pipeline
    device = pipe._execution_device
    start = _now(device)
    first = plans[0]
    sizes = [p.latents.shape[0] for p in plans]
    bounds = [sum(sizes[:k]) for k in range(len(plans) + 1)]
    conditioning = first.conditioning if len(plans) == 1 else batch_conditioning(
        [c for p in plans for c in p.conditionings])
    timesteps, sigmas = first.timesteps, first.sigmas
    x = torch.cat([p.latents for p in plans], dim=0)  # (sum G, N, C)
    outs = [SampleOutput(latents=p.latents, sde_steps=tuple(sorted(set(int(i) for i in p.window)))) for p in plans]
    log_probs = [[] for _ in plans]
    stds = [[] for _ in plans]
    sigmas32 = torch.as_tensor(sigmas, dtype=torch.float32)
    for i in range(len(sigmas32) - 1):
        sigma, sigma_next = sigmas32[i], sigmas32[i + 1]
        v = policy.velocity(x, timesteps[i].expand(x.shape[0]).to(x.dtype), conditioning)
        pieces = []
        for k, out in enumerate(outs):
            rows = slice(bounds[k], bounds[k + 1])
            if i in out.sde_steps:
                x_next, log_prob, mean, std = sde_step_with_logprob(
                    v[rows], x[rows], sigma, sigma_next, args.noise_level, generator=plans[k].sde_generator,
                    sigma_max=sigmas32[1],
                )
                out.trajectory.append(x[rows])
                out.next_latents.append(x_next)
                out.means.append(mean)
                log_probs[k].append(log_prob)
                stds[k].append(std)
            else:
                x_next = ode_step(v[rows], x[rows], sigma, sigma_next).to(x.dtype)
            pieces.append(x_next)
        x = torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]
    share = (_now(device) - start) / len(plans)
    for k, (plan, out) in enumerate(zip(plans, outs)):
        if len(plans) > 1:  # the loss re-runs the rows with the prompt padding they were sampled with
            plan.conditioning = _rows_of(conditioning, plan.conditioning, slice(bounds[k], bounds[k + 1]))
        out.latents = x[bounds[k] : bounds[k + 1]]
        rows = out.latents.shape[0]
        out.log_probs = torch.stack(log_probs[k], dim=1) if log_probs[k] else out.latents.new_zeros(rows, 0, dtype=torch.float32)
        out.stds = torch.stack(stds[k], dim=1) if stds[k] else out.latents.new_zeros(rows, 0, dtype=torch.float32)
        plan.out = out
        plan.timings["sampling"] = share


def _sample_one(policy, plan: _TurnPlan, args) -> None:
    """Step 4 for one session's turn with `editr2.flow.sample` (the G rollouts in one batch). Sets `plan.out`."""
    device = policy.pipeline._execution_device
    start = _now(device)
    sigmas, timesteps, conditioning = plan.sigmas, plan.timesteps, plan.conditioning

    def velocity_fn(x: Tensor, sigma: Tensor) -> Tensor:
        step = int((sigmas == sigma).nonzero()[0])
        return policy.velocity(x, timesteps[step].expand(x.shape[0]).to(x.dtype), conditioning)

    plan.out = sample(
        velocity_fn, plan.latents, sigmas, sde_steps=plan.window, noise_level=args.noise_level,
        generator=plan.sde_generator,
    )
    plan.timings["sampling"] = _now(device) - start


def _finish_turn(policy, plan: _TurnPlan) -> tuple[TurnRollout, list]:
    """Step 5: decode, continue each rollout's session, and the turn's record."""
    pipe = policy.pipeline
    device = pipe._execution_device
    start = _now(device)
    out, conditioning, conditionings, intents = plan.out, plan.conditioning, plan.conditionings, plan.intents
    sigmas, timesteps, instruction = plan.sigmas, plan.timesteps, plan.instruction
    if plan.keep_unedited is not None:  # as inference with the same setting; the log-probs stay the sampled ones
        out.latents, _ = pipe.keep_unedited(out.latents, conditioning.image_latents, conditioning.height,
                                            conditioning.width, plan.keep_unedited)  # (G, N, C)
    # (a rollout whose intent names an earlier state continues from that state exactly, not from its sample)
    decoded = pipe.decode_latents(out.latents, conditioning.height, conditioning.width)  # (G, 3, H, W)
    restored = [intent.restore is not None for intent in intents]
    new_sessions = [
        pipe.restore_turn(conditionings[g].session, instruction, intents[g]) if restored[g] else
        pipe.finish_turn(conditionings[g], out.latents[g : g + 1], instruction, intents[g], decoded[g : g + 1])
        for g in range(len(intents))
    ]
    plan.timings["decode"] = _now(device) - start

    steps = torch.tensor(out.sde_steps, dtype=torch.long, device=sigmas.device)
    record = TurnRollout(
        turn=plan.turn,
        instruction=instruction,
        intents=list(intents),
        text=plan.text,
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
        timings=plan.timings,
        reasoned=plan.reasoned,
        restored=restored,
    )
    return record, new_sessions


@torch.no_grad()
def rollout_turn(policy, sessions: list, instruction: str, turn: int, args, seed_keys: tuple) -> tuple[TurnRollout, list]:
    """Roll the G `sessions` forward by one turn; returns the turn's record and the G new sessions."""
    plan = _plan_turn(policy, sessions, instruction, turn, args, seed_keys)
    _sample_one(policy, plan, args)
    return _finish_turn(policy, plan)


def source_image(record: dict) -> PIL.Image.Image:
    """The session's source image: `record["source_image"]` (PIL), else an error that says what to provide."""
    image = record.get("source_image")
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    raise ValueError(
        "A session record needs 'source_image' (a PIL image); build datasets with trl_editr2.data "
        "(ShapesSessionDataset, MiceSessionDataset), which load it."
    )


def _start_sessions(pipe, record: dict, args) -> list:
    """The G identical start sessions of `record` (its source image at the working size)."""
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
    return [session] * args.num_generations


def rollout_session(policy, record: dict, args, seed: int) -> SessionRollout:
    """Run `args.num_generations` rollouts of one session for `args.num_turns` turns.

    Args:
        policy: the [`~trl_editr2.policy.EditR2Policy`].
        record: the session record (`source_image`, `instruction` list, MICE fields, ...).
        args: the [`EditR2Config`].
        seed: this session's rollout seed (the trainer derives it from the run seed, the step and the session id).
    """
    sessions = _start_sessions(policy.pipeline, record, args)
    source = sessions[0].source_image
    turns = []
    for turn, instruction in enumerate(list(record["instruction"])[: args.num_turns]):
        record_t, sessions = rollout_turn(policy, sessions, instruction, turn, args, (seed,))
        turns.append(record_t)
    return SessionRollout(record=record, source_image=source, turns=turns, sessions=sessions)


@torch.no_grad()
def rollout_sessions(policy, records: Sequence[dict], args, seeds: Sequence[int]) -> list[SessionRollout]:
    """[`rollout_session`] for several sessions at once, turn by turn, with one transformer batch per denoising step.

    Each session keeps its own seeds, so its reasoning tokens, initial noise, SDE window and SDE noise are those of
    `rollout_session(policy, record, args, seed)`. At every turn the B sessions' B x G reasoning answers are sampled
    in one batched `generate` call (each row from its own generator, `RowSampler`), and their B x G rollouts go
    through the transformer together at every denoising step (sessions whose shapes or schedules differ in separate
    batches), which on a CPU or a GPU is faster than B calls of G. The logits and velocities then differ from the
    per-session ones by float rounding only (summation order in a larger batch, padding to the longest prompt), so
    the samples and old log-probs match `rollout_session` to a tolerance, not bit for bit (a sampled token could
    only change where two tokens' perturbed scores tie to rounding).

    Args:
        policy: the [`~trl_editr2.policy.EditR2Policy`].
        records: B session records.
        args: the [`EditR2Config`].
        seeds: B rollout seeds, one per record.
    """
    if len(seeds) != len(records):
        raise ValueError(f"pass one seed per record; got {len(seeds)} seeds for {len(records)} records.")
    states = [_start_sessions(policy.pipeline, record, args) for record in records]
    sources = [sessions[0].source_image for sessions in states]
    turns: list[list[TurnRollout]] = [[] for _ in records]
    for turn in range(args.num_turns):
        instructions = [list(record["instruction"])[turn] for record in records]
        reasoning = [None] * len(records)
        if _reasons_at(args, turn):  # every session's G answers in one `generate` call
            device = policy.pipeline._execution_device
            start = _now(device)
            written = write_intents_batched(
                policy, [(sessions, instruction, (seed, turn))
                         for sessions, instruction, seed in zip(states, instructions, seeds)], args)
            share = (_now(device) - start) / len(records)
            reasoning = [(intents, text, share) for intents, text in written]
        plans = [_plan_turn(policy, sessions, instruction, turn, args, (seed,), reasoned)
                 for sessions, instruction, seed, reasoned in zip(states, instructions, seeds, reasoning)]
        groups: dict[tuple, list[_TurnPlan]] = {}
        for plan in plans:
            groups.setdefault(_batch_key(plan), []).append(plan)
        for group in groups.values():
            _sample_plans(policy, group, args)
        for b, plan in enumerate(plans):
            record_t, states[b] = _finish_turn(policy, plan)
            turns[b].append(record_t)
    return [SessionRollout(record=record, source_image=source, turns=t, sessions=sessions)
            for record, source, t, sessions in zip(records, sources, turns, states)]
