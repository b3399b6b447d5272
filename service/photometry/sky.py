"""Local background subtraction for images whose sky is still in the pixels.

LSST images are background-subtracted by the pipelines and measured as they are (the local
background is reported in ``localBackground_instFlux``, not subtracted). A plain FITS
image straight from a telescope usually still holds its sky: a 5000-count star on
100 counts/px of sky has a PSF flux near 7250. Forced photometry of such images subtracts
each object's local background (the clipped mean of its 7-15 sigma annulus) from its
fluxes. Both fluxes are linear in the pixels, so subtracting a constant ``b`` from every
pixel changes them by ``b`` times a response the kernels report: ``sum P / sum P^2`` for
the PSF flux, the aperture's area over valid pixels for an aperture.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from forcedphot.photometry.runner import KernelResults

__all__ = ["subtract_local_background", "subtracts_background"]


def subtracts_background(setting: Literal["auto", "on", "off"], sky_subtracted: bool, difference: bool) -> bool:
    """Whether an image's fluxes get its local background subtracted: ``on``/``off`` as
    said; ``auto`` on a direct image (not a ``difference`` image) that is not
    ``sky_subtracted`` (plain FITS, see :attr:`Exposure.sky_subtracted`)."""
    if setting != "auto":
        return setting == "on"
    return not sky_subtracted and not difference


def subtract_local_background(results: KernelResults) -> None:
    """Subtract each object's local background from its PSF and aperture fluxes (if
    measured), in place.

    The flux changes by ``-b x response`` (``b`` = ``background.mean``, image units per
    pixel); the error of ``b`` (``std / sqrt(n_pixels)``) times the response is added in
    quadrature to the flux error. An object measured without a background estimate (no
    good annulus pixel) gets NaN fluxes and ``psf.flag`` set.
    """
    background, fit, apertures = results.background, results.psf, results.apertures
    level = background.mean
    with np.errstate(invalid="ignore", divide="ignore"):
        level_err = np.where(background.n_pixels > 0, background.std / np.sqrt(background.n_pixels), np.nan)
    fit.flag[np.isfinite(fit.inst_flux) & ~np.isfinite(level)] = True
    fit.inst_flux[:] = fit.inst_flux - level * fit.background_response
    fit.inst_flux_err[:] = np.hypot(fit.inst_flux_err, level_err * fit.background_response)
    if apertures is not None:
        apertures.flux[:] = apertures.flux - level[:, None] * apertures.area
        apertures.flux_err[:] = np.hypot(apertures.flux_err, level_err[:, None] * apertures.area)
