"""A tiny synthetic captioning task: two coloured shapes, one above the other.

Captions follow one template, e.g. "a red circle above a blue square", so a decoder that sees
the image must reach BLEU-4 ~1 on held-out pictures. The small encoder is a fixed random conv
(seeded): its grid is 4x4 cells, and its pooled vector is the flattened 2x2 pooling, so that
inject/merge decoders still know which shape is on top.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220)}
SHAPES = ("circle", "square", "triangle")


def draw(c1: str, s1: str, c2: str, s2: str, rng: random.Random, size: int = 32) -> Image.Image:
    img = Image.new("RGB", (size, size), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for (colour, shape), top in (((c1, s1), 2), ((c2, s2), size // 2 + 2)):
        x0 = size // 2 - 6 + rng.randint(-2, 2)  # jittered, so test pictures are new
        y0 = top + rng.randint(0, 2)
        box = (x0, y0, x0 + 11, y0 + 11)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse(box, fill=fill)
        elif shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(x0, y0 + 11), (x0 + 11, y0 + 11), (x0 + 5, y0)], fill=fill)
    return img


def make_task(n_train: int, n_test: int, seed: int = 0):
    """Returns (train, test) lists of (PIL image, caption); test pictures are new drawings."""
    rng = random.Random(seed)
    combos = list(itertools.product(COLOURS, SHAPES, COLOURS, SHAPES))

    def sample(pool, n):
        out = []
        for _ in range(n):
            c1, s1, c2, s2 = rng.choice(pool)
            out.append((draw(c1, s1, c2, s2, rng), f"a {c1} {s1} above a {c2} {s2}"))
        return out

    return sample(combos, n_train), sample(combos, n_test)


class TinyEncoder:
    """Fixed random conv features: grid [N, 16, 66] (64 + 2 coordinates) and pooled [N, 256]."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(64, 3, 4, 4, generator=g) * 0.5

    def __call__(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images]))
        x = x.permute(0, 3, 1, 2)  # [N, 3, 32, 32]
        fmap = F.relu(F.conv2d(x - 0.5, self.w, stride=4))  # [N, 64, 8, 8]
        grid = F.avg_pool2d(fmap, 2)  # [N, 64, 4, 4]
        pooled = F.adaptive_avg_pool2d(fmap, 2).flatten(1)  # [N, 256]
        # a CNN's cells know where they are (padding leaks position); give these 2 coordinates
        ys, xs = torch.meshgrid(torch.linspace(-2, 2, 4), torch.linspace(-2, 2, 4), indexing="ij")
        coords = torch.stack([ys, xs])[None].expand(grid.shape[0], -1, -1, -1)  # [N, 2, 4, 4]
        grid = torch.cat([grid, coords], 1)  # [N, 66, 4, 4]
        return pooled, grid.flatten(2).transpose(1, 2).contiguous()  # [N,256], [N,16,66]


TEMPLATES = (
    "a {} {} above a {} {}",
    "A {} {} is above a {} {} .",
    "the {} {} sits over the {} {}",
    "a {} {} on top of a {} {}",
    "there is a {} {} above a {} {}",
)


def make_tiny_flickr(root: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """A Flickr8k-shaped folder (official layout) of synthetic pictures, 5 captions each."""
    sizes = sizes or {"train": 48, "dev": 8, "test": 8}
    (root / "Images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines, i = [], 0
    for split, n in sizes.items():
        names = []
        for _ in range(n):
            c1, c2 = rng.choice(list(COLOURS)), rng.choice(list(COLOURS))
            s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
            name = f"{i:04d}_synthetic.png"
            draw(c1, s1, c2, s2, rng).resize((96, 96)).save(root / "Images" / name)
            lines += [f"{name}#{k}\t{t.format(c1, s1, c2, s2)}" for k, t in enumerate(TEMPLATES)]
            names.append(name)
            i += 1
        (root / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return root
