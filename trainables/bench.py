"""Throughput benchmarks, measured side by side in one process (not timed tests).

    python -m trainables.bench [--suite augment,step,reference,packing] [--device auto|cpu|cuda] [--out DIR]
                               [--preset fixmatch_daso] [--depth 28 --widen 2] [--batch-size 64 --mu 2]
                               [--n1 500 --m1 1000]
                               [--steps 30] [--variants fp32,bf16,bf16+cl,bf16+cl+compile] [--workers 4]
                               [--pack 1,2,4 --pack-variant bf16+cl]

Suites (each prints its figures; `--out` also writes them all to DIR/bench.json):
  augment    the strong view of B * mu images: the batched path on the device (and, on the CPU, the fixed-shape
             path the GPU runs) against the per-image PIL path of the reference code, in rounds that alternate
             the paths; medians of images/s and of the per-round ratio.
  step       the real training step (`Run.train_step`: gather, augmentation, the DASO queue, one forward and
             backward over [x_lb, x_ulb_w, x_ulb_s], SGD, EMA, method hooks) per precision / memory-format /
             compile variant: it/s, images/s (B (1 + 2 mu) per step), peak memory, and TFLOP/s (FLOPs of one
             eager step counted by torch's FlopCounterMode) against the chip's dense bf16 peak where known.
  reference  the same step fed as the reference code feeds it: per-image PIL augmentation in DataLoader worker
             processes, normalised on the host and copied to the device each step; fp32, eager, a per-tensor
             Python EMA, and each step's losses read back to the host (`.item()`) for the running meters. The
             ratio to the fastest `step` variant is the speedup over a reference-style pipeline.
  packing    P training processes sharing the device (each capped at 1/P of the GPU's memory), started
             together: aggregate it/s against one process alone, and each process's peak memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trainables.augment import apply_strong, draw_strong
from trainables.augment_pil import pil_strong, pil_weak
from trainables.config import RunConfig, load_config
from trainables.data import build_data
from trainables.evaluate import Window
from trainables.loop import Run, resolve_runtime

SUITES = ("augment", "step", "reference", "packing")
VARIANTS = {
    "fp32": ["train.precision=fp32", "train.channels_last=false", "train.compile=false"],
    "bf16": ["train.precision=bf16", "train.channels_last=false", "train.compile=false"],
    "bf16+cl": ["train.precision=bf16", "train.channels_last=true", "train.compile=false"],
    "bf16+cl+compile": ["train.precision=bf16", "train.channels_last=true", "train.compile=true"],
}
# dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, matched on the device name
BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0, "L4": 121.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS.items() if key in name), None)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The CUDA caching allocator's peak reservation; on the CPU, the process's peak resident set so far (Linux's
    VmHWM, which starts afresh in a spawned process, unlike ru_maxrss, which execve keeps)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed_rate(fn: Callable[[], int], device: torch.device, seconds: float) -> float:
    """Units per second of `fn` (which returns the units it did), called until `seconds` have passed."""
    sync(device)
    done, t0 = 0, time.perf_counter()
    while True:
        done += fn()
        sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return done / elapsed


# ------------------------------------------------------------------------------------------------------------
# augment


def bench_augment(device: torch.device, batch: int, rounds: int, seconds: float) -> dict:
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    g = torch.Generator(device=device).manual_seed(0)
    pil_images = [Image.fromarray(image) for image in images]
    py_rng = np.random.default_rng(1)

    def batched(grouped: bool | None) -> Callable[[], int]:
        def run() -> int:
            with torch.no_grad():
                apply_strong(x, draw_strong(batch, (32, 32), g), grouped)
            return batch

        return run

    def per_image() -> int:
        for img in pil_images:
            np.asarray(pil_strong(img, py_rng))
        return batch

    paths = {"batched": batched(None), "pil": per_image}
    if device.type == "cpu":
        paths["batched_fixed_shape"] = batched(False)  # the GPU's path, for the record
    for fn in paths.values():
        fn()  # warm-up: kernel selection, the op tables on the device, the allocator
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            rates[name].append(timed_rate(fn, device, seconds))
    ratios = [b / p for b, p in zip(rates["batched"], rates["pil"], strict=True)]
    out = {f"{name}_img_s": statistics.median(r) for name, r in rates.items()}
    out.update(ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios), rounds=rounds)
    return out


# ------------------------------------------------------------------------------------------------------------
# step


def build_run(base: list[str], extra: list[str]) -> Run:
    cfg = load_config(None, base + extra)
    return Run(cfg, build_data(cfg.data), resolve_runtime(cfg))


def images_per_step(cfg: RunConfig) -> int:
    return cfg.train.batch_size * (1 + 2 * cfg.train.mu)


def step_flops(run: Run) -> int:
    """FLOPs of one eager training step (forward, backward, the EMA queue forward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    forward = run.forward
    run.forward = run._features_and_logits  # count the eager graph even when the run compiles
    try:
        with FlopCounterMode(display=False) as counter:
            run.train_step(Window())
    finally:
        run.forward = forward
    return counter.get_total_flops()


def bench_step(run: Run, steps: int, warmup: int) -> dict:
    device = run.rt.device
    run.model.train()
    for _ in range(warmup):
        run.train_step(Window())
    sync(device)
    reset_peak(device)
    window = Window()
    t0 = time.perf_counter()
    for _ in range(steps):
        run.train_step(window)
    sync(device)
    it_s = steps / (time.perf_counter() - t0)
    window.summarise(None, run.data.num_classes, run.groups)  # the device-side sums read once, as at evaluation
    return {"it_s": it_s, "img_s": it_s * images_per_step(run.cfg), "peak_gib": peak_memory_gib(device)}


# ------------------------------------------------------------------------------------------------------------
# reference


class _ViewsDataset(torch.utils.data.Dataset):
    """Per-image PIL views normalised on the host, as the reference code's dataset `__getitem__` makes them."""

    def __init__(self, images: np.ndarray, mean, std, strong: bool, seed: int):
        self.images, self.strong, self.seed = images, strong, seed
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.rng: np.random.Generator | None = None

    def __len__(self) -> int:
        return len(self.images)

    def _tensor(self, img) -> torch.Tensor:  # ToTensor + Normalize
        chw = np.asarray(img, np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((chw - self.mean) / self.std)

    def __getitem__(self, i: int):
        from PIL import Image

        if self.rng is None:  # one generator per worker process
            info = torch.utils.data.get_worker_info()
            self.rng = np.random.default_rng([self.seed, info.id if info else 0])
        img = Image.fromarray(self.images[i])
        weak = self._tensor(pil_weak(img, self.rng))
        if not self.strong:
            return weak, i
        return weak, self._tensor(pil_strong(img, self.rng)), i


def _loader(dataset, batch: int, workers: int, device: torch.device, seed: int):
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=10**8, generator=torch.Generator().manual_seed(seed)
    )
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=batch,
            sampler=sampler,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=workers > 0,
        )
    )


class _MeterWindow(Window):
    """Each step's losses read back to the host, as the reference's running meters do (`loss.item()`)."""

    def add(self, losses, idx_ulb, pseudo_label, mask, diag) -> None:
        for value in (*losses.values(), mask.float().mean()):
            value.item()
        super().add(losses, idx_ulb, pseudo_label, mask, diag)


def _python_ema(run: Run) -> None:
    """The reference's EMA update: a Python loop over the state dict, one small kernel pair per tensor."""
    ema, model, decay = run.ema, run.model, run.cfg.train.ema_decay

    @torch.no_grad()
    def update(_model) -> float:
        d = min(1.0 - 1.0 / (ema.updates + 1), decay)
        src = model.state_dict()
        for name, value in ema.module.state_dict().items():
            if value.is_floating_point():
                value.copy_(value * d + (1.0 - d) * src[name])
            else:
                value.copy_(src[name])
        ema.updates += 1
        return d

    ema.update = update


def bench_reference(base: list[str], steps: int, warmup: int, workers: int) -> dict:
    run = build_run(base, VARIANTS["fp32"] + ["data.resident=host"])
    cfg, data, device = run.cfg, run.data, run.rt.device
    t = cfg.train
    _python_ema(run)
    lb = _loader(_ViewsDataset(data.labeled.images, data.mean, data.std, False, 0), t.batch_size, workers, device, 0)
    ulb_ds = _ViewsDataset(data.unlabeled_images, data.mean, data.std, True, 1)
    ulb = _loader(ulb_ds, t.batch_size * t.mu, workers, device, 1)
    y_all = torch.as_tensor(data.labeled.labels, dtype=torch.int64)

    def one_step(window: Window) -> None:
        x_lb, i_lb = next(lb)
        x_w, x_s, i_ulb = next(ulb)
        run.learn(x_lb.to(device), y_all[i_lb].to(device), x_w.to(device), x_s.to(device), i_ulb, window)

    run.model.train()
    for _ in range(warmup):
        one_step(_MeterWindow())
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step(_MeterWindow())
    sync(device)
    it_s = steps / (time.perf_counter() - t0)
    return {"it_s": it_s, "img_s": it_s * images_per_step(cfg), "peak_gib": peak_memory_gib(device), "workers": workers}


# ------------------------------------------------------------------------------------------------------------
# packing


def _packed_worker(rank: int, n: int, base: list[str], seconds: float, warmup: int, barrier, results) -> None:
    run = build_run(base, [])
    device = run.rt.device
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0 / n, device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // n))
    run.model.train()
    for _ in range(warmup):
        run.train_step(Window())
    sync(device)
    reset_peak(device)
    barrier.wait()
    window = Window()

    def step() -> int:
        run.train_step(window)
        return 1

    it_s = timed_rate(step, device, seconds)
    results.put((rank, it_s, peak_memory_gib(device)))


def bench_packing(base: list[str], counts: list[int], seconds: float, warmup: int) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out: dict[str, dict] = {}
    for n in counts:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_packed_worker, args=(rank, n, base, seconds, warmup, barrier, results))
            for rank in range(n)
        ]
        for p in procs:
            p.start()
        rows = [results.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode:
                raise RuntimeError(f"packing: a process of {n} exited with {p.exitcode}")
        per = [it for _, it, _ in rows]
        out[str(n)] = {"aggregate_it_s": sum(per), "per_process_it_s": per, "peak_gib": max(m for *_, m in rows)}
    first = out[str(counts[0])]["aggregate_it_s"]
    for row in out.values():
        row["vs_first"] = row["aggregate_it_s"] / first
    return out


# ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m trainables.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="augment,step,reference", help=f"comma-separated subset of {list(SUITES)}")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, help="write every figure to OUT/bench.json")
    ap.add_argument("--preset", default="fixmatch_daso")
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--widen", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--mu", type=int, default=2)
    ap.add_argument("--n1", type=int, default=500, help="labeled images of the head class (synthetic data)")
    ap.add_argument("--m1", type=int, default=1000, help="unlabeled images of the head class")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per step variant and for the reference")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    ap.add_argument("--aug-rounds", type=int, default=5)
    ap.add_argument("--aug-seconds", type=float, default=1.0, help="seconds per path and round")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="reference DataLoader workers")
    ap.add_argument("--pack", default="1,2,4", help="process counts for the packing suite; the first is the base")
    ap.add_argument("--pack-seconds", type=float, default=20.0)
    ap.add_argument("--pack-variant", default="bf16+cl", choices=list(VARIANTS), help="what each packed process runs")
    args = ap.parse_args(argv)
    suites = args.suite.split(",")
    for name in suites:
        if name not in SUITES:
            ap.error(f"--suite: unknown {name!r}; valid: {', '.join(SUITES)}")
    variants = args.variants.split(",")
    for name in variants:
        if name not in VARIANTS:
            ap.error(f"--variants: unknown {name!r}; valid: {', '.join(VARIANTS)}")
    pack = [int(n) for n in args.pack.split(",")]

    base = [
        f"train.device={args.device}",
        f"model.depth={args.depth}",
        f"model.widen={args.widen}",
        f"train.batch_size={args.batch_size}",
        f"train.mu={args.mu}",
        f"method.preset={args.preset}",
        "data.dataset=synthetic",
        f"data.n1={args.n1}",
        f"data.m1={args.m1}",
        f"data.synthetic.pool_per_class={args.n1 + args.m1 + 200}",
        "data.synthetic.test_per_class=10",
        "data.resident=auto",
    ]
    if "daso" in args.preset:
        base.append("method.daso.warmup=0")  # the semantic pseudo-label and the alignment loss from step 0
    device = resolve_runtime(load_config(None, base)).device
    report: dict = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m trainables.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"model": f"WRN-{args.depth}-{args.widen}", "batch_size": args.batch_size, "mu": args.mu,
                   "preset": args.preset, "images_per_step": args.batch_size * (1 + 2 * args.mu)},
    }  # fmt: skip
    print(f"device: {report['device']}; torch {torch.__version__}", flush=True)

    if "augment" in suites:
        batch = args.batch_size * args.mu
        a = report["augment"] = bench_augment(device, batch, args.aug_rounds, args.aug_seconds)
        extra = f" | fixed-shape path {a['batched_fixed_shape_img_s']:,.0f} img/s" if device.type == "cpu" else ""
        print(
            f"strong augmentation, {batch} images of 32x32: batched on {device.type} {a['batched_img_s']:,.0f} img/s"
            f" | per-image PIL {a['pil_img_s']:,.0f} img/s | ratio {a['ratio']:.1f}x (rounds: {a['ratio_min']:.1f}x"
            f" to {a['ratio_max']:.1f}x){extra}",
            flush=True,
        )

    if "step" in suites:
        peak = bf16_peak(device)
        report["step"] = {}
        print(f"training step: WRN-{args.depth}-{args.widen}, B={args.batch_size}, mu={args.mu}, {args.preset}")
        for key in variants:
            run = build_run(base, VARIANTS[key])
            flops = step_flops(run)
            r = report["step"][key] = bench_step(run, args.steps, args.warmup)
            r["gflop_per_step"] = flops / 1e9
            r["tflop_s"] = flops * r["it_s"] / 1e12
            r["of_bf16_peak"] = r["tflop_s"] / peak if peak else None
            share = f" ({r['of_bf16_peak']:.1%} of {peak:g} bf16 peak)" if peak else ""
            print(
                f"  {key:<16} {r['it_s']:8.2f} it/s {r['img_s']:10,.0f} img/s  {r['tflop_s']:7.2f} TFLOP/s{share}"
                f"  peak {r['peak_gib']:.2f} GiB",
                flush=True,
            )
            del run

    if "reference" in suites:
        r = report["reference"] = bench_reference(base, args.steps, args.warmup, args.workers)
        line = f"reference-style pipeline ({r['workers']} PIL workers, fp32, eager): {r['it_s']:.2f} it/s"
        if report.get("step"):
            best_key = max(report["step"], key=lambda k: report["step"][k]["it_s"])
            r["speedup"] = report["step"][best_key]["it_s"] / r["it_s"]
            r["speedup_of"] = best_key
            line += f" | ours ({best_key}) {r['speedup']:.2f}x"
        print(line + f"  peak {r['peak_gib']:.2f} GiB", flush=True)

    if "packing" in suites:
        variant = args.pack_variant
        report["packing"] = bench_packing(base + VARIANTS[variant], pack, args.pack_seconds, args.warmup)
        print(f"packing ({variant}), processes sharing one {device.type} device:")
        for n, row in report["packing"].items():
            print(
                f"  {n} process(es): {row['aggregate_it_s']:8.2f} it/s aggregate ({row['vs_first']:.2f}x of"
                f" {pack[0]}), peak {row['peak_gib']:.2f} GiB per process",
                flush=True,
            )

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
