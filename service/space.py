"""The search-space file: the YAML a researcher writes to start a sweep, as one frozen pydantic model.

Sections: `experiment` (a name), `base` (a trial configuration; checked against `trainables.config.RunConfig` for
every preset of the sweep by `service.plan`), `space` (searched parameters keyed by dotted paths into the run
configuration, e.g. `method.drw.beta`), `search`, `resources`, `tracking`, `storage`. This module checks what can be
checked from the file alone; checks against the run configuration live in `service.plan`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.secrets import redact
from service.storage import SCHEMES
from trainables.config import PresetName, RunConfig

Mode = Literal["max", "min"]
SamplerName = Literal["tpe", "gp", "nsga2", "random", "grid"]
Scalar = str | int | float | bool | None
INNER = 0.3819660112501051  # where inside an interval the inner checked value lies (1 - 1/golden ratio)
CHECKED_INT_VALUES = 1000
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")

#: metric names follow trainables/metrics.py: `val/balanced_acc`, `val/recall_tail`, `val/recall/c03`, ...
METRIC_NAME = re.compile(r"^val/[A-Za-z0-9_]+(/[A-Za-z0-9_]+)*$")
EXPERIMENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # it names a directory and an Optuna study


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Param(Protocol):
    """What the sampler and the checks ask of a parameter, whatever its distribution."""

    type: str
    presets: list[str] | None  # restrict the parameter to trials of these presets
    paths: list[str] | None  # configuration fields the value goes to; None: the parameter's name is the one field

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw the value with an Optuna trial (define-by-run); returns the configuration value."""

    def checked_values(self) -> list[Any]:
        """Configuration values checked before a sweep starts, each of which must give a valid trial: the ends of a
        range, an inner value of an interval (so a float interval on an integer field is caught), every value of an
        integer range (up to CHECKED_INT_VALUES of them, evenly spread) or of a categorical."""

    def grid_values(self) -> list[Any] | None:
        """All values when the parameter is discrete, for the grid sampler; None when it is continuous."""

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        """Optuna's own parameters for a trial that takes configuration value `value` (`search.enqueue`); raises
        ValueError when the value is outside the distribution."""


class _Param(Frozen):
    """The fields every parameter has."""

    presets: list[PresetName] | None = Field(
        None,
        description="sample only for these presets; null = every preset of the sweep that has this field",
    )
    paths: list[str] | None = Field(
        None,
        min_length=1,
        description="run configuration fields that all take the value (e.g. seed -> [train.seed, data.seed]); "
        "null = the parameter's name is the field",
    )

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # pydantic's own message ("Extra inputs are not permitted") does not say which fields a type has
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown field(s) {', '.join(map(repr, unknown))} for type {data.get('type')!r}; "
                    f"valid fields: {', '.join(sorted(cls.model_fields))}"
                )
        return data


class _Interval(_Param):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> _Interval:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        return self

    def checked_values(self) -> list[Any]:
        step = getattr(self, "step", None)
        if step:  # a value on the step grid
            inner = self.low + step * math.floor((self.high - self.low) / step * INNER)
        else:  # a value with a fractional part
            inner = self.low + (self.high - self.low) * INNER
        return [self.low, inner, self.high]

    def grid_values(self) -> None:
        return None  # continuous

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, bool) or not isinstance(value, int | float) or not self.low <= value <= self.high:
            raise ValueError(f"{value!r} is not a number in [{self.low}, {self.high}]")
        return {name: float(value)}


class Uniform(_Interval):
    type: Literal["uniform"]
    step: float | None = Field(None, gt=0, description="quantisation step; null = continuous")

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, step=self.step)


class LogUniform(_Interval):
    type: Literal["loguniform"]
    low: float = Field(gt=0)

    def suggest(self, trial: Any, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=True)


class LogOneMinus(_Interval):
    """x in [low, high] inside (0, 1) with 1 - x log-uniform: DRw's beta, where 0.99 -> 0.999 is one decade."""

    type: Literal["log_one_minus"]
    low: float = Field(gt=0, lt=1)
    high: float = Field(gt=0, lt=1)

    def suggest(self, trial: Any, name: str) -> float:
        # Optuna sees the log-uniform quantity 1 - x under its own name, so its plots show the searched scale
        return 1.0 - trial.suggest_float(f"1 - {name}", 1.0 - self.high, 1.0 - self.low, log=True)

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        super().optuna_params(name, value)
        return {f"1 - {name}": 1.0 - float(value)}


class IntRange(_Param):
    type: Literal["int"]
    low: int
    high: int = Field(description="inclusive")
    step: int = Field(1, ge=1)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if not self.low < self.high:
            raise ValueError(f"low={self.low} must be below high={self.high}")
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError(f"log=true needs low >= 1 and step 1 (got low={self.low}, step={self.step})")
        return self

    def suggest(self, trial: Any, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def checked_values(self) -> list[Any]:
        values = self.grid_values()
        stride = max(1, math.ceil(len(values) / CHECKED_INT_VALUES))
        return sorted({*values[::stride], values[-1]})

    def grid_values(self) -> list[Any]:
        return list(range(self.low, self.high + 1, self.step))

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        if isinstance(value, bool) or not isinstance(value, int) or value not in self.grid_values():
            raise ValueError(f"{value!r} is not an integer of range({self.low}, {self.high} + 1, {self.step})")
        return {name: value}


class Categorical(_Param):
    type: Literal["categorical"]
    values: list[Scalar] = Field(min_length=1)

    @field_validator("values")
    @classmethod
    def _distinct(cls, values: list[Scalar]) -> list[Scalar]:
        if len(set(map(repr, values))) != len(values):
            raise ValueError("values must be distinct")
        return values

    def suggest(self, trial: Any, name: str) -> Scalar:
        return trial.suggest_categorical(name, self.values)

    def checked_values(self) -> list[Any]:
        return list(self.values)

    def grid_values(self) -> list[Any]:
        return list(self.values)

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        if not any(type(value) is type(v) and value == v for v in self.values):
            raise ValueError(f"{value!r} is not one of {self.values}")
        return {name: value}


class Fixed(_Param):
    """A constant set for every trial (of `presets`): not sampled, not seen by Optuna."""

    type: Literal["fixed"]
    value: Any

    def suggest(self, trial: Any, name: str) -> Any:
        return self.value

    def checked_values(self) -> list[Any]:
        return [self.value]

    def grid_values(self) -> list[Any]:
        return [self.value]

    def optuna_params(self, name: str, value: Any) -> dict[str, Any]:
        if value != self.value:
            raise ValueError(f"{value!r} differs from the fixed value {self.value!r}")
        return {}


Distribution = Annotated[
    Uniform | LogUniform | LogOneMinus | IntRange | Categorical | Fixed, Field(discriminator="type")
]


class NoScheduler(Frozen):
    type: Literal["none"]


class Asha(Frozen):
    """Asynchronous successive halving on the evaluation cadence (one rung unit = one evaluation)."""

    type: Literal["asha"]
    grace_period: int = Field(2, ge=1, description="evaluations every trial gets before it can be stopped")
    reduction_factor: float = Field(3.0, gt=1, description="1 / fraction of trials promoted at each rung")
    brackets: int = Field(1, ge=1)
    metric: str | None = Field(None, description="multi-objective only: the objective ASHA ranks by (default first)")


Scheduler = Annotated[NoScheduler | Asha, Field(discriminator="type")]


class SearchConfig(Frozen):
    sampler: SamplerName = "tpe"
    num_trials: int | None = Field(None, ge=1, description="null: 20, or the grid size for the grid sampler")
    seed: int = Field(0, ge=0, description="sampler seed (>= 0): the same file proposes the same trials")
    metric: str | list[str] = Field("val/balanced_acc", description="one objective, or several (Pareto front)")
    mode: Mode | list[Mode] = "max"
    scheduler: Scheduler = NoScheduler(type="none")
    max_concurrent: int | None = Field(None, ge=1, description="null: as many trials as the resources allow")
    time_budget_s: float | None = Field(
        None, gt=0, description="stop the sweep after this many seconds of this driver session (--resume continues it)"
    )
    max_failures: int = Field(2, ge=0, description="retries of a failed trial, each from its last checkpoint")
    enqueue: list[dict[str, Any]] = Field(
        default_factory=list,
        description="trials to run first, exactly as given ({parameter: value}, the preset's parameters all set); "
        "the sampler proposes the rest",
    )

    @field_validator("scheduler", mode="before")
    @classmethod
    def _scheduler_shorthand(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @field_validator("metric")
    @classmethod
    def _validation_metrics(cls, metric: str | list[str]) -> str | list[str]:
        for name in [metric] if isinstance(metric, str) else metric:
            if name.startswith("test/"):
                raise ValueError(
                    "the search never optimises on the test split (test metrics are recorded, not searched); "
                    f"use the val/ metric, e.g. {'val/' + name.removeprefix('test/')!r}"
                )
            if not METRIC_NAME.match(name):
                raise ValueError(
                    f"{name!r} is not a validation metric; use val/... names from the metrics contract, "
                    "e.g. val/balanced_acc, val/top1, val/recall_tail, val/recall_min"
                )
        return metric

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        metrics, modes = self.objectives_lists()
        if len(metrics) != len(modes):
            raise ValueError(f"{len(metrics)} metric(s) {metrics} but {len(modes)} mode(s) {modes}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"metric lists {metrics} with a repeat")
        if isinstance(self.scheduler, Asha):
            if len(metrics) == 1 and self.scheduler.metric not in (None, metrics[0]):
                raise ValueError(
                    f"scheduler.metric {self.scheduler.metric!r} differs from the objective {metrics[0]!r}; "
                    "leave it out for a single objective"
                )
            if len(metrics) > 1 and self.scheduler.metric not in (None, *metrics):
                raise ValueError(f"scheduler.metric {self.scheduler.metric!r} must be one of the objectives {metrics}")
        return self

    def objectives_lists(self) -> tuple[list[str], list[str]]:
        metrics = [self.metric] if isinstance(self.metric, str) else list(self.metric)
        modes = [self.mode] if isinstance(self.mode, str) else list(self.mode)
        if len(modes) == 1 and len(metrics) > 1 and isinstance(self.mode, str):
            modes = modes * len(metrics)  # one mode for several metrics applies to all
        return metrics, modes

    @property
    def objectives(self) -> list[tuple[str, str]]:
        return list(zip(*self.objectives_lists(), strict=True))

    @property
    def scheduler_objective(self) -> tuple[str, str]:
        """The single (metric, mode) a scheduler ranks trials by."""
        metric = getattr(self.scheduler, "metric", None) or self.objectives[0][0]
        return metric, dict(self.objectives)[metric]


class Resources(Frozen):
    """What one trial asks of a Ray node; the driver checks, before any trial starts, that some node can hold it."""

    cpu: float = Field(1.0, gt=0, description="CPU cores per trial")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial; a fraction (0.5) packs trials on one GPU")
    memory_gb: float | None = Field(
        None, gt=0, description="host memory per trial in GiB (Ray's memory resource); null = not reserved"
    )
    custom: dict[str, float] = Field(
        default_factory=dict,
        description="Ray custom resources per trial, e.g. {trial_slot: 1} or {'accelerator_type:H100': 0.001}",
    )
    probe_memory: bool = Field(
        True,
        description="with a fractional gpu, measure a trial's peak GPU memory with a short probe before the sweep "
        "and refuse a packing that does not fit (service/packing.py)",
    )

    @field_validator("gpu")
    @classmethod
    def _gpu_share(cls, gpu: float) -> float:
        if gpu > 1 and not float(gpu).is_integer():
            raise ValueError("use a fraction of one GPU (0 < gpu <= 1) or a whole number of GPUs")
        return gpu

    @field_validator("custom")
    @classmethod
    def _custom_names(cls, custom: dict[str, float]) -> dict[str, float]:
        for name, amount in custom.items():
            if name in RAY_BUILTIN_RESOURCES:
                raise ValueError(f"{name!r} is a built-in resource; use resources.cpu, gpu or memory_gb")
            if amount <= 0:
                raise ValueError(f"custom resource {name!r}: amount {amount} must be above 0")
        return custom

    def tune_request(self) -> dict[str, float]:
        """`tune.with_resources`' spelling: cpu, gpu, memory (bytes) and the custom resources."""
        request: dict[str, float] = {"cpu": self.cpu, "gpu": self.gpu, **self.custom}
        if self.memory_gb is not None:
            request["memory"] = self.memory_gb * 2**30
        return request

    def ray_request(self) -> dict[str, float]:
        """The same request in Ray's node-resource names (CPU, GPU), zero amounts left out."""
        names = {"cpu": "CPU", "gpu": "GPU"}
        return {names.get(k, k): v for k, v in self.tune_request().items() if v}


class Tracking(Frozen):
    uri: str | None = Field(None, description="MLflow tracking URI; null = sqlite:///mlflow.db in the working dir")
    experiment: str | None = Field(None, description="MLflow experiment; null = the file's experiment name")
    per_class_every: int = Field(
        1,
        ge=1,
        description="log per-class metrics (.../cNN) every k-th evaluation and at the last; 10 for 100+ classes",
    )
    tags: dict[str, str] = Field(
        default_factory=dict,
        description="MLflow tags set on the sweep's parent run and on every trial's run (e.g. ltssl.stage)",
    )

    @field_validator("uri")
    @classmethod
    def _supported_store(cls, uri: str | None) -> str | None:
        if uri is None:
            return uri
        if uri.startswith("file:") or "://" not in uri and uri not in ("databricks",):
            raise ValueError(
                "MLflow 3 no longer develops the file store (./mlruns); use a database such as "
                "sqlite:///mlflow.db, or a tracking server http(s)://host:port"
            )
        if uri != "databricks" and not TRACKING_URI.match(uri):
            raise ValueError(
                f"{redact(uri)!r} is not a tracking URI; use http(s)://host:port (a tracking server), "
                "sqlite:///mlflow.db or postgresql://user@host:5432/db (a database), or databricks"
            )
        _no_memory_db(uri)
        return uri


TRACKING_URI = re.compile(
    r"^(https?://[^/\s]+|(sqlite|postgresql|mysql|mariadb|mssql)(\+\w+)?://|databricks(-uc)?://)", re.IGNORECASE
)


def _no_memory_db(url: str) -> None:
    if url.startswith("sqlite") and (":memory:" in url or url.rstrip("/").endswith(":///") or url.endswith("://")):
        raise ValueError(
            f"{url!r} is a database in memory: each process (the driver, a resumed driver) would see its own empty "
            "one; use a file such as sqlite:///store.db or a server"
        )


class Storage(Frozen):
    """Where the sweep's state lives: a directory every node mounts (NFS) or an object store every node reaches."""

    path: str = Field(
        "ray_results",
        description="Ray Tune state, checkpoints and trial folders: a directory (on a cluster, one every node "
        "mounts) or s3://bucket/prefix, gs://bucket/prefix",
    )
    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint for an s3:// path (MinIO, Ceph, ...); null = AWS_ENDPOINT_URL_S3 or "
        "AWS_ENDPOINT_URL from the environment, else AWS",
    )
    optuna: str | None = Field(
        None,
        description="Optuna storage URL (sqlite:///optuna.db, postgresql://host/db; a password may come from "
        "PGPASSWORD); null = in memory, saved with the Ray experiment",
    )

    @field_validator("path")
    @classmethod
    def _directory_or_store(cls, path: str) -> str:
        if "://" in path:
            scheme, rest = path.split("://", 1)
            if scheme not in SCHEMES:
                raise ValueError(
                    f"{scheme}:// is not a store Ray Tune can share between nodes; use a directory every node "
                    f"mounts, or one of {', '.join(s + '://bucket/prefix' for s in SCHEMES)}"
                )
            if not rest.split("/", 1)[0]:
                raise ValueError(f"{path!r} names no bucket; expected {scheme}://bucket/prefix")
        return path

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+/?$", url):
            raise ValueError(f"{url!r}: expected http(s)://host:port of an S3-compatible store")
        return url

    @field_validator("optuna")
    @classmethod
    def _database(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^(sqlite|postgresql|mysql|mariadb|oracle|mssql)(\+\w+)?://", url):
            raise ValueError(
                f"{redact(url)!r} is not a database URL; use sqlite:///optuna.db or postgresql://host:5432/db "
                "(any SQLAlchemy URL of a database Optuna supports)"
            )
        _no_memory_db(url)
        return url

    @model_validator(mode="after")
    def _endpoint_for_s3(self) -> Storage:
        if self.endpoint_url is not None and not self.path.startswith("s3://"):
            raise ValueError(f"endpoint_url applies to an s3:// path only; path is {self.path!r}")
        return self


class SpaceFile(Frozen):
    experiment: str = Field(pattern=EXPERIMENT_NAME, description="names the MLflow experiment and the Ray run")
    description: str = ""
    base_file: str | None = Field(
        None, description="a run configuration YAML (path relative to this file) that `base` is merged over"
    )
    base: dict[str, Any] = Field(default_factory=dict, description="the trial configuration (RunConfig fields)")
    space: dict[str, Distribution] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    resources: Resources = Resources()
    tracking: Tracking = Tracking()
    storage: Storage = Storage()

    @field_validator("space")
    @classmethod
    def _dotted_names(cls, space: dict[str, Any]) -> dict[str, Any]:
        for name in space:
            if not re.fullmatch(r"[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*", name):
                raise ValueError(f"parameter name {name!r} must be a dotted path like method.drw.beta")
        return space

    @model_validator(mode="after")
    def _enqueued_trials(self) -> SpaceFile:
        for i, trial in enumerate(self.search.enqueue):
            unknown = sorted(set(trial) - set(self.space))
            if unknown:
                raise ValueError(
                    f"search.enqueue[{i}]: {', '.join(map(repr, unknown))} not in the space; its parameters: "
                    f"{', '.join(self.space)}"
                )
            for name, value in trial.items():
                try:
                    self.space[name].optuna_params(name, value)
                except ValueError as err:
                    raise ValueError(f"search.enqueue[{i}].{name}: {err}") from None
        return self

    def optuna_params(self, trial: dict[str, Any]) -> dict[str, Any]:
        """Optuna's parameters of an enqueued trial (`search.enqueue`)."""
        out: dict[str, Any] = {}
        for name, value in trial.items():
            out.update(self.space[name].optuna_params(name, value))
        return out

    @property
    def searched(self) -> dict[str, Any]:
        """Parameters Optuna samples (everything but `fixed`)."""
        return {name: p for name, p in self.space.items() if not isinstance(p, Fixed)}


def describe(param: Any) -> str:
    """`log_one_minus[0.9, 0.9999]`, `categorical[fixmatch, fixmatch_la]`, `fixed 0.95`, with presets if any."""
    if isinstance(param, Fixed):
        text = f"fixed {param.value}"
    elif isinstance(param, Categorical):
        text = f"categorical[{', '.join(map(str, param.values))}]"
    else:
        extra = " step " + str(param.step) if getattr(param, "step", None) not in (None, 1) else ""
        text = f"{param.type}[{param.low}, {param.high}]{extra}" + (" log" if getattr(param, "log", False) else "")
    return text + (f" for {', '.join(param.presets)}" if param.presets else "")


def grid_size(space: dict[str, Any]) -> int:
    return math.prod(len(p.grid_values()) for p in space.values() if not isinstance(p, Fixed))


def json_schema() -> dict[str, Any]:
    """The file's JSON Schema, with `base` described by the run configuration's own schema (editor completion)."""
    schema = SpaceFile.model_json_schema()
    run = RunConfig.model_json_schema()
    schema.setdefault("$defs", {}).update(run.pop("$defs", {}))
    description = schema["properties"]["base"].get("description", "")
    schema["properties"]["base"] = {**run, "description": description}
    return schema
