"""A deterministic synthetic long-tailed image set that behaves like CIFAR-10-LT, rendered in seconds on CPU.

A class is a pair of factors that survive FixMatch's augmentations: a SHAPE family (disc, ring, square,
triangle, cross), drawn 2-3 times per image, one copy per image quadrant, and the FILL texture of those shapes
(solid, stripes, checker, concentric rings, speckle). Class c has shape c % 5 and fill (c // 5) % 5; beyond 25
classes the background style c // 25 is a third factor (up to 200 classes), below that the background style is
clutter. Everything else is nuisance drawn per image: positions, sizes (3.5-7 px radius at 32 px), rotations
(any angle), colours and their polarity, background colour, gradient, low-frequency clutter, a background
pattern and pixel noise.

Why these factors: flips, 4 px crops, rotations up to 30 deg, shear, 30 % translation, colour, contrast and
brightness changes, posterize, solarize, equalize, auto-contrast and a 16x16 cutout change absolute colour,
position, orientation and up to a quarter of the image, but not the kind of shape (several copies, any
orientation) nor the local texture. Why it is hard: with 10 classes, classes c and c + 5 share a shape and
differ by solid vs striped fill; stripes are faint in some images (fill contrast down to 0.15 of the object
contrast) and resemble the background patterns. Head classes 0-4 are solid and their tail partners 5-9
striped, so a head-biased classifier calls faint-striped tail images solid head images: the bias DASO and
DRw correct. Measured (small CNN, 1000 CPU iterations): the labeled split N1 = 500, gamma = 100 alone gives
69 % balanced test accuracy, recall 0.05 on class 9 (mostly called class 4); the balanced labeled pool, 96 %.

Validation carve-out default: 10 % of the pool (CIFAR's 500 of 5000 per class). The normalisation statistics
come from a fixed 2048-image sample of the same generator settings, so they do not move with the data seed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from trainables.config import DataConfig
from trainables.data.base import ImageSet, SSLData
from trainables.data.splits import split_pool

SHAPES = ("disc", "ring", "square", "triangle", "cross")
FILLS = ("solid", "stripes", "checker", "rings", "speckle")
BACKGROUNDS = ("smooth", "stripes", "speckle", "grid", "rings", "dots", "blotches", "waves")
MAX_OBJECTS = 3
STATS_SAMPLE = 2048  # images in the fixed sample behind mean / std (standard error ~0.005 on [0, 1])
STATS_SEED = 12345


def class_factors(label: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(shape, fill, background) indices of each class; background None when it is nuisance (C <= 25)."""
    shape = label % len(SHAPES)
    fill = (label // len(SHAPES)) % len(FILLS)
    per_bg = len(SHAPES) * len(FILLS)
    return shape, fill, (label // per_bg if num_classes > per_bg else None)


def class_names(num_classes: int) -> list[str]:
    shape, fill, bg = class_factors(np.arange(num_classes), num_classes)
    names = [f"{SHAPES[s]}/{FILLS[f]}" for s, f in zip(shape, fill, strict=True)]
    if bg is not None:
        names = [f"{n}/{BACKGROUNDS[b]}" for n, b in zip(names, bg, strict=True)]
    return names


def _uniform(rng: np.random.Generator, low: float, high: float, shape: tuple) -> torch.Tensor:
    return torch.from_numpy(rng.uniform(low, high, shape).astype(np.float32))


def _rgb(rng: np.random.Generator, brightness: torch.Tensor, saturation: float) -> torch.Tensor:
    """Colours of a given brightness and random hue: brightness + saturation * a zero-mean unit direction.

    Shape: brightness (n,) -> (n, 3) in [0, 1].
    """
    direction = rng.standard_normal((len(brightness), 3)).astype(np.float32)
    direction -= direction.mean(axis=1, keepdims=True)
    direction /= np.linalg.norm(direction, axis=1, keepdims=True) + 1e-6
    return (brightness[:, None] + saturation * torch.from_numpy(direction)).clamp(0, 1)


def _by_group(index: torch.Tensor, makers: list, like: torch.Tensor) -> torch.Tensor:
    """out[i] = makers[index[i]](rows of that group)[i]: each maker computes only the rows it owns.

    Shape: index (n,), each maker: row indices (r,) -> (r, H, W); like (n, H, W) -> (n, H, W).
    """
    out = torch.empty_like(like)
    for k in index.unique().tolist():  # sorted, so random draws inside makers happen in a fixed order
        rows = (index == k).nonzero().squeeze(1)
        out[rows] = makers[k](rows)
    return out


def _background(
    rng: np.random.Generator,
    gen: torch.Generator,
    style: torch.Tensor,
    xx: torch.Tensor,
    yy: torch.Tensor,
    px: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Background: base colour, gradient, low-frequency clutter and a pattern of the given style.

    Shape: style (n,), xx / yy (H, W) pixel coordinates -> image (n, 3, H, W), base colour (n, 3).
    """
    n, (h, w) = len(style), xx.shape
    base = _rgb(rng, _uniform(rng, 0.15, 0.85, (n,)), 0.25)
    tilt = _uniform(rng, 0, 2 * math.pi, (n, 1, 1))
    ramp = (xx * torch.cos(tilt) + yy * torch.sin(tilt)) / max(h, w) - 0.5  # (n, H, W), about [-0.7, 0.7]
    img = base[:, :, None, None] + _uniform(rng, -0.3, 0.3, (n, 3, 1, 1)) * ramp[:, None]
    coarse = F.interpolate(torch.randn(n, 3, 4, 4, generator=gen), size=(h, w), mode="bicubic", align_corners=False)
    img = img + _uniform(rng, 0.03, 0.15, (n, 1, 1, 1)) * coarse

    period = _uniform(rng, 5.0, 8.0, (n, 1, 1)) * px  # coarser than the fills' 2.6-3.6 px, yet close
    angle = _uniform(rng, 0, math.pi, (n, 1, 1))
    u = xx * torch.cos(angle) + yy * torch.sin(angle)
    v = -xx * torch.sin(angle) + yy * torch.cos(angle)
    phase = _uniform(rng, 0, 2 * math.pi, (n, 1, 1))
    centre = _uniform(rng, 0, max(h, w), (n, 2, 1, 1))
    wobble = _uniform(rng, 1.0, 2.5, (n, 1, 1)) * px

    def wave(r, x):  # cos(2 pi x / period + phase) on rows r
        return torch.cos(2 * math.pi * x / period[r] + phase[r])

    def blotches(r):
        mid = torch.randn(len(r), 1, 8, 8, generator=gen)
        return F.interpolate(mid, size=(h, w), mode="bicubic", align_corners=False)[:, 0].clamp(-1.5, 1.5) / 1.5

    makers = [
        lambda r: torch.zeros_like(u[r]),  # smooth: the clutter alone
        lambda r: wave(r, u[r]),  # stripes
        lambda r: torch.rand(u[r].shape, generator=gen) * 2 - 1,  # speckle
        lambda r: torch.maximum(wave(r, u[r]), wave(r, v[r])) ** 3,  # grid lines
        lambda r: wave(r, torch.sqrt((xx - centre[r, 0]) ** 2 + (yy - centre[r, 1]) ** 2)),  # rings
        lambda r: torch.tanh(4 * (wave(r, u[r]) * wave(r, v[r]) - 0.5)),  # dots
        blotches,
        lambda r: wave(r, u[r] + wobble[r] * torch.sin(2 * math.pi * v[r] / (2.5 * period[r]))),  # waves
    ]
    pattern = _by_group(style, makers, u)
    # mostly a brightness pattern, with a random tint
    tint = 1 + 0.5 * (_rgb(rng, torch.full((n,), 0.5), 1.0) - 0.5)
    strength = _uniform(rng, 0.04, 0.18, (n, 1, 1, 1)) * tint[:, :, None, None]
    return img + strength * pattern[:, None], base


def _shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside, in units of the object radius) of each image's shape family.

    Shape: shape (n,), u / v (n, H, W) object coordinates -> (n, H, W).
    """
    makers = [
        lambda r: torch.sqrt(u[r] ** 2 + v[r] ** 2) - 1.0,  # disc
        lambda r: (torch.sqrt(u[r] ** 2 + v[r] ** 2) - 0.68).abs() - 0.32,  # ring
        lambda r: torch.maximum(u[r].abs(), v[r].abs()) - 0.82,  # square
        lambda r: _triangle(u[r], v[r]),
        lambda r: torch.minimum(  # cross: the union of two 2 x 0.72 bars
            torch.maximum(u[r].abs() - 1.0, v[r].abs() - 0.36),
            torch.maximum(u[r].abs() - 0.36, v[r].abs() - 1.0),
        ),
    ]
    return _by_group(shape, makers, u)


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # equilateral, inradius 0.55: the distance beyond the farthest of its three edges (outward normals
    # at 90, 210 and 330 degrees)
    edges = torch.stack([v, -0.866 * u - 0.5 * v, 0.866 * u - 0.5 * v])
    return edges.amax(0) - 0.55


def _fill_texture(rng, gen, fill: torch.Tensor, u: torch.Tensor, v: torch.Tensor, px: float) -> torch.Tensor:
    """Fill texture in [0, 1] at an absolute scale (period 2.6-3.6 px at 32 px), whatever the object's size.

    Shape: fill (n,), u / v (n, H, W) object coordinates in pixels -> (n, H, W).
    """
    n = len(fill)
    period = _uniform(rng, 2.6, 3.6, (n, 1, 1)) * px
    phase = _uniform(rng, 0, 2 * math.pi, (n, 1, 1))

    def wave(r, x):
        return torch.cos(2 * math.pi * x / period[r] + phase[r])

    makers = [
        lambda r: torch.zeros_like(u[r]),  # solid
        lambda r: 0.5 + 0.5 * wave(r, u[r]),  # stripes
        lambda r: 0.5 + 0.5 * wave(r, u[r]) * wave(r, v[r]),  # checker
        lambda r: 0.5 + 0.5 * wave(r, torch.sqrt(u[r] ** 2 + v[r] ** 2)),  # concentric rings
        lambda r: torch.rand(u[r].shape, generator=gen),  # speckle
    ]
    return _by_group(fill, makers, u)


@dataclass(frozen=True)
class Difficulty:
    """The generator's difficulty knobs (SyntheticConfig's): object contrast and pixel noise scale their
    default ranges; `faint_fill` is the weakest fill strength, the overlap between a striped tail class and its
    solid head partner. The defaults are the original set."""

    contrast: float = 1.0
    noise: float = 1.0
    faint_fill: float = 0.15


def render(
    labels: np.ndarray,
    num_classes: int,
    image_size: int,
    seed: int | tuple[int, ...],
    difficulty: Difficulty = Difficulty(),
) -> np.ndarray:
    """Images of the given classes, a pure function of (labels, num_classes, image_size, seed, difficulty).

    Rendered in chunks whose size depends on image_size only, each from its own child of SeedSequence(seed).

    Shape: labels (N,) -> uint8 (N, image_size, image_size, 3).
    """
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    out = np.empty((len(labels), image_size, image_size, 3), dtype=np.uint8)
    # bounds memory (about 1M pixels per chunk); depends on the size only, so the bytes never vary
    chunk = max(64, 2**20 // image_size**2)
    seeds = np.random.SeedSequence(seed).spawn((len(labels) + chunk - 1) // chunk)
    for start, seq in zip(range(0, len(labels), chunk), seeds, strict=True):
        rng = np.random.default_rng(seq)
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        out[start : start + chunk] = _render_chunk(
            rng, gen, labels[start : start + chunk], num_classes, image_size, difficulty
        )
    return out


def _render_chunk(rng, gen, labels: np.ndarray, num_classes: int, size: int, difficulty: Difficulty) -> np.ndarray:
    n, px = len(labels), size / 32  # px: one pixel of the 32 px design, in this image's pixels
    shape_np, fill_np, bg_np = class_factors(labels, num_classes)
    style = torch.from_numpy(bg_np if bg_np is not None else rng.integers(len(BACKGROUNDS), size=n))
    shape, fill = torch.from_numpy(shape_np), torch.from_numpy(fill_np)
    axis = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    img, base = _background(rng, gen, style, xx, yy, px)
    base_b = base.mean(1)
    present = torch.from_numpy(rng.integers(2, MAX_OBJECTS + 1, size=n))[:, None, None]
    # each copy in its own quadrant (a random one), jittered: a 16x16 cutout rarely hides every copy
    quadrant = torch.from_numpy(rng.permuted(np.tile(np.arange(4), (n, 1)), axis=1))
    for k in range(MAX_OBJECTS):
        cell = torch.stack([quadrant[:, k] % 2, quadrant[:, k] // 2], dim=1)[:, :, None, None]
        centre = (0.25 + 0.5 * cell) * size + _uniform(rng, -0.12 * size, 0.12 * size, (n, 2, 1, 1))
        radius = _uniform(rng, 3.5, 7.0, (n, 1, 1)) * px
        angle = _uniform(rng, 0, 2 * math.pi, (n, 1, 1))
        dx, dy = xx - centre[:, 0], yy - centre[:, 1]
        u = dx * torch.cos(angle) + dy * torch.sin(angle)  # object coordinates in pixels
        v = -dx * torch.sin(angle) + dy * torch.cos(angle)
        # 1 px anti-aliased edge; objects beyond the image's count are transparent
        alpha = (0.5 - _shape_sdf(shape, u / radius, v / radius) * radius / px).clamp(0, 1) * (present > k)
        # object contrast 0.2-0.55 against the base colour, either polarity (solarize flips it anyway)
        sign = torch.from_numpy(rng.choice([-1.0, 1.0], size=n).astype(np.float32))
        top = 0.55 * difficulty.contrast
        sign = torch.where(base_b + sign * top > 1, -1.0, torch.where(base_b + sign * top < 0, 1.0, sign))
        contrast = _uniform(rng, 0.2, 0.55, (n,))
        if difficulty.contrast != 1.0:
            contrast = contrast * difficulty.contrast
        colour = _rgb(rng, base_b + sign * contrast, 0.3)  # (n, 3)
        texture = _fill_texture(rng, gen, fill, u, v, px)
        # the fill alternates between the object colour and a colour `amp` of the way back to the background:
        # faint fills (amp near 0.15) make some striped images look solid, the overlap between class pairs
        amp = _uniform(rng, difficulty.faint_fill, 1.0, (n, 1, 1))
        fill_rgb = colour[:, :, None, None] + (amp * texture)[:, None] * (base - colour)[:, :, None, None]
        img = torch.lerp(img, fill_rgb, alpha[:, None])
    noise = _uniform(rng, 0.02, 0.08, (n, 1, 1, 1))
    if difficulty.noise != 1.0:
        noise = noise * difficulty.noise
    img = img + noise * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@functools.lru_cache(maxsize=8)
def normalisation(
    num_classes: int, image_size: int, difficulty: Difficulty = Difficulty()
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on [0, 1] of a fixed sample (STATS_SEED), independent of the data seed."""
    sample = render(np.arange(STATS_SAMPLE) % num_classes, num_classes, image_size, STATS_SEED, difficulty)
    total, total_sq = np.zeros(3), np.zeros(3)
    for part in np.array_split(sample, 16):  # float64 sums without a float64 copy of the whole sample
        x = part.reshape(-1, 3).astype(np.float64) / 255
        total += x.sum(0)
        total_sq += (x**2).sum(0)
    count = sample.size // 3
    mean = total / count
    std = np.sqrt(total_sq / count - mean**2)
    return tuple(np.round(mean, 4).tolist()), tuple(np.round(std, 4).tolist())


def build_synthetic(cfg: DataConfig) -> SSLData:
    """Render a balanced pool and test set from the data seed, then split the pool as CIFAR's train set.

    The pool (stream 0) and the test set (stream 1) are drawn from the data seed, so another seed is another
    data set, not only another split. Validation: 10 % of the pool per class unless data.val_size is set.
    """
    spec = cfg.synthetic
    num_classes, pool = spec.num_classes, spec.pool_per_class
    val_per_class = cfg.val_per_class  # DataConfig has checked that val + n1 + m1 fits the pool
    labels = np.repeat(np.arange(num_classes), pool)
    difficulty = Difficulty(spec.contrast, spec.noise, spec.faint_fill)
    images = render(labels, num_classes, spec.image_size, (cfg.seed, 0), difficulty)
    test_labels = np.repeat(np.arange(num_classes), spec.test_per_class)
    parts = split_pool(images, labels, num_classes, cfg, val_per_class)
    mean, std = normalisation(num_classes, spec.image_size, difficulty)
    return SSLData(
        labeled=parts["labeled"],
        unlabeled_images=parts["unlabeled"].images,
        unlabeled_truth=parts["unlabeled"].labels,
        val=parts["val"],
        test=ImageSet(render(test_labels, num_classes, spec.image_size, (cfg.seed, 1), difficulty), test_labels),
        num_classes=num_classes,
        mean=mean,
        std=std,
        class_names=class_names(num_classes),
    )
