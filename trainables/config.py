"""The run configuration: one validated, frozen object per training run.

Parsed once at the edge (`load_config`), passed down, never written to. Values only known at run time
(class counts, the resolved device) live in the loop's state, not here. Every choice between variants is a
`Literal` whose values are the keys of the matching registry, so a typo in YAML fails validation with the list of
valid names.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


DatasetName = Literal["synthetic", "cifar10", "cifar100", "stl10", "imagefolder"]
DATASET_CLASSES = {"cifar10": 10, "cifar100": 100, "stl10": 10}  # synthetic: its config; imagefolder: its lists
TRAIN_PER_CLASS = {"cifar10": 5000, "cifar100": 500, "stl10": 500}  # labeled train images per class in the files
DEFAULT_VAL_SIZE = {"cifar10": 5000, "cifar100": 5000, "stl10": 500}  # the reference's validation carve-outs
ArchName = Literal["wrn", "resnet18", "resnet34", "resnet50"]
PresetName = Literal[
    "fixmatch",
    "fixmatch_la",
    "fixmatch_daso",
    "fixmatch_drw",
    "fixmatch_la_daso",
    "fixmatch_la_drw",
    "fixmatch_daso_drw",
    "supervised",
    "supervised_la",
    "fixmatch_darp",
    "fixmatch_la_darp",
    "fixmatch_abc",
    "fixmatch_abc_daso",
    "fixmatch_crest",
    "fixmatch_crest_plus",
    "fixmatch_acr",
]
PseudoLabelName = Literal["none", "daso", "dist_align"]
LabeledLossName = Literal["none", "class_balanced", "logit_adjustment"]
UnlabeledWeightName = Literal["none", "drw"]
ExtensionName = Literal["none", "darp", "abc", "crest", "acr"]

# preset -> (pseudo-label transform, labeled-loss weighting, unlabeled-loss weighting, extension)
PRESETS: dict[str, tuple[PseudoLabelName, LabeledLossName, UnlabeledWeightName, ExtensionName]] = {
    "fixmatch": ("none", "none", "none", "none"),
    "fixmatch_la": ("none", "logit_adjustment", "none", "none"),
    "fixmatch_daso": ("daso", "none", "none", "none"),
    "fixmatch_drw": ("none", "class_balanced", "drw", "none"),
    "fixmatch_la_daso": ("daso", "logit_adjustment", "none", "none"),
    "fixmatch_la_drw": ("none", "logit_adjustment", "drw", "none"),
    "fixmatch_daso_drw": ("daso", "class_balanced", "drw", "none"),
    "supervised": ("none", "none", "none", "none"),
    "supervised_la": ("none", "logit_adjustment", "none", "none"),
    "fixmatch_darp": ("none", "none", "none", "darp"),
    "fixmatch_la_darp": ("none", "logit_adjustment", "none", "darp"),
    "fixmatch_abc": ("none", "none", "none", "abc"),
    "fixmatch_abc_daso": ("daso", "none", "none", "abc"),
    "fixmatch_crest": ("none", "none", "none", "crest"),
    "fixmatch_crest_plus": ("dist_align", "none", "none", "crest"),
    "fixmatch_acr": ("none", "none", "none", "acr"),
}
#: presets trained on the labeled set alone (the papers' first rows): no unlabeled forward, no pseudo-labels, and
#: evaluated on the trained model itself, as the DASO reference's `Supervised` algorithm evaluates (no EMA)
LABELED_ONLY = frozenset({"supervised", "supervised_la"})


class SyntheticConfig(Frozen):
    """The deterministic synthetic long-tailed image set (see trainables/data/synthetic.py)."""

    num_classes: int = Field(10, ge=2, le=200)
    image_size: int = Field(32, ge=16, le=96)
    pool_per_class: int = Field(
        5000, ge=10, description="train images generated per class before the carve-out (CIFAR: 5000)"
    )
    test_per_class: int = Field(1000, ge=1, description="balanced test images per class (CIFAR: 1000)")
    # difficulty knobs; the defaults render the original set bit for bit
    contrast: float = Field(
        1.0, gt=0, le=1.8, description="scales the object-to-background contrast (0.2-0.55 at 1.0); higher is easier"
    )
    noise: float = Field(1.0, ge=0, le=5, description="scales the pixel noise std (0.02-0.08 at 1.0); 0 = none")
    faint_fill: float = Field(
        0.15,
        ge=0,
        le=1,
        description="weakest fill texture, as a fraction of full strength (fills are drawn in [faint_fill, 1]); "
        "near 0 some striped (tail) images look solid (their head partners): how much tail resembles head",
    )


class ImageFolderConfig(Frozen):
    """Users' own data in the Semi-Aves layout: list files of `relative/path.jpg label` lines under `root`."""

    root: str
    labeled_list: str
    unlabeled_lists: list[str] = Field(min_length=1, description="in-class and out-of-class unlabeled lists")
    val_list: str
    test_list: str
    image_size: int = Field(224, ge=16, le=512)


def balanced_per_class(total: int, num_classes: int, what: str = "val_size") -> int:
    """`total` images spread evenly over C classes; a total that does not divide is refused, not rounded."""
    if total % num_classes != 0:
        raise ValueError(
            f"{what}={total} is not a multiple of the {num_classes} classes; the carve-out is "
            f"class-balanced, e.g. {what}={(total // num_classes) * num_classes or num_classes}"
        )
    return total // num_classes


class AugmentConfig(Frozen):
    """Sizes of the weak and strong views, in pixels of the stored image (before any resize to the model's size)."""

    crop_pad: int | Literal["auto"] = Field(
        "auto", description="reflect padding of the weak view's random crop; auto: side / 8 (4 px at 32 px)"
    )
    cutout: int | Literal["auto"] = Field(
        "auto",
        description="side of the strong view's Cutout square; auto: 16 px on STL-10 (at 96 px, as the "
        "reference), else half the side (16 px at 32 px)",
    )

    def pad_px(self, side: int) -> int:
        return self.crop_pad if isinstance(self.crop_pad, int) else max(1, round(side / 8))

    def cutout_px(self, side: int, dataset: str) -> int:
        if isinstance(self.cutout, int):
            return self.cutout
        return 16 if dataset == "stl10" else side // 2

    @model_validator(mode="after")
    def _check(self) -> AugmentConfig:
        for name in ("crop_pad", "cutout"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name}={value} must be >= 0 or 'auto'")
        return self


class DataConfig(Frozen):
    dataset: DatasetName = "synthetic"
    root: str = "data"
    download: bool = True
    n1: int = Field(1500, ge=1, description="labeled images of the most frequent class")
    m1: int = Field(3000, ge=0, description="unlabeled images of the most frequent (unlabeled) class")
    gamma_l: float = Field(100.0, ge=1.0, description="labeled imbalance ratio N1 / N_C")
    gamma_u: float | Literal["reversed"] | None = Field(
        None, description="unlabeled imbalance ratio: a number >= 1 (1 = uniform), 'reversed', or null = gamma_l"
    )
    val_size: int | None = Field(
        None, ge=1, description="class-balanced validation carve-out; null = dataset default (CIFAR 5000, STL-10 500)"
    )
    seed: int = Field(0, ge=0, description="data seed: the split is a pure function of it")
    resident: Literal["auto", "device", "host"] = Field(
        "auto", description="keep the uint8 training set on the training device (auto: yes on CUDA)"
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    imagefolder: ImageFolderConfig | None = None
    augment: AugmentConfig = AugmentConfig()

    @property
    def num_classes(self) -> int | None:
        """Classes of the data set, known before loading it (None for an image folder: its list files decide)."""
        if self.dataset == "synthetic":
            return self.synthetic.num_classes
        return DATASET_CLASSES.get(self.dataset)

    @property
    def val_per_class(self) -> int | None:
        """Validation images per class: `val_size` spread over the classes, else the data set's default carve-out
        (10 % of the synthetic pool; CIFAR 5000, STL-10 500 in all). None for an image folder (its own list)."""
        classes = self.num_classes
        if classes is None:
            return None
        if self.val_size is not None:
            return balanced_per_class(self.val_size, classes)
        if self.dataset == "synthetic":
            return self.synthetic.pool_per_class // 10
        return DEFAULT_VAL_SIZE[self.dataset] // classes

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if isinstance(self.gamma_u, float) and self.gamma_u < 1.0:
            raise ValueError(
                f"gamma_u={self.gamma_u} is below 1; use a number >= 1 (1 = uniform) or 'reversed' for the "
                "reversed profile"
            )
        if self.dataset == "imagefolder" and self.imagefolder is None:
            raise ValueError("dataset 'imagefolder' needs an 'imagefolder' section (root, list files)")
        if self.dataset != "imagefolder" and self.imagefolder is not None:
            raise ValueError(f"the 'imagefolder' section belongs to dataset 'imagefolder', not {self.dataset!r}")
        self._check_pool()
        return self

    def _check_pool(self) -> None:
        """The split must fit the per-class pool of train images: val + n1 (+ m1 where the unlabeled images come
        from the same pool), known before any file is read."""
        val = self.val_per_class
        if val is None:
            return  # an image folder's lists decide
        if self.dataset == "synthetic":
            pool, what = self.synthetic.pool_per_class, "synthetic.pool_per_class"
        else:
            pool, what = TRAIN_PER_CLASS[self.dataset], f"{self.dataset}'s train images per class"
        m1 = 0 if self.dataset == "stl10" else self.m1  # STL-10's unlabeled images are a split of their own
        if val + self.n1 + m1 > pool:
            raise ValueError(
                f"val ({val} per class) + n1 ({self.n1})"
                + (f" + m1 ({m1})" if m1 else "")
                + f" = {val + self.n1 + m1} images per class, more than {what} ({pool}); lower n1"
                + (", m1" if m1 else "")
                + " or val_size"
            )

    @property
    def gamma_u_resolved(self) -> float | Literal["reversed"]:
        return self.gamma_l if self.gamma_u is None else self.gamma_u


class ModelConfig(Frozen):
    arch: ArchName = "wrn"
    depth: int = Field(28, ge=10, description="WRN depth; (depth - 4) must be divisible by 6")
    widen: int = Field(2, ge=1, description="WRN widening factor (2: WRN-28-2, 8: WRN-28-8)")
    bn_momentum: float = Field(0.001, gt=0, le=1, description="FixMatch's BatchNorm momentum")
    leaky_slope: float = Field(0.1, ge=0)
    pretrained: bool = Field(False, description="torchvision ImageNet weights for resnet archs (needs network)")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.arch == "wrn" and (self.depth - 4) % 6 != 0:
            raise ValueError(f"depth={self.depth}: WRN depth must satisfy (depth - 4) % 6 == 0, e.g. 10, 16, 22, 28")
        return self


class OptimConfig(Frozen):
    lr: float = Field(0.03, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    weight_decay_on: Literal["weights", "all"] = Field(
        "weights", description="weights: conv and linear weights only (FixMatch); all: every parameter (DASO reference)"
    )
    schedule: Literal["constant", "cosine", "multistep"] = Field(
        "constant",
        description="constant (DASO reference), FixMatch's lr * cos(7 pi k / (16 K)), or multistep: lr * gamma^(number "
        "of milestones passed) after a linear warm-up (the DASO reference's supervised baselines)",
    )
    cosine_fraction: float = Field(7 / 16, gt=0, le=0.5, description="the 7/16 of FixMatch's cosine")
    milestones: list[float] = Field(
        [0.8, 0.9], description="multistep: fractions of train.iterations at which the lr is multiplied by gamma"
    )
    gamma: float = Field(0.01, gt=0, le=1, description="multistep: the factor at each milestone")
    warmup: float = Field(
        0.0, ge=0, lt=1, description="multistep: fraction of train.iterations of linear warm-up from lr 0"
    )

    @field_validator("milestones")
    @classmethod
    def _milestones(cls, value: list[float]) -> list[float]:
        if any(not 0 < m <= 1 for m in value) or value != sorted(value):
            raise ValueError(f"{value}: milestones are increasing fractions of train.iterations in (0, 1]")
        return value


class TrainConfig(Frozen):
    iterations: int = Field(250_000, ge=1)
    batch_size: int = Field(64, ge=1, description="labeled batch B")
    mu: int = Field(2, ge=1, description="unlabeled batch = mu * B")
    tau: float = Field(0.95, gt=0, le=1, description="confidence threshold")
    lambda_u: float = Field(1.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    eval_every: int = Field(500, ge=1)
    checkpoint_every: int | None = Field(None, ge=1, description="null = every evaluation")
    eval_batch_size: int = Field(512, ge=1)
    seed: int = Field(0, description="training seed (init, data order, augmentation)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA")
    channels_last: bool | None = Field(None, description="null: on for CUDA")
    compile: bool = False
    deterministic: bool = Field(False, description="torch deterministic algorithms (slower)")


class DasoConfig(Frozen):
    t_proto: float = Field(0.05, gt=0, description="temperature of the semantic pseudo-label")
    t_dist: float | Literal["auto"] = Field(
        "auto", description="blending temperature; auto: 1.5 if CIFAR-10-like and gamma_l == gamma_u, else 0.3"
    )
    lambda_align: float = Field(1.0, ge=0)
    queue_len: int = Field(256, ge=1, description="per-class feature queue length L")
    window: int = Field(100, ge=1, description="iterations per pseudo-label histogram window")
    warmup: int = Field(5000, ge=0, description="iterations with the linear pseudo-label only, no alignment loss")
    const_v: float | None = Field(None, ge=0, le=1, description="ablation: a constant blending weight v")
    ema_bn: Literal["train", "batch", "eval"] = Field(
        "batch",
        description="BatchNorm of the EMA encoder's labeled forward that fills the queue: batch statistics "
        "(batch; the reference's output), batch statistics that also move the EMA's running statistics (train; "
        "the reference's side effect, which changes only the evaluated EMA model, and DRw's ema_pass counts: "
        "measured +0.5 +- 1.2 bACC, BENCHMARKS.md), or the running statistics (eval)",
    )

    @model_validator(mode="after")
    def _check(self) -> DasoConfig:
        if isinstance(self.t_dist, float) and self.t_dist <= 0:
            raise ValueError(f"t_dist={self.t_dist} must be > 0 or 'auto'")
        return self


class DrwConfig(Frozen):
    beta: float = Field(
        0.999,
        ge=0,
        lt=1,
        description="effective-number beta of the labeled weights, and of the unlabeled ones "
        "unless beta_u is set; 0 = no re-weighting",
    )
    beta_u: float | None = Field(None, ge=0, lt=1, description="beta of the unlabeled weights; null = beta")
    start: int | float = Field(
        2 / 3,
        ge=0,
        description="when the dynamic unlabeled weights switch on: an iteration (integer) or a fraction of "
        "train.iterations (a number with a point, in [0, 1]); the paper's 2/3 by default",
    )
    count: Literal["window", "ema_pass"] = Field(
        "window",
        description="pseudo numbers from the last batches' pseudo-labels (a window), or an EMA-model pass over "
        "the unlabeled set",
    )
    window: int | Literal["auto"] = Field(
        "auto", description="batches in the counting window (count=window); auto: |U| / (mu B), one pass over U"
    )
    pass_every: int = Field(500, ge=1, description="iterations between EMA passes over the unlabeled set")
    confident_only: bool = Field(
        False, description="count only confident pseudo-labels (the paper counts every unlabeled sample's)"
    )

    @field_validator("start")
    @classmethod
    def _start(cls, value: int | float) -> int | float:
        if isinstance(value, float) and value > 1:
            raise ValueError(
                f"{value} with a point is a fraction of train.iterations and must be in [0, 1]; give an iteration "
                "as an integer"
            )
        return value

    @field_validator("window")
    @classmethod
    def _window(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"{value} batches: the window must hold at least 1, or be 'auto'")
        return value

    def start_step(self, iterations: int) -> int:
        """The iteration at which the dynamic weights switch on."""
        return round(self.start * iterations) if isinstance(self.start, float) else self.start

    def window_batches(self, unlabeled_size: int, unlabeled_batch: int) -> int:
        """Batches in the counting window: `window`, or (auto) enough to hold |U| predictions."""
        return self.window if isinstance(self.window, int) else max(1, math.ceil(unlabeled_size / unlabeled_batch))


class LaConfig(Frozen):
    tau: float = Field(1.0, ge=0, description="train-time logit adjustment strength tau_la")


class DarpConfig(Frozen):
    """DARP (Kim et al., NeurIPS 2020): the pseudo-labels of the whole unlabeled set are refined to match a target
    class distribution; defaults are the paper's and the DASO reference's."""

    warmup: float = Field(0.4, ge=0, le=1, description="share of train.iterations before the refined labels are used")
    every: int = Field(10, ge=1, description="iterations between refinements")
    alpha: float = Field(2.0, gt=0, description="per class k, the alpha N_k most confident samples set its scale")
    solver_iters: int = Field(10, ge=1, description="alternating scaling rounds of the refinement solver")
    target: Literal["auto", "labeled", "estimate"] | list[float] = Field(
        "auto",
        description="target distribution over the unlabeled set: the labeled class proportions (labeled), a "
        "black-box shift estimate from the EMA model's confusion on the validation split at the warm-up's end "
        "(estimate), per-class proportions (a list), or auto: labeled when gamma_u equals gamma_l, else (and on "
        "STL-10 and image folders, whose unlabeled distribution is unknown) estimate",
    )

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | list[float]) -> str | list[float]:
        if isinstance(value, list) and (not value or min(value) < 0 or sum(value) <= 0):
            raise ValueError(f"{value}: a target distribution lists one non-negative share per class, not all 0")
        return value


class AbcConfig(Frozen):
    """ABC (Lee et al., NeurIPS 2021): an auxiliary balanced classifier on the shared encoder, trained under
    Bernoulli masks that keep class k with probability N_C / N_k, and evaluated in place of the main classifier."""

    weight: float = Field(1.0, ge=0, description="weight of the auxiliary classifier's loss")
    tau: float | None = Field(None, gt=0, le=1, description="its confidence threshold; null = train.tau")
    stairs: int = Field(
        500,
        ge=1,
        description="the unlabeled keep rate falls from 1 to N_C / N_k in this many equal stairs over training "
        "(the reference's 500 evaluation periods)",
    )


class CrestConfig(Frozen):
    """CReST (Wei et al., CVPR 2021): self-training generations; at each one's end the EMA model's most confident
    predictions on U join the labeled set, class k at rate (N_{C+1-k} / N_1)^(1 / alpha), and training restarts
    from a fresh model on the grown set. A generation is train.iterations / generations iterations."""

    generations: int = Field(5, ge=1, description="self-training generations (the reference: 5 of 50,000 iterations)")
    alpha: float = Field(3.0, gt=0, description="selection-rate exponent: class k keeps (N_{C+1-k} / N_1)^(1/alpha)")


class DaConfig(Frozen):
    """CReST+'s progressive distribution alignment: the weak-view distribution is rescaled toward the labeled
    distribution raised to t, t falling linearly from 1 in the first generation to t_min in the last."""

    t_min: float = Field(0.5, gt=0, le=1, description="the alignment temperature of the last generation")
    queue: int = Field(128, ge=1, description="batches whose mean prediction is the running model distribution")


class AcrConfig(Frozen):
    """ACR (Wei and Gan, CVPR 2023): a balanced head with logit adjustment, consistency on two strong views, and a
    pseudo-label adjustment tau_1 that adapts to the estimated unlabeled distribution; the reference's defaults."""

    tau1: float = Field(2.0, ge=0, description="tau_max of the adaptive pseudo-label adjustment (its start value)")
    tau12: float = Field(2.0, ge=0, description="adjustment of the balanced head's consistency targets")
    tau2: float = Field(2.0, ge=0, description="logit adjustment of the balanced head's labeled loss")
    ema_u: float = Field(0.99, ge=0, lt=1, description="EMA rate of the unlabeled distribution estimate")
    epoch: int = Field(500, ge=1, description="iterations per epoch: tau_1 is updated at each epoch's start")
    est_epoch: int = Field(5, ge=0, description="epochs before the estimate starts")


class MethodConfig(Frozen):
    preset: PresetName = "fixmatch"
    daso: DasoConfig | None = None
    drw: DrwConfig | None = None
    la: LaConfig | None = None
    darp: DarpConfig | None = None
    abc: AbcConfig | None = None
    crest: CrestConfig | None = None
    da: DaConfig | None = None
    acr: AcrConfig | None = None
    posthoc_la_tau: float = Field(1.0, ge=0, description="tau of the post-hoc LA reported as val/top1_la")

    @model_validator(mode="before")
    @classmethod
    def _fill_blocks(cls, data: Any) -> Any:
        """Give the preset's own blocks their defaults; refuse blocks that belong to another method."""
        if not isinstance(data, dict):
            return data
        preset = data.get("preset", "fixmatch")
        if preset not in PRESETS:
            return data  # the Literal check reports it with the valid names
        out = dict(data)
        for block in METHOD_BLOCKS:
            used = preset_uses(preset, block)
            if used and out.get(block) is None:
                out[block] = {}
            elif not used and out.get(block) is not None:
                owners = [p for p in PRESETS if preset_uses(p, block)]
                raise ValueError(
                    f"'{block}' parameters do not belong to preset {preset!r}; presets that use them: "
                    + ", ".join(owners)
                )
        return out

    @property
    def components(self) -> tuple[PseudoLabelName, LabeledLossName, UnlabeledWeightName, ExtensionName]:
        return PRESETS[self.preset]

    @property
    def labeled_only(self) -> bool:
        return self.preset in LABELED_ONLY


METHOD_BLOCKS = ("daso", "drw", "la", "darp", "abc", "crest", "da", "acr")  # MethodConfig's parameter blocks


def preset_uses(preset: str, block: str) -> bool:
    """Whether `preset` has the parameter block `block` (one of METHOD_BLOCKS): DASO's, DRw's beta (class-balanced
    labeled weights or dynamic unlabeled weights), logit adjustment's, DARP's, ABC's, CReST's, its distribution
    alignment's or ACR's."""
    pseudo, labeled, unlabeled, extension = PRESETS[preset]
    return {
        "daso": pseudo == "daso",
        "drw": labeled == "class_balanced" or unlabeled == "drw",
        "la": labeled == "logit_adjustment",
        "darp": extension == "darp",
        "abc": extension == "abc",
        "crest": extension == "crest",
        "da": pseudo == "dist_align",
        "acr": extension == "acr",
    }[block]


class RunConfig(Frozen):
    name: str = "run"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    method: MethodConfig = MethodConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.data.dataset == "imagefolder" and self.model.arch == "wrn" and self.data.imagefolder.image_size > 96:
            raise ValueError("model.arch 'wrn' is for 32-96 px images; use resnet18/34/50 for image-folder data")
        darp, classes = self.method.darp, self.data.num_classes
        if darp is not None and isinstance(darp.target, list) and classes is not None and len(darp.target) != classes:
            raise ValueError(f"method.darp.target lists {len(darp.target)} shares; the data set has {classes} classes")
        crest = self.method.crest
        if crest is not None and self.train.iterations % crest.generations:
            raise ValueError(
                f"train.iterations ({self.train.iterations}) must be a multiple of method.crest.generations "
                f"({crest.generations}): every generation runs the same number of iterations"
            )
        return self


# --------------------------------------------------------------------------------------------------------------
# Loading, overrides and readable errors


class ConfigError(Exception):
    """A configuration problem, already phrased for the user (file, field, value, what is valid)."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["train.iterations=100", "method.preset=fixmatch_daso"]` -> nested dict; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected key=value, e.g. train.iterations=1000")
        value = parse_yaml_strict(raw, f"--set {pair!r}") if raw.strip() else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair!r}: {part!r} is set both as a value and as a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


MAX_YAML_BYTES = 1 << 20  # a configuration or space file is a few kB
MAX_YAML_NODES = 100_000  # nodes after expanding aliases: a "billion laughs" file stops here, not in RAM


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping that repeats a key (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges a mapping whose keys the explicit ones may override
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first + 1})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_nodes(node: yaml.Node, sizes: dict[int, int], open_: set[int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (aliases share their anchor's node)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise yaml.YAMLError("an alias refers to a node that contains it (a recursive structure)")
    open_.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_nodes(child, sizes, open_) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_nodes(k, sizes, open_) + _expanded_nodes(v, sizes, open_) for k, v in node.value)
    else:
        size = 1
    open_.discard(id(node))
    sizes[id(node)] = size
    return size


def parse_yaml_strict(text: str, source: str) -> Any:
    """YAML text -> data, with duplicate keys refused and alias expansion bounded; ConfigError naming `source`."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, set()) > MAX_YAML_NODES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_YAML_NODES:,} YAML nodes through its aliases (&anchor / *alias); "
                "a configuration needs far fewer"
            )
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A configuration file: UTF-8 text of at most 1 MiB, YAML without repeated keys, a mapping at the top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a configuration file is at most {MAX_YAML_BYTES:,} bytes")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); save it as UTF-8"
        ) from None
    raw = parse_yaml_strict(text, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    raw = deep_merge(raw, parse_overrides(overrides or []))
    return validate(RunConfig, raw, source=str(path) if path else "<defaults>")


def validate(model: type[BaseModel], raw: dict[str, Any], source: str) -> Any:
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    """One line per problem: `source: field.path: message (got value); valid: ...`."""
    lines = [f"{source}: {err.error_count()} invalid field(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not _is_union_tag(p)) or "<top level>"
        msg = e["msg"].removeprefix("Value error, ")
        line = f"  {loc}: {msg}"
        if e["type"] != "missing" and "input" in e and not isinstance(e["input"], dict):
            line += f" (got {e['input']!r})"
        if e["type"] == "extra_forbidden":
            known = _fields_at(model, e["loc"][:-1])
            if known:
                line += "; valid fields here: " + ", ".join(known)
        lines.append(line)
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    # pydantic names the union member it tried (e.g. 'float', "literal['reversed']") inside the loc
    return isinstance(part, str) and (part in {"float", "int", "str", "bool", "none"} or part.startswith("literal["))


def _fields_at(model: type[BaseModel], loc: tuple) -> list[str]:
    current: Any = model
    for part in loc:
        if _is_union_tag(part) or isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        current = model_in(fields[part].annotation)
        if current is None:
            return []
    return sorted(getattr(current, "model_fields", {}))


def model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside a field annotation (`X`, `X | None`, ...), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = model_in(arg)
        if found is not None:
            return found
    return None
