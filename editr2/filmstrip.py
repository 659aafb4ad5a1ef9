"""A filmstrip of an editing session: each turn's image under its instruction and operative intent (PIL only).

Used by `editr2 edit` (filmstrip.png) and by the ComfyUI nodes' preview.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

from .session import Session


@dataclass(frozen=True)
class Frame:
    """One column of a filmstrip.

    Args:
        image: the image shown (RGB).
        title: the first caption line, e.g. `"Turn 2"`.
        instruction: the user's instruction ("" for the source).
        intent: the operative intent ("" or equal to `instruction` when there is nothing more to show).
    """

    image: Image.Image
    title: str
    instruction: str = ""
    intent: str = ""


def session_frames(session: Session) -> list[Frame]:
    """The source and every turn that produced an image, as [`Frame`]s."""
    frames = [Frame(session.source_image, "Source")]
    for k, turn in enumerate(session.turns, start=1):
        if turn.image is not None:
            intent = "" if turn.intent.strip() == turn.instruction.strip() else turn.intent
            if turn.fallback_reason:
                intent = f"{intent} [fallback: {turn.fallback_reason}]".strip()
            frames.append(Frame(turn.image, f"Turn {k}", turn.instruction, intent))
    return frames


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _fit(text: str, font: ImageFont.ImageFont, width: int) -> str:
    """`text` cut (with an ellipsis) to at most `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


# Typographic punctuation that Pillow's default font has no glyph for (it would print a box), as plain ASCII.
_PLAIN = str.maketrans({"\u2014": "-", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})


def _wrap(text: str, font: ImageFont.ImageFont, width: int, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` pixels, at most `max_lines` lines (the last one ends with an ellipsis if cut)."""
    lines, line = [], ""
    for word in text.translate(_PLAIN).split():
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(lines[-1] + " …", font, width)
    return [_fit(line, font, width) for line in lines]


def filmstrip(
    frames: Sequence[Frame] | Session,
    tile: int = 256,
    max_lines: int = 4,
    font_size: int = 13,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Render frames side by side: a caption block (title, instruction, intent in grey) above each image.

    Args:
        frames (`Sequence[Frame]` or [`Session`]): the columns, or a session (its source and turns).
        tile (`int`, defaults to 256): the longer side of each image, in pixels.
        max_lines (`int`, defaults to 4): caption lines kept for the instruction and for the intent, each.
        font_size (`int`, defaults to 13): caption font size (Pillow's built-in font).
        background (`tuple[int, int, int]`, defaults to white): the canvas colour.

    Returns:
        `PIL.Image.Image`: an RGB image `len(frames) * (tile + margin)` wide.
    """
    if isinstance(frames, Session):
        frames = session_frames(frames)
    if not frames:
        raise ValueError("filmstrip needs at least one frame (an image with its captions).")
    if tile < 16:
        raise ValueError(f"tile must be at least 16 pixels, got {tile}.")
    font, margin = _font(font_size), 8
    line_height = font_size + 4
    captions = []
    for frame in frames:
        lines = [(frame.title, (0, 0, 0))]
        lines += [(line, (20, 20, 20)) for line in _wrap(frame.instruction, font, tile, max_lines)]
        lines += [(line, (110, 110, 110)) for line in _wrap(frame.intent, font, tile, max_lines)]
        captions.append(lines)
    caption_height = max(len(lines) for lines in captions) * line_height + margin

    canvas = Image.new("RGB", (len(frames) * (tile + margin) + margin, caption_height + tile + 2 * margin), background)
    draw = ImageDraw.Draw(canvas)
    for k, (frame, lines) in enumerate(zip(frames, captions)):
        left = margin + k * (tile + margin)
        for j, (line, color) in enumerate(lines):
            draw.text((left, margin + j * line_height), line, fill=color, font=font)
        image = frame.image.convert("RGB")
        scale = tile / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        canvas.paste(image.resize(size, Image.Resampling.LANCZOS), (left, margin + caption_height))
    return canvas
