"""The FixMatch training loop (Sohn et al., NeurIPS 2020) with pluggable method components.

`train(cfg, out_dir, report)` takes a validated `RunConfig` and a `report` callback and returns the final metrics.
It knows nothing of Ray, Optuna or MLflow. Methods (DASO, DRw, logit adjustment, DARP, ABC) enter only through the
four components of `trainables.methods.base.Method`; the loop never asks which method runs.

One step: the EMA encoder's features of the labeled weak views when the method asks for them (DASO's queue, filled
before its prototypes are read, as in the reference), a single forward over [x_lb, x_ulb_w, x_ulb_s] (so BatchNorm
sees all three) and through the extension's heads, the pseudo-label from the weak view (then the extension's
refinement), L = L_s + lambda_u * L_u (+ the methods' extra losses), SGD with Nesterov, EMA update, then the method
observes the step's pseudo-labels. Evaluation uses the EMA model (its extension head, if the method names one). A
labeled-only method (the supervised baselines) takes the labeled batch alone and is evaluated on the trained model
itself. Everything that affects the result is checkpointed as one unit and restored on resume.
"""

from __future__ import annotations

import bisect
import json
import math
import random
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainables import checkpoint
from trainables.augment import normalize, resize, strong_augment, weak_augment
from trainables.batches import GrownStore, ImageStore, IndexStream
from trainables.config import OptimConfig, RunConfig
from trainables.data import build_data, describe_counts, split_counts
from trainables.data.base import SSLData, image_side
from trainables.ema import ModelEMA
from trainables.evaluate import Window, predict_logits, split_metrics
from trainables.losses import fixmatch_mask, unlabeled_ce
from trainables.methods import build_method
from trainables.methods.base import Method, MethodContext, StepView
from trainables.methods.la import log_prior
from trainables.metrics import EvalHistory, class_groups, confusion_matrix, per_class, per_class_table
from trainables.models import build_model

Report = Callable[[dict[str, float], Path | None], None]
CHECKPOINT_DIR = "checkpoint"
# 2: DASO enqueues before reading prototypes, DRw counts every pseudo-label over one pass of U, augmentation sizes
# follow the image; a format-1 checkpoint would resume under other rules with the same-looking configuration
CHECKPOINT_FORMAT = 2
METRICS_FILE = "metrics.jsonl"


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """The learning rate of step k = `step` (0-based) of K = `total`:
    - constant: lr;
    - cosine (FixMatch): lr * cos(7 pi k / (16 K));
    - multistep (the DASO reference's WarmupMultiStepLR, stepped once per iteration): lr * w(k) * gamma^n, with n
      the milestones int(m K) <= k and the linear warm-up w(k) = k / W below W = int(warmup K), else 1.
    """
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        return cfg.lr * math.cos(math.pi * cfg.cosine_fraction * step / total)
    warmup_steps = int(cfg.warmup * total)
    factor = step / warmup_steps if step < warmup_steps else 1.0
    passed = bisect.bisect_right([int(m * total) for m in cfg.milestones], step)
    return cfg.lr * factor * cfg.gamma**passed


@dataclass
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def resolve_runtime(cfg: RunConfig) -> Runtime:
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    device = torch.device("cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu")
    on_cuda = device.type == "cuda"
    bf16 = t.precision == "bf16" or (t.precision == "auto" and on_cuda)
    channels_last = on_cuda if t.channels_last is None else t.channels_last
    return Runtime(device, torch.bfloat16 if bf16 else None, channels_last)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


class Run:
    """Everything one training run holds. Built from (config, data); its `state_dict` is the checkpoint."""

    def __init__(self, cfg: RunConfig, data: SSLData, rt: Runtime):
        self.cfg, self.data, self.rt = cfg, data, rt
        t = cfg.train
        seed_everything(t.seed, t.deterministic)
        resident = cfg.data.resident == "device" or (cfg.data.resident == "auto" and rt.device.type == "cuda")
        self.lb_store = ImageStore(data.labeled.images, rt.device, resident)
        self.ulb_store = ImageStore(data.unlabeled_images, rt.device, resident)
        self.val_store = ImageStore(data.val.images, rt.device, resident)
        self.test_store = ImageStore(data.test.images, rt.device, resident)
        self.y_lb = torch.as_tensor(data.labeled.labels, dtype=torch.int64, device=rt.device)
        self.lb_stream = IndexStream(len(self.lb_store), t.batch_size, t.seed, stream=0)
        self.ulb_stream = IndexStream(len(self.ulb_store), t.batch_size * t.mu, t.seed, stream=1)
        self.aug_gen = torch.Generator(device=rt.device).manual_seed(t.seed)
        self.mean = torch.tensor(data.mean, device=rt.device).view(1, 3, 1, 1)
        self.std = torch.tensor(data.std, device=rt.device).view(1, 3, 1, 1)

        self.model = build_model(cfg.model, data.num_classes)
        counts = data.labeled_counts
        self.method: Method = build_method(
            cfg.method,
            MethodContext(
                num_classes=data.num_classes,
                labeled_counts=torch.as_tensor(counts, dtype=torch.int64),
                feature_dim=self.model.feature_dim,
                device=rt.device,
                dataset=cfg.data.dataset,
                gamma_l=cfg.data.gamma_l,
                gamma_u=cfg.data.gamma_u_resolved,
                iterations=t.iterations,
                unlabeled_size=len(self.ulb_store),
                unlabeled_batch=t.batch_size * t.mu,
                seed=t.seed,
                tau=t.tau,
            ),
        )
        self.heads = self.method.extension.heads
        self._start_training(self.model)
        # self-training generations (CReST): equal parts of training, each with its own schedule
        self.generation_length = t.iterations // self.method.extension.generations
        self.base_lb_store, self.base_y_lb = self.lb_store, self.y_lb
        self.forward = self._features_and_logits
        if t.compile:
            self.forward = torch.compile(self._features_and_logits)
        self.groups = class_groups(counts)
        self.log_prior = log_prior(torch.as_tensor(counts))
        side = image_side(data.labeled.images)
        self.crop_pad = cfg.data.augment.pad_px(side)
        self.cutout_px = cfg.data.augment.cutout_px(side, cfg.data.dataset)
        daso_cfg = cfg.method.daso
        self.ema_bn = daso_cfg.ema_bn if daso_cfg is not None else "batch"
        self.history = EvalHistory()
        self.step = 0  # iterations completed

    def _start_training(self, model: torch.nn.Module) -> None:
        """`model` (freshly built) becomes the trained model, with its EMA copy and a new optimiser. The
        extension's heads (ABC's classifier) join it: optimised, EMA-averaged and saved with it."""
        t, o = self.cfg.train, self.cfg.optim
        if self.heads:
            model.heads = torch.nn.ModuleDict(self.heads)
        self.model = model.to(self.rt.device)
        if self.rt.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = ModelEMA(self.model, t.ema_decay)
        decay, no_decay = [], []
        for p in self.model.parameters():
            # FixMatch: no weight decay on BN and biases; the DASO reference decays every parameter
            (no_decay if p.ndim <= 1 and o.weight_decay_on == "weights" else decay).append(p)
        self.optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=o.lr,
            momentum=o.momentum,
            nesterov=o.nesterov,
        )
        # the EMA copy's BatchNorm layers, found once (the training step toggles them for DASO's queue forward)
        self.ema_norms = [m for m in self.ema.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def _new_generation(self) -> None:
        """CReST: the evaluated EMA model predicts U, the extension picks the samples that join the original labeled
        set, and training restarts from a fresh model on the grown set."""
        probs = predict_logits(self.eval_logits, self.ulb_store, self.prep, self.cfg.train.eval_batch_size).softmax(1)
        self._use_labeled(*self.method.extension.new_generation(probs))
        self._start_training(build_model(self.cfg.model, self.data.num_classes))

    def _use_labeled(self, picks: Tensor, labels: Tensor) -> None:
        """The labeled set: the original one plus the unlabeled images `picks` with labels `labels`."""
        if len(picks) == 0:
            self.lb_store, self.y_lb = self.base_lb_store, self.base_y_lb
            self.lb_stream = IndexStream(len(self.lb_store), self.cfg.train.batch_size, self.cfg.train.seed, stream=0)
            return
        self.lb_store = GrownStore(self.base_lb_store, self.ulb_store, picks)
        self.y_lb = torch.cat([self.base_y_lb, labels.to(self.rt.device)])
        self.lb_stream = IndexStream(len(self.lb_store), self.cfg.train.batch_size, self.cfg.train.seed, stream=2)

    def lr_at(self, step: int) -> float:
        """Step `step`'s learning rate: the schedule runs over each generation (the whole run when there is one)."""
        return lr_at(step % self.generation_length, self.generation_length, self.cfg.optim)

    # ---- one step -------------------------------------------------------------------------------------------
    def _features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.model.encode(x)
        return feats, self.model.classifier(feats)

    def prep(self, x_u8: Tensor) -> Tensor:
        """uint8 (b, 3, H, W) -> normalised float at the model's input size and memory format."""
        x = normalize(x_u8, self.mean, self.std)
        if self.data.model_size is not None and x.shape[-1] != self.data.model_size:
            x = resize(x, self.data.model_size)
        return x.contiguous(memory_format=torch.channels_last) if self.rt.channels_last else x

    def train_step(self, window: Window) -> None:
        step, t, method = self.step, self.cfg.train, self.method
        if step > 0 and step % self.generation_length == 0:
            self._new_generation()
        weighting_pass, extension_pass = method.unlabeled_weighting.wants_pass(step), method.extension.wants_pass(step)
        if weighting_pass or extension_pass:  # one EMA pass over U serves both
            probs_ulb = predict_logits(self.ema_logits, self.ulb_store, self.prep, t.eval_batch_size).softmax(1)
        if weighting_pass:
            mask, pseudo_label = fixmatch_mask(probs_ulb, t.tau)
            method.unlabeled_weighting.observe_pass(pseudo_label.to(self.rt.device), mask.to(self.rt.device), step)
        if extension_pass:
            probs_val = predict_logits(self.ema_logits, self.val_store, self.prep, t.eval_batch_size).softmax(1)
            y_val = torch.as_tensor(self.data.val.labels, dtype=torch.int64)
            method.extension.observe_pass(probs_ulb, probs_val, y_val, step)

        if method.labeled_only:
            self.learn_labeled(window)
            return
        idx_lb, idx_ulb = self.lb_stream.indices(step), self.ulb_stream.indices(step)
        x_lb_u8, x_ulb_u8 = self.lb_store.gather(idx_lb), self.ulb_store.gather(idx_ulb)
        y_lb = self.y_lb[idx_lb.to(self.rt.device, non_blocking=True)]  # no stream sync
        x_lb = self.prep(weak_augment(x_lb_u8, self.aug_gen, self.crop_pad))
        x_ulb_w = self.prep(weak_augment(x_ulb_u8, self.aug_gen, self.crop_pad))
        views = [
            self.prep(strong_augment(x_ulb_u8, self.aug_gen, cutout=self.cutout_px, pad=self.crop_pad))
            for _ in range(method.extension.strong_views)
        ]
        self.learn(x_lb, y_lb, x_ulb_w, views[0] if len(views) == 1 else torch.cat(views), idx_ulb, window)

    def learn(self, x_lb: Tensor, y_lb: Tensor, x_ulb_w: Tensor, x_ulb_s: Tensor, idx_ulb: Tensor, window: Window):
        """The step's learning on prepared views (normalised float, on the device): the DASO queue, one forward,
        the losses, SGD, EMA, the method's observations. `train_step` feeds it; so does the benchmark's
        reference-style pipeline, whose views come from a DataLoader. x_ulb_s holds the extension's strong views
        of the U samples one after the other (one view but for ACR)."""
        step, t, method = self.step, self.cfg.train, self.method
        b, u, s = len(x_lb), len(x_ulb_w), len(x_ulb_s)

        if method.pseudo_label.needs_ema_labeled_features:
            # the reference's order: the labeled batch enters the queue (EMA encoder of the previous step)
            # before this step's prototypes are read
            method.pseudo_label.enqueue(self.ema_labeled_features(x_lb), y_lb)

        with self.rt.autocast():
            feats, logits = self.forward(torch.cat([x_lb, x_ulb_w, x_ulb_s]))
            head_logits = {name: head(feats).float() for name, head in self.heads.items()}
        feats, logits = feats.float(), logits.float()
        logits_x_lb, logits_x_ulb_w, logits_x_ulb_s = logits.split([b, u, s])
        _, feat_ulb_w, feat_ulb_s = feats.split([b, u, s])
        logits_x_ulb_s, feat_ulb_s = logits_x_ulb_s[:u], feat_ulb_s[:u]  # FixMatch's terms use the first view

        probs_w = logits_x_ulb_w.detach().softmax(dim=1)
        pl = method.pseudo_label(probs_w, feat_ulb_w.detach(), feat_ulb_s, step)
        with torch.no_grad():
            probs = method.extension.refine(pl.probs, idx_ulb, step)
        ext = method.extension.loss(StepView(feats, head_logits, y_lb, b, pl, step, logits))
        if ext.unlabeled is None:
            mask, pseudo_label = fixmatch_mask(probs, t.tau)
            weights = method.unlabeled_weighting.class_weights(step)
            loss_u = unlabeled_ce(logits_x_ulb_s, pseudo_label, mask, weights)
            weighted_u = t.lambda_u * loss_u
        else:  # the extension's own consistency term (ACR), weighted as the extension says (lambda_u is FixMatch's)
            loss_u, pseudo_label, mask = ext.unlabeled
            weighted_u = loss_u
        loss_x = method.labeled_loss(logits_x_lb, y_lb)
        loss = loss_x + weighted_u + pl.loss + ext.loss

        self._sgd_step(loss)

        method.pseudo_label.observe(pseudo_label, step)
        method.unlabeled_weighting.observe(pseudo_label, mask, step)
        losses = {"loss": loss, "loss_x": loss_x, "loss_u": loss_u, **pl.logs, **ext.logs}
        window.add(losses, idx_ulb, pseudo_label, mask, {**pl.diagnostics, **ext.diagnostics})
        self.step += 1

    def learn_labeled(self, window: Window) -> None:
        """A labeled-only step (supervised baselines): the weak labeled view, the labeled loss, SGD, EMA."""
        idx_lb = self.lb_stream.indices(self.step)
        y_lb = self.y_lb[idx_lb.to(self.rt.device, non_blocking=True)]  # no stream sync
        x_lb = self.prep(weak_augment(self.lb_store.gather(idx_lb), self.aug_gen, self.crop_pad))
        with self.rt.autocast():
            _, logits = self.forward(x_lb)
        loss = self.method.labeled_loss(logits.float(), y_lb)
        self._sgd_step(loss)
        window.add_losses({"loss": loss, "loss_x": loss})
        self.step += 1

    def _sgd_step(self, loss: Tensor) -> None:
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update(self.model)

    @torch.no_grad()
    def ema_labeled_features(self, x_lb: Tensor) -> Tensor:
        """The EMA encoder's features (B, D) of the weak labeled views, its BatchNorm as `daso.ema_bn` says.

        "batch" and "train" normalise with the batch's statistics, as the reference's train-mode EMA model
        does; "train" also lets the forward move the EMA's running statistics (the reference's side effect,
        then averaged toward the online model's by the EMA update), "batch" leaves them untouched. "eval" uses
        the running statistics.
        """
        ema = self.ema.module
        if self.ema_bn == "eval":
            with self.rt.autocast():
                return ema.encode(x_lb).float()
        norms = self.ema_norms
        tracking = [m.track_running_stats for m in norms]
        try:
            ema.train()
            if self.ema_bn == "batch":
                for m in norms:  # batch statistics, running statistics neither read nor written
                    m.track_running_stats = False
            with self.rt.autocast():
                return ema.encode(x_lb).float()
        finally:
            for m, flag in zip(norms, tracking, strict=True):
                m.track_running_stats = flag
            ema.eval()

    # ---- evaluation -----------------------------------------------------------------------------------------
    def ema_logits(self, x: Tensor) -> Tensor:
        with self.rt.autocast():
            return self.ema.module(x)

    def eval_logits(self, x: Tensor) -> Tensor:
        """The evaluated model's logits: the EMA model's, or (labeled-only methods) the trained model's in eval
        mode, as the reference evaluates its supervised baselines."""
        head = self.method.extension.eval_head
        if head is not None:  # the method's own head (ABC's balanced classifier) on the EMA encoder
            ema = self.ema.module
            with self.rt.autocast():
                return ema.heads[head](ema.encode(x))
        if not self.method.labeled_only:
            return self.ema_logits(x)
        training = self.model.training
        self.model.eval()
        try:
            with self.rt.autocast():
                return self.model(x)
        finally:
            self.model.train(training)

    def evaluate(self) -> tuple[dict[str, float], dict[str, Tensor]]:
        logits = {}
        out: dict[str, float] = {}
        C, tau = self.data.num_classes, self.cfg.method.posthoc_la_tau
        for prefix, store, labels in (
            ("val", self.val_store, self.data.val.labels),
            ("test", self.test_store, self.data.test.labels),
        ):
            if len(store) == 0:
                continue
            logits[prefix] = predict_logits(self.eval_logits, store, self.prep, self.cfg.train.eval_batch_size)
            out.update(split_metrics(prefix, logits[prefix], labels, C, self.groups, self.log_prior, tau))
        out.update(self.history.update(out))
        return out, logits

    # ---- checkpoint -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.model_dump(mode="json"),
            "step": self.step,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "history": self.history.state_dict(),
            "aug_generator": self.aug_gen.get_state(),
            "rng": checkpoint.capture_rng(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format", 1) != CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint format {state.get('format', 1)}, this code writes format {CHECKPOINT_FORMAT}: it was "
                "written before DASO's queue order, DRw's pseudo numbers and the augmentation sizes followed the "
                "papers (issue 9), and would resume under other rules; start a new run"
            )
        saved = RunConfig.model_validate(state["config"])
        if saved != self.cfg:
            diff = _config_diff(saved.model_dump(mode="json"), self.cfg.model_dump(mode="json"))
            raise ValueError(f"checkpoint was written by a different configuration: {diff}")
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.method.load_state_dict(state["method"])
        self._use_labeled(*self.method.extension.additions())
        self.history.load_state_dict(state["history"])
        self.aug_gen.set_state(state["aug_generator"])
        checkpoint.restore_rng(state["rng"])


def _config_diff(a: dict, b: dict, path: str = "") -> str:
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            sub = _config_diff(va, vb, f"{path}{key}.")
            if sub:
                diffs.append(sub)
        elif va != vb:
            diffs.append(f"{path}{key}: {va!r} (checkpoint) vs {vb!r} (now)")
    return "; ".join(diffs)


def _write_artifacts(run: Run, out_dir: Path, metrics: dict[str, float], logits: dict[str, Tensor]) -> None:
    art = out_dir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    C, names = run.data.num_classes, run.data.class_names or [str(c) for c in range(run.data.num_classes)]
    for prefix, labels in (("val", run.data.val.labels), ("test", run.data.test.labels)):
        if prefix not in logits:
            continue
        rows = per_class_table(metrics, prefix, C, names)
        with open(art / f"per_class_{prefix}.csv", "w") as f:
            f.write(",".join(rows[0].keys()) + "\n")
            f.writelines(",".join(str(v) for v in row.values()) + "\n" for row in rows)
        cm = confusion_matrix(labels, logits[prefix].argmax(1).numpy(), C)
        np.savetxt(art / f"confusion_{prefix}.csv", cm, fmt="%d", delimiter=",")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop evaluations after the checkpoint we resume from: they will be recomputed."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


class Progress:
    """A line every few seconds on stderr: step, it/s, ETA, latest metrics. Reads the device only when printing."""

    def __init__(self, total: int, enabled: bool, every_s: float = 5.0):
        self.total, self.enabled, self.every_s = total, enabled, every_s
        self.t0, self.step0, self.last_print = time.monotonic(), 0, 0.0
        self.latest = ""

    def start(self, step: int) -> None:
        self.t0, self.step0 = time.monotonic(), step

    def tick(self, step: int, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last_print < self.every_s):
            return
        self.last_print = now
        rate = (step - self.step0) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        eta_s = f"{eta / 60:.1f} min" if math.isfinite(eta) else "?"
        print(f"step {step}/{self.total} | {rate:.1f} it/s | ETA {eta_s} {self.latest}", file=sys.stderr, flush=True)


def train(
    cfg: RunConfig,
    out_dir: str | Path,
    report: Report | None = None,
    resume: bool = False,
    progress: bool = True,
    data: SSLData | None = None,
) -> dict[str, float]:
    """Train to cfg.train.iterations; return the last evaluation's metrics.

    Writes out_dir/metrics.jsonl (one object per evaluation, with "step"), out_dir/checkpoint/state.pt (at every
    checkpoint_every-th iteration that is an evaluation, and at the end) and out_dir/artifacts/. After each
    evaluation calls report(metrics, checkpoint_dir or None). With resume=True it continues from the checkpoint in
    out_dir, if there is one. `data` lets a caller pass prebuilt data (tests, sweeps sharing one split).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    rt = resolve_runtime(cfg)
    data = data if data is not None else build_data(cfg.data)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1))
    counts = {split: None if c is None else c.tolist() for split, c in split_counts(data).items()}
    (out_dir / "counts.json").write_text(json.dumps(counts))
    if progress:
        print(describe_counts(data), file=sys.stderr)

    run = Run(cfg, data, rt)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    metrics_path = out_dir / METRICS_FILE
    if resume and (state := checkpoint.load(ckpt_dir)) is not None:
        run.load_state_dict(state)
        _truncate_metrics(metrics_path, run.step)
        if progress:
            print(f"resumed from {ckpt_dir} at step {run.step}", file=sys.stderr)
    elif metrics_path.exists():
        metrics_path.unlink()

    ckpt_every = t.checkpoint_every or t.eval_every
    bar = Progress(t.iterations, progress)
    bar.start(run.step)
    window, window_t0 = Window(), time.monotonic()
    metrics: dict[str, float] = {}
    logits: dict[str, Tensor] = {}
    while run.step < t.iterations:
        run.model.train()
        run.train_step(window)
        bar.tick(run.step)
        if run.step % t.eval_every and run.step != t.iterations:
            continue
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.monotonic() - window_t0
        metrics = {"step": run.step, **window.summarise(data.unlabeled_truth, data.num_classes, run.groups)}
        metrics["train/lr"] = run.lr_at(run.step - 1)
        metrics["train/it_per_s"] = window.steps / max(elapsed, 1e-9)
        check_finite(run, metrics)  # before anything is written: no poisoned checkpoint, no NaN curves
        eval_metrics, logits = run.evaluate()
        metrics.update(eval_metrics)
        for prefix, values in run.method.metrics().items():
            metrics.update(per_class(prefix, values))
        with open(metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        saved = None
        if run.step % ckpt_every == 0 or run.step == t.iterations:
            saved = ckpt_dir
            checkpoint.save_atomic(run.state_dict(), ckpt_dir)
        bar.latest = _headline(metrics)
        bar.tick(run.step, force=True)
        if report is not None:
            report(metrics, saved)
        window, window_t0 = Window(), time.monotonic()
    if not metrics:  # resumed from the final checkpoint: nothing left to run
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        return json.loads(lines[-1]) if lines else {}
    _write_artifacts(run, out_dir, metrics, logits)
    return metrics


class NonFiniteError(RuntimeError):
    """Training diverged (a non-finite loss or weight): retrying from the last checkpoint would diverge again."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"training diverged at step {step}: {reason}")
        self.step = step


def check_finite(run: Run, metrics: dict[str, float]) -> None:
    """Raise NonFiniteError when the evaluation window's losses or the model's weights are not finite."""
    bad = [k for k, v in metrics.items() if k.startswith("train/loss") and not math.isfinite(v)]
    if bad:
        raise NonFiniteError(run.step, ", ".join(f"{k} = {metrics[k]}" for k in bad))
    params = [p for p in run.model.parameters() if p.is_floating_point()]
    if params and not bool(torch.stack([p.detach().isfinite().all() for p in params]).all()):
        raise NonFiniteError(run.step, "the model's weights hold non-finite values")


def _headline(m: dict[str, float]) -> str:
    keys = ("train/loss", "train/mask_ratio", "val/top1", "val/balanced_acc", "val/recall_tail")
    return "| " + " ".join(f"{k.split('/', 1)[1]} {m[k]:.3f}" for k in keys if k in m)
