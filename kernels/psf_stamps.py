"""PSF model stamps, batched: pixel-integrated Gaussians and Lanczos resampling of models.

Stacks are ``(N, K, K)``: axis 0 = object, axis 1 = y (row), axis 2 = x (column). The
centre of stamp pixel ``[n, j, i]`` is at stamp coordinates ``(x=i, y=j)`` and the pixel
covers ``[i-0.5, i+0.5) x [j-0.5, j+0.5)``. Positions ``cx``, ``cy`` are ``(N,)`` float64
stamp coordinates in pixels. Everything is computed in float64 with standard array-API
functions only, so the kernels run unchanged on NumPy, CuPy and ``array_api_strict``.

The array API has no error function, so :func:`erfc` is a Chebyshev-fitted approximation
(the fit published in Numerical Recipes, "erfcc"): fractional error below 1.2e-7 for every
real argument.
"""

import math
from typing import Any

from array_api_compat import array_namespace, device

Array = Any

# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), z >= 0: Chebyshev-fitted P, lowest power first.
ERFC_COEFFS = (
    -1.26551223,
    1.00002368,
    0.37409196,
    0.09678418,
    -0.18628806,
    0.27886807,
    -1.13520398,
    1.48851587,
    -0.82215223,
    0.17087277,
)
_SQRT_HALF = math.sqrt(0.5)


def erfc(x: Array) -> Array:
    """Complementary error function, elementwise, float64; fractional error < 1.2e-7."""
    xp = array_namespace(x)
    x = xp.astype(x, xp.float64)
    z = xp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = xp.zeros_like(t)
    for coeff in reversed(ERFC_COEFFS):
        poly = poly * t + coeff
    tail = t * xp.exp(poly - z * z)
    return xp.where(x >= 0.0, tail, 2.0 - tail)


def _pixel_fractions(centre: Array, sigma: Array, size: int) -> Array:
    """(N, size) fraction of a unit 1-D Gaussian falling in each pixel [k-0.5, k+0.5).

    The difference of erfc is taken on the side of the centre where both edge values are
    small (the far tail), so that fractions far from the centre keep their relative
    accuracy. Both edges go through one :func:`erfc` call (a few large array operations
    rather than twice as many small ones: small batches are dominated by their count).
    """
    xp = array_namespace(centre, sigma)
    k = xp.arange(size + 1, dtype=xp.float64, device=device(centre))
    edge = (k - 0.5)[None, :] - centre[:, None]  # pixel k's left edge (k + 1's: its right) minus the Gaussian centre
    offset = k[None, :size] - centre[:, None]  # pixel centre minus Gaussian centre
    scale = _SQRT_HALF / sigma
    side = 1.0 - 2.0 * xp.astype(offset < 0.0, xp.float64)
    edges = erfc(xp.stack([side * edge[:, :size] * scale, side * edge[:, 1:] * scale]))
    return 0.5 * side * (edges[0, ...] - edges[1, ...])


def gaussian_stamps(cx: Array, cy: Array, sigma: Array | float, size: int) -> Array:
    """Stamps of a circular Gaussian of unit total flux, integrated over each pixel.

    Parameters
    ----------
    cx, cy : (N,) arrays
        Gaussian centre in stamp coordinates, pixels (centre of pixel ``[j, i]`` is ``(i, j)``).
    sigma : float or (N,) array
        Gaussian standard deviation in pixels (of the profile before pixel integration).
    size : int
        Stamp side K.

    Returns
    -------
    (N, K, K) float64 array
        Pixel ``[n, j, i]`` holds the flux of the unit Gaussian inside the pixel, the outer
        product of two (N, K) 1-D pixel-integrated profiles (difference of erfc at pixel
        edges). Each stamp sums to the flux enclosed by the stamp (< 1).
    """
    xp = array_namespace(cx, cy)
    cx = xp.astype(cx, xp.float64)
    cy = xp.astype(cy, xp.float64)
    sigma = xp.asarray(sigma, dtype=xp.float64, device=device(cx))
    sigma = sigma[:, None] if sigma.ndim == 1 else sigma
    n = cx.shape[0]
    both = _pixel_fractions(xp.concat([cx, cy]), xp.concat([sigma, sigma]) if sigma.ndim == 2 else sigma, size)  # x rows, then y rows
    profile_x, profile_y = both[:n, ...], both[n:, ...]
    return profile_y[:, :, None] * profile_x[:, None, :]


def _sin_pi(t: Array) -> Array:
    """sin(pi t), exactly zero at integer t (argument reduced to [-1/2, 1/2] first)."""
    xp = array_namespace(t)
    n = xp.round(t)
    parity = 1.0 - 2.0 * xp.remainder(n, 2.0)
    return parity * xp.sin(math.pi * (t - n))


def _lanczos(t: Array, order: int) -> Array:
    """Lanczos kernel sinc(t) sinc(t/order) for |t| < order, else 0 (sinc(0) = 1)."""
    xp = array_namespace(t)
    inside = xp.abs(t) < order
    tiny = xp.abs(t) < 1e-12
    safe_t = xp.where(tiny, xp.ones_like(t), t)
    value = order * _sin_pi(safe_t) * _sin_pi(safe_t / order) / (math.pi**2 * safe_t * safe_t)
    value = xp.where(tiny, xp.ones_like(t), value)
    return xp.where(inside, value, xp.zeros_like(t))


def lanczos_weights(u: Array, length: int, order: int) -> Array:
    """Lanczos interpolation weights of model samples ``0 .. length-1`` at coordinates ``u``.

    Parameters
    ----------
    u : (...,) float array
        Coordinates in model samples.
    length : int
        Number of model samples.
    order : int
        Lanczos order (kernel half-width in samples).

    Returns
    -------
    (..., length) float64 array
        The weights of each output coordinate, divided by the kernel's sum over its full
        ``2 * order`` integer taps around ``u`` (counting taps beyond the model, where the
        model is zero): the kernel then conserves a constant exactly (GalSim's
        ``conserve_dc`` aims at the same with an approximate correction; LSST normalises
        its warping kernels to sum 1). Normalising over the full taps, not over the model
        samples, keeps the model's edge from being extrapolated beyond it.
    """
    xp = array_namespace(u)
    dev = device(u)
    samples = xp.arange(length, dtype=xp.float64, device=dev)
    taps = xp.arange(1 - order, order + 1, dtype=xp.float64, device=dev)
    frac = u - xp.floor(u)
    dc = xp.sum(_lanczos(frac[..., None] - taps, order), axis=-1)
    return _lanczos(u[..., None] - samples, order) / dc[..., None]


def lanczos_resample(
    model: Array, cx: Array, cy: Array, size: int, sample_scale: float = 1.0, order: int = 5
) -> Array:
    """Interpolate sampled model images at the pixel centres of (N, size, size) stamps.

    Parameters
    ----------
    model : (B, B) or (N, B, B) array
        Model image(s) sampled on a grid of spacing ``sample_scale`` image pixels, the model
        centre at model pixel ``(B//2, B//2)``; zero outside the array.
    cx, cy : (N,) arrays
        Where the model centre lands, in stamp coordinates (pixels).
    size : int
        Stamp side K.
    sample_scale : float
        Model sample spacing in image pixels (PSFEx ``PSF_SAMP``; 1 for a pixel-scale image).
    order : int
        Lanczos order (kernel half-width in model samples).

    Returns
    -------
    (N, K, K) float64 array
        Stamp pixel ``[n, j, i]`` = model interpolated at model coords
        ``(B//2 + (i - cx[n]) / sample_scale, B//2 + (j - cy[n]) / sample_scale)``, with
        separable weights (see :func:`lanczos_weights`): ``Wy @ model @ Wx^T``. Not
        renormalised: values are model samples, not fluxes.
    """
    xp = array_namespace(model, cx, cy)
    model = xp.astype(model, xp.float64)
    cx = xp.astype(cx, xp.float64)
    cy = xp.astype(cy, xp.float64)
    rows, cols = model.shape[-2], model.shape[-1]
    pixels = xp.arange(size, dtype=xp.float64, device=device(cx))
    ux = float(cols // 2) + (pixels[None, :] - cx[:, None]) / sample_scale
    uy = float(rows // 2) + (pixels[None, :] - cy[:, None]) / sample_scale
    weights_x = lanczos_weights(ux, cols, order)
    weights_y = lanczos_weights(uy, rows, order)
    return xp.matmul(xp.matmul(weights_y, model), xp.matrix_transpose(weights_x))
