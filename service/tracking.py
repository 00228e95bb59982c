"""MLflow records of a sweep: one parent run per sweep, one child run per Tune trial, all written by the driver.

Why the driver (a Tune callback) and not the trainable: only the driver knows how a trial ended (ASHA stop,
failure after the last retry, interruption), the Optuna trial number, and the sweep's parent run; workers never need
to reach the tracking store (a local sqlite file works for a multi-node sweep); and one writer means no sqlite lock
contention. A child run is found again by its tags (parent run id + Optuna trial number, the sweep's own id for a
trial), so a retried or `--resume`d trial, or a trial a resumed sweep took over, reopens its own run instead of
creating a duplicate, and evaluations a retry re-runs are not logged twice (the last logged step is kept in a tag);
evaluations a killed driver never wrote are backfilled from Tune's saved log of the trial. The callback's hooks only
queue the work; a writer thread makes the MLflow calls, in order and with retries, so an MLflow outage delays
records without stalling Tune's event loop.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from ray import tune

from service import leaderboard, secrets
from service.leaderboard import Row
from service.sampling import SERVICE_KEY
from trainables.ray_trainable import ARTIFACTS, NO_METRICS, NOT_RETRIED

PARENT = "mlflow.parentRunId"
COMMIT = "mlflow.source.git.commit"
ROLE, SWEEP, SPACE_HASH = "ltssl.role", "ltssl.sweep", "ltssl.space_hash"
TRIAL_ID, OPTUNA_TRIAL, PRESET = "ltssl.tune_trial_id", "ltssl.optuna_trial", "ltssl.preset"
OUTCOME, LAST_STEP, RETRIES = "ltssl.outcome", "ltssl.last_step", "ltssl.retries"
LOST = "lost"  # the outcome of a run whose trial no resumed sweep could take over (see _run_of)
#: where the trial ran (its latest attempt), from the trainable's reports; `ltssl.nodes` lists every node it ran on
WHERE_TAGS = {
    "ray_node_id": "ltssl.node_id",
    "hostname": "ltssl.hostname",
    "node_ip": "ltssl.node_ip",
    "gpu_model": "ltssl.gpu",
    "code_path": "ltssl.code_path",
}
NODES = "ltssl.nodes"
NOTE = "mlflow.note.content"
ENDED_NOTE = "Ended: "  # how a note set by the sweep's end on a run it closed begins (service.sweep.close_stale)
DUPLICATE_OF = "ltssl.duplicate_of"  # on a deleted duplicate child run: the run kept for the trial
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3: the UI opens on training runs
PER_CLASS = re.compile(r"/c\d+$")  # per-class keys: val/recall/c03, pl/count/c117, ...
BATCH = 1000  # MLflow's limit of metrics per log_batch call
PARAM_BATCH = 100  # and of params


@dataclass(frozen=True)
class SweepRecord:
    """Where a sweep's runs live. Pickled into the Tune experiment, so a resumed sweep logs to the same place."""

    tracking_uri: str  # redacted (service.secrets): the plan file and Tune's state carry no password
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    space_hash: str
    git_commit: str
    objectives: tuple[tuple[str, str], ...]
    per_class_every: int
    tags: tuple[tuple[str, str], ...] = ()  # tracking.tags: on the parent run and every child run


def git_commit(root: Path) -> str:
    """HEAD of the repository at `root`, with `-dirty` when tracked files have changes; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAM_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAM_BATCH])


def terminal(client: MlflowClient, run_id: str, status: str, outcome: str) -> None:
    client.set_tag(run_id, OUTCOME, outcome)
    client.set_terminated(run_id, status=status)


RESULT_FILE = "result.json"  # Tune's log of a trial's results, one JSON object per line
ENDED = ("finished", "pruned", "failed")  # outcomes of a trial that ended (its run is closed)
FLUSH_TIMEOUT_S = float(os.environ.get("LTSSL_MLFLOW_FLUSH_TIMEOUT_S", "300"))  # at the sweep's end
MAX_RETRY_DELAY_S = 30.0
UNWRITTEN = "unwritten_mlflow.pkl"  # in the sweep folder: writes an MLflow outage left undone; --resume makes them


def _view(trial: Any) -> SimpleNamespace:
    """What the writer needs of a Tune trial, taken when the event happens (the trial object moves on)."""
    error = trial.get_error() if hasattr(trial, "get_error") else None
    storage = getattr(trial, "storage", None)
    return SimpleNamespace(
        trial_id=trial.trial_id,
        config=trial.config,
        checkpoint=getattr(trial, "checkpoint", None),
        last_result=dict(getattr(trial, "last_result", None) or {}),
        error=str(error) if error else None,
        failures=getattr(getattr(trial, "run_metadata", None), "num_failures", None),  # Tune's count, for retries
        # Tune's own log of the trial's results in the sweep's storage (what the backfill reads)
        results=(storage.storage_filesystem, f"{storage.trial_fs_path}/{RESULT_FILE}") if storage else None,
    )


def failure_kind(err: Exception) -> str:
    """ "retry": waiting can cure it (the server or the database is down or restarting, a connection dropped);
    "refused": MLflow's answer to this write; "bug": anything else, which the sweep's end raises."""
    import requests
    import sqlalchemy.exc

    if isinstance(err, OSError | requests.RequestException | sqlalchemy.exc.OperationalError):
        return "retry"
    if isinstance(err, MlflowException):
        # MLflow wraps a connection that failed all its own retries, and a gateway's 502/503/504, in its exception
        unreachable = err.get_http_status_code() in (502, 503, 504) or "Max retries exceeded" in str(err)
        return "retry" if unreachable else "refused"
    return "bug"


class MlflowTrialLogger(tune.Callback):
    """Child runs for the trials of one sweep (see the module docstring for why this runs in the driver).

    Every write is idempotent (runs found by their tags, evaluations skipped by step), so a write made twice records
    once: the writes still undone when the sweep ends (MLflow down for longer than `FLUSH_TIMEOUT_S`) are kept, with
    their arguments, in `unwritten` for the sweep to save (`save_unwritten`) and a `--resume` to make (`replay`)."""

    unwritten: ClassVar[list[tuple[str, tuple]]] = []  # class level: Tune may hold an unpickled copy of the logger

    def __init__(self, record: SweepRecord):
        self.record = record
        self._session()

    def _session(self) -> None:
        # per-process state, rebuilt after Tuner.restore unpickles the callback
        self._client: MlflowClient | None = None
        self._runs: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._last_step: dict[str, int] = {}
        self._ended: set[str] = set()
        self._where: dict[str, dict[str, str]] = {}  # Tune trial id -> where tags last written
        self._nodes: dict[str, list[str]] = {}  # Tune trial id -> nodes it ran on
        self._rows: dict[str, Row] | None = None  # leaderboard rows, read from MLflow once per session
        self.busy_s = 0.0  # time the writer spent in MLflow calls in this session (printed at the end)
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._wake = threading.Event()  # set when the sweep's end gives up: a write waiting to retry stops waiting
        self._current: tuple[Callable, tuple] | None = None  # the write the writer thread is making
        self._given_up: list[tuple[Callable, tuple]] = []  # writes the writer stopped retrying at the sweep's end
        self._done = 0  # writes the writer got through (made, or refused by MLflow)
        self._bug: Exception | None = None
        self._reconciled = False

    def __getstate__(self) -> dict[str, Any]:
        return {"record": self.record}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.record = state["record"]
        self._session()

    @property
    def bug(self) -> Exception | None:
        """The first write that failed in a way no retry cures (a programming error), if any."""
        return self._bug

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(secrets.reveal(self.record.tracking_uri))
        return self._client

    # ---- Tune callback hooks: they only queue the work; the writer thread talks to MLflow ----------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._do_start, _view(trial))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        # the timestamp is taken now, so a write retried after an outage repeats the same points (MLflow keeps one)
        self._submit(self._do_result, _view(trial), dict(result), int(time.time() * 1000))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._do_recover, _view(trial))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._do_complete, _view(trial))

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._reconciled:
            return
        self._reconciled = True
        # a resumed sweep: trials Tune's saved state holds as ended, whose end a killed driver never wrote
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                self._submit(self._do_reconcile, _view(trial), trial.status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._submit(self._do_error, _view(trial))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._submit(self._do_experiment_end, [_view(t) for t in trials])
        left = self.flush(FLUSH_TIMEOUT_S)
        if self._bug is not None:
            raise RuntimeError("the MLflow writer failed (traceback above)") from self._bug
        n = max(len(self._runs), 1)
        print(
            f"[sweep] tracking: {self.busy_s:.2f} s of MLflow calls (in the writer thread, off Tune's loop) for "
            f"{len(self._runs)} trial(s), {self.busy_s / n * 1000:.0f} ms per trial "
            f"({secrets.redact(self.record.tracking_uri)})",
            flush=True,
        )
        if left:
            print(
                f"[sweep] tracking: {len(left)} MLflow write(s) undone after {FLUSH_TIMEOUT_S:g} s without progress: "
                f"{', '.join(left[:10])}{', ...' if len(left) > 10 else ''}; they are saved with the sweep, and the "
                "same command with --resume makes them once MLflow answers",
                flush=True,
            )

    # ---- the writer thread -----------------------------------------------------------------------------------

    def _submit(self, task: Callable, *args: Any) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._drain, name="mlflow-writer", daemon=True)
            self._thread.start()
        self._queue.put((task, args))

    def flush(self, timeout: float) -> list[str]:
        """Wait until every queued write is done, giving up once `timeout` s pass without one getting done; the
        names of those left undone, which are added to `unwritten` (with the one being retried: making it again
        records nothing twice)."""
        deadline, done = time.monotonic() + timeout, self._done
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            if self._done != done:  # MLflow is taking them: a long backlog is not an outage
                deadline, done = time.monotonic() + timeout, self._done
            time.sleep(0.05)
        if not self._queue.unfinished_tasks:
            return []
        self._closing = True  # the writer gives up on the write it retries; the queued ones are taken off the queue
        self._wake.set()
        queued = []
        while True:
            try:
                queued.append(self._queue.get_nowait())
            except queue.Empty:
                break
            self._queue.task_done()
        idle_by = time.monotonic() + MAX_RETRY_DELAY_S
        while self._queue.unfinished_tasks and time.monotonic() < idle_by:
            time.sleep(0.05)
        # a write still hanging in a call is kept too: made twice, it records once
        hanging = [self._current] if self._current is not None and self._queue.unfinished_tasks else []
        undone = list({id(args): (task, args) for task, args in self._given_up + hanging + queued}.values())
        self._given_up = []
        MlflowTrialLogger.unwritten.extend((task.__name__, args) for task, args in undone)
        return [task.__name__.removeprefix("_do_") for task, _ in undone]

    def replay(self, writes: list[tuple[str, tuple]], timeout: float) -> list[str]:
        """Make writes an earlier session left undone (`unwritten`), in their order; the names of those still
        undone after `timeout` s (kept in `unwritten` again)."""
        for name, args in writes:
            self._submit(getattr(self, name), *args)
        return self.flush(timeout)

    def _drain(self) -> None:
        while True:
            task, args = self._queue.get()
            self._current = (task, args)
            self._run_task(task, args)
            self._current = None
            self._done += 1
            self._queue.task_done()

    def _run_task(self, task: Callable, args: tuple) -> None:
        """Run one write, retrying it with back-off while MLflow is unreachable (until the sweep's end gives up)."""
        delay, warned = 1.0, False
        while True:
            try:
                started = time.perf_counter()
                task(*args)
                self.busy_s += time.perf_counter() - started
                if warned:
                    print("[sweep] tracking: MLflow answers again; queued records are being written", flush=True)
                return
            except Exception as err:  # noqa: BLE001 - classified by failure_kind
                kind = failure_kind(err)
                if kind == "bug":
                    traceback.print_exc()
                    self._bug = self._bug or err
                    return
                if kind == "refused":  # MLflow's answer to this write: making it again would get the same
                    print(f"[sweep] tracking: MLflow refused a write ({task.__name__}): {err}", flush=True)
                    return
                if self._closing:
                    self._given_up.append((task, args))
                    return
                if not warned:
                    print(
                        f"[sweep] tracking: MLflow unreachable ({type(err).__name__}); training goes on, records "
                        f"wait in a queue ({self._queue.qsize()} more) and are retried",
                        flush=True,
                    )
                    warned = True
                self._wake.wait(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY_S)

    # ---- the work, in the writer thread ------------------------------------------------------------------------

    def _do_start(self, trial: Any) -> None:
        self._run_of(trial)

    def _do_result(self, trial: Any, result: dict, now: int) -> None:
        run_id = self._run_of(trial)
        if any(k in result for k in NO_METRICS):  # no metrics (a failure: the completion records it)
            self._record_where(trial, run_id, result)
            return
        self._log_result(trial, run_id, result, now)

    def _do_reconcile(self, trial: Any, status: str) -> None:
        found = self._runs_of(trial)
        if found and found[0].data.tags.get(OUTCOME) in ENDED:
            return
        self._run_of(trial)  # reopened, or created (a driver killed before writing it), and backfilled
        if status == "ERROR":
            self._do_error(trial)
        else:
            self._do_complete(trial)

    def _backfill(self, trial: Any, run_id: str) -> None:
        """Log the evaluations Tune's saved log of the trial holds beyond the run's last logged step: a driver killed
        with writes still queued loses them, while Tune's saved state (and so the trial's resumed checkpoint) may
        already be past them. Runs when a trial's existing run is reopened; the resumed trial re-reports nothing
        before its checkpoint, and what it does re-report is skipped by step."""
        if trial.results is None:
            return
        fs, path = trial.results
        try:
            with fs.open_input_stream(path) as f:
                lines = f.read().decode().splitlines()
        except (OSError, FileNotFoundError):  # no result reported yet, or the file is not in storage
            return
        for line in lines:
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if any(k in result for k in NO_METRICS):
                continue
            if int(result.get("step", -1)) > self._last_step[trial.trial_id]:
                self._log_result(trial, run_id, result, int(float(result.get("timestamp", time.time())) * 1000))

    def _log_result(self, trial: Any, run_id: str, result: dict, now: int) -> None:
        step = int(result["step"])
        if step <= self._last_step[trial.trial_id]:
            return  # a retry re-ran an evaluation after its checkpoint: the first record stands
        final = step >= trial.config["train"]["iterations"]
        per_class = final or int(result.get("evaluation", 1)) % self.record.per_class_every == 0
        metrics = [
            Metric(k, float(v), now, step)
            for k, v in result.items()
            if _is_metric(k, v) and (per_class or not PER_CLASS.search(k))
        ]
        # the de-duplication tag travels in the same log_batch (one transaction) as the evaluation's last metrics:
        # no evaluation is recorded without its step, or its step without its metrics
        chunks = list(_chunks(metrics, BATCH)) or [[]]
        for i, chunk in enumerate(chunks):
            tags = [RunTag(LAST_STEP, str(step))] if i == len(chunks) - 1 else []
            self.client.log_batch(run_id, metrics=chunk, tags=tags)
        self._last_step[trial.trial_id] = step
        self._record_where(trial, run_id, result)
        row = self._row(trial)
        row.metrics.update({k: float(v) for k, v in result.items() if _is_metric(k, v) and not PER_CLASS.search(k)})

    def _record_where(self, trial: Any, run_id: str, result: dict) -> None:
        """Tag the run with where the trial runs, when that changed (a first report, a retry on another node)."""
        where = {tag: str(result[key]) for key, tag in WHERE_TAGS.items() if key in result}
        if not where or self._where.get(trial.trial_id) == where:
            return
        # ltssl.nodes: every node the trial ran on, across retries and --resume (read back once per session)
        nodes = self._nodes.get(trial.trial_id)
        if nodes is None:
            nodes = [n for n in self.client.get_run(run_id).data.tags.get(NODES, "").split(",") if n]
        node = where.get(WHERE_TAGS["ray_node_id"])
        if node and node not in nodes:
            nodes.append(node)
        tags = [RunTag(k, v) for k, v in {**where, NODES: ",".join(nodes)}.items()]
        self.client.log_batch(run_id, tags=tags)
        self._where[trial.trial_id], self._nodes[trial.trial_id] = where, nodes

    def _do_recover(self, trial: Any) -> None:
        run_id = self._run_of(trial)
        retries = getattr(trial, "failures", None)  # Tune's count: made twice (a replay), the tag stays right
        if retries is None:
            retries = int(self.client.get_run(run_id).data.tags.get(RETRIES, "0")) + 1
        self.client.set_tag(run_id, RETRIES, str(retries))

    def _do_complete(self, trial: Any) -> None:
        run_id = self._run_of(trial)
        reason = trial.last_result.get(NOT_RETRIED)
        if reason:  # ended on purpose, not retried: it would diverge again
            self.client.log_text(run_id, reason, "error.txt")
            self.client.set_tag(run_id, "mlflow.note.content", reason)
            self._end(trial, "FAILED", "failed")
            return
        finished = self._last_step[trial.trial_id] >= trial.config["train"]["iterations"]
        if finished and trial.checkpoint is not None:
            with trial.checkpoint.as_directory() as ckpt:
                if (Path(ckpt) / ARTIFACTS).is_dir():
                    self.client.log_artifacts(run_id, str(Path(ckpt) / ARTIFACTS))
        if finished:
            self._end(trial, "FINISHED", "finished")
        else:  # Tune completes a trial before its last evaluation only when the scheduler (ASHA) stops it
            self._end(trial, "KILLED", "pruned")

    def _do_error(self, trial: Any) -> None:
        run_id = self._run_of(trial)
        if trial.error:
            self.client.log_text(run_id, trial.error, "error.txt")
        self._end(trial, "FAILED", "failed")

    def _do_experiment_end(self, trials: list) -> None:
        # runs still open were cut short by an interruption: --resume reopens them
        for trial in trials:
            if trial.trial_id in self._runs and trial.trial_id not in self._ended:
                self._end(trial, "KILLED", "interrupted")
        self._write_leaderboard()

    # ---- runs --------------------------------------------------------------------------------------------------

    def _run_of(self, trial: Any) -> str:
        """The trial's child run: found by its tags when it exists (retry, --resume), created otherwise."""
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        found = self._runs_of(trial)
        if found and _sampled(found[0]) and _sampled(found[0]) != _sampled(trial):
            # the same Optuna number with other values: a study kept in Tune's state (no database) handed the number
            # out again after the driver died before its next snapshot; the old run's trial is gone for good
            self._lose(
                found[0].info.run_id,
                "its trial was started after the sweep's last saved state and the "
                "driver died; the resumed sweep gave its Optuna number to another trial",
            )
            found = []
        if found:
            run = found[0]
            run_id = run.info.run_id
            tags = [RunTag(OUTCOME, "running")]
            if run.data.tags.get(TRIAL_ID) != tid:  # a resumed sweep's new Tune trial took over an orphaned trial
                tags.append(RunTag(TRIAL_ID, tid))
            if run.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
            if run.data.tags.get(NOTE, "").startswith(ENDED_NOTE):  # closed at a sweep's end, now continued
                self.client.delete_tag(run_id, NOTE)
            self.client.log_batch(run_id, tags=tags)
            if not run.data.params:  # the driver died between creating the run and logging its params
                self._log_trial_params(trial, run_id)
            self._last_step[tid] = int(run.data.tags.get(LAST_STEP, "-1"))
            self._runs[tid] = run_id
            self._backfill(trial, run_id)
        else:
            run_id = self._create(trial)
            self._last_step[tid] = -1
            # a create whose response was lost and retried by the client made two runs: keep one
            kept = self._runs_of(trial)
            run_id = kept[0].info.run_id if kept else run_id
            self._runs[tid] = run_id
            self._backfill(trial, run_id)  # a trial Tune's saved state holds, whose run a killed driver never made
        self._ended.discard(tid)
        return run_id

    def _runs_of(self, trial: Any) -> list[Any]:
        """The trial's child run, as a one-element list (empty when none exists), found by the trial's Optuna number:
        the sweep's own id for a trial, which a Tune trial of a resumed sweep may take over. Should MLflow hold
        several (a create request retried after its response was lost), the one with the most evaluations stays and
        the others are deleted (MLflow's soft delete: restorable) with a tag naming the one kept."""
        number = trial.config[SERVICE_KEY]["optuna_trial"]
        found = list(
            self.client.search_runs(
                [self.record.experiment_id],
                filter_string=f"tags.`{PARENT}` = '{self.record.parent_run_id}' AND tags.`{OPTUNA_TRIAL}` = '{number}'"
                f" AND tags.`{OUTCOME}` != '{LOST}'",
                max_results=50,
            )
        )
        found.sort(key=lambda r: (-int(r.data.tags.get(LAST_STEP, "-1")), r.info.start_time, r.info.run_id))
        for extra in found[1:]:
            self.client.set_tag(extra.info.run_id, DUPLICATE_OF, found[0].info.run_id)
            self.client.delete_run(extra.info.run_id)
        return found[:1]

    def _create(self, trial: Any) -> str:
        meta = trial.config[SERVICE_KEY]
        run_config = {k: v for k, v in trial.config.items() if k != SERVICE_KEY}
        tags = {
            PARENT: self.record.parent_run_id,
            COMMIT: self.record.git_commit,
            ROLE: "trial",
            SWEEP: self.record.sweep_name,
            SPACE_HASH: self.record.space_hash,
            TRIAL_ID: trial.trial_id,
            OPTUNA_TRIAL: str(meta["optuna_trial"]),
            PRESET: run_config["method"]["preset"],
            OUTCOME: "running",
            **dict(getattr(self.record, "tags", ())),  # a record pickled before tracking.tags has none
        }
        run = self.client.create_run(self.record.experiment_id, run_name=meta["run_name"], tags=tags)
        self._log_trial_params(trial, run.info.run_id)
        return run.info.run_id

    def _log_trial_params(self, trial: Any, run_id: str) -> None:
        run_config = {k: v for k, v in trial.config.items() if k != SERVICE_KEY}
        log_params(self.client, run_id, {**flatten(run_config), **_sampled(trial)})

    def _lose(self, run_id: str, why: str) -> None:
        self.client.set_tag(run_id, "mlflow.note.content", f"Lost: {why}.")
        terminal(self.client, run_id, "KILLED", LOST)

    def _end(self, trial: Any, status: str, outcome: str) -> None:
        terminal(self.client, self._runs[trial.trial_id], status, outcome)
        self._ended.add(trial.trial_id)
        self._row(trial).outcome = outcome
        self._write_leaderboard()

    # ---- leaderboard on the parent run -------------------------------------------------------------------------

    def _row(self, trial: Any) -> Row:
        rows = self._leaderboard_rows()
        meta = trial.config[SERVICE_KEY]
        key = str(meta["optuna_trial"])  # a Tune trial of a resumed sweep may take over a trial (and its row)
        if key not in rows or rows[key].run_id != self._runs[trial.trial_id]:
            rows[key] = Row(
                run_id=self._runs[trial.trial_id],
                name=meta["run_name"],
                trial_id=trial.trial_id,
                optuna_trial=str(meta["optuna_trial"]),
                outcome="running",
                params={k: str(v) for k, v in meta["params"].items()},
            )
        rows[key].trial_id = trial.trial_id
        return rows[key]

    def _leaderboard_rows(self) -> dict[str, Row]:
        if self._rows is None:
            self._rows = {}
            for run in children(self.client, self.record):
                tags = run.data.tags
                if tags.get(OUTCOME) == LOST:
                    continue
                self._rows[tags.get(OPTUNA_TRIAL, tags[TRIAL_ID])] = Row(
                    run_id=run.info.run_id,
                    name=run.info.run_name,
                    trial_id=tags[TRIAL_ID],
                    optuna_trial=tags.get(OPTUNA_TRIAL, ""),
                    outcome=tags.get(OUTCOME, "running"),
                    params={
                        k.removeprefix("sampled/"): v for k, v in run.data.params.items() if k.startswith("sampled/")
                    },
                    metrics={k: v for k, v in run.data.metrics.items() if not PER_CLASS.search(k)},
                )
        return self._rows

    def _write_leaderboard(self) -> None:
        objectives = [tuple(o) for o in self.record.objectives]
        rows = leaderboard.rank(list(self._leaderboard_rows().values()), objectives)
        parent = self.record.parent_run_id
        self.client.log_text(parent, leaderboard.to_csv(rows, objectives), "leaderboard.csv")
        self.client.log_text(parent, leaderboard.to_markdown(rows, objectives), "leaderboard.md")
        counts = {o: sum(r.outcome == o for r in rows) for o in ("finished", "pruned", "failed", "interrupted")}
        ended = sum(counts.values())
        now = int(time.time() * 1000)
        metrics = [Metric(f"trials/{o}", float(n), now, ended) for o, n in counts.items()]
        best = next((r for r in rows if r.outcome == "finished"), None)
        if best is not None:
            metrics += [Metric(f"best/{m}", best.metrics[m], now, ended) for m, _ in objectives if m in best.metrics]
            self.client.set_tag(parent, "ltssl.best_run", best.name)
        self.client.log_batch(parent, metrics=metrics)


def children(client: MlflowClient, record: SweepRecord) -> Iterator[Any]:
    """Every child run of the sweep, page by page."""
    return leaderboard.child_runs(client, record.experiment_id, record.parent_run_id)


def _sampled(item: Any) -> dict[str, str]:
    """The sampled values of a trial (a Tune trial's view) or of a child run, as MLflow's params hold them."""
    if hasattr(item, "config"):
        values = item.config[SERVICE_KEY]["params"]
        return {f"sampled/{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}
    return {k: v for k, v in item.data.params.items() if k.startswith("sampled/")}


def _is_metric(key: str, value: Any) -> bool:
    # the metrics contract namespaces every metric (val/top1, pl/count/c03); Tune's own keys have no '/'
    return "/" in key and isinstance(value, int | float) and not isinstance(value, bool)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
