"""MICE-Shapes sessions: seeded multi-turn editing sessions with exact ground truth, in the MICE JSONL format.

Two families, mirroring MICE-Bench:

- **cm** (context memory): turn 1 states a persistent colour rule together with an edit; later turns are explicit
  and never restate it, but must obey it (objects they create take the rule colour; see `grammar` for the exact
  semantics).
- **cu** (context understanding): later turns refer back: "it" (the object the previous turn produced or changed),
  "the one you added first", "the shape from the first edit", and "undo that" (revert the previous turn).

Every session is valid by construction: targets are unique by description, destination cells are free, scenes keep
1-5 objects, and references only point at objects that exist and were never part of a count change (whose copies
would make them ambiguous).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image

from .grammar import (TARGET_OPS, Command, Literal, apply_command, canonical_intent, check_command,
                      formatted_instruction, realize)
from .render import DEFAULT_SIZE, render
from .world import COLOR_NAMES, MAX_OBJECTS, SHAPES, SIZES, TONE_NAMES, Desc, Obj, Scene, random_scene

FAMILIES = ("cm", "cu")
MAX_TURNS = 16
OP_WEIGHTS = {"subject_add": 3.0, "subject_remove": 2.0, "subject_replace": 2.0, "color_alter": 2.0,
              "size_change": 2.0, "position_change": 2.0, "count_change": 1.5, "background_change": 1.0}
UNDO_PROBABILITY = 0.2       # cu, turns >= 2
REFERENCE_PROBABILITY = 0.75  # cu, turns >= 2, when no undo: refer back instead of naming the object


@dataclass
class ShapesSession:
    """One generated session: the MICE fields of the real release plus exact ground truth.

    Per-turn lists have `num_turns` entries; `scenes` has `num_turns + 1` (scene 0 is the source).

    Args:
        family (`str`): "cm" or "cu".
        seed (`int`): generation seed (with `family` it determines the session).
        size (`int`): image side in pixels.
        rule_color (`str`, *optional*): the cm rule's colour.
        scenes (`list[Scene]`): ground-truth scenes 0..T.
        instruction, task_type, formatted_instruction, bg_consistency, unchanged_objects, available_objects,
        all_objects: the MICE fields.
        gold_intent (`list[str]`): the self-contained operative instruction per turn (`grammar.canonical_intent`).
        commands (`list[Command]`): the resolved edit per turn.
        references (`list[str]`): how each turn names its target: "explicit", "it", "first_added", "first_edit",
            "undo", or "none" (add / background / count); everyday phrasing adds "last_added", "other", "redo" and
            "restore".
        phrasing (`str`): "grammar" (the fixed grammar) or the everyday phrasing split it was written in ("seen",
            "unseen", "all"; see `language`).
        phrasing_families (`list[str]`): everyday phrasing only: the phrasing family of each turn.
        rules (`list[str | None]`): everyday phrasing only: the persistent rule's colour after each turn (rules can
            be changed and cancelled there; `rule_color` is the first rule stated).
    """

    family: str
    seed: int
    size: int
    rule_color: str | None
    scenes: list[Scene]
    instruction: list[str]
    task_type: list[str]
    formatted_instruction: list[str]
    bg_consistency: list[bool]
    unchanged_objects: list[list[str]]
    available_objects: list[list[str]]
    all_objects: list[list[str]]
    gold_intent: list[str]
    commands: list[Command]
    references: list[str] = field(default_factory=list)
    phrasing: str = "grammar"
    phrasing_families: list[str] = field(default_factory=list)
    rules: list = field(default_factory=list)

    @property
    def num_turns(self) -> int:
        return len(self.instruction)

    @property
    def image_path(self) -> str:
        """Placeholder path of the source image (the image itself is `render(scenes[0], size)`)."""
        return f"mice-shapes/{self.family}_{self.seed:06d}.png"

    def source_image(self) -> Image.Image:
        return render(self.scenes[0], self.size)

    def target_image(self, turn: int) -> Image.Image:
        """The ground-truth image after `turn` (0 = the source)."""
        return render(self.scenes[turn], self.size)

    def unchanged_scene_objects(self, turn: int) -> list[Obj]:
        """Objects of the source scene that no edit touched up to `turn` (1-based), as they are in scene 0."""
        names = set(self.unchanged_objects[turn - 1])
        return [o for o in self.scenes[0].objects if o.name in names]

    def to_json(self) -> dict:
        """The MICE JSONL record (release field order first) plus the MICE-Shapes extras."""
        record = {
            "image": self.image_path,
            "instruction": list(self.instruction),
            "task_type": list(self.task_type),
            "formatted_instruction": list(self.formatted_instruction),
            "bg_consistency": list(self.bg_consistency),
            "unchanged_objects": [list(x) for x in self.unchanged_objects],
            "available_objects": [list(x) for x in self.available_objects],
            "all_objects": [list(x) for x in self.all_objects],
            "turns": self.num_turns,
            "family": self.family,
            "seed": self.seed,
            "size": self.size,
            "rule_color": self.rule_color,
            "scenes": [s.to_json() for s in self.scenes],
            "gold_intent": list(self.gold_intent),
            "gold_command": [c.to_json() for c in self.commands],
            "references": list(self.references),
        }
        if self.phrasing != "grammar":
            record.update(phrasing=self.phrasing, phrasing_families=list(self.phrasing_families),
                          rules=list(self.rules))
        return record

    @classmethod
    def from_json(cls, data: dict) -> "ShapesSession":
        return cls(
            family=data["family"], seed=int(data["seed"]), size=int(data["size"]), rule_color=data.get("rule_color"),
            scenes=[Scene.from_json(s) for s in data["scenes"]],
            instruction=list(data["instruction"]), task_type=list(data["task_type"]),
            formatted_instruction=list(data["formatted_instruction"]), bg_consistency=list(data["bg_consistency"]),
            unchanged_objects=[list(x) for x in data["unchanged_objects"]],
            available_objects=[list(x) for x in data["available_objects"]],
            all_objects=[list(x) for x in data["all_objects"]],
            gold_intent=list(data["gold_intent"]),
            commands=[Command.from_json(c) for c in data["gold_command"]],
            references=list(data.get("references", [])),
            phrasing=data.get("phrasing", "grammar"),
            phrasing_families=list(data.get("phrasing_families", [])),
            rules=list(data.get("rules", [])),
        )


# ---------------------------------------------------------------------------------------------------------------------
# Ground-truth world with object identities
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _World:
    objs: dict[int, Obj]
    background: int
    tone: str
    first_added: int | None = None
    tainted: frozenset = frozenset()
    next_id: int = 0

    def scene(self) -> Scene:
        return Scene(tuple(self.objs.values()), self.background, self.tone)

    def copy(self) -> "_World":
        return _World(dict(self.objs), self.background, self.tone, self.first_added, self.tainted, self.next_id)

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def id_of(self, desc: Desc) -> list[int]:
        return sorted((i for i, o in self.objs.items() if o.desc == desc), key=lambda i: self.objs[i].cell)

    def nameable(self) -> list[int]:
        """Ids whose description is unique in the scene (so text can name them)."""
        return [i for i, o in self.objs.items() if len(self.id_of(o.desc)) == 1]

    def referable(self, obj_id: int | None) -> bool:
        """Whether a back-reference may point at `obj_id`: alive, unique description, never part of a count change."""
        return obj_id is not None and obj_id in self.objs and obj_id not in self.tainted and obj_id in self.nameable()


@dataclass
class _Step:
    cmd: Command
    lit: Literal
    world: _World
    focus: int | None
    touched: frozenset


def _apply(world: _World, cmd: Command) -> tuple[_World, int | None, frozenset]:
    """Apply `cmd` to the world with identities: (new world, focus id, touched ids)."""
    new = world.copy()
    if cmd.op == "subject_add":
        i = new.new_id()
        new.objs[i] = Obj(cmd.shape, cmd.color, cmd.size, cmd.cell)
        if new.first_added is None:
            new.first_added = i
        return new, i, frozenset()
    if cmd.op == "background_change":
        new.tone = cmd.tone
        return new, None, frozenset()
    if cmd.op == "count_change":
        group = new.id_of(cmd.target)
        k, scene = len(group), new.scene()
        added = []
        for cell in scene.free_cells[: max(0, cmd.count - k)]:
            added.append(new.new_id())
            new.objs[added[-1]] = Obj(cmd.target.shape, cmd.target.color, cmd.target.size, cell)
        for i in group[cmd.count:]:
            del new.objs[i]
        new.tainted = world.tainted | set(group) | set(added)
        return new, None, frozenset(group)
    (i,) = new.id_of(cmd.target)
    old = new.objs.pop(i)
    if cmd.op == "subject_remove":
        return new, None, frozenset([i])
    if cmd.op == "subject_replace":
        j = new.new_id()
        new.objs[j] = Obj(cmd.shape, cmd.color, old.size, old.cell)
        return new, j, frozenset([i])
    changes = {"color_alter": {"color": cmd.color}, "size_change": {"size": cmd.size},
               "position_change": {"cell": cmd.cell}}[cmd.op]
    new.objs[i] = old.replace(**changes)
    return new, i, frozenset([i])


# ---------------------------------------------------------------------------------------------------------------------
# Proposing one edit
# ---------------------------------------------------------------------------------------------------------------------


def _unique_new(scene: Scene, desc: Desc, ignore: Obj | None = None) -> bool:
    return all(o.desc != desc for o in scene.objects if o is not ignore)


def _propose(op: str, world: _World, rng: random.Random, rule: str | None, target_id: int | None = None):
    """A random valid (Command, Literal-without-reference) for `op`, or `None` if `op` cannot apply here."""
    scene = world.scene()
    free = scene.free_cells
    if op == "subject_add":
        if len(scene.objects) >= MAX_OBJECTS or not free:
            return None
        for _ in range(20):
            color = rule or rng.choice(COLOR_NAMES)
            desc = Desc(rng.choice(SIZES), color, rng.choice(SHAPES))
            if _unique_new(scene, desc):
                cmd = Command(op, shape=desc.shape, color=color, size=desc.size, cell=rng.choice(free),
                              color_from_rule=rule is not None)
                lit = Literal(op, shape=desc.shape, color=None if rule else color, size=desc.size, cell=cmd.cell)
                return cmd, lit
        return None
    if op == "background_change":
        tone = rng.choice([t for t in TONE_NAMES if t != scene.tone])
        return Command(op, tone=tone), Literal(op, tone=tone)
    if op == "count_change":
        groups = sorted({o.desc for o in scene.objects})
        rng.shuffle(groups)
        for desc in groups:
            k = scene.count(desc)
            room = min(len(free), MAX_OBJECTS - len(scene.objects))
            counts = [n for n in range(1, 5)
                      if n != k and n - k <= room and (rule is None or n < k or desc.color == rule)]
            if counts:
                n = rng.choice(counts)
                return Command(op, desc, count=n), Literal(op, desc, count=n)
        return None
    if op == "color_alter" and rule is not None:
        return None  # a recolour would contradict the colour rule
    candidates = [target_id] if target_id is not None else world.nameable()
    rng.shuffle(candidates)
    for i in candidates:
        old = world.objs[i]
        if op == "subject_remove":
            if len(scene.objects) > 1:
                return Command(op, old.desc), Literal(op, old.desc)
        elif op == "subject_replace":
            shapes = [s for s in SHAPES if s != old.shape]
            rng.shuffle(shapes)
            for shape in shapes:
                say = None if rule else rng.choice([None, rng.choice(COLOR_NAMES)])
                color = rule or say or old.color
                if _unique_new(scene, Desc(old.size, color, shape), ignore=old):
                    return (Command(op, old.desc, shape=shape, color=color, color_from_rule=rule is not None),
                            Literal(op, old.desc, shape=shape, color=say))
        elif op == "color_alter":
            colors = [c for c in COLOR_NAMES if c != old.color and _unique_new(scene, old.desc._replace(color=c))]
            if colors:
                c = rng.choice(colors)
                return Command(op, old.desc, color=c), Literal(op, old.desc, color=c)
        elif op == "size_change":
            size = "large" if old.size == "small" else "small"
            if _unique_new(scene, old.desc._replace(size=size)):
                return Command(op, old.desc, size=size), Literal(op, old.desc, size=size)
        elif op == "position_change" and free:
            cell = rng.choice(free)
            return Command(op, old.desc, cell=cell), Literal(op, old.desc, cell=cell)
    return None


def _weighted_order(ops, rng: random.Random) -> list[str]:
    """`ops` in a random order drawn by OP_WEIGHTS (weighted sampling without replacement)."""
    ops, out = list(ops), []
    while ops:
        pick = rng.choices(ops, weights=[OP_WEIGHTS[o] for o in ops])[0]
        ops.remove(pick)
        out.append(pick)
    return out


def _explicit_step(world: _World, rng: random.Random, rule: str | None, first_turn: bool):
    ops = list(OP_WEIGHTS)
    order = _weighted_order(ops, rng)
    if first_turn and rng.random() < 0.5:  # early adds give later turns something to refer back to
        order.remove("subject_add")
        order.insert(0, "subject_add")
    for op in order:
        proposal = _propose(op, world, rng, rule)
        if proposal is not None:
            return proposal[0], proposal[1], ("explicit" if proposal[1].target is not None else "none")
    raise RuntimeError("No edit applies to this scene (cannot happen for scenes of 1-5 objects).")


def _reference_step(world: _World, rng: random.Random, steps: list[_Step]):
    refs = []
    if world.referable(steps[-1].focus):
        refs.append(("it", steps[-1].focus))
    if world.referable(world.first_added):
        refs.append(("first_added", world.first_added))
    if len(steps) >= 2 and world.referable(steps[0].focus):
        refs.append(("first_edit", steps[0].focus))
    rng.shuffle(refs)
    for key, obj_id in refs:
        for op in _weighted_order(TARGET_OPS, rng):
            proposal = _propose(op, world, rng, None, target_id=obj_id)
            if proposal is not None:
                cmd, lit = proposal
                return cmd, Literal(lit.op, key, lit.shape, lit.color, lit.size, lit.cell, lit.count, lit.tone), key
    return None


def generate_session(family: str = "cm", num_turns: int = 3, seed: int = 0, size: int = DEFAULT_SIZE,
                     phrasing: str = "grammar") -> ShapesSession:
    """Generate one valid session, deterministically from `(family, num_turns, seed, phrasing)`.

    Args:
        family (`str`, defaults to `"cm"`): "cm" (persistent rule in turn 1) or "cu" (back-references and undo).
        num_turns (`int`, defaults to 3): 1-16 (`MAX_TURNS`). The generator is seeded with `num_turns` too, so
            raising `MAX_TURNS` left every shorter session as it was.
        seed (`int`, defaults to 0): generation seed.
        size (`int`, defaults to 64): image side in pixels (does not change the scenes or the text).
        phrasing (`str`, defaults to `"grammar"`): "grammar", the fixed grammar of `grammar.TEMPLATES` (the sessions
            every recorded number was measured on); or everyday phrasing (`language`): "seen" (the training
            phrasing families), "unseen" (the held-out families) or "all". Everyday sessions also change and cancel
            rules (cm), undo undos and restore earlier states (cu), and move or add into occupied cells.
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: pass one of {FAMILIES}.")
    if not 1 <= num_turns <= MAX_TURNS:
        raise ValueError(f"num_turns={num_turns}: pass a value in [1, {MAX_TURNS}].")
    if phrasing != "grammar":
        from .language import PHRASINGS, generate_natural_session

        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing={phrasing!r}: pass one of {PHRASINGS}.")
        return generate_natural_session(family, num_turns, seed, size, phrasing)
    rng = random.Random(f"mice-shapes/{family}/{num_turns}/{seed}")
    scene0 = random_scene(rng, rng.randint(1, 4))
    world = _World({}, scene0.background, scene0.tone)
    for obj in scene0.objects:
        world.objs[world.new_id()] = obj
    rule = rng.choice(COLOR_NAMES) if family == "cm" else None

    worlds, steps, refs = [world], [], []
    for t in range(1, num_turns + 1):
        world = worlds[-1]
        step = None
        if family == "cu" and t >= 2:
            if steps[-1].cmd.op != "undo" and rng.random() < UNDO_PROBABILITY:
                cmd = Command("undo", previous=steps[-1].cmd)
                restored = worlds[-2].copy()
                restored.next_id = world.next_id  # ids stay unique across an undo
                step = _Step(cmd, Literal("undo"), restored, None, steps[-1].touched)
                refs.append("undo")
            elif rng.random() < REFERENCE_PROBABILITY:
                proposal = _reference_step(world, rng, steps)
                if proposal is not None:
                    cmd, lit, key = proposal
                    new_world, focus, touched = _apply(world, cmd)
                    step = _Step(cmd, lit, new_world, focus, touched)
                    refs.append(key)
        if step is None:
            cmd, lit, kind = _explicit_step(world, rng, rule, first_turn=t == 1)
            new_world, focus, touched = _apply(world, cmd)
            step = _Step(cmd, lit, new_world, focus, touched)
            refs.append(kind)
        if step.cmd.op != "undo":  # the identity-tracking world and the pure scene semantics must agree
            assert check_command(world.scene(), step.cmd) is None
            assert apply_command(world.scene(), step.cmd) == step.world.scene()
        steps.append(step)
        worlds.append(step.world)

    return _assemble(family, seed, size, rule, worlds, steps, refs, rng)


def _assemble(family, seed, size, rule, worlds, steps, refs, rng) -> ShapesSession:
    scenes = [w.scene() for w in worlds]
    instructions, unchanged, available, all_objects = [], [], [], []
    touched: set[int] = set()
    seen: list[str] = list(dict.fromkeys(o.name for o in scenes[0].objects))
    for t, step in enumerate(steps, start=1):
        lit = step.lit
        if t == 1 and rule is not None:
            lit = Literal(lit.op, lit.target, lit.shape, lit.color, lit.size, lit.cell, lit.count, lit.tone, rule)
        keep = [o.name for o in scenes[t - 1].objects] if lit.op == "background_change" else []
        instructions.append(realize(lit, rng, keep=keep, prefix=family == "cu" and t > 1))
        touched |= step.touched
        unchanged.append([o.name for i, o in sorted(worlds[0].objs.items(), key=lambda kv: kv[1].cell)
                          if i not in touched])
        available.append(list(dict.fromkeys(o.name for o in scenes[t].objects)))
        seen += [n for n in available[-1] if n not in seen]
        all_objects.append(list(seen))
    return ShapesSession(
        family=family, seed=seed, size=size, rule_color=rule, scenes=scenes,
        instruction=instructions,
        task_type=[s.cmd.op for s in steps],
        formatted_instruction=[formatted_instruction(s.cmd) for s in steps],
        bg_consistency=[s.tone == scenes[0].tone for s in scenes[1:]],
        unchanged_objects=unchanged, available_objects=available, all_objects=all_objects,
        gold_intent=[canonical_intent(s.cmd, rule) for s in steps],
        commands=[s.cmd for s in steps], references=refs,
    )


def generate_sessions(family: str, num_sessions: int, num_turns: int = 3, seed: int = 0,
                      size: int = DEFAULT_SIZE, phrasing: str = "grammar") -> list[ShapesSession]:
    """`num_sessions` sessions with seeds `seed, seed + 1, ...`."""
    return [generate_session(family, num_turns, seed + i, size, phrasing) for i in range(num_sessions)]
