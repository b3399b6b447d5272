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
