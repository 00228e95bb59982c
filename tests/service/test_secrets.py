"""Store URLs are written down redacted; the real URL stays in the process that was given it."""

from __future__ import annotations

import pytest

from service import secrets
from service.plan import load_plan

from .conftest import SMALL


@pytest.mark.parametrize(
    ("url", "safe"),
    [
        ("postgresql+psycopg://ml:s3cr%40t@db:5432/optuna", "postgresql+psycopg://ml:***@db:5432/optuna"),
        (
            "postgresql://ml@db/optuna?sslmode=require&password=pw",
            "postgresql://ml@db/optuna?sslmode=require&password=***",
        ),
        ("https://token123@mlflow.example.org", "https://***@mlflow.example.org"),
        ("http://alice:pw@127.0.0.1:5000/", "http://alice:***@127.0.0.1:5000/"),
        ("mysql://u@h/db?access_key=AK&x=1", "mysql://u@h/db?access_key=***&x=1"),
        # untouched, byte for byte
        ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("postgresql://ml@db/optuna", "postgresql://ml@db/optuna"),
        (None, None),
    ],
)
def test_redact(url, safe):
    assert secrets.redact(url) == safe


def test_redact_text_masks_every_password_in_a_file():
    text = "tracking: {uri: 'http://a:pw1@h:5000'}\nstorage: {optuna: postgresql://b:pw2@db/o, path: s3://bucket/x}\n"
    out = secrets.redact_text(text)
    assert "pw1" not in out and "pw2" not in out
    assert "http://a:***@h:5000" in out and "postgresql://b:***@db/o" in out and "s3://bucket/x" in out


def test_remember_and_reveal():
    url = "postgresql://ml:hunter2@db/optuna"
    safe = secrets.remember(url)
    assert safe == "postgresql://ml:***@db/optuna"
    assert secrets.reveal(safe) == url
    assert secrets.reveal("postgresql://other:***@db/x") == "postgresql://other:***@db/x"


def test_plan_file_fields_carry_no_password(write_space, tmp_path):
    text = SMALL + (
        "tracking: {uri: 'http://alice:pw-tracking@127.0.0.1:5000'}\n"
        "storage: {optuna: 'postgresql://ml:pw-optuna@db/optuna'}\n"
    )
    plan = load_plan(write_space(text), launch_dir=tmp_path)
    frozen = str(plan.frozen_fields())
    assert "pw-tracking" not in frozen and "pw-optuna" not in frozen
    assert plan.optuna_storage == "postgresql://ml:pw-optuna@db/optuna"  # the real one, for connecting
