"""Regenerate `upernet/data/assets/sample.png`, the built-in image of `upernet predict --sample`.

A procedurally drawn outdoor scene (sky, sun, clouds, mountains, grass, road, house, tree) from a
fixed seed, so the committed file can be rebuilt byte for byte:

    .venv/bin/python benchmarks/make_sample_image.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 320, 240
OUT = Path(__file__).resolve().parent.parent / "upernet" / "data" / "assets" / "sample.png"


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bilinearly."""
    grid = rng.random((h // cell + 2, w // cell + 2))
    ys, xs = np.arange(h) / cell, np.arange(w) / cell
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a, b = grid[y0][:, x0], grid[y0][:, x0 + 1]
    c, d = grid[y0 + 1][:, x0], grid[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def make_scene(seed: int = 0) -> np.ndarray:
    """The scene as uint8 (HEIGHT, WIDTH, 3)."""
    rng = np.random.default_rng(seed)
    h, w = HEIGHT, WIDTH
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)

    # Sky: a vertical gradient, a sun, soft clouds.
    t = (yy / (0.55 * h))[..., None]
    img[:] = (1 - t) * np.array([70, 130, 210]) + t * np.array([190, 215, 240])
    sun = (xx - 250) ** 2 + (yy - 40) ** 2 < 18 ** 2
    img[sun] = (255, 240, 180)
    clouds = np.clip(_smooth_noise(rng, h, w, 40) * 2.2 - 1.3, 0, 1) * (yy < 0.35 * h)
    img = img * (1 - clouds[..., None]) + 245 * clouds[..., None]

    # Mountains: a ridge line from a few sines, darker with height.
    ridge = 0.42 * h - 28 * np.sin(xx[0] / 37 + 1) - 14 * np.sin(xx[0] / 13) - 6 * _smooth_noise(rng, 1, w, 8)[0]
    mountain = yy > ridge[None, :]
    shade = (0.8 + 0.2 * _smooth_noise(rng, h, w, 6))[..., None]
    img[mountain] = (shade * np.array([105, 100, 125]))[mountain]

    # Grass field with a texture.
    horizon = int(0.55 * h)
    grass = yy >= horizon
    texture = (0.75 + 0.25 * _smooth_noise(rng, h, w, 3) + 0.08 * rng.standard_normal((h, w)))[..., None]
    img[grass] = (texture * np.array([70, 150, 55]))[grass]

    # Road: a trapezoid in perspective with dashed centre marks.
    depth = np.clip((yy - horizon) / (h - horizon), 0, 1)
    half_width = 6 + depth * 90
    road = grass & (np.abs(xx - 150) < half_width)
    img[road] = (0.9 + 0.1 * _smooth_noise(rng, h, w, 2))[..., None][road] * np.array([95, 95, 100])
    dashes = road & (np.abs(xx - 150) < 1 + 3 * depth) & ((yy.astype(int) // 8) % 2 == 0)
    img[dashes] = (235, 235, 220)

    # House: wall, roof, windows, door.
    wall = (xx > 215) & (xx < 295) & (yy > 105) & (yy < 160)
    img[wall] = (200, 175, 140)
    roof = (yy > 75) & (yy <= 105) & (np.abs(xx - 255) < (yy - 75) * 1.5 + 2)
    img[roof] = (150, 55, 45)
    for x0 in (225, 270):
        img[(xx > x0) & (xx < x0 + 14) & (yy > 115) & (yy < 130)] = (90, 140, 190)
    img[(xx > 250) & (xx < 262) & (yy > 130) & (yy < 160)] = (100, 65, 40)

    # Tree: trunk and a textured canopy.
    img[(xx > 52) & (xx < 60) & (yy > 110) & (yy < 165)] = (90, 60, 35)
    canopy = ((xx - 56) ** 2 / 30 ** 2 + (yy - 95) ** 2 / 35 ** 2) < 1 + 0.25 * (_smooth_noise(rng, h, w, 5) - 0.5)
    img[canopy] = ((0.7 + 0.3 * _smooth_noise(rng, h, w, 2))[..., None] * np.array([40, 110, 40]))[canopy]

    return np.clip(img, 0, 255).round().astype(np.uint8)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_scene()).save(OUT, optimize=True)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1024:.1f} KB)")
