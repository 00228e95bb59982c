"""Throughput benchmark, measured side by side in one process (not a timed test).

    python -m trainables.bench [--device auto|cpu|cuda] [--depth 28 --widen 2] [--batch-size 64 --mu 2]
                               [--steps 50] [--preset fixmatch] [--variants fp32,bf16,bf16+cl,bf16+cl+compile]

1. Strong augmentation: the batched per-image RandAugment on the device against the per-image PIL path of the
   reference code (one image at a time, as its DataLoader workers do per worker), in images/s and their ratio.
2. Training steps of the real loop (`Run.train_step`: gather, augment, one forward/backward over
   [x_lb, x_ulb_w, x_ulb_s], SGD, EMA, method hooks) per precision / memory-format / compile variant: it/s and
   images/s (B * (1 + 2 mu) images per step).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from trainables.augment import strong_augment
from trainables.augment_pil import pil_strong
from trainables.config import load_config
from trainables.data import build_data
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime

VARIANTS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false", "train.compile=false"],
    "bf16": ["train.precision=bf16", "train.channels_last=false", "train.compile=false"],
    "bf16+cl": ["train.precision=bf16", "train.channels_last=true", "train.compile=false"],
    "bf16+cl+compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_augment(device: torch.device, batch: int, repeats: int, pil_images: int) -> dict[str, float]:
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    strong_augment(x, g)  # warm-up (kernel selection, allocator)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        strong_augment(x, g)
    sync(device)
    batched = batch * repeats / (time.perf_counter() - t0)

    pil = [Image.fromarray(images[i % batch]) for i in range(pil_images)]
    py_rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for img in pil:
        np.asarray(pil_strong(img, py_rng))
    per_image = pil_images / (time.perf_counter() - t0)
    return {"batched_img_s": batched, "pil_img_s": per_image, "ratio": batched / per_image}


def bench_steps(base: list[str], variant: list[str], steps: int, warmup: int) -> dict[str, float]:
    cfg = load_config(None, base + variant)
    run = Run(cfg, build_data(cfg.data), resolve_runtime(cfg))
    window = Window()
    for _ in range(warmup):
        run.train_step(window)
    sync(run.rt.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        run.train_step(Window())
    sync(run.rt.device)
    it_s = steps / (time.perf_counter() - t0)
    t = cfg.train
    return {"it_s": it_s, "img_s": it_s * t.batch_size * (1 + 2 * t.mu)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m trainables.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--widen", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--preset", default="fixmatch")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--aug-repeats", type=int, default=20)
    ap.add_argument("--pil-images", type=int, default=1000)
    args = ap.parse_args(argv)

    base = [
        f"train.device={args.device}",
        f"model.depth={args.depth}",
        f"model.widen={args.widen}",
        f"train.batch_size={args.batch_size}",
        f"train.mu={args.mu}",
        f"method.preset={args.preset}",
        "data.dataset=synthetic",
        "data.n1=500",
        "data.m1=1000",
        "data.synthetic.pool_per_class=1700",
        "data.synthetic.test_per_class=10",
        "data.resident=device",
    ]
    device = resolve_runtime(load_config(None, base)).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}")

    a = bench_augment(device, args.batch_size * args.mu, args.aug_repeats, args.pil_images)
    print(f"strong augmentation, {args.batch_size * args.mu} images of 32x32 per batch:")
    print(
        f"  batched on {device.type}: {a['batched_img_s']:,.0f} img/s | per-image PIL: {a['pil_img_s']:,.0f} img/s"
        f" | ratio {a['ratio']:.1f}x"
    )

    print(f"training steps: WRN-{args.depth}-{args.widen}, B={args.batch_size}, mu={args.mu}, preset={args.preset}")
    results = {}
    for key in args.variants.split(","):
        if key not in VARIANTS:
            raise SystemExit(f"--variants: unknown {key!r}; valid: {', '.join(VARIANTS)}")
        results[key] = r = bench_steps(base, VARIANTS[key], args.steps, args.warmup)
        rel = r["it_s"] / next(iter(results.values()))["it_s"]
        print(f"  {key:<17} {r['it_s']:8.2f} it/s  {r['img_s']:10,.0f} img/s  ({rel:.2f}x of first)")


if __name__ == "__main__":
    main()
