"""The compiled Gaussian stamps equal the array-API ones, normalised as photometry does."""

import numpy as np
import pytest

from forcedphot.kernels.psf_stamps import gaussian_stamps
from forcedphot.kernels.psf_stamps_cpu import normalised_gaussian_stamps


def reference(cx, cy, sigma, size):
    stamps = gaussian_stamps(cx, cy, sigma, size)
    total = stamps.sum(axis=(1, 2))
    return stamps / np.where(total > 0, total, np.nan)[:, None, None]


@pytest.mark.parametrize("size", [1, 7, 17, 25])
def test_compiled_stamps_equal_the_array_api_ones(size):
    """Centres across the stamp, far beyond it (only the far tails' flux, normalised),
    undefined (NaN), widths from a tenth of a pixel (a point) to wider than the stamp, one
    width or one per object."""
    rng = np.random.default_rng(size)
    n = 600  # spread over threads where there are several
    half = size // 2
    cx, cy = half + rng.uniform(-0.5, 0.5, n), half + rng.uniform(-0.5, 0.5, n)
    cx[:5] = (-40.0, size + 40.0, half, half + 0.5, np.nan)  # far off the stamp both ways, centred, on a pixel edge, undefined
    sigma = rng.uniform(0.1, 2.0 * size, n)
    for width in (sigma, 1.7):
        got = normalised_gaussian_stamps(cx, cy, width, size)
        want = reference(cx, cy, width, size)
        assert got.shape == (n, size, size) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-300, equal_nan=True)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.isnan(got[4]).all() and np.isfinite(np.delete(got, 4, axis=0)).all()
