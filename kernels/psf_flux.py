"""Forced PSF flux, batched: LSST ``base_PsfFlux`` on a stack of cutouts.

For each object the PSF model ``P`` (normalised to sum 1 over its stamp) is fitted to the
data ``D`` with an unweighted linear least-squares amplitude over the fit pixels ``i``
(the stamp box clipped to the image, minus pixels with bad mask bits)::

    alpha       = sum P_i^2
    instFlux    = sum P_i D_i / alpha
    instFluxErr = sqrt(sum P_i^2 V_i) / alpha
    area        = (sum P_i)^2 / alpha
    chi2        = sum (D_i - instFlux P_i)^2 / V_i
    response    = sum P_i / alpha   (the instFlux a uniform background of 1 adds)

Units: fluxes in the image's units times pixels (instrumental flux, "instFlux"); ``area``
in pixels; ``chi2`` dimensionless.
"""

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace

Array = Any


class PsfFluxResult(NamedTuple):
    """Per-object results of :func:`psf_flux`, each an ``(N,)`` array.

    Attributes
    ----------
    inst_flux, inst_flux_err : float64
        Fitted amplitude and its standard deviation, image units x px (LSST
        ``instFlux``, ``instFluxErr``); NaN where undefined.
    area : float64
        Effective area ``(sum P)^2 / sum P^2``, px.
    chi2 : float64
        ``sum (D - instFlux P)^2 / V`` over the fit pixels, dimensionless.
    npixels : int64
        Pixels fitted.
    flag : bool
        General failure: edge, no good pixels, or a non-finite result.
    flag_edge : bool
        The stamp is clipped by the image edge.
    flag_no_good_pixels : bool
        No pixel left to fit.
    background_response : float64
        ``sum P / sum P^2`` over the fit pixels, px: the ``inst_flux`` a uniform
        background of one image unit adds (what subtracting a local background scales by).
    """

    inst_flux: Array
    inst_flux_err: Array
    area: Array
    chi2: Array
    npixels: Array
    flag: Array
    flag_edge: Array
    flag_no_good_pixels: Array
    background_response: Array


def psf_flux(data: Array, variance: Array, psf: Array, inside: Array, usable: Array) -> PsfFluxResult:
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
    PsfFluxResult
        ``(N,)`` arrays: fluxes, area and chi2 float64 (NaN where undefined), pixel count
        int64, and the flags (see :class:`PsfFluxResult`).
    """
    xp = array_namespace(data, variance, psf, inside, usable)
    f64 = xp.float64
    p = xp.where(usable, xp.astype(psf, f64), 0.0)
    d = xp.where(usable, xp.astype(data, f64), 0.0)
    v = xp.where(usable, xp.astype(variance, f64), 0.0)

    axes = (1, 2)
    npixels = xp.sum(xp.astype(usable, xp.int64), axis=axes)
    alpha = xp.sum(p * p, axis=axes)
    good = npixels > 0
    safe_alpha = xp.where(good, alpha, 1.0)
    nan = math.nan

    flux = xp.where(good, xp.sum(p * d, axis=axes) / safe_alpha, nan)
    flux_err = xp.where(good, xp.sqrt(xp.sum(p * p * v, axis=axes)) / safe_alpha, nan)
    sum_p = xp.sum(p, axis=axes)
    area = xp.where(good, sum_p ** 2 / safe_alpha, nan)
    response = xp.where(good, sum_p / safe_alpha, nan)
    residual = d - flux[:, None, None] * p
    safe_v = xp.where(usable, v, 1.0)
    chi2 = xp.where(good, xp.sum(xp.where(usable, residual * residual / safe_v, 0.0), axis=axes), nan)

    flag_edge = xp.logical_not(xp.all(inside, axis=axes))
    finite = xp.logical_and(xp.isfinite(flux), xp.isfinite(flux_err))
    flux = xp.where(finite, flux, nan)
    flag = xp.logical_or(xp.logical_or(flag_edge, xp.logical_not(good)), xp.logical_not(finite))
    return PsfFluxResult(flux, flux_err, area, chi2, npixels, flag, flag_edge, xp.logical_not(good), response)
