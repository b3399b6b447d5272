"""Forced PSF flux, batched: LSST ``base_PsfFlux`` on a stack of cutouts.

For each object the PSF model ``P`` (normalised to sum 1 over its stamp) is fitted to the
data ``D`` with an unweighted linear least-squares amplitude over the fit pixels ``i``
(the stamp box clipped to the image, minus pixels with bad mask bits)::

    alpha       = sum P_i^2
    instFlux    = sum P_i D_i / alpha
    instFluxErr = sqrt(sum P_i^2 V_i) / alpha
    area        = (sum P_i)^2 / alpha
    chi2        = sum (D_i - instFlux P_i)^2 / V_i

Units: fluxes in the image's units times pixels (instrumental flux, "instFlux"); ``area``
in pixels; ``chi2`` dimensionless.
"""

from typing import Any

from array_api_compat import array_namespace

Array = Any


def psf_flux(data: Array, variance: Array, psf: Array, inside: Array, usable: Array) -> dict[str, Array]:
    """Fit the PSF amplitude of every object in a stack.

    Parameters
    ----------
    data, variance : (N, K, K) arrays
        Cutouts of the image and its variance, centred as ``psf`` (same K).
    psf : (N, K, K) array
        PSF model stamps at each object's sub-pixel position, each summing to 1 over the
        whole stamp (before clipping to the image).
    inside : (N, K, K) bool
        True where the stamp pixel lies on the image (False in padding beyond its edge).
    usable : (N, K, K) bool
        True where the pixel may be fitted: inside, finite data and variance, and no bad
        mask bit.

    Returns
    -------
    dict of (N,) arrays
        ``instFlux``, ``instFluxErr``, ``area``, ``chi2`` (float64, NaN where undefined),
        ``npixels`` (int64), and bool flags ``flag`` (general), ``flag_edge`` (stamp
        clipped by the image edge), ``flag_noGoodPixels`` (no pixel left to fit).
    """
    xp = array_namespace(data, variance, psf, inside, usable)
    f64 = xp.float64
    zero = xp.asarray(0.0, dtype=f64)
    p = xp.where(usable, xp.astype(psf, f64), zero)
    d = xp.where(usable, xp.astype(data, f64), zero)
    v = xp.where(usable, xp.astype(variance, f64), zero)

    axes = (1, 2)
    npixels = xp.sum(xp.astype(usable, xp.int64), axis=axes)
    alpha = xp.sum(p * p, axis=axes)
    good = npixels > 0
    safe_alpha = xp.where(good, alpha, xp.asarray(1.0, dtype=f64))
    nan = xp.asarray(float("nan"), dtype=f64)

    flux = xp.where(good, xp.sum(p * d, axis=axes) / safe_alpha, nan)
    flux_err = xp.where(good, xp.sqrt(xp.sum(p * p * v, axis=axes)) / safe_alpha, nan)
    area = xp.where(good, xp.sum(p, axis=axes) ** 2 / safe_alpha, nan)
    residual = d - flux[:, None, None] * p
    safe_v = xp.where(usable, v, xp.asarray(1.0, dtype=f64))
    chi2 = xp.where(good, xp.sum(xp.where(usable, residual * residual / safe_v, zero), axis=axes), nan)

    flag_edge = xp.logical_not(xp.all(inside, axis=axes))
    finite = xp.logical_and(xp.isfinite(flux), xp.isfinite(flux_err))
    flux = xp.where(finite, flux, nan)
    flag = xp.logical_or(xp.logical_or(flag_edge, xp.logical_not(good)), xp.logical_not(finite))
    return {
        "instFlux": flux,
        "instFluxErr": flux_err,
        "area": area,
        "chi2": chi2,
        "npixels": npixels,
        "flag": flag,
        "flag_edge": flag_edge,
        "flag_noGoodPixels": xp.logical_not(good),
    }
