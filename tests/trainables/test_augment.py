"""The batched augmentation (trainables/augment.py) against the per-image PIL path (augment_pil.py).

Test images are smooth colour waves plus Gaussian noise (so nearest-neighbour and filter differences show),
followed by three edge cases: a constant image (AutoContrast / Equalize identity paths), a low-contrast image,
and a half-black, half-white image (blend clipping, two-bin histograms).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from trainables import augment as A
from trainables import augment_pil as P

SIZES = [(32, 32), (24, 40)]  # CIFAR's size, and a non-square one that catches swapped axes


def _images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """n smooth, noisy RGB images, then the three edge cases. Shape: (n + 3, H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
    out = []
    for _ in range(n):
        freq, phase = rng.uniform(0.5, 3, size=(3, 2)), rng.uniform(0, 2 * np.pi, size=3)
        waves = [np.sin(2 * np.pi * (freq[c, 0] * xx + freq[c, 1] * yy) + phase[c]) for c in range(3)]
        image = 127 + 110 * np.stack(waves, axis=-1) + rng.normal(0, 12, size=(height, width, 3))
        out.append(np.clip(image, 0, 255))
    out.append(np.full((height, width, 3), 90.0))
    out.append(100 + 20 * rng.random((height, width, 3)))
    out.append(np.where(xx[..., None] < 0.5, 0.0, 255.0).repeat(3, axis=-1))
    return np.stack(out).astype(np.uint8)


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _array(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _pil_each(images: np.ndarray, fn) -> np.ndarray:
    """fn(i, PIL image i) for every image, stacked back into one uint8 array."""
    return np.stack([np.asarray(fn(i, Image.fromarray(image))) for i, image in enumerate(images)])


def _levels(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels 1..9 cycling and signs alternating: over 18 images every (level, sign) pair occurs once."""
    return torch.arange(n) % 9 + 1, torch.arange(n) % 2 == 1


# ------------------------------------------------------------------------------------------------------------
# Each op against PIL


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", A.OP_NAMES)
def test_op_matches_pil_image_by_image(name, size):
    """Every op, at every reference level and sign, is pixel-identical to the PIL op the reference calls.

    Exact rather than approximate, because each batched op replicates PIL's arithmetic (see augment.py):
    float32 blend with truncation; PIL's integer luma, mean and SMOOTH degenerate images; PIL's lookup-table
    formulas; the 16.16 fixed-point nearest-neighbour affine map. Magnitudes come from each side's own table.
    """
    images = _images(18, *size)
    level, negate = _levels(len(images))
    op = torch.full((len(images),), A.OP_NAMES.index(name))
    out = A.OPS[name].fn(_tensor(images), A.op_magnitude(op, level, negate, size))

    def reference(i, img):
        return P.PIL_OPS[name](img, P.reference_magnitude(name, int(level[i]), bool(negate[i]), size))

    np.testing.assert_array_equal(_array(out), _pil_each(images, reference))


@pytest.mark.parametrize("name", ["brightness", "color", "contrast", "sharpness"])
def test_enhance_ops_match_pil_beyond_the_reference_range(name):
    """Factors 0 (fully degenerate), 1 (identity), 1.7 and 2.6 (extrapolation, which PIL clips at 0 and 255)
    are exact too: RandAugment only uses 0.14..0.86, but the op functions promise PIL's result for any
    factor."""
    images = _images(5, 32, 32)
    factors = torch.tensor([0.0, 1.0, 1.7, 2.6, 0.33, 1.7, 2.6, 2.6], dtype=torch.float64)
    out = A.OPS[name].fn(_tensor(images), factors)
    expected = _pil_each(images, lambda i, img: P.PIL_OPS[name](img, float(factors[i])))
    np.testing.assert_array_equal(_array(out), expected)


def test_auto_contrast_truncates_like_pil():
    """A channel spanning 0..249: PIL maps i to int(i * (255 / 249)), and in double 83, 166, 249 give 85.0,
    170.0, 255.00000000000003, so 85, 170, 255; multiplying by a reciprocal, 255 * (1 / 249), would give
    84.99999999999999, 169.99999999999997, 254.99999999999997 and truncate each to one less."""
    x = torch.tensor([0, 83, 166, 249], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 4, 4).contiguous()
    assert A.auto_contrast(x)[0, 0, 0].tolist() == [0, 85, 170, 255]
    reference = _pil_each(_array(x), lambda i, img: P.PIL_OPS["auto_contrast"](img, 0.0))
    np.testing.assert_array_equal(_array(A.auto_contrast(x)), reference)


@pytest.mark.parametrize("size", SIZES)
def test_rotate_matches_pil_at_any_angle(size):
    """Right angles (where PIL may take a transpose shortcut), non-integer angles and angles past 180 are
    exact as well: the rotation matrix follows `Image.rotate` (angle mod 360, centre (W/2, H/2))."""
    angles = [0.0, 90.0, -90.0, 180.0, 270.0, 45.0, -45.5, 12.3, 200.25, 359.9]
    images = np.repeat(_images(1, *size)[:1], len(angles), axis=0)
    out = A.rotate(_tensor(images), torch.tensor(angles, dtype=torch.float64))
    np.testing.assert_array_equal(_array(out), _pil_each(images, lambda i, img: img.rotate(angles[i])))


@pytest.mark.parametrize("apply_ops", [A.apply_ops, A.apply_ops_grouped])
@pytest.mark.parametrize("size", SIZES)
def test_apply_ops_gives_each_image_its_own_op(size, apply_ops):
    """Both batched paths, every family over the whole batch with a per-image pick (`apply_ops`) and each
    family on its own images (`apply_ops_grouped`), equal PIL image by image when image i gets op i mod 14:
    28 images, every op twice, at different levels and signs."""
    images = _images(25, *size)
    op = torch.arange(len(images)) % len(A.OP_NAMES)
    level, negate = torch.arange(len(images)) % 9 + 1, torch.arange(len(images)) % 3 == 0
    out = apply_ops(_tensor(images), op, A.op_magnitude(op, level, negate, size))

    def reference(i, img):
        name = A.OP_NAMES[int(op[i])]
        return P.PIL_OPS[name](img, P.reference_magnitude(name, int(level[i]), bool(negate[i]), size))

    np.testing.assert_array_equal(_array(out), _pil_each(images, reference))


@pytest.mark.parametrize("name", [name for name, op in A.OPS.items() if op.level is not None])
def test_neutral_magnitude_leaves_images_unchanged(name):
    """`apply_ops` gives each op its neutral magnitude on images that chose another op, so it must be a no-op:
    enhance factor 1, 8 bits, threshold 256, zero degrees / shear / pixels."""
    x = _tensor(_images(4, 32, 32))
    out = A.OPS[name].fn(x, torch.full((len(x),), A.OPS[name].neutral, dtype=torch.float64))
    assert torch.equal(out, x)


def test_magnitudes_match_the_reference_tables():
    """Both level tables agree for every op, level 1..9, sign and size. Hand-computed anchors:
    Brightness level 5: 5 / 10 * 0.9 + 0.05 = 0.5. Posterize level 1: int(0.4) + 4 = 4 bits; level 9:
    int(3.6) + 4 = 7. Rotate level 9: int(27.0) = 27 degrees. Solarize level 1: 256 - int(25.6) = 231.
    TranslateX at 32 px, level 1: int(0.03 * 32) = int(0.96) = 0 px; level 9 negated: int(-0.27 * 32) = -8 px.
    TranslateY on a 96-px-high image, level 9: int(0.27 * 96) = int(25.92) = 25 px."""
    for size in [(32, 32), (96, 96), (24, 40)]:
        for i, name in enumerate(A.OP_NAMES):
            level, negate = torch.arange(1, 10).repeat(2), torch.arange(18) >= 9
            ours = A.op_magnitude(torch.full((18,), i), level, negate, size).tolist()
            ref = [P.reference_magnitude(name, int(v), bool(s), size) for v, s in zip(level, negate, strict=True)]
            assert ours == ref, (name, size)

    def magnitude(name, level, negate=False, size=(32, 32)):
        op = torch.tensor([A.OP_NAMES.index(name)])
        return A.op_magnitude(op, torch.tensor([level]), torch.tensor([negate]), size).item()

    assert magnitude("brightness", 5) == 0.5
    assert (magnitude("posterize", 1), magnitude("posterize", 9)) == (4, 7)
    assert magnitude("rotate", 9) == 27 and magnitude("rotate", 9, negate=True) == -27
    assert magnitude("solarize", 1) == 231
    assert magnitude("solarize", 1, negate=True) == 231  # unsigned ops ignore the sign draw
    assert (magnitude("translate_x", 1), magnitude("translate_x", 9, negate=True)) == (0, -8)
    assert magnitude("translate_y", 9, size=(96, 64)) == 25


def test_registry_order_matches_the_reference_pool():
    """The op index drawn by `draw_rand_augment` must mean the same op on both paths."""
    assert A.OP_NAMES == tuple(P.PIL_OPS)
    assert {name for name, op in A.OPS.items() if op.signed} == P.SIGNED


# ------------------------------------------------------------------------------------------------------------
# Weak view, Cutout, the whole strong view


@pytest.mark.parametrize("size", SIZES)
def test_flip_crop_matches_pil(size):
    """Flip, then crop of the 4-px reflect-padded image, as torchvision's RandomHorizontalFlip +
    RandomCrop(padding_mode="reflect") on PIL images; drawn flips and offsets plus the extremes 0 and 8."""
    images = _images(13, *size)
    drawn = A.draw_weak(len(images), torch.Generator().manual_seed(3))
    offset = drawn.offset.clone()
    offset[0], offset[1] = torch.tensor([0, 0]), torch.tensor([8, 8])
    params = A.WeakParams(drawn.flip, offset, pad=4)
    out = A.flip_crop(_tensor(images), params)

    def reference(i, img):
        return P.pil_flip_crop(img, bool(params.flip[i]), int(offset[i, 0]), int(offset[i, 1]), pad=4)

    np.testing.assert_array_equal(_array(out), _pil_each(images, reference))


def test_weak_augment_is_one_of_the_flip_crops():
    """Each weak view equals one of the 2 x 9 x 9 flip/crop candidates of its own image (enumerated with
    numpy); shape and dtype are kept; across the batch both flips and many offsets occur (per-image draws)."""
    images = _images(29, 32, 32)
    out = _array(A.weak_augment(_tensor(images), torch.Generator().manual_seed(0)))
    assert out.shape == images.shape and out.dtype == np.uint8
    found = set()
    for image, view in zip(images, out, strict=True):
        padded = [np.pad(im, ((4, 4), (4, 4), (0, 0)), mode="reflect") for im in (image, image[:, ::-1])]
        matches = [
            (flip, top, left)
            for flip in (0, 1)
            for top in range(9)
            for left in range(9)
            if np.array_equal(padded[flip][top : top + 32, left : left + 32], view)
        ]
        assert matches, "a weak view is not a flip/crop of its input"
        found.add(matches[0])
    assert {flip for flip, _, _ in found} == {0, 1}
    assert len(found) >= 20


def test_cutout_fills_a_clipped_gray_square():
    """8x8 black images, side 4 (half-side 2): centre (4, 4) fills rows and cols 2..5 (16 px); centre (0, 0)
    is clipped to rows/cols 0..1 (4 px); centre (7, 6) to rows 5..7 x cols 4..7 (12 px). Nothing else
    changes."""
    centers = [(4, 4), (0, 0), (7, 6)]
    out = A.cutout(torch.zeros(3, 3, 8, 8, dtype=torch.uint8), torch.tensor(centers), size=4)
    expected = torch.zeros(3, 8, 8, dtype=torch.uint8)
    expected[0, 2:6, 2:6] = 127
    expected[1, 0:2, 0:2] = 127
    expected[2, 5:8, 4:8] = 127
    assert torch.equal(out, expected.unsqueeze(1).expand(3, 3, 8, 8))
    assert (out[:, 0] == 127).sum(dim=(1, 2)).tolist() == [16, 4, 12]
    black = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    reference = np.stack([np.asarray(P.pil_cutout(black, r, c, 4)) for r, c in centers])
    np.testing.assert_array_equal(_array(out), reference)


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_strong_view_matches_a_pil_replay(size, grouped):
    """The whole strong view (flip-crop, two RandAugment slots, Cutout), its drawn choices replayed image by
    image through the PIL ops: identical, on both batched paths. 40 images, so most ops occur in both slots."""
    images = _images(37, *size)
    params = A.draw_strong(len(images), size, torch.Generator().manual_seed(7))
    out = A.apply_strong(_tensor(images), params, grouped=grouped)
    weak, ops = params.weak, params.ops

    def replay(i, img):
        img = P.pil_flip_crop(img, bool(weak.flip[i]), int(weak.offset[i, 0]), int(weak.offset[i, 1]), weak.pad)
        for slot in range(ops.op.shape[0]):
            if ops.apply[slot, i]:
                name = A.OP_NAMES[int(ops.op[slot, i])]
                magnitude = P.reference_magnitude(name, int(ops.level[slot, i]), bool(ops.negate[slot, i]), size)
                img = P.PIL_OPS[name](img, magnitude)
        return P.pil_cutout(img, int(params.centers[i, 0]), int(params.centers[i, 1]), params.cutout_size)

    assert params.cutout_size == int(0.5 * min(size))
    np.testing.assert_array_equal(_array(out), _pil_each(images, replay))


@pytest.mark.parametrize("ops", [["identity"] * 3, ["rotate"] * 3, ["equalize", "identity", "identity"], ["color"]])
def test_grouped_path_with_families_absent(ops):
    """`apply_ops_grouped` with one family only, none at all, or a single image equals the fused path."""
    x = _tensor(_images(len(ops) + 3, 16, 16)[: len(ops)])
    op = torch.tensor([A.OP_NAMES.index(name) for name in ops])
    magnitude = A.op_magnitude(op, torch.full_like(op, 6), torch.zeros_like(op, dtype=torch.bool), (16, 16))
    grouped = A.apply_ops_grouped(x, op, magnitude)
    assert torch.equal(grouped, A.apply_ops(x, op, magnitude))
    assert ops[0] != "identity" or torch.equal(grouped, x)


def test_strong_augment_shapes_dtypes_and_input_checks():
    """Views come back as (B, 3, H, W) uint8, also at STL-10's 96 px; float input and a too-wide pad fail."""
    generator = torch.Generator().manual_seed(0)
    for size in [(32, 32), (96, 96), (24, 40)]:
        x = _tensor(_images(5, *size))
        for out in (A.strong_augment(x, generator), A.weak_augment(x, generator)):
            assert out.shape == x.shape and out.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        A.strong_augment(torch.zeros(2, 3, 32, 32), generator)
    with pytest.raises(ValueError, match="pad=40"):
        A.weak_augment(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), generator, pad=40)


# ------------------------------------------------------------------------------------------------------------
# Randomness: per image, reproducible, only from the given generator


def test_choices_are_drawn_per_image_and_uniformly():
    """14,000 images x 2 slots: each op is chosen 2000 +- 250 times (binomial sd ~ 43); about half the slots
    apply; levels cover exactly 1..9; signs are balanced; every slot uses every op across the batch."""
    params = A.draw_rand_augment(14_000, torch.Generator().manual_seed(1), num_ops=2)
    counts = torch.bincount(params.op.flatten(), minlength=len(A.OP_NAMES))
    assert ((counts - 2000).abs() < 250).all(), counts.tolist()
    assert abs(params.apply.float().mean().item() - 0.5) < 0.01
    assert abs(params.negate.float().mean().item() - 0.5) < 0.01
    assert params.level.unique().tolist() == list(range(1, 10))
    assert all(len(slot.unique()) == len(A.OP_NAMES) for slot in params.op)


def test_identical_images_get_different_strong_views():
    """64 copies of one image in one batch: nearly all strong views differ from each other. One RandAugment
    slot alone leaves exactly the images that skipped it (or drew Identity) unchanged and changes nearly all
    others (a few draws are no-ops here, e.g. TranslateX level 1 = int(0.96) = 0 px), into many distinct
    views."""
    x = _tensor(np.repeat(_images(1, 32, 32)[:1], 64, axis=0))
    out = A.strong_augment(x, torch.Generator().manual_seed(0))
    assert len({bytes(view.numpy()) for view in out}) >= 60
    params = A.draw_rand_augment(64, torch.Generator().manual_seed(0), num_ops=1)
    ra = A.apply_rand_augment(x, params)
    acted = params.apply[0] & (params.op[0] != A.OP_NAMES.index("identity"))
    assert torch.equal(ra[~acted], x[~acted])
    assert (ra[acted] != x[acted]).flatten(1).any(dim=1).float().mean() > 0.85
    assert len({bytes(view.numpy()) for view in ra[acted]}) >= 0.7 * int(acted.sum())


def test_same_seed_or_restored_state_reproduces_the_views():
    """Same seed -> same views; restoring a generator's saved state mid-run -> the same next views (a resumed
    run continues identically); another seed -> other views. The global torch and numpy RNGs stay
    untouched."""
    x = _tensor(_images(13, 32, 32))
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    a = A.strong_augment(x, torch.Generator().manual_seed(5))
    b = A.strong_augment(x, torch.Generator().manual_seed(5))
    c = A.strong_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)

    generator = torch.Generator().manual_seed(9)
    A.strong_augment(x, generator)
    saved = generator.get_state()
    first = (A.weak_augment(x, generator), A.strong_augment(x, generator))
    generator.set_state(saved)
    second = (A.weak_augment(x, generator), A.strong_augment(x, generator))
    assert all(torch.equal(p, q) for p, q in zip(first, second, strict=True))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)


def test_pil_strong_is_reproducible_and_keeps_the_image_size():
    """The PIL path draws only from its numpy generator: same seed, same views; sizes are kept."""
    images = _images(3, 32, 32)
    views = [
        [np.asarray(P.pil_strong(Image.fromarray(im), rng)) for im in images]
        for rng in (np.random.default_rng(2), np.random.default_rng(2))
    ]
    assert all(np.array_equal(p, q) and p.shape == (32, 32, 3) for p, q in zip(*views, strict=True))


# ------------------------------------------------------------------------------------------------------------
# To the model's input


def test_normalize_by_hand():
    """mean 0.5, std 0.25 on every channel: 0 -> (0 - 0.5) / 0.25 = -2; 255 -> (1 - 0.5) / 0.25 = 2;
    51 -> (0.2 - 0.5) / 0.25 = -1.2."""
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3)
    out = A.normalize(x, [0.5] * 3, [0.25] * 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0, :, 0], torch.tensor([[-2.0, 2.0, -1.2]] * 3))


@pytest.mark.parametrize(("source", "target", "tolerance"), [(96, 32, 0), (32, 16, 0), (40, 32, 2)])
def test_resize_matches_pil_bilinear(source, target, tolerance):
    """uint8 resize against PIL's BILINEAR: identical for integer reduction factors (96 -> 32 is STL-10's),
    at most 2 gray levels off for 40 -> 32, where PIL's fixed-point filter weights round unlike float32."""
    images = _images(5, source, source)
    out = A.resize(_tensor(images), target)
    assert out.shape == (len(images), 3, target, target) and out.dtype == torch.uint8
    reference = _pil_each(images, lambda i, img: img.resize((target, target), Image.Resampling.BILINEAR))
    assert np.abs(_array(out).astype(int) - reference).max() <= tolerance


def test_resize_keeps_float_and_constant_images():
    """A constant float image stays that constant at any size (the filter weights sum to 1)."""
    out = A.resize(torch.full((2, 3, 96, 96), 0.25), (32, 48))
    assert out.dtype == torch.float32 and out.shape == (2, 3, 32, 48)
    torch.testing.assert_close(out, torch.full_like(out, 0.25))


# ------------------------------------------------------------------------------------------------------------
# On a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_views_equal_cpu_views_without_host_syncs():
    """The same drawn choices give the same pixels on CUDA as on the CPU; and once the op tables are on the
    device, a whole strong view runs without a host-device synchronisation (sync debug mode raises on one)."""
    x = _tensor(_images(61, 32, 32))
    params = A.draw_strong(len(x), (32, 32), torch.Generator().manual_seed(4))
    ops = params.ops
    on_gpu = A.StrongParams(
        A.WeakParams(params.weak.flip.cuda(), params.weak.offset.cuda(), params.weak.pad),
        A.RandAugmentParams(ops.op.cuda(), ops.apply.cuda(), ops.level.cuda(), ops.negate.cuda()),
        params.centers.cuda(),
        params.cutout_size,
    )
    assert torch.equal(A.apply_strong(x.cuda(), on_gpu).cpu(), A.apply_strong(x, params))
    generator, x = torch.Generator(device="cuda").manual_seed(0), x.cuda()
    A.strong_augment(x, generator)  # the first call copies the op tables to the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        A.strong_augment(x, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")
