"""Shared fixtures: every kernel test runs under NumPy and under array_api_strict; service
tests share a small repository."""

import array_api_strict
import numpy as np
import pytest


@pytest.fixture(params=["numpy", "array_api_strict"])
def xp(request):
    """The array namespace a kernel test runs under."""
    return np if request.param == "numpy" else array_api_strict


@pytest.fixture
def rng():
    """A seeded random generator, so failures reproduce."""
    return np.random.default_rng(20261124)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A repository of one synthetic visit (see :func:`service_helpers.make_repository`)."""
    from service_helpers import make_repository

    return make_repository(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session (skipped, saying why, where its programs are absent)."""
    from postgres_helpers import PostgresServer, postgres_bin

    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL's initdb and postgres are not installed (Debian: apt-get install postgresql)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def job_database(request) -> str | None:
    """The job store's database for a test run on both: None (SQLite in the data
    directory) or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()
