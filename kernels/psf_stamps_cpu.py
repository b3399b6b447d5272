"""Normalised pixel-integrated Gaussian PSF stamps, compiled: the CPU fast path.

:func:`~forcedphot.kernels.psf_stamps.gaussian_stamps` builds the stamps as a few dozen
whole-array operations (its ``erfc`` alone is ~25 passes over every pixel edge); here each
object's two 1-D profiles and its stamp are made in one compiled loop, with the same
formulas (the same Numerical Recipes ``erfc`` fit, the same far-side differences, the
outer product), each pixel edge's ``erfc`` evaluated once for the two pixels that share
it (twice where the far side changes, at the centre). The stamp is normalised as
photometry normalises stamps, in the same pass: its sum is the product of its profiles'
sums (NaN where that is not positive). Many stamps are spread over threads as the fused
kernel spreads its objects. ``tests/kernels/test_psf_stamps_cpu.py`` holds the two to
1e-13 relative (the sums add in another order), far tails included.

Conventions as :mod:`~forcedphot.kernels.psf_stamps`: stamp pixel ``[n, j, i]`` is
centred at stamp coordinates ``(x=i, y=j)`` and covers ``[i-0.5, i+0.5) x [j-0.5, j+0.5)``;
centres and widths in pixels.
"""

import math

from numba import njit
import numpy as np

from forcedphot.kernels.psf_stamps import ERFC_COEFFS

_SQRT_HALF = math.sqrt(0.5)
COEFFS = np.array(ERFC_COEFFS[::-1])  # highest power first, as Horner's rule takes them
SPREAD_MIN_STAMPS = 1024  # fewer are made on the calling thread (~1 us a stamp of 19 x 19; handing a run to a helper costs ~0.2 ms)


def normalised_gaussian_stamps(cx: np.ndarray, cy: np.ndarray, sigma: np.ndarray | float, size: int) -> np.ndarray:
    """(N, K, K) float64 stamps of a circular Gaussian integrated over each pixel, each
    divided by its sum.

    Parameters
    ----------
    cx, cy : (N,) float arrays
        Gaussian centre in stamp coordinates, pixels.
    sigma : float or (N,) float array
        Gaussian standard deviation before pixel integration, pixels.
    size : int
        Stamp side K.
    """
    from forcedphot.kernels.fused_cpu import spread  # (which makes these stamps itself, with gaussian_stamp)

    cx, cy = np.ascontiguousarray(cx, dtype=np.float64), np.ascontiguousarray(cy, dtype=np.float64)
    sigma = np.ascontiguousarray(np.broadcast_to(np.asarray(sigma, dtype=np.float64), cx.shape))
    out = np.empty((len(cx), size, size))
    spread(lambda lo, hi: _stamps(cx[lo:hi], cy[lo:hi], sigma[lo:hi], COEFFS, out[lo:hi]), len(cx), SPREAD_MIN_STAMPS)
    return out


@njit(nogil=True, cache=True, error_model="numpy")
def _stamps(cx, cy, sigma, coeffs, out):
    size = out.shape[1]
    profile_x, profile_y = np.empty(size), np.empty(size)
    for i in range(cx.shape[0]):
        gaussian_stamp(cx[i], cy[i], sigma[i], coeffs, profile_x, profile_y, out[i])


@njit(cache=True, error_model="numpy")
def gaussian_stamp(cx, cy, sigma, coeffs, profile_x, profile_y, out):
    """One stamp of :func:`normalised_gaussian_stamps` into the ``(K, K)`` array ``out``
    (centre ``(cx, cy)`` in stamp coordinates, width ``sigma``, px; ``coeffs``:
    :data:`COEFFS`), with ``profile_x`` and ``profile_y`` ``(K,)`` scratch arrays."""
    size = out.shape[0]
    _fractions(cx, sigma, coeffs, profile_x)
    _fractions(cy, sigma, coeffs, profile_y)
    sum_x = sum_y = 0.0
    for k in range(size):
        sum_x += profile_x[k]
        sum_y += profile_y[k]
    total = sum_x * sum_y
    scale = 1.0 / total if total > 0 else math.nan
    for j in range(size):
        for k in range(size):
            out[j, k] = profile_y[j] * profile_x[k] * scale  # the product first: far tails round as the reference's


@njit(cache=True, error_model="numpy")
def _fractions(centre, sigma, coeffs, out):
    """As :func:`~forcedphot.kernels.psf_stamps._pixel_fractions` for one centre: a pixel's
    right edge's ``erfc`` is its right neighbour's left one where both take the same side."""
    scale = _SQRT_HALF / sigma
    previous_side = right = 0.0
    for k in range(out.shape[0]):
        side = 1.0 - 2.0 * (1.0 if float(k) - centre < 0.0 else 0.0)
        left = right if side == previous_side else _erfc(side * ((float(k) - 0.5) - centre) * scale, coeffs)
        right = _erfc(side * ((float(k) + 0.5) - centre) * scale, coeffs)
        out[k] = 0.5 * side * (left - right)
        previous_side = side


@njit(cache=True, error_model="numpy", inline="always")
def _erfc(x, coeffs):
    """As :func:`~forcedphot.kernels.psf_stamps.erfc` (``coeffs``: highest power first)."""
    z = abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = 0.0
    for coeff in coeffs:
        poly = poly * t + coeff
    tail = t * math.exp(poly - z * z)
    return tail if x >= 0.0 else 2.0 - tail
