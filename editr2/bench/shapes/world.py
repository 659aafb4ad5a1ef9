"""The MICE-Shapes world: vocabulary, objects and scenes (pure data, no pixels).

A scene is 1-5 flat objects on a 3x3 grid (at most one object per cell) over a procedural background texture. The
texture is a seeded smooth-noise field blended between the two muted colours of a *tone*; text never describes the
pattern itself (only the tone can be named, by `background_change`), so keeping the background consistent means
copying it from the reference image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds",
                           "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")

# Saturated palette colours, RGB in [0, 1]: pairwise >= 0.37 apart and >= 0.5 away from every background tone.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.72, 0.15),
    "blue": (0.10, 0.25, 0.92),
    "yellow": (0.95, 0.88, 0.08),
    "purple": (0.58, 0.10, 0.82),
    "orange": (0.98, 0.52, 0.02),
}
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Background tones: (colour at texture value 0, colour at texture value 1); all muted (channel spread <= 0.2).
TONES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "neutral": ((0.36, 0.36, 0.36), (0.64, 0.64, 0.64)),
    "warm": ((0.46, 0.38, 0.30), (0.70, 0.60, 0.50)),
    "cool": ((0.30, 0.38, 0.46), (0.52, 0.60, 0.70)),
    "dark": ((0.12, 0.12, 0.14), (0.30, 0.30, 0.33)),
    "light": ((0.74, 0.74, 0.72), (0.92, 0.92, 0.90)),
}
TONE_NAMES: tuple[str, ...] = tuple(TONES)

GRID = 3
CELLS: tuple[tuple[int, int], ...] = tuple((r, c) for r in range(GRID) for c in range(GRID))  # reading order
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top center", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom center", (2, 2): "bottom right",
}
CELL_BY_NAME: dict[str, tuple[int, int]] = {name: cell for cell, name in CELL_NAMES.items()}

MIN_OBJECTS, MAX_OBJECTS = 1, 5


# ---------------------------------------------------------------------------------------------------------------------
# Objects and scenes
# ---------------------------------------------------------------------------------------------------------------------


class Desc(NamedTuple):
    """What text can say about an object: `"small red circle"` (no position)."""

    size: str
    color: str
    shape: str

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.color} {self.shape}"

    @property
    def plural(self) -> str:
        return f"{self.size} {self.color} {PLURALS[self.shape]}"


@dataclass(frozen=True)
class Obj:
    """One flat object: a shape of one palette colour and size, centred in one grid cell `(row, col)`."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}: pass one of {SHAPES}.")
        if self.color not in COLORS:
            raise ValueError(f"Unknown color {self.color!r}: pass one of {COLOR_NAMES}.")
        if self.size not in SIZES:
            raise ValueError(f"Unknown size {self.size!r}: pass one of {SIZES}.")
        if tuple(self.cell) not in CELL_NAMES:
            raise ValueError(f"Cell {self.cell!r} is off the {GRID}x{GRID} grid: pass (row, col) in 0..{GRID - 1}.")
        object.__setattr__(self, "cell", (int(self.cell[0]), int(self.cell[1])))

    @property
    def desc(self) -> Desc:
        return Desc(self.size, self.color, self.shape)

    @property
    def name(self) -> str:
        """The object's name as MICE fields list it: `"small red circle"`."""
        return self.desc.phrase

    def replace(self, **changes) -> "Obj":
        fields = {"shape": self.shape, "color": self.color, "size": self.size, "cell": self.cell, **changes}
        return Obj(**fields)

    def to_json(self) -> dict:
        return {"shape": self.shape, "color": self.color, "size": self.size, "cell": list(self.cell)}

    @classmethod
    def from_json(cls, data: dict) -> "Obj":
        return cls(data["shape"], data["color"], data["size"], tuple(data["cell"]))


@dataclass(frozen=True)
class Scene:
    """A MICE-Shapes scene: objects (at most one per cell, kept in reading order) over a background.

    Args:
        objects (`tuple[Obj, ...]`): the objects; stored sorted by cell.
        background (`int`): seed of the background texture (`-1` when unknown, e.g. for a parsed image).
        tone (`str`): the background tone, one of `TONE_NAMES`.
    """

    objects: tuple[Obj, ...] = ()
    background: int = 0
    tone: str = "neutral"
    _by_cell: dict = field(default=None, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        objects = tuple(sorted(self.objects, key=lambda o: o.cell))
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Two objects share a cell in {cells}: put at most one object per cell.")
        if self.tone not in TONES:
            raise ValueError(f"Unknown tone {self.tone!r}: pass one of {TONE_NAMES}.")
        object.__setattr__(self, "objects", objects)
        object.__setattr__(self, "_by_cell", {o.cell: o for o in objects})

    def at(self, cell: tuple[int, int]) -> Obj | None:
        """The object in `cell`, or `None`."""
        return self._by_cell.get(tuple(cell))

    def find(self, desc: Desc) -> list[Obj]:
        """All objects matching a description, in reading order."""
        return [o for o in self.objects if o.desc == desc]

    def count(self, desc: Desc) -> int:
        return sum(o.desc == desc for o in self.objects)

    @property
    def free_cells(self) -> list[tuple[int, int]]:
        return [c for c in CELLS if c not in self._by_cell]

    def with_objects(self, objects) -> "Scene":
        return Scene(tuple(objects), self.background, self.tone)

    def with_tone(self, tone: str) -> "Scene":
        return Scene(self.objects, self.background, tone)

    def to_json(self) -> dict:
        return {"objects": [o.to_json() for o in self.objects], "background": self.background, "tone": self.tone}

    @classmethod
    def from_json(cls, data: dict) -> "Scene":
        return cls(tuple(Obj.from_json(o) for o in data["objects"]), int(data["background"]), data["tone"])


def random_scene(rng, num_objects: int | None = None) -> Scene:
    """A random scene with unique object descriptions (so every object can be named unambiguously).

    Args:
        rng (`random.Random`): source of randomness.
        num_objects (`int`, *optional*): 1-5; drawn uniformly when omitted.
    """
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS) if num_objects is None else num_objects
    if not MIN_OBJECTS <= n <= MAX_OBJECTS:
        raise ValueError(f"num_objects={n}: pass a value in [{MIN_OBJECTS}, {MAX_OBJECTS}].")
    cells = rng.sample(CELLS, n)
    objects, seen = [], set()
    for cell in cells:
        while True:
            obj = Obj(rng.choice(SHAPES), rng.choice(COLOR_NAMES), rng.choice(SIZES), cell)
            if obj.desc not in seen:
                break
        seen.add(obj.desc)
        objects.append(obj)
    return Scene(tuple(objects), rng.randrange(2**31), rng.choice(TONE_NAMES))
