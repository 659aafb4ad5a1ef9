"""Bench editors: the one editor protocol of `editr2 bench shapes` and `editr2 bench mice`, and the symbolic
MICE-Shapes editors (reference points that show the metrics discriminate).

An editor edits a whole session: `editor.edit_session(source, instructions, session) -> [one PIL image per turn]`
(`Editor`), where `session` is the bench's session object (a `ShapesSession` or a `MiceSession`: ground truth for the
editors that use it). `diffusers_editr2.bench.PipelineEditor` is the model editor.

The symbolic editors work turn by turn (`TurnEditor`): `editor(images, history, instruction) -> PIL image`, with
`images` the session's images so far (`[source, image after turn 1, ..., current image]`) and `history` the earlier
instructions; `bind(session)` gives a fresh editor for one session. The three here:

- `oracle`: paints the ground-truth scene of the turn (IF = CC = GA = 1 by construction).
- `identity`: returns the current image unchanged (IF = 0; a floor for IF and GA, a ceiling for CC on real images).
- `literal`: reads only the current instruction's words (`grammar.parse_instruction`) and applies them to the parsed
  current image: no pronoun or back-reference resolution, no undo, no persistent rule (an added object whose
  instruction names no colour gets `grammar.LITERAL_DEFAULT_COLOR`).

Editors that repaint never regenerate the background: `repaint` copies it from the input images (the most recent
image where each pixel is not under an object; re-tinted through the parsed texture field if the tone changes, and
smoothly filled where every image had an object), then paints the objects over it.
"""

from __future__ import annotations

from typing import Any, Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from .shapes.grammar import apply_command, check_command, parse_instruction, resolve_literal
from .shapes.parser import ParseResult, analyze_batch, fill_holes
from .shapes.render import compose, tint, to_array, to_image
from .shapes.sessions import ShapesSession
from .shapes.world import Obj



class Editor(Protocol):
    """Edits a whole session: returns one output image per instruction, in order."""

    name: str

    def edit_session(self, source: Image.Image, instructions: Sequence[str], session: Any) -> list[Image.Image]:
        ...


class TurnEditor:
    """An `Editor` made of one call per turn: subclasses define `__call__(images, history, instruction)` and, when
    they keep per-session state or need the ground truth, `bind(session)` (returning a fresh editor)."""

    name = "editor"

    def bind(self, session) -> "TurnEditor":
        return self

    def edit_session(self, source, instructions, session):
        editor = self.bind(session)
        images = [source]
        for t, instruction in enumerate(instructions):
            out = editor(list(images), list(instructions[:t]), instruction)
            if not isinstance(out, Image.Image):
                raise TypeError(f"The editor returned {type(out).__name__}: return a PIL.Image.Image.")
            images.append(out.convert("RGB"))
        return images[1:]


class _ParseCache:
    """Parses of a session's images, reused across turns (the list only grows within a session)."""

    def __init__(self):
        self.images: list[Image.Image] = []
        self.parses: list[ParseResult] = []

    def __call__(self, images: Sequence[Image.Image]) -> list[ParseResult]:
        keep = 0
        while keep < min(len(images), len(self.images)) and images[keep] is self.images[keep]:
            keep += 1
        new = list(images[keep:])
        self.images = self.images[:keep] + new
        self.parses = self.parses[:keep] + (analyze_batch(new) if new else [])
        return self.parses


def repaint(images: Sequence[Image.Image], objects: Iterable[Obj], tone: str,
            parses: Sequence[ParseResult] | None = None) -> Image.Image:
    """Paint `objects` over the background of `images` (copied, not regenerated), in `tone`.

    Args:
        images: the session's images so far (the last one is the current image); all the same size.
        objects: the objects of the output image.
        tone (`str`): the output background tone.
        parses: `analyze_batch(images)`, if already computed.
    """
    arrays = [to_array(im) for im in images]
    parses = analyze_batch(np.stack(arrays)) if parses is None else parses
    size = arrays[-1].shape[0]
    background = np.zeros((size, size, 3), np.float32)
    alpha = np.zeros((size, size, 1), np.float32)
    filled = np.zeros((size, size), bool)
    for array, parse in zip(reversed(arrays), reversed(parses)):  # newest first
        take = ~parse.mask & ~filled
        source = array if parse.scene.tone == tone else tint(parse.alpha, tone)
        background[take] = source[take]
        alpha[take, 0] = parse.alpha[take]
        filled |= take
    if not filled.all():
        smooth = fill_holes(alpha, filled)[..., 0]
        background[~filled] = tint(smooth, tone)[~filled]
    return to_image(compose(background, list(objects), size))


class IdentityEditor(TurnEditor):
    """Returns the current image unchanged."""

    name = "identity"

    def __call__(self, images, history, instruction):
        return images[-1].copy()


class OracleEditor(TurnEditor):
    """Paints the ground-truth scene of each turn over the copied background. Bind it to a session first."""

    name = "oracle"

    def __init__(self, session: ShapesSession | None = None):
        self.session = session
        self._parse = _ParseCache()

    def bind(self, session: ShapesSession) -> "OracleEditor":
        return OracleEditor(session)

    def __call__(self, images, history, instruction):
        if self.session is None:
            raise ValueError("The oracle needs the ground truth: call `OracleEditor().bind(session)` first.")
        turn = len(images)
        if turn > self.session.num_turns:
            raise ValueError(f"The session has {self.session.num_turns} turns; got {len(images)} images so far.")
        scene = self.session.scenes[turn]
        return repaint(images, scene.objects, scene.tone, self._parse(images))


class LiteralEditor(TurnEditor):
    """Applies the current instruction's literal words to the parsed current image (see the module docstring)."""

    name = "literal"

    def __init__(self):
        self._parse = _ParseCache()

    def bind(self, session: ShapesSession) -> "LiteralEditor":
        return LiteralEditor()  # fresh parse cache; the session's ground truth is not used

    def __call__(self, images, history, instruction):
        parses = self._parse(images)
        scene = parses[-1].scene
        try:
            cmd = resolve_literal(parse_instruction(instruction), scene)
        except ValueError:
            cmd = None
        if cmd is None or check_command(scene, cmd) is not None:
            return images[-1].copy()
        new = apply_command(scene, cmd)
        return repaint(images, new.objects, new.tone, parses)


EDITORS: dict[str, type] = {"oracle": OracleEditor, "identity": IdentityEditor, "literal": LiteralEditor}


def make_editor(name: str):
    """A symbolic editor by name: "oracle", "identity" or "literal"."""
    if name not in EDITORS:
        raise ValueError(f"Unknown editor {name!r}: pass one of {tuple(EDITORS)}.")
    return EDITORS[name]()
