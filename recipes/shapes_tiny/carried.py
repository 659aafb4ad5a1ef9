"""Training the editor on its own carried state: a pool of sessions the current editor rolls forward.

At turn k of a session the pipeline edits the latent the editor itself produced at turn k - 1 (re-sampled k - 1
times, never re-encoded), while plain SFT only shows it clean encodings of rendered scenes. `CarriedPool` keeps
`carried_pool` training sessions of `carried_turns` turns, each at some turn k with the editor's own latent and image
of that state. Every step the `carried_refresh` oldest-advanced slots edit one more turn with the *current* weights
(the gold intent as the prompt, `num_inference_steps` as the pipeline samples, no gradients), so the pool follows the
editor's skill as it trains; a slot that finished its session starts a new one from the clean source. A training
example drawn from the pool conditions on the slot's carried latent and decoded image and targets the *true* next
scene, rendered and encoded: the editor learns to apply the edit and to repair what its earlier turns got wrong.

Undo turns whose gold intent names an earlier state (`editr2.intent.parse_restore`) are restored exactly, as the
pipeline does (the slot takes that state's latent and image again); they are never training examples, since the
editor never runs on them.

The pool is part of the checkpoint (`carried_pool.safetensors` and `carried_pool.json` next to the accelerate state),
so a resumed run continues with the same pool.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from recipes.shapes_tiny import common

POOL_TENSORS = "carried_pool.safetensors"
POOL_STATE = "carried_pool.json"


@dataclass
class Slot:
    """One pool session: `family` and `seed` regenerate it; `turn` is the turn its current state is the input of
    (0 = the clean source); `states` are the indices into the slot's stored latents of the states so far (the
    source first), so an undo can name any of them."""

    family: str
    seed: int
    turn: int = 0
    advanced_at: int = -1
    states: list[int] = field(default_factory=list)


class CarriedPool:
    """`size` sessions of `turns` turns rolled forward by the editor being trained.

    Args:
        pipe: the training pipeline (its VAE and text encoder frozen, its transformer the one being trained).
        cfg: the `EditorConfig` (image size, condition size, sampling steps of the pool's edits).
        size: sessions in the pool.
        turns: turns per pool session (2..16).
        seed: seeds the sessions drawn and the sampling noise.
    """

    def __init__(self, pipe, cfg, size: int, turns: int, seed: int):
        if size < 1:
            raise ValueError(f"carried_pool={size}: pass at least 1 session.")
        if not 2 <= turns <= 16:
            raise ValueError(f"carried_turns={turns}: pass 2..16 (turn 1 always edits the clean source).")
        self.pipe, self.cfg, self.size, self.turns, self.seed = pipe, cfg, size, turns, seed
        self.slots: list[Slot] = []
        self.latents: list[list[torch.Tensor]] = []  # per slot, its states' packed latents (N, C), source first
        self._sessions: dict[tuple[str, int], object] = {}
        self.draws = 0  # sessions started so far (seeds the next one)

    # ---- sessions -------------------------------------------------------------------------------------------------

    def session(self, slot: Slot):
        """The slot's `ShapesSession` (cached)."""
        from editr2.bench.shapes import generate_session

        key = (slot.family, slot.seed)
        if key not in self._sessions:
            self._sessions[key] = generate_session(slot.family, self.turns, slot.seed, self.cfg.image_size)
        return self._sessions[key]

    def _new_slot(self) -> Slot:
        rng = random.Random(common.derive_seed(self.seed, "carried-session", self.draws))
        self.draws += 1
        return Slot(family=rng.choice(("cm", "cu")), seed=common.TRAIN_SEED_OFFSET + rng.randrange(10**9))

    @torch.no_grad()
    def _start(self, index: int) -> None:
        """Put a new session into slot `index`, at its clean source (rendered and VAE-encoded)."""
        from recipes.shapes_tiny.train_editor import encode_images

        slot = self._new_slot()
        latent = encode_images(self.pipe, [self.session(slot).source_image()], self.cfg.image_size)[0].cpu()
        slot.states = [0]
        if index < len(self.slots):
            self.slots[index], self.latents[index] = slot, [latent]
        else:
            self.slots.append(slot)
            self.latents.append([latent])

    def fill(self) -> None:
        """Start every slot at its clean source (a new run)."""
        while len(self.slots) < self.size:
            self._start(len(self.slots))

    def current(self, index: int) -> torch.Tensor:
        slot = self.slots[index]
        return self.latents[index][slot.states[-1]]

    def image(self, index: int):
        """The slot's current image as the pipeline would carry it (decoded from its latent; the source rendered)."""
        slot = self.slots[index]
        if slot.states[-1] == 0:  # the clean source, or restored to it
            return self.session(slot).source_image()
        return self._decode(self.current(index).unsqueeze(0))[0]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list:
        size = self.cfg.image_size
        with common.single_frame_convs():
            pixels = self.pipe.decode_latents(latents.to(self.pipe.vae.device), size, size)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    # ---- rolling forward ------------------------------------------------------------------------------------------

    def _restore(self, index: int) -> bool:
        """Apply the slot's turn when its gold intent names an earlier state; True when it did."""
        from editr2.intent import parse_restore

        slot = self.slots[index]
        target = parse_restore(self.session(slot).gold_intent[slot.turn], slot.turn)
        if target is None:
            return False
        slot.states.append(slot.states[target])
        slot.turn += 1
        return True

    def _skip_restores(self, index: int) -> None:
        """Restore turns need no editor: apply them at once (and start over when the session ends)."""
        while self.slots[index].turn < self.turns and self._restore(index):
            pass
        if self.slots[index].turn >= self.turns:
            self._start(index)

    @torch.no_grad()
    def advance(self, indices: list[int], step: int, model) -> None:
        """Edit one turn of the slots `indices` with the current weights, in one batched sampling run."""
        from editr2 import flow
        from recipes.shapes_tiny.train_editor import conditioning

        if not indices:
            return
        cfg, pipe = self.cfg, self.pipe
        texts = [self.session(self.slots[i]).gold_intent[self.slots[i].turn] for i in indices]
        references = [self.image(i) for i in indices]
        cond = conditioning(pipe, references, texts, cfg,
                            image_latents=torch.stack([self.current(i) for i in indices]).to(pipe.vae.device))
        generator = common.step_generator(self.seed, step, "carried-noise")
        noise = torch.randn(cond.image_latents.shape, generator=generator).to(cond.image_latents.device)  # (B, N, C)
        _, sigmas = pipe.prepare_timesteps(cfg.carried_steps, noise.shape[1], noise.device)
        was_training = model.training
        model.eval()
        try:
            latents = flow.sample(pipe.velocity_fn(cond), noise, sigmas).latents.float().cpu()  # (B, N, C)
        finally:
            model.train(was_training)
        if not torch.isfinite(latents).all():
            raise FloatingPointError(f"step {step}: the editor produced non-finite latents for the carried pool.")
        for i, latent in zip(indices, latents):
            slot = self.slots[i]
            self.latents[i].append(latent)
            slot.states.append(len(self.latents[i]) - 1)
            slot.turn += 1
            slot.advanced_at = step
            self._skip_restores(i)

    def refresh(self, count: int, step: int, model) -> None:
        """Advance the `count` slots advanced longest ago (ties: lowest index)."""
        for i in range(len(self.slots)):
            self._skip_restores(i)
        order = sorted(range(len(self.slots)), key=lambda i: (self.slots[i].advanced_at, i))
        self.advance(order[:count], step, model)

    # ---- examples -------------------------------------------------------------------------------------------------

    def carried_indices(self) -> list[int]:
        """Slots whose current state is the editor's own output (turn >= 1)."""
        return [i for i, slot in enumerate(self.slots) if slot.turn >= 1]

    def draw(self, count: int, rng: random.Random) -> list[tuple[torch.Tensor, object, str, object]]:
        """`count` examples `(carried latent (N, C), its image, text, target scene)` from slots at turn >= 1 (fewer
        when fewer slots are there yet). Texts are the gold intent, with the raw instruction and the empty prompt at
        the SFT recipe's rates."""
        from recipes.shapes_tiny.train_editor import self_contained

        candidates = self.carried_indices()
        examples = []
        for i in rng.sample(candidates, min(count, len(candidates))):
            slot, session = self.slots[i], self.session(self.slots[i])
            text = session.gold_intent[slot.turn]
            if self_contained(session, slot.turn) and rng.random() < self.cfg.raw_instruction_prob:
                text = session.instruction[slot.turn]
            if rng.random() < self.cfg.drop_text_prob:
                text = " "
            examples.append((self.current(i), self.image(i), text, session.scenes[slot.turn + 1]))
        return examples

    # ---- checkpoint -----------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the pool into a checkpoint folder (safetensors for the latents, JSON for the slots)."""
        from safetensors.torch import save_file

        tensors = {f"{i}.{k}": latent.contiguous() for i, states in enumerate(self.latents)
                   for k, latent in enumerate(states)}
        save_file(tensors, str(Path(directory) / POOL_TENSORS))
        state = {"draws": self.draws, "turns": self.turns, "slots": [asdict(slot) for slot in self.slots],
                 "num_latents": [len(states) for states in self.latents]}
        (Path(directory) / POOL_STATE).write_text(json.dumps(state))

    def load(self, directory: Path) -> bool:
        """Read the pool of a checkpoint folder; False when it holds none (a run started without the pool)."""
        from safetensors.torch import load_file

        path = Path(directory)
        if not (path / POOL_STATE).is_file():
            return False
        state = json.loads((path / POOL_STATE).read_text())
        if state["turns"] != self.turns:
            raise ValueError(f"{path}: its carried pool has {state['turns']}-turn sessions, the config "
                             f"carried_turns={self.turns}; pass the run's value or a new run_dir.")
        tensors = load_file(str(path / POOL_TENSORS))
        self.draws = state["draws"]
        self.slots = [Slot(**slot) for slot in state["slots"]]
        self.latents = [[tensors[f"{i}.{k}"] for k in range(n)] for i, n in enumerate(state["num_latents"])]
        return True


def carried_fraction_at(schedule, step: int, max_steps: int) -> float:
    """The fraction of a batch drawn from the pool at `step`: `schedule` is `[[fraction_of_max_steps, value], ...]`
    in order; the value of the last entry whose start has passed (0 before the first)."""
    value = 0.0
    for start, fraction in schedule:
        if step >= start * max_steps:
            value = float(fraction)
    return value
