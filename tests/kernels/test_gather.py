"""The cutout gather: windows equal direct slices, padding beyond every edge, one code path
on NumPy, array_api_strict and the stand-in device."""

import array_api_strict
import numpy as np
import pytest

from forcedphot.kernels.cutouts import gather_cutouts

NO_DATA = 1 << 8


def planes(rng, height=40, width=30):
    image = rng.normal(size=(height, width)).astype(np.float32)
    variance = rng.uniform(1, 2, (height, width)).astype(np.float32)
    mask = rng.integers(0, 64, (height, width)).astype(np.int32)
    return image, variance, mask


def reference(plane, ix, iy, size, fill):
    """One window at a time, padding by hand."""
    h = size // 2
    height, width = plane.shape
    out = np.full((len(ix), size, size), fill, dtype=plane.dtype)
    inside = np.zeros((len(ix), size, size), bool)
    for n, (i, j) in enumerate(zip(ix, iy)):
        for b in range(size):
            for a in range(size):
                row, col = j - h + b, i - h + a
                if 0 <= row < height and 0 <= col < width:
                    out[n, b, a], inside[n, b, a] = plane[row, col], True
    return out, inside


def gather(xp, arrays, ix, iy, size, device=None):
    put = (lambda a: xp.asarray(a)) if device is None else (lambda a: xp.asarray(a, device=device))
    result = gather_cutouts(*(put(a) for a in arrays), put(ix), put(iy), size, NO_DATA)
    to_host = (lambda a: np.asarray(a)) if device is None else (lambda a: np.asarray(a.to_device(array_api_strict.Device("CPU_DEVICE"))))
    return [to_host(a) for a in result]


def test_windows_and_padding_match_a_pixel_by_pixel_reference(xp, rng):
    arrays = planes(rng)
    # interior, every edge, every corner, and wholly off the planes
    ix = np.array([15, 0, 29, 12, 10, 0, 29, -3, 40], np.int64)
    iy = np.array([20, 18, 22, 0, 39, 0, 39, 5, 50], np.int64)
    size = 7
    image, variance, mask, inside = gather(xp, arrays, ix, iy, size)
    for got, plane, fill in zip((image, variance, mask), arrays, (np.nan, np.nan, NO_DATA)):
        expected, expected_inside = reference(plane, ix, iy, size, fill)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(inside, expected_inside)
    assert image.dtype == np.float32 and mask.dtype == np.int32 and inside.dtype == bool
    assert inside[0].all() and not inside[-1].any() and inside[5].sum() == 16  # 4 x 4 quadrant at the corner


def test_the_stand_in_device_gives_numpy_results(rng):
    arrays = planes(rng)
    ix, iy = rng.integers(-4, 34, 50), rng.integers(-4, 44, 50)
    on_host = gather(np, arrays, ix, iy, 9)
    on_device = gather(array_api_strict, arrays, ix, iy, 9, device=array_api_strict.Device("device1"))
    for a, b in zip(on_host, on_device):
        np.testing.assert_array_equal(a, b)


def test_even_size_is_refused():
    arrays = planes(np.random.default_rng(0))
    with pytest.raises(ValueError, match="odd"):
        gather_cutouts(*arrays, np.array([3]), np.array([3]), 8, NO_DATA)
