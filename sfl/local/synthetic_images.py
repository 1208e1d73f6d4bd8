"""Synthetic image folders a model can learn: one folder per class, a shape in a colour each.

``sfl dataset images`` writes them for the ``image_folder`` task, to simulate without data of
one's own or to benchmark a real-size model. Class ``c`` is a shape (circle, square, ...) in a
colour, both its own; position, size, background and noise vary per image, seeded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bars", "dot_grid")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 50, 200),
    "cyan": (40, 200, 210),
    "orange": (240, 140, 30),
    "purple": (110, 50, 170),
    "white": (235, 235, 235),
    "brown": (130, 80, 40),
}
MAX_CLASSES = len(SHAPES) * len(COLOURS)
NOISE_STD = 12.0


class SyntheticImagesError(ValueError):
    """The generator's arguments are out of range."""


@dataclass(frozen=True)
class SyntheticClass:
    """One class: its folder name, shape and colour."""

    name: str
    shape: str
    colour: str


def classes(count: int) -> list[SyntheticClass]:
    """The first ``count`` classes; names sort in class order (``00-red-circle``, ...)."""
    if not 2 <= count <= MAX_CLASSES:
        raise SyntheticImagesError(f"classes must be from 2 to {MAX_CLASSES}, got {count}")
    colours = list(COLOURS)
    result = []
    for c in range(count):
        shape = SHAPES[c % len(SHAPES)]
        colour = colours[(c + c // len(SHAPES)) % len(colours)]
        result.append(SyntheticClass(f"{c:02d}-{colour}-{shape}", shape, colour))
    return result


def write_image_folders(
    out: Path, *, num_classes: int = 10, per_class: int = 50, size: int = 64, seed: int = 0
) -> list[SyntheticClass]:
    """Write ``out/<class>/<n>.png`` for every class; the same arguments write the same files."""
    from PIL import Image

    if not 1 <= per_class <= 100_000:
        raise SyntheticImagesError(f"per-class must be from 1 to 100000, got {per_class}")
    if not 8 <= size <= 1024:
        raise SyntheticImagesError(f"size must be from 8 to 1024 pixels, got {size}")
    chosen = classes(num_classes)
    rng = np.random.default_rng(seed)
    for c in chosen:
        folder = Path(out) / c.name
        folder.mkdir(parents=True, exist_ok=True)
        for n in range(per_class):
            pixels = draw(c, size, rng)
            Image.fromarray(pixels).save(folder / f"{n:05d}.png")
    return chosen


def draw(c: SyntheticClass, size: int, rng: np.random.Generator) -> np.ndarray:
    """One [size, size, 3] uint8 image of class ``c``."""
    background = rng.uniform(0, 90, size=3)
    image = np.broadcast_to(background, (size, size, 3)).copy()
    radius = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(radius, size - radius, size=2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    mask = _shape_mask(c.shape, dy, dx)
    colour = np.asarray(COLOURS[c.colour], dtype=np.float64) * rng.uniform(0.8, 1.1)
    image[mask] = colour
    image += rng.normal(0.0, NOISE_STD, size=image.shape)
    result: np.ndarray = np.clip(image, 0, 255).astype(np.uint8)
    return result


def _shape_mask(shape: str, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """Where the shape is, in coordinates scaled so the shape spans -1..1."""
    r = np.hypot(dy, dx)
    inside = (np.abs(dy) <= 1) & (np.abs(dx) <= 1)
    masks = {
        "circle": r <= 1,
        "square": (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8),
        "triangle": inside & (dy >= -0.9) & (np.abs(dx) <= (dy + 0.9) / 1.9),
        "cross": inside & ((np.abs(dy) <= 0.25) | (np.abs(dx) <= 0.25)),
        "ring": (r <= 1) & (r >= 0.6),
        "diamond": np.abs(dy) + np.abs(dx) <= 1,
        "bars": inside & (np.floor((dy + 1) * 2.5) % 2 == 0),
        "dot_grid": inside & (np.hypot((dy * 2) % 1 - 0.5, (dx * 2) % 1 - 0.5) <= 0.3),
    }
    mask: np.ndarray = masks[shape]
    return mask
