"""MICE-Bench metrics on MICE-Shapes: IF, CC, GA and the reward, per turn, from images alone.

Every image is read back with the oracle parser (`editr2.bench.shapes.parser`), so the scores apply to any editor's
outputs; the session's ground truth (scenes and resolved commands) says what should have happened. Definitions, with
a worked example, are in docs/metrics.md. In short, for turn t (1-based), with P_t the parsed scene of image t and
G_t the ground-truth scene:

- **IF** (instruction following) = 1 when the turn's edit is visible between P_{t-1} and P_t: the edit's *key*
  (the objects in the cells the edit touches, the background tone if it changes, or the group's count for
  count_change) has the ground-truth value in P_t and did not have it in P_{t-1}; else 0. A colour that only the
  persistent rule imposes is not part of IF's key (that is GA's business).
- **CC** (content consistency) = (number of source objects untouched so far that P_t still shows unchanged, plus the
  background score) / (number of such objects + 1). The background score is the fraction of pixels outside every
  object of G_0 and G_t whose colour is within `BACKGROUND_TOLERANCE` (every channel) of the reference background:
  the source image while the background should be unchanged, otherwise the source's texture in the new tone.
- **GA** (global awareness) = product over turns k <= t of IF_k * rule_k: cumulative, the first failure zeroes every
  later turn. rule_k = 1 without a persistent rule; under one, the key holds *including* the rule's colour and no
  object outside the edited cells changed colour.
- **reward** = 0.3 IF + 0.3 CC + 0.4 GA (`editr2.rewards.DEFAULT_WEIGHTS`).

An undo turn (gold command "undo", restoring scene r: the one before the last edit, or `Command.restore`) is also
scored against the state it restores: **restore_CC** = the fraction of its pixels within `BACKGROUND_TOLERANCE` (every
channel) of the editor's own image r. An editor that restores exactly (`EditR2Pipeline` with an intent naming the
state) scores 1.0 by construction; one that redraws the scene scores what it kept. `None` on other turns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from PIL import Image

from editr2.rewards import DEFAULT_WEIGHTS

from .shapes.parser import ParseResult, analyze_batch
from .shapes.render import object_mask, render_background, to_array
from .shapes.sessions import ShapesSession
from .shapes.world import CELLS, Scene

BACKGROUND_TOLERANCE = 0.1  # max per-channel difference (in [0, 1]) for a background pixel to count as kept
METRICS = ("IF", "CC", "GA", "reward")


@dataclass
class TurnScore:
    """Scores of one turn (all in [0, 1]); `rule` is 1.0 when no rule is active."""

    turn: int
    IF: float
    CC: float
    GA: float
    reward: float
    rule: float = 1.0
    background: float = 1.0
    restore_CC: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------------
# IF / rule keys
# ---------------------------------------------------------------------------------------------------------------------


def _touched_cells(before: Scene, after: Scene) -> list[tuple[int, int]]:
    return [c for c in CELLS if before.at(c) != after.at(c)]


def edit_key(session: ShapesSession, turn: int, scene: Scene, *, strict: bool) -> tuple:
    """What turn `turn`'s edit determines, read from `scene` (compare against the same key of the ground truth).

    Args:
        session: the ground-truth session.
        turn (`int`): 1-based turn.
        scene (`Scene`): a parsed (or ground-truth) scene.
        strict (`bool`): include colours that only the persistent rule imposes.
    """
    cmd = session.commands[turn - 1]
    before, after = session.scenes[turn - 1], session.scenes[turn]
    if cmd.op == "count_change":
        return ("count", scene.count(cmd.target))
    cells = _touched_cells(before, after)
    free_color = cmd.color_from_rule and not strict
    objects = []
    for cell in cells:
        o = scene.at(cell)
        objects.append(None if o is None else (o.shape, o.size, None if free_color else o.color))
    tone = scene.tone if before.tone != after.tone else None
    return ("cells", tuple(objects), tone)


def _edit_done(session: ShapesSession, turn: int, prev: Scene, cur: Scene, strict: bool) -> bool:
    want = edit_key(session, turn, session.scenes[turn], strict=strict)
    return edit_key(session, turn, cur, strict=strict) == want and edit_key(session, turn, prev, strict=strict) != want


def _colors_kept(session: ShapesSession, turn: int, prev: Scene, cur: Scene) -> bool:
    """No object outside the cells this turn's edit touches changed colour (same shape and size, other colour)."""
    touched = set(_touched_cells(session.scenes[turn - 1], session.scenes[turn]))
    for cell in CELLS:
        a, b = prev.at(cell), cur.at(cell)
        if cell in touched or a is None or b is None:
            continue
        if (a.shape, a.size) == (b.shape, b.size) and a.color != b.color:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------------------
# CC
# ---------------------------------------------------------------------------------------------------------------------


def background_score(session: ShapesSession, turn: int, image: np.ndarray, source: np.ndarray) -> float:
    """Fraction of background pixels (outside the objects of G_0 and G_t) kept within `BACKGROUND_TOLERANCE`."""
    size = session.size
    if session.bg_consistency[turn - 1]:
        reference = source
    else:
        reference = render_background(session.scenes[turn], size)
    mask = ~(object_mask(session.scenes[0], size) | object_mask(session.scenes[turn], size))
    if not mask.any():
        return 1.0
    kept = np.abs(image - reference).max(-1) <= BACKGROUND_TOLERANCE
    return float(kept[mask].mean())


def _objects_kept(session: ShapesSession, turn: int, parsed: Scene) -> tuple[int, int]:
    unchanged = session.unchanged_scene_objects(turn)
    return sum(parsed.at(o.cell) == o for o in unchanged), len(unchanged)


# ---------------------------------------------------------------------------------------------------------------------
# Session scoring
# ---------------------------------------------------------------------------------------------------------------------


def score_session(session: ShapesSession, images: Sequence[Image.Image], weights: dict | None = None,
                  parsed: Sequence[ParseResult] | None = None) -> list[TurnScore]:
    """Score one session's images.

    Args:
        session (`ShapesSession`): the ground truth.
        images (`Sequence[PIL.Image.Image]`): `[source, image after turn 1, ..., image after turn T]`, all
            `session.size` square. Fewer than T edited images scores only those turns.
        weights (`dict`, *optional*): reward weights; defaults to `editr2.rewards.DEFAULT_WEIGHTS`.
        parsed (`Sequence[ParseResult]`, *optional*): the images already parsed (saves the parsing).

    Returns:
        One `TurnScore` per scored turn.
    """
    weights = DEFAULT_WEIGHTS if weights is None else weights
    if len(images) < 2 or len(images) > session.num_turns + 1:
        raise ValueError(f"Pass the source image plus 1..{session.num_turns} edited images, got {len(images)} images.")
    arrays = [to_array(im) for im in images]
    for k, a in enumerate(arrays):
        if a.shape[:2] != (session.size, session.size):
            raise ValueError(f"Image {k} is {a.shape[1]}x{a.shape[0]}; this session's images are "
                             f"{session.size}x{session.size}: resize the editor's output first.")
    parsed = analyze_batch(np.stack(arrays)) if parsed is None else parsed
    scenes = [p.scene for p in parsed]
    out, ga = [], 1.0
    for t in range(1, len(images)):
        prev, cur = scenes[t - 1], scenes[t]
        follow = _edit_done(session, t, prev, cur, strict=False)
        rule = 1.0
        if session.rule_color is not None:
            rule = float(_edit_done(session, t, prev, cur, strict=True) and _colors_kept(session, t, prev, cur))
        ga *= float(follow) * rule
        kept, n = _objects_kept(session, t, cur)
        bg = background_score(session, t, arrays[t], arrays[0])
        cc = (kept + bg) / (n + 1)
        if_score = float(follow)
        reward = weights["IF"] * if_score + weights["CC"] * cc + weights["GA"] * ga
        out.append(TurnScore(t, if_score, cc, ga, reward, rule, bg, restore_cc(session, t, arrays)))
    return out


def restored_scene(session: ShapesSession, turn: int) -> int | None:
    """The scene index an undo at `turn` (1-based) restores (0 = the source), or None for an ordinary edit."""
    cmd = session.commands[turn - 1]
    if cmd.op != "undo":
        return None
    return cmd.restore if cmd.restore is not None else turn - 2


def restore_cc(session: ShapesSession, turn: int, arrays: Sequence[np.ndarray]) -> float | None:
    """An undo turn's agreement with the editor's own image of the state it restores (see the module docstring)."""
    index = restored_scene(session, turn)
    if index is None:
        return None
    kept = np.abs(arrays[turn] - arrays[index]).max(-1) <= BACKGROUND_TOLERANCE
    return float(kept.mean())


def restore_summary(rows: Sequence[TurnScore]) -> dict:
    """`{"turns": the undo turns scored, "CC": their mean restore_CC}` (CC is None when there are none)."""
    values = [r.restore_CC for r in rows if r.restore_CC is not None]
    return {"turns": len(values), "CC": float(np.mean(values)) if values else None}


def mean_scores(rows: Sequence[TurnScore]) -> dict[str, float]:
    """Mean of each metric over `rows`."""
    if not rows:
        return {k: float("nan") for k in METRICS}
    return {k: float(np.mean([getattr(r, k) for r in rows])) for k in METRICS}
