"""Synthetic scenes for tests: pixel-integrated Gaussian stars (scipy erf, independent
of the project's own PSF code) and small LSST-layout exposures with a TAN-SIP WCS."""

from astropy.time import Time
from astropy.wcs import WCS, Sip
import numpy as np
from scipy.special import erf

from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES, afw_visit_metadata, write_lsst_exposure


def integrated_gaussian(cx, cy, sigma, size):
    """(N, size, size) pixel-integrated unit-flux Gaussians centred at (cx, cy), px."""
    edges = np.arange(size + 1) - 0.5
    s = np.sqrt(2) * sigma

    def profile(c):
        return np.diff(0.5 * erf((edges[None, :] - np.asarray(c, dtype=float)[:, None]) / s), axis=1)

    return profile(cy)[:, :, None] * profile(cx)[:, None, :]


def render_stars(shape, x, y, flux, sigma, half=None):
    """Image of Gaussian stars at local positions (x, y) with total fluxes ``flux``."""
    half = half or int(np.ceil(8 * sigma))
    size = 2 * half + 1
    ix, iy = np.floor(np.asarray(x) + 0.5).astype(int), np.floor(np.asarray(y) + 0.5).astype(int)
    stamps = integrated_gaussian(half + x - ix, half + y - iy, sigma, size) * np.asarray(flux)[:, None, None]
    padded = np.zeros((shape[0] + 2 * size, shape[1] + 2 * size))
    rows = iy[:, None, None] + np.arange(size)[None, :, None] + size - half
    cols = ix[:, None, None] + np.arange(size)[None, None, :] + size - half
    np.add.at(padded, (rows, cols), stamps)
    return padded[size:-size, size:-size]


def sip_wcs(width, height, ra=150.0, dec=2.0, scale_arcsec=0.2) -> WCS:
    """A TAN-SIP WCS for a local array of the given size, with a small distortion."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [width / 2 + 0.5, height / 2 + 0.5]
    s = scale_arcsec / 3600
    wcs.wcs.cd = [[-s * np.cos(0.1), s * np.sin(0.1)], [s * np.sin(0.1), s * np.cos(0.1)]]
    a = np.zeros((4, 4)); b = np.zeros((4, 4))
    a[2, 0], a[0, 2], b[1, 1], b[2, 1] = 3e-6, -2e-6, 2.5e-6, 1e-9
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def write_exposure(path, image, variance, mask=None, *, wcs, x0=0, y0=0, calibration=2.0, visit=1234, detector=42):
    """An LSST-layout exposure with PhotoCalib calibration and VisitInfo metadata."""
    mask = np.zeros(image.shape, np.int32) if mask is None else mask
    meta = afw_visit_metadata(visit=visit, detector=detector, band="r", midpoint=Time(61000.25, format="mjd", scale="tai"), exposure_time=30.0)
    write_lsst_exposure(path, image.astype(np.float32), variance.astype(np.float32), mask, wcs, x0=x0, y0=y0,
                        calibration_mean=calibration, calibration_err=0.01, metadata=meta)
    return path


MASK_BITS = AFW_DEFAULT_MASK_PLANES
