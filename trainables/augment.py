"""Batched, per-image FixMatch augmentation of uint8 image tensors, on whatever device the batch lives on.

Weak view: horizontal flip (p = 0.5), then a random crop back to (H, W) after `pad`-px reflect padding.
Strong view: the weak view, then RandAugment as FixMatch uses it (Sohn et al., NeurIPS 2020, sec. 2.3 and
appendix): for each of `num_ops` slots draw one of 14 ops uniformly (with replacement), apply it with p = 0.5
at an integer level 1..9 of 10; then always a gray Cutout square (half the image side unless the caller
gives its size: the loop passes `data.augment`'s, 16 px at STL-10's 96 px as the reference). Magnitudes are those of the
DASO reference code (`lib/dataset/transform/transformation.py`, pool "FixMatch"). Every draw is made PER IMAGE
(torchvision v2 and kornia draw one op for the whole batch).

Structure. The 14 ops and their batched mechanisms live in `trainables.augment_ops` (re-exported here); this
module draws and applies them. Randomness is drawn up front from the explicit `generator` (on the batch's
device; saving its state makes a run resumable) into small parameter tensors (`draw_weak`,
`draw_rand_augment`, `draw_strong`). Pure functions then apply them (`flip_crop`, `apply_rand_augment`,
`cutout`, `apply_strong`). Inside a RandAugment slot the 14 ops fall into three families (`enhance_family`,
`point_family`, `geometric_family`), each one batched computation:
  - enhance (Brightness, Color, Contrast, Sharpness): PIL blends the image with a "degenerate" image (black,
    gray version, mean gray, smoothed): one blend with a per-image degenerate image;
  - point (AutoContrast, Equalize, Posterize, Solarize): one gather through a per-image, per-channel table;
  - geometric (Rotate, ShearX/Y, TranslateX/Y): one gather through a per-image affine map (nearest neighbour,
    black fill: PIL's defaults for `rotate` and `transform`).
Two ways to run a slot give the same pixels. On a GPU (`apply_ops`) every family runs on the whole batch and each
image takes its family's result (`select`): no Python loop over images, nothing read back to the host (no
boolean-mask indexing, no `.item()`), fixed shapes, so it never waits for the GPU and can be captured in a CUDA
graph. On the CPU (`apply_ops_grouped`, the default there) the images are sorted by family and each family runs on
its own slice only, about a quarter of the work; it reads the family counts on the host, which costs nothing on a
CPU. uint8 picks use `select`'s arithmetic: `torch.where` over uint8 runs about 10x slower on the CPU.

Agreement with PIL, the reference code's backend (tests/trainables/test_augment.py, image by image):
  - every op, the flip-crop and Cutout are bit-identical to Pillow 13 on x86-64, because each replicates PIL's
    arithmetic rather than approximating it. `Image.blend` computes `d + alpha * (x - d)` in float32 and
    truncates (three separate kernels here round the same way); the degenerate images use PIL's integer luma,
    its half-up rounded mean and its rounded SMOOTH filter; AutoContrast's table is float64 as PIL computes it
    in Python; Equalize's is PIL's integer formula; NEAREST affine warps use PIL's 16.16 fixed-point
    pixel-centre coordinates (`affine_fixed`, libImaging/Geometry.c), which a float `grid_sample` would miss
    wherever a source point falls on a pixel edge.
    Caveats: a PIL build that fuses multiply-adds (FMA, e.g. aarch64), or `torch.compile` fusing `blend`, can
    move an enhance-op pixel by 1 where the float32 sum lands next to an integer; torch's cos/sin may differ
    from libm's by an ulp (no effect after the 1/65536 rounding at the angles tested).
  - `resize` (two antialiased bilinear passes rounded like PIL's) is bit-identical to PIL's BILINEAR for
    integer reduction factors (96 -> 32 for STL-10), within 2 gray levels otherwise (PIL's fixed-point
    weights).
Deliberate deviation from the reference code: Cutout fills exactly `size` x `size` pixels centred on a uniform
pixel, clipped at every border (the original FixMatch). The reference's `CutoutAbs` draws an inclusive PIL
rectangle, so its square is 17 px wide and is clipped only at the right and bottom.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.augment_ops import (  # noqa: F401  (the ops are part of this module's API)
    _gather_pixels,
    affine_coeffs,
    affine_nearest,
    apply_lut,
    auto_contrast,
    auto_contrast_lut,
    blend,
    brightness,
    color,
    contrast,
    equalize,
    equalize_lut,
    grayscale,
    identity,
    mean_gray,
    posterize,
    posterize_lut,
    rotate,
    select,
    sharpness,
    shear_x,
    shear_y,
    smooth,
    solarize,
    solarize_lut,
    translate_x,
    translate_y,
)


def _float_level(level: int, max_level: float, bias: float = 0.0) -> float:
    """The reference's `_float_parameter(level, max_level) + bias`: level / 10 * max_level + bias."""
    return float(level) / 10 * max_level + bias


def _int_level(level: int, max_level: int, bias: int = 0) -> int:
    """The reference's `_int_parameter(level, max_level) + bias`: int(level / 10 * max_level) + bias."""
    return int(level / 10 * max_level) + bias


ENHANCE, POINT, GEOMETRIC, NONE = range(4)  # how `apply_ops` computes an op


@dataclass(frozen=True)
class Op:
    fn: Callable[[Tensor, Tensor], Tensor]  # (x, magnitude (B,)) -> augmented x
    family: int
    level: Callable[[int], float] | None = None  # reference magnitude at level 1..9 (before sign and size)
    signed: bool = False  # the reference negates the magnitude with p = 0.5
    neutral: float = 0.0  # a magnitude at which the op leaves every image unchanged


_enhance_level = functools.partial(_float_level, max_level=0.9, bias=0.05)  # factor 0.14..0.86
_shift_level = functools.partial(_float_level, max_level=0.3)  # shear 0.03..0.27, translate 3%..27% of side

OPS: dict[str, Op] = {  # in the reference pool's order: the drawn index means the same op on both paths
    "auto_contrast": Op(lambda x, m: auto_contrast(x), POINT),
    "brightness": Op(brightness, ENHANCE, _enhance_level, neutral=1.0),
    "color": Op(color, ENHANCE, _enhance_level, neutral=1.0),
    "contrast": Op(contrast, ENHANCE, _enhance_level, neutral=1.0),
    "equalize": Op(lambda x, m: equalize(x), POINT),
    "identity": Op(lambda x, m: identity(x), NONE),
    "posterize": Op(posterize, POINT, lambda v: _int_level(v, 4, bias=4), neutral=8),  # 4..7 bits
    "rotate": Op(rotate, GEOMETRIC, lambda v: _int_level(v, 30), signed=True),  # 3..27 degrees
    "sharpness": Op(sharpness, ENHANCE, _enhance_level, neutral=1.0),
    "shear_x": Op(shear_x, GEOMETRIC, _shift_level, signed=True),
    "shear_y": Op(shear_y, GEOMETRIC, _shift_level, signed=True),
    "solarize": Op(solarize, POINT, lambda v: 256 - _int_level(v, 256), neutral=256),  # threshold 231..26
    "translate_x": Op(translate_x, GEOMETRIC, _shift_level, signed=True),  # `op_magnitude` makes pixels
    "translate_y": Op(translate_y, GEOMETRIC, _shift_level, signed=True),
}
OP_NAMES: tuple[str, ...] = tuple(OPS)
_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
LEVELS = 10  # levels are drawn from 1..LEVELS-1, as the reference's np.random.randint(1, 10)


@dataclass(frozen=True)
class _Tables:
    magnitude: Tensor  # (ops, LEVELS) float64: reference magnitude per op and level
    signed: Tensor  # (ops,) bool
    family: Tensor  # (ops,) int64
    neutral: Tensor  # (ops,) float64


@functools.cache
def _tables(device: torch.device) -> _Tables:
    """The op tables, copied to `device` once: a host-to-device copy per call would wait for the device."""
    ops = OPS.values()
    return _Tables(
        magnitude=torch.tensor(
            [[float(op.level(v)) if op.level else 0.0 for v in range(LEVELS)] for op in ops],
            dtype=torch.float64,
            device=device,
        ),
        signed=torch.tensor([op.signed for op in ops], device=device),
        family=torch.tensor([op.family for op in ops], device=device),
        neutral=torch.tensor([op.neutral for op in ops], dtype=torch.float64, device=device),
    )


def op_magnitude(op: Tensor, level: Tensor, negate: Tensor, size: tuple[int, int]) -> Tensor:
    """Magnitude of op[i] at level[i] in the op's unit, with the reference's sign and translate rounding.

    Signed ops (rotate, shears, translates) are negated where `negate`; a translation by a fraction t becomes
    int(t * side) pixels (side W for translate_x, H for translate_y), truncated after the sign, as the
    reference does.

    Shape: op, level (B,) int64, negate (B,) bool -> (B,) float64; size = (H, W).
    """
    tables = _tables(op.device)
    magnitude = tables.magnitude[op, level]
    magnitude = torch.where(negate & tables.signed[op], -magnitude, magnitude)
    is_x, is_y = op == _INDEX["translate_x"], op == _INDEX["translate_y"]
    side = torch.where(is_y, size[0], size[1])
    return torch.where(is_x | is_y, (magnitude * side).trunc(), magnitude)


class _Chosen:
    """Which op each image drew, and each op's magnitude where chosen (its neutral one elsewhere, so no op
    computes on a foreign unit)."""

    def __init__(self, op: Tensor, magnitude: Tensor) -> None:
        tables = _tables(op.device)
        self.chosen = op.view(-1, 1) == torch.arange(len(OP_NAMES), device=op.device)  # (B, ops) one-hot
        self.magnitudes = torch.where(self.chosen, magnitude.view(-1, 1), tables.neutral)  # (B, ops)

    def is_op(self, name: str, dims: int = 4) -> Tensor:  # (B, 1, ...): broadcasts over image or table dims
        return self.chosen[:, _INDEX[name]].view(-1, *([1] * (dims - 1)))

    def m(self, name: str) -> Tensor:
        return self.magnitudes[:, _INDEX[name]]


def enhance_family(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """Brightness, Color, Contrast, Sharpness: one blend with each image's own degenerate image.

    Images whose op is in another family get a blend with black (discarded by the callers).
    Shape: x (B, 3, H, W) uint8; op (B,) int64; magnitude (B,) float64 -> (B, 3, H, W) uint8.
    """
    c = _Chosen(op, magnitude)
    gray = grayscale(x)
    degenerate = torch.where(c.is_op("contrast"), mean_gray(gray).float(), 0.0)  # 0: Brightness's black
    degenerate = torch.where(c.is_op("color"), gray.float(), degenerate)
    return blend(x, torch.where(c.is_op("sharpness"), smooth(x).float(), degenerate), magnitude)


def point_family(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """AutoContrast, Equalize, Posterize, Solarize: one gather through a per-image, per-channel table.

    Shape: as `enhance_family`.
    """
    c = _Chosen(op, magnitude)
    lut = torch.where(c.is_op("solarize", 3), solarize_lut(c.m("solarize")), posterize_lut(c.m("posterize")))
    lut = torch.where(c.is_op("equalize", 3), equalize_lut(x), lut)
    return apply_lut(x, torch.where(c.is_op("auto_contrast", 3), auto_contrast_lut(x), lut))


def geometric_family(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """Rotate, ShearX/Y, TranslateX/Y: one gather through a per-image affine map.

    Shape: as `enhance_family`.
    """
    c = _Chosen(op, magnitude)
    m = c.m
    coeffs = affine_coeffs(m("rotate"), m("shear_x"), m("shear_y"), m("translate_x"), m("translate_y"), x.shape[-2:])
    return affine_nearest(x, coeffs)


FAMILIES: dict[int, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    ENHANCE: enhance_family,
    POINT: point_family,
    GEOMETRIC: geometric_family,
}


def apply_ops(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """Image i gets op OP_NAMES[op[i]] at magnitude[i]; each family runs once on the batch, `select` picks.

    Gives the same pixels as each image's own op function (`OPS[name].fn`) applied to it alone. No host
    reads and fixed shapes: the GPU path.

    Shape: x (B, 3, H, W) uint8; op (B,) int64; magnitude (B,) float64 -> (B, 3, H, W) uint8.
    """
    family = _tables(x.device).family[op].view(-1, 1, 1, 1)
    out = x
    for key, run_family in FAMILIES.items():
        out = select(family == key, run_family(x, op, magnitude), out)
    return out


def apply_ops_grouped(x: Tensor, op: Tensor, magnitude: Tensor) -> Tensor:
    """`apply_ops` computing each family only on the images that drew one of its ops: the same pixels, about
    a quarter of the work (half the images skip a slot; each family takes a third or less of the rest).

    The images are sorted by family and each family runs once on its slice. This reads the family counts back
    to the host (a device synchronisation) and runs on shapes that change from call to call, so the training
    loop uses it on the CPU, where neither costs anything, and `apply_ops` on a GPU.

    Shape: x (B, 3, H, W) uint8; op (B,) int64; magnitude (B,) float64 -> (B, 3, H, W) uint8.
    """
    family = _tables(x.device).family[op]
    order = torch.argsort(family, stable=True)
    counts = torch.bincount(family, minlength=len(FAMILIES) + 1).tolist()
    out = x.clone()
    start = 0
    for key, count in enumerate(counts):  # ENHANCE, POINT, GEOMETRIC, NONE
        if count and key in FAMILIES:
            index = order[start : start + count]
            out[index] = FAMILIES[key](x[index], op[index], magnitude[index])
        start += count
    return out


# ------------------------------------------------------------------------------------------------------------
# Weak view, RandAugment, Cutout: draw the choices, then apply them


@dataclass(frozen=True)
class WeakParams:
    flip: Tensor  # (B,) bool, p = 0.5
    offset: Tensor  # (B, 2) int64: the crop's top and left in the padded image, uniform in 0..2*pad
    pad: int


@dataclass(frozen=True)
class RandAugmentParams:
    op: Tensor  # (num_ops, B) int64 index into OP_NAMES, uniform
    apply: Tensor  # (num_ops, B) bool, p = 0.5
    level: Tensor  # (num_ops, B) int64, uniform in 1..9
    negate: Tensor  # (num_ops, B) bool, p = 0.5: the sign of signed ops


@dataclass(frozen=True)
class StrongParams:
    weak: WeakParams
    ops: RandAugmentParams
    centers: Tensor  # (B, 2) int64: Cutout centre (row, col), a uniform pixel
    cutout_size: int


def draw_weak(batch: int, generator: torch.Generator, pad: int = 4) -> WeakParams:
    device = generator.device
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    offset = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=device)
    return WeakParams(flip, offset, pad)


def draw_rand_augment(batch: int, generator: torch.Generator, num_ops: int = 2) -> RandAugmentParams:
    device, shape = generator.device, (num_ops, batch)
    op = torch.randint(0, len(OP_NAMES), shape, generator=generator, device=device)
    apply, negate = torch.rand((2, *shape), generator=generator, device=device) < 0.5
    level = torch.randint(1, LEVELS, shape, generator=generator, device=device)
    return RandAugmentParams(op, apply, level, negate)


def draw_strong(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator,
    num_ops: int = 2,
    cutout: int | None = None,
    pad: int = 4,
) -> StrongParams:
    """Every random choice of `strong_augment` for `batch` images of size (H, W)."""
    height, width = size
    weak = draw_weak(batch, generator, pad)
    ops = draw_rand_augment(batch, generator, num_ops)
    pixel = torch.randint(0, height * width, (batch,), generator=generator, device=generator.device)
    centers = torch.stack([pixel // width, pixel % width], dim=1)
    return StrongParams(weak, ops, centers, min(height, width) // 2 if cutout is None else cutout)


def _reflect(index: Tensor, n: int) -> Tensor:
    """Index into an axis of length n, reflect-padded without repeating the edge (-1 -> 1, n -> n - 2)."""
    index = index.abs()
    return torch.where(index > n - 1, 2 * (n - 1) - index, index)


def flip_crop(x: Tensor, params: WeakParams) -> Tensor:
    """Horizontal flip where `params.flip`, then the crop at `params.offset` of the reflect-padded image.

    out[r, c] = flipped[refl(top + r - pad), refl(left + c - pad)]: one gather for the batch.

    Shape: (B, C, H, W) -> (B, C, H, W).
    """
    h, w = x.shape[-2:]
    rows = _reflect(params.offset[:, :1] + torch.arange(h, device=x.device) - params.pad, h)  # (B, H)
    cols = _reflect(params.offset[:, 1:] + torch.arange(w, device=x.device) - params.pad, w)  # (B, W)
    cols = torch.where(params.flip.view(-1, 1), w - 1 - cols, cols)
    return _gather_pixels(x, rows.unsqueeze(2) * w + cols.unsqueeze(1))


def apply_rand_augment(x: Tensor, params: RandAugmentParams, grouped: bool | None = None) -> Tensor:
    """The RandAugment slots in order; an image that skips a slot gets the identity there.

    `grouped`: run each op family on its own images (`apply_ops_grouped`) rather than every family on the whole
    batch (`apply_ops`); the pixels are the same. None: grouped on the CPU, not on other devices (no host reads).

    Shape: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8.
    """
    grouped = x.device.type == "cpu" if grouped is None else grouped
    apply_slot = apply_ops_grouped if grouped else apply_ops
    for op, apply, level, negate in zip(params.op, params.apply, params.level, params.negate, strict=True):
        op = torch.where(apply, op, _INDEX["identity"])
        x = apply_slot(x, op, op_magnitude(op, level, negate, x.shape[-2:]))
    return x


def cutout(x: Tensor, centers: Tensor, size: int, fill: int = 127) -> Tensor:
    """Fill a `size` x `size` square, rows and cols [c - size // 2, c - size // 2 + size) around centers[i],
    clipped at the borders, with gray `fill` (DeVries and Taylor 2017; FixMatch: 127, half the side).

    Shape: x (B, C, H, W) uint8; centers (B, 2) int64 (row, col) -> (B, C, H, W) uint8.
    """
    h, w = x.shape[-2:]
    top_left = centers - size // 2  # (B, 2)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top_left[:, :1]) & (rows < top_left[:, :1] + size)  # (B, H)
    in_cols = (cols >= top_left[:, 1:]) & (cols < top_left[:, 1:] + size)  # (B, W)
    inside = (in_rows.unsqueeze(2) & in_cols.unsqueeze(1)).unsqueeze(1)
    return select(inside, fill, x)  # a Python fill: a tensor made from it would be a host-to-device copy


def apply_strong(x: Tensor, params: StrongParams, grouped: bool | None = None) -> Tensor:
    """Flip-crop, RandAugment, Cutout with the given choices (`grouped`: see `apply_rand_augment`).

    Shape: (B, 3, H, W) uint8 -> same.
    """
    x = flip_crop(x, params.weak)
    x = apply_rand_augment(x, params.ops, grouped)
    return cutout(x, params.centers, params.cutout_size)


def _check_images(x: Tensor, pad: int) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {x.dtype} {tuple(x.shape)}")
    if not 0 <= pad < min(x.shape[-2:]):
        raise ValueError(f"pad={pad} must be in [0, {min(x.shape[-2:])}) to reflect-pad {tuple(x.shape)}")


@torch.no_grad()
def weak_augment(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """FixMatch's weak view: per image, flip with p = 0.5, random crop after `pad`-px reflect padding.

    Shape: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8.
    """
    _check_images(x, pad)
    return flip_crop(x, draw_weak(x.shape[0], generator, pad))


@torch.no_grad()
def strong_augment(
    x: Tensor,
    generator: torch.Generator,
    num_ops: int = 2,
    cutout: int | None = None,
    pad: int = 4,
    grouped: bool | None = None,
) -> Tensor:
    """FixMatch's strong view: weak view, RandAugment with `num_ops` per-image ops, Cutout of side `cutout`
    pixels (None: half the shorter image side, FixMatch's 16 px at 32 px). `grouped`: see `apply_rand_augment`
    (the same pixels either way).

    Shape: (B, 3, H, W) uint8 -> (B, 3, H, W) uint8.
    """
    _check_images(x, pad)
    return apply_strong(x, draw_strong(x.shape[0], x.shape[-2:], generator, num_ops, cutout, pad), grouped)


# ------------------------------------------------------------------------------------------------------------
# To the model's input


def resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear, antialiased resize, as PIL's BILINEAR in the reference's `transforms.Resize`; STL-10 is
    augmented at 96 px, then resized to the model's 32 px. uint8 in -> uint8 out; float in -> float out.

    For uint8, PIL resamples in two passes, width then height, each rounded half up to uint8; doing the same
    makes integer-factor reductions (96 -> 32) bit-identical to PIL. Other ratios land within 2 levels.

    Shape: (B, C, H, W) -> (B, C, size_h, size_w).
    """
    size = (size, size) if isinstance(size, int) else tuple(size)
    if x.dtype != torch.uint8:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    out = x.float()
    for pass_size in ((x.shape[-2], size[1]), size):
        out = F.interpolate(out, size=pass_size, mode="bilinear", align_corners=False, antialias=True)
        out = out.add_(0.5).floor_().clamp_(0, 255)
    return out.to(torch.uint8)


def normalize(x: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """(x / 255 - mean) / std per channel, in float32: the reference's ToTensor + Normalize.

    Pass mean and std as tensors on x's device to spare a host-to-device copy per call.

    Shape: x (B, C, H, W) uint8; mean, std (C,) -> (B, C, H, W) float32.
    """
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std
