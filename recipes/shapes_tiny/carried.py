"""Training the editor on its own carried state: a pool of sessions the current editor rolls forward.

At turn k of a session the pipeline edits the latent the editor itself produced at turn k - 1 (re-sampled k - 1
times, never re-encoded), while plain SFT only shows it clean encodings of rendered scenes. `CarriedPool` keeps
`carried_pool` training sessions of `carried_turns` turns, each at some turn k with the editor's own latent and image
of that state. Every step the `carried_refresh` oldest-advanced slots edit one more turn with the *current* weights
(the gold intent as the prompt, `num_inference_steps` as the pipeline samples, no gradients), so the pool follows the
editor's skill as it trains; a slot that finished its session starts a new one from the clean source. A training
example drawn from the pool conditions on the slot's carried latent and decoded image and targets the *true* next
scene, rendered and encoded: the editor learns to apply the edit and to repair what its earlier turns got wrong.

The pool prompts as the config's `prompt_mode` conditions (`train_editor.mode_text`): the gold intent ("intent"),
the raw instruction ("none"), or the history text with up to `max_history_images` of the slot's earlier states as
extra references after the current one ("history", oldest first, as `EditR2Pipeline.prepare_conditioning` builds
them: the earlier states' carried latents, and their decoded images for the text encoder).

In the "intent" mode, undo turns whose gold intent names an earlier state (`editr2.intent.parse_restore`) are
restored exactly, as the pipeline does (the slot takes that state's latent and image again); they are never training
examples, since the editor never runs on them. In the "none" and "history" modes the instruction goes to the editor
(the pipeline restores only when an intent names a state), so undo turns are edited and are ordinary examples.

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
        self._images: dict[tuple[int, int], object] = {}  # (slot, state) -> its decoded image (decoded once)
        self._sessions: dict[tuple[str, int], object] = {}
        self.draws = 0  # sessions started so far (seeds the next one)
        self.rejected = 0  # states `carried_filter` rejected so far

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
            self._images = {key: image for key, image in self._images.items() if key[0] != index}
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
        return self.state_image(index, self.slots[index].states[-1])

    def state_image(self, index: int, state: int):
        """The image of the slot's stored latent `state` (0: the source, rendered; else decoded, as the pipeline
        keeps each turn's image)."""
        if state == 0:  # the clean source, or restored to it
            return self.session(self.slots[index]).source_image()
        if (index, state) not in self._images:  # a state is drawn and conditioned on many times: decode it once
            self._images[index, state] = self._decode(self.latents[index][state].unsqueeze(0))[0]
        return self._images[index, state]

    def references(self, index: int) -> list[tuple[torch.Tensor, object]]:
        """`[(latent (N, C), image), ...]` the slot's next edit is conditioned on: its current state, then (the
        "history" mode) its earlier states, the last `max_history_images`, oldest first."""
        from recipes.shapes_tiny.train_editor import earlier_states

        slot = self.slots[index]
        states = [slot.states[-1]] + [slot.states[k] for k in earlier_states(self.cfg, slot.turn)]
        return [(self.latents[index][s], self.state_image(index, s)) for s in states]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor) -> list:
        size = self.cfg.image_size
        with common.single_frame_convs():
            pixels = self.pipe.decode_latents(latents.to(self.pipe.vae.device), size, size)
        return self.pipe.image_processor.postprocess(pixels, output_type="pil")

    # ---- rolling forward ------------------------------------------------------------------------------------------

    def _restore(self, index: int) -> bool:
        """Apply the slot's turn when its gold intent names an earlier state ("intent" mode only); True when it did."""
        from editr2.intent import parse_restore

        if getattr(self.cfg, "prompt_mode", "intent") != "intent":
            return False
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
        """Edit one turn of the slots `indices` with the current weights: one batched sampling run per number of
        references (a single run except in the "history" mode), prompted with the mode's text
        (`train_editor.mode_text`)."""
        from recipes.shapes_tiny.train_editor import earlier_states

        if not indices:
            return
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(len(earlier_states(self.cfg, self.slots[i].turn)), []).append(i)
        generator = common.step_generator(self.seed, step, "carried-noise")
        was_training = model.training
        model.eval()
        try:
            edited = {}
            for _, group in sorted(groups.items()):
                edited.update(zip(group, self._sample(group, generator)))
        finally:
            model.train(was_training)
        for i in indices:
            latent = edited[i]
            if not torch.isfinite(latent).all():
                raise FloatingPointError(f"step {step}: the editor produced non-finite latents for the carried pool.")
            slot = self.slots[i]
            self.latents[i].append(latent)
            slot.states.append(len(self.latents[i]) - 1)
            slot.turn += 1
            slot.advanced_at = step
        if getattr(self.cfg, "carried_filter", False):
            self._filter(indices)
        for i in indices:
            self._skip_restores(i)

    def _filter(self, indices: list[int]) -> None:
        """`carried_filter`: a slot whose new state the oracle parser does not read as the true scene (objects and
        tone) starts a new session, so the pool holds only states where every turn so far went right (up to the
        VAE's own misreadings) and no example asks the editor to draw what its state does not hold."""
        from editr2.bench.shapes.parser import parse_batch

        parsed = parse_batch([self.image(i) for i in indices])  # PIL images: the parser reads them in [0, 1]
        for i, scene in zip(indices, parsed):
            truth = self.session(self.slots[i]).scenes[self.slots[i].turn]
            if common.scene_key(scene) != common.scene_key(truth):
                self.rejected += 1
                self._start(i)

    @property
    def _history(self) -> bool:
        return getattr(self.cfg, "prompt_mode", "intent") == "history"

    def _text(self, index: int) -> str:
        from recipes.shapes_tiny.train_editor import mode_text

        slot = self.slots[index]
        return mode_text(self.cfg, self.session(slot), slot.turn)

    def _sample(self, indices: list[int], generator: torch.Generator) -> torch.Tensor:
        """The edited latents `(B, N, C)` (CPU, float32) of slots with as many references each."""
        from editr2 import flow
        from recipes.shapes_tiny.train_editor import conditioning

        cfg, pipe = self.cfg, self.pipe
        texts = [self._text(i) for i in indices]
        if self._history:
            refs = [self.references(i) for i in indices]
            images = [[image for _, image in r] for r in refs]
            latents = torch.stack([torch.cat([latent for latent, _ in r]) for r in refs])  # (B, R * N, C)
        else:  # the current state only (`references` decodes no history)
            images = [self.image(i) for i in indices]
            latents = torch.stack([self.current(i) for i in indices])  # (B, N, C)
        cond = conditioning(pipe, images, texts, cfg, image_latents=latents.to(pipe.vae.device))
        shape = (len(indices), self.current(indices[0]).shape[0], latents.shape[-1])
        noise = torch.randn(shape, generator=generator).to(cond.image_latents.device)  # (B, N, C)
        _, sigmas = pipe.prepare_timesteps(cfg.carried_steps, noise.shape[1], noise.device)
        return flow.sample(pipe.velocity_fn(cond), noise, sigmas).latents.float().cpu()  # (B, N, C)

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
        when fewer slots are there yet). Texts as `train_editor.example_text` draws them for the SFT examples (the
        mode's text; in the "intent" mode the raw instruction at its rate; the empty prompt at its rate)."""
        return [(refs[0][0], refs[0][1], text, scene) for refs, text, scene, _ in self.draw_references(count, rng)]

    def draw_references(self, count: int, rng: random.Random) -> list[tuple[list, str, object]]:
        """As `draw`, with all of an example's references and the true current scene: `([(latent (N, C), image),
        ...], text, target scene, current scene)`, the current state first, then (the "history" mode) earlier ones
        (`references`)."""
        from recipes.shapes_tiny.train_editor import example_text

        candidates = self.carried_indices()
        examples = []
        for i in rng.sample(candidates, min(count, len(candidates))):
            slot, session = self.slots[i], self.session(self.slots[i])
            text = example_text(rng, self.cfg, session, slot.turn)
            references = self.references(i) if self._history else [(self.current(i), self.image(i))]
            examples.append((references, text, session.scenes[slot.turn + 1], session.scenes[slot.turn]))
        return examples

    # ---- checkpoint -----------------------------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        """Write the pool into a checkpoint folder (safetensors for the latents, JSON for the slots)."""
        from safetensors.torch import save_file

        tensors = {f"{i}.{k}": latent.contiguous() for i, states in enumerate(self.latents)
                   for k, latent in enumerate(states)}
        save_file(tensors, str(Path(directory) / POOL_TENSORS))
        state = {"draws": self.draws, "rejected": self.rejected, "turns": self.turns,
                 "slots": [asdict(slot) for slot in self.slots],
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
        self.rejected = state.get("rejected", 0)
        self.slots = [Slot(**slot) for slot in state["slots"]]
        self.latents = [[tensors[f"{i}.{k}"] for k in range(n)] for i, n in enumerate(state["num_latents"])]
        self._images = {}
        return True


def carried_fraction_at(schedule, step: int, max_steps: int) -> float:
    """The fraction of a batch drawn from the pool at `step`: `schedule` is `[[fraction_of_max_steps, value], ...]`
    in order; the value of the last entry whose start has passed (0 before the first)."""
    value = 0.0
    for start, fraction in schedule:
        if step >= start * max_steps:
            value = float(fraction)
    return value
