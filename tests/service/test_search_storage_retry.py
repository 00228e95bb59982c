"""The study storage retries an attribute write the database dropped (a real SQLite study, one injected drop)."""

import optuna
import pytest

from service.search import RetryingStorage, study_storage


def test_a_dropped_attribute_write_is_retried(tmp_path, monkeypatch):
    storage = study_storage(f"sqlite:///{tmp_path}/o.db")
    assert isinstance(storage, RetryingStorage)
    study = optuna.create_study(storage=storage, sampler=optuna.samplers.GridSampler({"x": [1, 2]}))
    calls = []
    original = optuna.storages.RDBStorage.set_trial_system_attr

    def drop_once(self, trial_id, key, value):
        calls.append(key)
        if len(calls) == 1:
            raise optuna.exceptions.StorageInternalError("connection dropped")
        return original(self, trial_id, key, value)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_system_attr", drop_once)
    monkeypatch.setattr(RetryingStorage, "ATTEMPTS", 2)
    trial = study.ask()  # the grid sampler writes its attributes inside ask(): the first dropped, then retried
    assert calls[0] == calls[1] and "grid_id" in calls
    assert study.trials[trial.number].system_attrs["grid_id"] in (0, 1)


def test_a_write_that_keeps_failing_is_raised(tmp_path, monkeypatch):
    storage = study_storage(f"sqlite:///{tmp_path}/o.db")
    study = optuna.create_study(storage=storage)
    trial = study.ask()

    def always(self, trial_id, key, value):
        raise optuna.exceptions.StorageInternalError("database gone")

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_user_attr", always)
    monkeypatch.setattr("service.search.time.sleep", lambda s: None)
    with pytest.raises(optuna.exceptions.StorageInternalError):
        trial.set_user_attr("k", 1)
