"""One driver per sweep: a second driver (a second `--resume`, or the same command twice) is refused while one runs.

The lock lives where the sweep's state does, so every machine that could drive the sweep sees it:
- a local or mounted `storage.path`: an exclusive `flock` on `<storage>/.<sweep>.lock` (NFSv4 maps it to a lock
  on the server), which the kernel releases when the driver dies, even by kill -9;
- an object store with the Optuna study in PostgreSQL: a session-level advisory lock keyed by the sweep's name,
  released when the driver's connection closes (on exit or death). A dropped connection (a PostgreSQL restart, a
  terminated backend) releases it too, silently: a watchdog thread checks the connection every `LOCK_CHECK_S`
  seconds and takes the lock again on a new one, or, when another driver took it meanwhile, stops this sweep as
  Ctrl-C does (its state stays resumable).
An object store with the study elsewhere has no lock to take; the driver says so and runs unguarded.
The lock file records the holder (host, pid, start time), so the refusal says who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from service import secrets
from service.plan import Plan
from trainables.config import ConfigError

LOCK_CHECK_S = float(os.environ.get("LTSSL_LOCK_CHECK_S", "10"))  # seconds between checks of the lock connection


def _interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the sweep stops as on Ctrl-C: state saved, runs closed, resumable


class SweepLock:
    def __init__(self, plan: Plan, on_lost: Callable[[], None] = _interrupt):
        self.plan = plan
        self._file: Any = None
        self._path: Path | None = None
        self._created: list[Path] = []  # folders the lock had to create
        self._connection: Any = None
        self._on_lost = on_lost  # another driver took the PostgreSQL lock after this one's connection dropped
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def __enter__(self) -> SweepLock:
        storage = self.plan.storage
        if not storage.remote:
            self._lock_file(Path(storage.uri) / f".{self.plan.sweep_name}.lock")
        elif self.plan.optuna_storage and self.plan.optuna_storage.startswith("postgresql"):
            self._lock_postgres(self.plan.optuna_storage)
        else:
            print(
                f"[sweep] note: {storage} is an object store and the Optuna study is not in PostgreSQL, so nothing "
                "stops a second driver on this sweep; run one at a time",
                flush=True,
            )
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, trace: TracebackType | None) -> None:
        if self._file is not None:
            if self._path is not None and not Path(self.plan.sweep_location.uri).exists():
                # refused before the sweep started: leave nothing behind (the lock is still ours while we clean)
                self._path.unlink(missing_ok=True)
                for folder in self._created:
                    folder.rmdir()
            self._file.close()  # closing the descriptor releases the flock
        if self._watchdog is not None:
            self._stop.set()
            self._watchdog.join(timeout=30)
        if self._connection is not None:
            self._connection.close()  # ends the session, which releases the advisory lock

    def _holder(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _lock_file(self, path: Path) -> None:
        if path.parent.is_file():
            raise ConfigError(f"{self.plan.source}: storage.path {self.plan.storage} is a file; it must be a directory")
        self._created = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            # held open for the whole run, read-only where the file system allows: a descriptor open for writing
            # keeps the storage from being remounted read-only. NFS emulates flock with fcntl locks, which want a
            # descriptor open for writing (EBADF otherwise): there the lock is taken through one
            handle = open(path)  # noqa: SIM115
            try:
                locked = _flock(handle)
            except OSError as err:
                handle.close()
                if err.errno != errno.EBADF:
                    raise
                handle = open(path, "r+")  # noqa: SIM115
                locked = _flock(handle)
        except OSError as err:  # read-only, full, under a file, or not a real directory (/proc, a mount that refuses)
            raise ConfigError(
                f"{self.plan.source}: storage.path {self.plan.storage} cannot be written ({err.strerror or err}: "
                f"{err.filename or path}); choose a directory you can write to"
            ) from None
        if not locked:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise ConfigError(
                f"{self.plan.source}: another driver is running sweep {self.plan.sweep_name} (lock {path}, held by "
                f"{holder}); wait for it to end or stop it (Ctrl-C), then --resume"
            )
        path.write_text(json.dumps(self._holder()))
        self._file, self._path = handle, path

    def _lock_postgres(self, url: str) -> None:
        self._key = int.from_bytes(hashlib.sha256(self.plan.sweep_name.encode()).digest()[:8], "big", signed=True)
        self._url = url
        connection = self._try_postgres()
        if connection is None:
            raise ConfigError(
                f"{self.plan.source}: another driver is running sweep {self.plan.sweep_name} (PostgreSQL advisory "
                f"lock {self._key} in {secrets.redact(url)}); wait for it to end or stop it (Ctrl-C), then --resume"
            )
        self._connection = connection
        self._watchdog = threading.Thread(target=self._keep_postgres_lock, name="sweep-lock", daemon=True)
        self._watchdog.start()

    def _try_postgres(self) -> Any:
        """A new connection holding the advisory lock, or None when another session holds it."""
        import sqlalchemy

        engine = sqlalchemy.create_engine(secrets.reveal(self._url), poolclass=sqlalchemy.pool.NullPool)
        connection = engine.connect()
        got = connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), {"key": self._key}).scalar()
        connection.commit()
        if not got:
            connection.close()
            return None
        return connection

    def _keep_postgres_lock(self) -> None:
        import sqlalchemy

        while not self._stop.wait(LOCK_CHECK_S):
            try:
                self._connection.execute(sqlalchemy.text("SELECT 1"))
                self._connection.rollback()
                continue
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # the connection dropped, and the advisory lock with it
            try:
                self._connection.close()
            except sqlalchemy.exc.SQLAlchemyError:
                pass
            where = f"PostgreSQL advisory lock {self._key} in {secrets.redact(self._url)}"
            while not self._stop.is_set():
                try:
                    connection = self._try_postgres()
                    break
                except sqlalchemy.exc.SQLAlchemyError:  # the database is restarting: try again
                    self._stop.wait(LOCK_CHECK_S)
            else:
                return
            if connection is None:
                print(
                    f"[sweep] lock: the connection holding the sweep's lock dropped and another driver took it "
                    f"({where}); stopping this driver (its sweep stays resumable)",
                    flush=True,
                )
                self._on_lost()
                return
            self._connection = connection
            print(f"[sweep] lock: the connection holding the sweep's lock dropped; taken again ({where})", flush=True)


def _flock(handle: Any) -> bool:
    """An exclusive flock on the open file, without waiting: False when another process holds it."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
