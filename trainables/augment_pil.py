"""The per-image PIL path of FixMatch's weak and strong views, as the DASO reference code runs it.

One image at a time, PIL ops, a numpy `Generator` for every draw. Tests hold the batched tensor path
(`trainables/augment.py`) to it op by op, and it is the baseline of the augmentation throughput benchmark.
Each op takes its magnitude in its own unit (enhance factor, bits, degrees, shear, threshold, pixels). The
level -> magnitude mapping follows the reference's `_float_parameter` / `_int_parameter` (DASO,
`lib/dataset/transform/transformation.py`, pool "FixMatch"): sign first, then translations truncated to
pixels.

Cutout follows the original FixMatch (a `size` x `size` square centred on a uniform pixel, clipped at every
border) rather than the reference's `CutoutAbs`, whose inclusive PIL rectangle makes a 17 px square clipped
only at the right and bottom; see augment.py.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

PilOp = Callable[[Image.Image, float], Image.Image]


def _affine(img: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs)  # NEAREST, black fill: PIL's defaults


PIL_OPS: dict[str, PilOp] = {  # name -> op(img, magnitude), in the reference pool's order
    "auto_contrast": lambda img, m: ImageOps.autocontrast(img),
    "brightness": lambda img, m: ImageEnhance.Brightness(img).enhance(m),
    "color": lambda img, m: ImageEnhance.Color(img).enhance(m),
    "contrast": lambda img, m: ImageEnhance.Contrast(img).enhance(m),
    "equalize": lambda img, m: ImageOps.equalize(img),
    "identity": lambda img, m: img,
    "posterize": lambda img, m: ImageOps.posterize(img, int(m)),
    "rotate": lambda img, m: img.rotate(m),
    "sharpness": lambda img, m: ImageEnhance.Sharpness(img).enhance(m),
    "shear_x": lambda img, m: _affine(img, (1, m, 0, 0, 1, 0)),
    "shear_y": lambda img, m: _affine(img, (1, 0, 0, m, 1, 0)),
    "solarize": lambda img, m: ImageOps.solarize(img, int(m)),
    "translate_x": lambda img, m: _affine(img, (1, 0, int(m), 0, 1, 0)),
    "translate_y": lambda img, m: _affine(img, (1, 0, 0, 0, 1, int(m))),
}

# name -> (float or int parameter, max_level, bias) of the reference pool; None: the op takes no magnitude
_POOL: dict[str, tuple[str, float, float] | None] = {
    "auto_contrast": None,
    "brightness": ("float", 0.9, 0.05),
    "color": ("float", 0.9, 0.05),
    "contrast": ("float", 0.9, 0.05),
    "equalize": None,
    "identity": None,
    "posterize": ("int", 4, 4),
    "rotate": ("int", 30, 0),
    "sharpness": ("float", 0.9, 0.05),
    "shear_x": ("float", 0.3, 0),
    "shear_y": ("float", 0.3, 0),
    "solarize": ("int", 256, 0),
    "translate_x": ("float", 0.3, 0),
    "translate_y": ("float", 0.3, 0),
}
SIGNED = frozenset({"rotate", "shear_x", "shear_y", "translate_x", "translate_y"})


def reference_magnitude(op: str, level: int, negate: bool, size: tuple[int, int]) -> float:
    """Magnitude of `op` at `level` (1..9 of 10) as the reference computes it inside the op; size = (H, W).

    float parameter: level / 10 * max_level + bias; int parameter: int(level / 10 * max_level) + bias.
    Solarize's threshold is 256 minus the int parameter; signed ops are negated when `negate`; translations
    become int(fraction * side) pixels after the sign (side = width for x, height for y).
    """
    spec = _POOL[op]
    if spec is None:
        return 0.0
    kind, max_level, bias = spec
    value = float(level) / 10 * max_level + bias if kind == "float" else int(level / 10 * max_level) + bias
    if op == "solarize":
        value = 256 - value
    if op in SIGNED and negate:
        value = -value
    if op == "translate_x":
        value = int(value * size[1])
    if op == "translate_y":
        value = int(value * size[0])
    return float(value)


def pil_flip_crop(img: Image.Image, flip: bool, top: int, left: int, pad: int) -> Image.Image:
    """Flip, then crop (H, W) at (top, left) of the `pad`-px reflect-padded image, as torchvision's
    RandomHorizontalFlip + RandomCrop(padding_mode="reflect") do on PIL images (numpy 'reflect')."""
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    width, height = img.size
    padded = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return Image.fromarray(padded[top : top + height, left : left + width])


def pil_cutout(img: Image.Image, row: int, col: int, size: int, fill: int = 127) -> Image.Image:
    """Gray square: rows and cols [c - size // 2, c - size // 2 + size), clipped at the borders."""
    arr = np.array(img)
    top, left = row - size // 2, col - size // 2
    arr[max(top, 0) : max(top + size, 0), max(left, 0) : max(left + size, 0)] = fill
    return Image.fromarray(arr)


def pil_weak(img: Image.Image, rng: np.random.Generator, pad: int = 4) -> Image.Image:
    """Weak view of one image: flip with p = 0.5, random crop after `pad`-px reflect padding."""
    flip = bool(rng.random() < 0.5)
    top, left = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    return pil_flip_crop(img, flip, top, left, pad)


def pil_rand_augment(img: Image.Image, rng: np.random.Generator, num_ops: int = 2) -> Image.Image:
    """The reference RandAugment: `num_ops` ops drawn with replacement, each applied with p = 0.5 at a level
    drawn from 1..9."""
    names = list(PIL_OPS)
    size = (img.height, img.width)
    for index in rng.integers(0, len(names), size=num_ops):
        if rng.random() < 0.5:
            op = names[int(index)]
            level = int(rng.integers(1, 10))
            negate = op in SIGNED and bool(rng.random() < 0.5)
            img = PIL_OPS[op](img, reference_magnitude(op, level, negate, size))
    return img


def pil_strong(
    img: Image.Image, rng: np.random.Generator, num_ops: int = 2, cutout: float = 0.5, pad: int = 4
) -> Image.Image:
    """Strong view of one image: weak view, RandAugment, gray Cutout of `cutout` x the shorter side."""
    img = pil_rand_augment(pil_weak(img, rng, pad), rng, num_ops)
    row, col = int(rng.integers(0, img.height)), int(rng.integers(0, img.width))
    return pil_cutout(img, row, col, int(cutout * min(img.size)))
