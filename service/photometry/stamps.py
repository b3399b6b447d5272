"""Pixel stamps around a sky position: a FITS cutout with its WCS, or a PNG to look at.

The PNG is stretched as astronomers expect: ZScale limits (astropy.visualization) and an
asinh stretch, grey, enlarged ``scale`` times with nearest-neighbour pixels, a red cross
marking the position.
"""

from __future__ import annotations

import io
import math

from astropy.io import fits
from astropy.visualization import AsinhStretch, ImageNormalize, ZScaleInterval
import matplotlib.image
import numpy as np

from forcedphot.photometry.exposure import Exposure, ExposureError
from forcedphot.photometry.selection import sky_to_pixel

MAX_STAMP_PX = 256
PNG_SCALE = 4  # screen pixels per image pixel


def cutout(exposure: Exposure, ra: float, dec: float, size: int) -> tuple[np.ndarray, fits.Header, tuple[float, float]]:
    """The ``size`` x ``size`` image pixels centred on the pixel nearest (ra, dec) (NaN
    beyond the image), a header whose WCS maps the cutout's own pixels, and the position
    in cutout pixels (0-based)."""
    if not 1 <= size <= MAX_STAMP_PX:
        raise ValueError(f"stamp size must be 1 to {MAX_STAMP_PX} px, got {size}")
    x, y = (float(v[0]) for v in sky_to_pixel(exposure.wcs, np.array([ra]), np.array([dec])))
    if not (math.isfinite(x) and math.isfinite(y)):
        raise ExposureError(f"{exposure.name}: ({ra}, {dec}) has no pixel position on it")
    half = size // 2
    x0, y0 = math.floor(x + 0.5) - half, math.floor(y + 0.5) - half
    if x0 + size <= 0 or y0 + size <= 0 or x0 >= exposure.width or y0 >= exposure.height:
        raise ExposureError(f"{exposure.name}: ({ra}, {dec}) lies off the exposure (pixel {x:.1f}, {y:.1f})")
    pixels = np.full((size, size), np.nan, np.float32)
    rows = slice(max(y0, 0), min(y0 + size, exposure.height))
    cols = slice(max(x0, 0), min(x0 + size, exposure.width))
    image = exposure.read_rows(rows.start, rows.stop)[0]
    pixels[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0] = image[:, cols]
    wcs = exposure.wcs.deepcopy()
    wcs.wcs.crpix = wcs.wcs.crpix - [x0, y0]
    if wcs.sip is not None:
        wcs.sip = type(wcs.sip)(wcs.sip.a, wcs.sip.b, wcs.sip.ap, wcs.sip.bp, wcs.wcs.crpix)
    header = wcs.to_header(relax=True)
    header["LTV1"], header["LTV2"] = -(x0 + exposure.x0), -(y0 + exposure.y0)  # parent origin of the cutout, as afw
    return pixels, header, (x - x0, y - y0)


def stamp_fits(pixels: np.ndarray, header: fits.Header) -> bytes:
    sink = io.BytesIO()
    fits.PrimaryHDU(pixels, header=header).writeto(sink)
    return sink.getvalue()


def stamp_png(pixels: np.ndarray, position: tuple[float, float], scale: int = PNG_SCALE) -> bytes:
    """A PNG of ``size * scale`` pixels a side (see the module docstring); row 0 at the bottom."""
    finite = pixels[np.isfinite(pixels)]
    norm = ImageNormalize(finite if finite.size else np.zeros(1), interval=ZScaleInterval(), stretch=AsinhStretch())
    grey = np.nan_to_num(np.clip(norm(np.where(np.isfinite(pixels), pixels, np.nan)).filled(0.0), 0, 1), nan=0.0)
    rgb = np.repeat(np.repeat(np.stack([grey] * 3, axis=-1), scale, axis=0), scale, axis=1)
    cx, cy = (int(round((v + 0.5) * scale)) for v in position)
    arm, size = 3 * scale, rgb.shape[0]
    red = np.array([1.0, 0.1, 0.1])
    for lo, hi in ((cx - arm, cx - scale), (cx + scale, cx + arm)):  # a cross with a gap at the centre
        rgb[max(cy - 1, 0):cy + 1, max(lo, 0):max(min(hi, size), 0)] = red
    for lo, hi in ((cy - arm, cy - scale), (cy + scale, cy + arm)):
        rgb[max(lo, 0):max(min(hi, size), 0), max(cx - 1, 0):cx + 1] = red
    sink = io.BytesIO()
    matplotlib.image.imsave(sink, rgb[::-1], format="png")  # FITS row 0 is at the bottom
    return sink.getvalue()
