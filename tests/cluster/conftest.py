"""Fixtures for the cluster suite: the real components of `peers`, started by the tests (see that module)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from . import peers
from .peers import RayCluster, S3Server


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory) -> Iterator[RayCluster]:
    with peers.ray_cluster(tmp_path_factory.mktemp("ray")) as cluster:
        yield cluster


@pytest.fixture
def databases() -> Iterator[Callable[[], str]]:
    with peers.databases() as create:
        yield create


@pytest.fixture
def s3_server(tmp_path) -> Iterator[S3Server]:
    with peers.s3_server(tmp_path) as server:
        yield server


@pytest.fixture
def mlflow_server(tmp_path, databases, s3_server) -> Iterator[str]:
    with peers.mlflow_server(tmp_path, databases(), s3_server) as url:
        yield url
