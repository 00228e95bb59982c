"""The 14 RandAugment ops and their three batched mechanisms, bit-exact to PIL (see `trainables.augment`).

Each op takes uint8 images (B, 3, H, W) and per-image magnitudes (B,) and reproduces PIL's own arithmetic:
enhance ops blend with a degenerate image, point ops gather through per-image tables, geometric ops gather through
per-image affine maps in PIL's 16.16 fixed-point coordinates. No loop over images, no host reads.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------------------
# Primitives: the three batched mechanisms behind the ops


def _gather_pixels(x: Tensor, index: Tensor) -> Tensor:
    """out[b, :, i, j] = x[b, :].flatten()[index[b, i, j]], all channels at once.

    Shape: x (B, C, H, W); index (B, H, W) int64 row-major pixel indices -> (B, C, H, W).
    """
    b, c, h, w = x.shape
    out = x.reshape(b, c, h * w).gather(2, index.reshape(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w)


def select(mask: Tensor, a: Tensor | int, b: Tensor) -> Tensor:
    """`torch.where(mask, a, b)` for uint8 images: b + mask (a - b), in uint8's wrapping arithmetic (exact).

    On the CPU, `where` over uint8 runs about 10x slower than these three elementwise kernels.

    Shape: mask bool, a (or an int in 0..255) and b uint8, all broadcastable to each other -> uint8.
    """
    return b + (a - b) * mask.to(torch.uint8)


def _sample(x: Tensor, src_row: Tensor, src_col: Tensor) -> Tensor:
    """out[b, :, i, j] = x[b, :, src_row[b, i, j], src_col[b, i, j]], black (0) where the source is outside.

    Shape: x (B, C, H, W); src_row, src_col (B, H, W) int64 -> (B, C, H, W).
    """
    b, c, h, w = x.shape
    row, col = src_row.clamp(0, h - 1), src_col.clamp(0, w - 1)
    # a source that clamping moved lies outside: it reads the black pixel appended after each image's pixels
    index = torch.where((row == src_row) & (col == src_col), row * w + col, h * w)
    padded = torch.cat([x.reshape(b, c, h * w), x.new_zeros(b, c, 1)], dim=2)
    out = padded.gather(2, index.reshape(b, 1, h * w).expand(b, c, h * w))
    return out.view(b, c, h, w)


def blend(x: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    """PIL's `Image.blend(degenerate, x, factor)`, the core of every `ImageEnhance` op.

    out = trunc(clip(d + f (x - d), 0, 255)) in float32 with f = float32(factor), as libImaging/Blend.c
    computes it; subtraction, product and sum are separate kernels, so each rounds as the C code does.

    Shape: x (B, C, H, W) uint8; degenerate integer-valued, broadcastable to x; factor (B,)
    -> (B, C, H, W) uint8.
    """
    d = degenerate.float()
    alpha = factor.to(torch.float32).view(-1, 1, 1, 1)
    out = d + (x.float() - d) * alpha
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates toward zero, like PIL's cast


def apply_lut(x: Tensor, lut: Tensor) -> Tensor:
    """PIL's `Image.point`: out[b, c] = lut[b, c][x[b, c]], table values clipped to 0..255 as PIL clips them.

    Shape: x (B, C, H, W) uint8; lut (B, C or 1, 256) integer -> (B, C, H, W) uint8.
    """
    b, c, h, w = x.shape
    table = lut.clamp(0, 255).to(torch.uint8).expand(b, c, 256)
    return table.gather(2, x.reshape(b, c, h * w).long()).view(b, c, h, w)


@functools.cache
def _pixel_grid(height: int, width: int, device: torch.device) -> Tensor:
    """Homogeneous pixel coordinates (col, row, 1), one column per pixel, row-major. Shape: (3, H * W)."""
    rows, cols = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float64),
        torch.arange(width, device=device, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack([cols.flatten(), rows.flatten(), torch.ones_like(cols.flatten())])


def affine_nearest(x: Tensor, coeffs: Tensor) -> Tensor:
    """PIL's `Image.transform(size, AFFINE, (a, b, c, d, e, f))`, NEAREST sampling, black fill, batched.

    Output pixel (col, row) reads input (a col' + b row' + c, d col' + e row' + f) at the pixel centre
    (col' = col + 1/2). PIL evaluates this in 16.16 fixed point (`affine_fixed`, libImaging/Geometry.c):
    coefficients rounded to 1/65536, source index = floor. The same arithmetic here gives PIL's pixels.

    Shape: x (B, C, H, W); coeffs (B, 6) -> (B, C, H, W).
    """
    h, w = x.shape[-2:]
    a = coeffs.double().view(-1, 2, 3)  # rows (a, b, c) and (d, e, f)
    # PIL folds the pixel-centre offset into the constant term (c + a/2 + b/2, in this order), then rounds
    centred = a[:, :, 2] + a[:, :, 0] * 0.5 + a[:, :, 1] * 0.5
    fixed = torch.floor(torch.cat([a[:, :, :2], centred.unsqueeze(2)], dim=2) * 65536.0 + 0.5)
    # integer-valued float64: every product and partial sum is an integer below 2^53, so the matmul is exact
    src = (fixed @ _pixel_grid(h, w, x.device)).long() >> 16  # (B, 2, H*W): col, row; floor(v / 65536)
    return _sample(x, src[:, 1].view(-1, h, w), src[:, 0].view(-1, h, w))


def affine_coeffs(
    degrees: Tensor,
    shear_x: Tensor,
    shear_y: Tensor,
    translate_x: Tensor,
    translate_y: Tensor,
    size: tuple[int, int],
) -> Tensor:
    """PIL's coefficients for `Image.rotate(degrees)` (about the centre) plus a shear and a translation.

    The rotation as `Image.rotate` builds it: t = -radians(degrees mod 360), matrix
    (cos t, sin t, c, -sin t, cos t, f) with (c, f) keeping the centre (W/2, H/2) in place. Shears and
    translations enter as in `transform(AFFINE, (1, sx, tx, sy, 1, ty))`. With all but one argument zero this
    is PIL's matrix for that op bit for bit (adding an exact 0.0 changes no double), so one call serves the
    whole geometric family. (PIL also rounds cos and sin to 15 decimals, far below the 1/65536 grid.)

    Shape: each magnitude (B,) -> (B, 6) float64; size = (H, W).
    """
    height, width = size
    angle = -(torch.remainder(degrees.double(), 360.0) * (math.pi / 180.0))
    cos, sin = torch.cos(angle), torch.sin(angle)
    cx, cy = width / 2, height / 2
    c = cos * -cx + sin * -cy + cx + translate_x
    f = -sin * -cx + cos * -cy + cy + translate_y
    return torch.stack([cos, sin + shear_x, c, -sin + shear_y, cos, f], dim=1)


# ------------------------------------------------------------------------------------------------------------
# Degenerate images and lookup tables, as PIL defines them


def grayscale(x: Tensor) -> Tensor:
    """PIL's RGB -> L: ITU-R 601-2 luma in 16-bit fixed point, (19595 R + 38470 G + 7471 B + 2^15) >> 16.

    Shape: (B, 3, H, W) uint8 -> (B, 1, H, W) uint8.
    """
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1).to(torch.uint8)


def mean_gray(gray: Tensor) -> Tensor:
    """`ImageEnhance.Contrast`'s gray: the L image's mean m rounded half up, floor(m + 1/2) = (2 S + n) // 2n.

    Shape: gray (B, 1, H, W) uint8, from `grayscale` -> (B, 1, 1, 1) int64.
    """
    n = gray.shape[-1] * gray.shape[-2]
    total = gray.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.int64)
    return (2 * total + n) // (2 * n)


def smooth(x: Tensor) -> Tensor:
    """PIL's `ImageFilter.SMOOTH`: 3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, border pixels kept.

    PIL sums in float32 with +0.5 and truncates: floor(S / 13 + 1/2) for the integer weighted sum S. That
    value is never closer than 1/26 to an integer, far beyond float32 rounding, so any float evaluation floors
    the same way. (Not a conv2d: a TF32 convolution on a GPU would round the 1/13 weights too coarsely.)

    Shape: (B, C, H, W) uint8 -> (B, C, H, W) uint8.
    """
    xf = x.float()
    rows = xf[..., :-2, :] + xf[..., 1:-1, :] + xf[..., 2:, :]  # separable 3x3 sum, exact integers in float32
    weighted = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:] + 4 * xf[..., 1:-1, 1:-1]
    out = x.clone()  # the one-pixel border stays as it is
    out[..., 1:-1, 1:-1] = ((weighted + 6.5) / 13).floor_()
    return out


def auto_contrast_lut(x: Tensor) -> Tensor:
    """`ImageOps.autocontrast` table per channel: int(i s + o) with s = 255 / (hi - lo), o = -lo s, clipped;
    the identity where hi <= lo. Float64 in PIL's operation order, so truncation lands where PIL's does.

    Shape: (B, C, H, W) uint8 -> (B, C, 256) int64.
    """
    lo, hi = x.reshape(*x.shape[:2], -1).aminmax(dim=-1)
    lo, span = lo.double().unsqueeze(-1), (hi.double() - lo.double()).unsqueeze(-1)
    # a true division: `255.0 / tensor` is 255 * reciprocal(tensor), one rounding more than PIL's
    scale = torch.full_like(span, 255.0) / torch.where(span > 0, span, 1.0)
    offset = -lo * scale
    i = torch.arange(256, device=x.device, dtype=torch.float64)
    return torch.where(span > 0, (i * scale + offset).trunc().clamp(0, 255), i).long()


def equalize_lut(x: Tensor) -> Tensor:
    """`ImageOps.equalize` table per channel: lut[i] = (step // 2 + #pixels below i) // step, where
    step = (#pixels - #pixels at the channel's maximum) // 255; the identity where step = 0 (e.g. constant).

    Shape: (B, C, H, W) uint8 -> (B, C, 256) int64; entries above 255 are clipped by `apply_lut`, as by PIL.
    """
    flat = x.reshape(*x.shape[:2], -1).long()  # (B, C, N)
    hist = torch.zeros(*flat.shape[:2], 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(2, flat, torch.ones_like(flat))
    at_max = hist.gather(2, flat.amax(dim=2, keepdim=True))
    step = (flat.shape[2] - at_max) // 255  # (B, C, 1)
    below = hist.cumsum(dim=2) - hist
    i = torch.arange(256, device=x.device)
    return torch.where(step > 0, (step // 2 + below) // step.clamp(min=1), i)


def posterize_lut(bits: Tensor) -> Tensor:
    """`ImageOps.posterize`: keep the `bits` high bits, lut[i] = i & (255 << (8 - bits)) & 255.

    Shape: bits (B,), 0..8 -> (B, 1, 256) int64.
    """
    keep = (255 << (8 - bits.long())) & 255
    return torch.arange(256, device=bits.device) & keep.view(-1, 1, 1)


def solarize_lut(threshold: Tensor) -> Tensor:
    """`ImageOps.solarize`: lut[i] = i below the threshold, 255 - i from it on.

    Shape: threshold (B,) -> (B, 1, 256) int64.
    """
    i = torch.arange(256, device=threshold.device)
    return torch.where(i < threshold.long().view(-1, 1, 1), i, 255 - i)


# ------------------------------------------------------------------------------------------------------------
# The 14 ops, batched, one magnitude per image in the op's own unit; Shape: x (B, 3, H, W) uint8, m (B,)


def identity(x: Tensor) -> Tensor:
    return x


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """`ImageEnhance.Brightness(img).enhance(factor)`: blend with black."""
    return blend(x, torch.zeros((), dtype=torch.int64, device=x.device), factor)


def color(x: Tensor, factor: Tensor) -> Tensor:
    """`ImageEnhance.Color(img).enhance(factor)`: blend with the image's gray version."""
    return blend(x, grayscale(x), factor)


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """`ImageEnhance.Contrast(img).enhance(factor)`: blend with the image's mean gray."""
    return blend(x, mean_gray(grayscale(x)), factor)


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """`ImageEnhance.Sharpness(img).enhance(factor)`: blend with the SMOOTH-filtered image."""
    return blend(x, smooth(x), factor)


def auto_contrast(x: Tensor) -> Tensor:
    """`ImageOps.autocontrast(img)`: stretch each channel to 0..255."""
    return apply_lut(x, auto_contrast_lut(x))


def equalize(x: Tensor) -> Tensor:
    """`ImageOps.equalize(img)`: flatten each channel's histogram."""
    return apply_lut(x, equalize_lut(x))


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """`ImageOps.posterize(img, bits)`, bits in 0..8."""
    return apply_lut(x, posterize_lut(bits))


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """`ImageOps.solarize(img, threshold)`."""
    return apply_lut(x, solarize_lut(threshold))


def _warp(x: Tensor, magnitude: Tensor, slot: int) -> Tensor:
    """`affine_nearest` with `magnitude` as argument `slot` of `affine_coeffs`, all others zero."""
    args = [torch.zeros_like(magnitude, dtype=torch.float64)] * 5
    args[slot] = magnitude.double()
    return affine_nearest(x, affine_coeffs(*args, size=x.shape[-2:]))


def rotate(x: Tensor, degrees: Tensor) -> Tensor:
    """`img.rotate(degrees)`: counter-clockwise about the centre."""
    return _warp(x, degrees, 0)


def shear_x(x: Tensor, shear: Tensor) -> Tensor:
    """`img.transform(size, AFFINE, (1, shear, 0, 0, 1, 0))`."""
    return _warp(x, shear, 1)


def shear_y(x: Tensor, shear: Tensor) -> Tensor:
    """`img.transform(size, AFFINE, (1, 0, 0, shear, 1, 0))`."""
    return _warp(x, shear, 2)


def translate_x(x: Tensor, pixels: Tensor) -> Tensor:
    """`img.transform(size, AFFINE, (1, 0, pixels, 0, 1, 0))`: content moves left for pixels > 0."""
    return _warp(x, pixels, 3)


def translate_y(x: Tensor, pixels: Tensor) -> Tensor:
    """`img.transform(size, AFFINE, (1, 0, 0, 0, 1, pixels))`: content moves up for pixels > 0."""
    return _warp(x, pixels, 4)
