"""A synthetic LSST-style visit for demos, benchmarks and end-to-end tests.

:func:`make_demo_visit` writes into one directory:

- ``calexp.fits``: the science (direct) exposure in the afw FITS layout
  (:func:`forcedphot.photometry.lsst_fits.write_lsst_exposure`): IMAGE / MASK / VARIANCE, a TAN-SIP
  WCS of the local array (0.2 arcsec/px, ~1 px distortion at the corners), a non-zero
  parent origin (X0, Y0), a constant PhotoCalib, VisitInfo metadata and ``PSF_FWHM``
  (pixels) in the primary header.
- ``difference.fits``: science minus template, same WCS, origin and calibration, with its
  own variance (science + template) and the science mask.
- ``diaObjects.parquet``: ``diaObjectId`` (int64), ``ra``, ``dec`` (deg, ICRS); ~5 % of
  the objects lie off the detector and a few straddle its edge (within 3 px of the
  ``Box2D`` border, on either side).
- ``truth.parquet``: ``diaObjectId, ra, dec, x, y`` (local pixels, astropy ``origin=0``),
  ``science_flux_nJy`` (template + difference flux), ``difference_flux_nJy``,
  ``on_detector`` (``-0.5 <= x < width - 0.5`` and the same in y: LSST's ``Box2D``).

Pixel model (units: counts, gain 1 e-/count)
--------------------------------------------
Every source is a circular Gaussian of the given FWHM integrated over pixels (the same
model as ``load_psf(fwhm_pixels=...)``), rendered from stamps of half-size ``ceil(6 sigma)``
summed into the image with ``np.bincount``. The science image is sky-subtracted:

    image = stars + DiaObjects (template + difference flux) + noise,
    variance = SKY + model + READ_NOISE^2,

with Gaussian noise of that variance (sky and source Poisson noise plus read noise).
Pixels whose raw value (image + SKY) exceeds ``SATURATION`` are clipped to it and get the
SAT bit (the brightest field stars saturate). Cosmic rays (short tracks, CR bit) and a few
hot columns (BAD bit) are added to the science image; EDGE marks an 8-pixel border.
The template holds the stars and the DiaObjects' template flux with the noise of a
4-visit coadd (variance / 4); with the same PSF, static sources cancel in
``difference = science - template``, whose variance is the sum of both and whose mask is
the science mask. Calibration: zero point 28.5 mag for 1 count, i.e.
``calibrationMean = 10**((31.4 - 28.5) / 2.5) = 14.45 nJy/count``.

Rendering is vectorised: a 4096 x 4096 visit with 2000 objects takes a few seconds, most
of it writing ~200 MB per FITS file.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path

from astropy.time import Time
from astropy.wcs import WCS, Sip
import numpy as np
import pandas as pd

from forcedphot.kernels.psf_stamps import gaussian_stamps
from forcedphot.photometry.exposure import njy_per_count
from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES, afw_visit_metadata, write_lsst_exposure
from forcedphot.photometry.psf_models import PSF_FWHM_KEYWORD

PIXEL_SCALE_ARCSEC = 0.2
ZERO_POINT_MAG = 28.5  # magnitude of 1 count
CALIBRATION_NJY_PER_COUNT = njy_per_count(ZERO_POINT_MAG)
SKY = 400.0  # counts per pixel (subtracted)
READ_NOISE = 5.0  # counts
SATURATION = 60000.0  # raw counts
TEMPLATE_COADD_VISITS = 4
EDGE_WIDTH = 8  # px
ORIGIN = (1017, 2046)  # parent X0, Y0
BAND, DETNAME = "r", "R22_S11"
PHYSICAL_FILTERS = {"g": "g_6", "r": "r_57", "i": "i_39"}
MIDPOINT = Time(61041.21875, format="mjd", scale="tai")
EXPOSURE_TIME = 30.0
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
BITS = AFW_DEFAULT_MASK_PLANES


@dataclass(frozen=True)
class DemoVisit:
    """What :func:`make_demo_visit` wrote (paths) and the numbers that describe it."""

    directory: Path
    calexp: Path
    difference: Path
    dia_objects: Path
    truth: Path
    visit: int
    detector: int
    size: int
    x0: int
    y0: int
    fwhm_pixels: float
    calibration_mean: float  # nJy per count
    n_objects: int
    n_on_detector: int
    n_stars: int
    n_saturated_pixels: int
    n_cosmic_ray_pixels: int

    def __str__(self) -> str:
        return (
            f"{self.size}x{self.size} px visit {self.visit} detector {self.detector}, "
            f"{self.n_objects} DiaObjects ({self.n_on_detector} on the detector), {self.n_stars} stars, "
            f"PSF FWHM {self.fwhm_pixels} px"
        )


def demo_wcs(size: int, ra: float = 150.1, dec: float = 2.2) -> WCS:
    """TAN-SIP WCS of a ``size`` x ``size`` local array: 0.2 arcsec/px, rotated 0.1 rad,
    with second- and third-order SIP terms that move the corners by ~1 px."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [ra, dec]
    wcs.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    rot = 0.1
    wcs.wcs.cd = [[-scale * math.cos(rot), scale * math.sin(rot)], [scale * math.sin(rot), scale * math.cos(rot)]]
    half = size / 2
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[0, 2], a[1, 1] = 0.6 / half**2, -0.4 / half**2, 0.3 / half**2
    b[0, 2], b[1, 1], b[2, 1] = 0.5 / half**2, -0.3 / half**2, 0.4 / half**3
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def _render(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float) -> np.ndarray:
    """Image (float64, counts) of pixel-integrated Gaussians of total ``flux`` at local
    positions ``(x, y)``; stamp pixels off the image are dropped."""
    height, width = shape
    half = int(math.ceil(6.0 * sigma))
    size = 2 * half + 1
    ix = np.floor(x + 0.5).astype(np.int64)
    iy = np.floor(y + 0.5).astype(np.int64)
    stamps = np.asarray(gaussian_stamps(half + x - ix, half + y - iy, sigma, size)) * flux[:, None, None]
    offsets = np.arange(size) - half
    cols = (ix[:, None] + offsets)[:, None, :]
    rows = (iy[:, None] + offsets)[:, :, None]
    on = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
    flat = np.broadcast_to(rows * width + cols, stamps.shape)
    total = np.bincount(flat[on], weights=stamps[on], minlength=height * width)
    return total.reshape(shape)


def magnitudes_to_counts(mag: np.ndarray) -> np.ndarray:
    return 10.0 ** (-0.4 * (mag - ZERO_POINT_MAG))


def field_stars(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static stars: counts rising as 10^(0.3 m) from 16 to 23 mag, plus a few bright
    (11.5 - 13.5 mag) stars that saturate. Returns local x, y and flux in counts."""
    area = (size / 4096.0) ** 2
    n_faint = max(20, round(1500 * area))
    n_bright = max(2, round(8 * area))
    # Inverse CDF of p(m) ~ 10^(0.3 m) on [16, 23].
    u = rng.random(n_faint)
    lo, hi = 10.0 ** (0.3 * 16.0), 10.0 ** (0.3 * 23.0)
    mag = np.concatenate([np.log10(lo + u * (hi - lo)) / 0.3, rng.uniform(11.5, 13.5, n_bright)])
    n = n_faint + n_bright
    return rng.uniform(-10, size + 10, n), rng.uniform(-10, size + 10, n), magnitudes_to_counts(mag)


def _object_positions(rng: np.random.Generator, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Local positions: ~5 % off the detector (up to 100 px beyond it), ~1 % (at least 4)
    within 3 px of the border on either side, the rest on the detector."""
    x = rng.uniform(-0.5, size - 0.5, n)
    y = rng.uniform(-0.5, size - 0.5, n)
    kind = rng.random(n)
    off = kind < 0.05
    straddle = (kind >= 0.05) & (kind < 0.06)
    straddle[np.flatnonzero(~off & ~straddle)[: max(0, 4 - int(straddle.sum()))]] = True
    for mask, lo, hi in ((off, 3.0, 100.0), (straddle, -3.0, 3.0)):
        m = int(mask.sum())
        depth = rng.uniform(lo, hi, m)  # distance beyond the Box2D border (negative: inside)
        side = rng.integers(0, 4, m)
        along = rng.uniform(-0.5, size - 0.5, m)
        border_x = np.where(side == 0, -0.5 - depth, size - 0.5 + depth)
        border_y = np.where(side == 2, -0.5 - depth, size - 0.5 + depth)
        x[mask] = np.where(side < 2, border_x, along)
        y[mask] = np.where(side < 2, along, border_y)
    return x, y


def _object_fluxes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Template and difference flux (counts) of the DiaObjects: 20 % hostless, hosts of
    19 - 24 mag; 20 % not varying, the rest brightening or fading by 19.5 - 23.5 mag
    (a fade never takes more than the template flux)."""
    template = np.where(rng.random(n) < 0.2, 0.0, magnitudes_to_counts(rng.uniform(19.0, 24.0, n)))
    change = magnitudes_to_counts(rng.uniform(19.5, 23.5, n)) * np.where(rng.random(n) < 0.5, -1.0, 1.0)
    change = np.where(change < -template, -template * rng.uniform(0.2, 1.0, n), change)
    change = np.where(rng.random(n) < 0.2, 0.0, change)
    return template, change


def _cosmic_rays(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel rows, columns and deposited counts of short cosmic-ray tracks (1 - 6 px),
    about 20 per megapixel."""
    n = max(3, round(20 * size * size / 1e6))
    length = rng.integers(1, 7, n)
    angle = rng.uniform(0, np.pi, n)
    steps = np.arange(6)
    x = rng.uniform(0, size - 1, n)[:, None] + steps * np.cos(angle)[:, None]
    y = rng.uniform(0, size - 1, n)[:, None] + steps * np.sin(angle)[:, None]
    keep = steps[None, :] < length[:, None]
    cols = np.clip(np.rint(x[keep]).astype(np.int64), 0, size - 1)
    rows = np.clip(np.rint(y[keep]).astype(np.int64), 0, size - 1)
    counts = rng.uniform(300.0, 5000.0, int(keep.sum()))
    return rows, cols, counts


@dataclass(frozen=True)
class VisitImages:
    """The pixels of one synthetic visit (counts), before they are written."""

    science: np.ndarray
    science_variance: np.ndarray
    difference: np.ndarray
    difference_variance: np.ndarray
    mask: np.ndarray
    n_saturated: int
    n_cosmic_ray: int


def render_visit(rng: np.random.Generator, size: int, sigma: float, stars: tuple, objects: tuple) -> VisitImages:
    """Science and difference images of one visit (see the module docstring).

    ``stars`` is ``(x, y, flux)`` and ``objects`` ``(x, y, template_flux, change_flux)``,
    local pixel positions and counts; ``sigma`` the Gaussian PSF width in pixels.
    """
    star_x, star_y, star_flux = stars
    obj_x, obj_y, template_flux, change_flux = objects
    shape = (size, size)
    all_x = np.concatenate([star_x, obj_x])
    all_y = np.concatenate([star_y, obj_y])
    template_model = _render(shape, all_x, all_y, np.concatenate([star_flux, template_flux]), sigma)
    change_model = _render(shape, obj_x, obj_y, change_flux, sigma)
    science_model = template_model + change_model

    science_var = SKY + science_model + READ_NOISE**2
    science = science_model + np.sqrt(science_var) * rng.standard_normal(shape, dtype=np.float32)
    template_var = (SKY + template_model + READ_NOISE**2) / TEMPLATE_COADD_VISITS
    template = template_model + np.sqrt(template_var) * rng.standard_normal(shape, dtype=np.float32)

    mask = np.zeros(shape, np.int32)
    rows, cols, counts = _cosmic_rays(rng, size)
    np.add.at(science, (rows, cols), counts)
    mask[rows, cols] |= 1 << BITS["CR"]
    bad_cols = rng.choice(np.arange(EDGE_WIDTH, size - EDGE_WIDTH), size=max(1, size // 1024), replace=False)
    science[:, bad_cols] += 300.0  # hot columns
    mask[:, bad_cols] |= 1 << BITS["BAD"]
    saturated = science + SKY >= SATURATION
    science[saturated] = SATURATION - SKY
    mask[saturated] |= 1 << BITS["SAT"]
    edge = np.zeros(shape, bool)
    edge[:EDGE_WIDTH, :] = edge[-EDGE_WIDTH:, :] = True
    edge[:, :EDGE_WIDTH] = edge[:, -EDGE_WIDTH:] = True
    mask[edge] |= 1 << BITS["EDGE"]
    return VisitImages(science, science_var, science - template, science_var + template_var, mask,
                       int(saturated.sum()), len(np.unique(rows * size + cols)))


def write_visit(out: Path, images: VisitImages, wcs: WCS, *, visit: int, detector: int, band: str, midpoint: Time,
                fwhm_pixels: float) -> None:
    """Write ``calexp.fits`` and ``difference.fits`` of one visit into ``out`` (LSST layout)."""
    metadata = afw_visit_metadata(
        visit=visit, detector=detector, band=band, midpoint=midpoint, exposure_time=EXPOSURE_TIME,
        physical_filter=PHYSICAL_FILTERS[band],
    )
    metadata["DETNAME"] = DETNAME
    metadata[PSF_FWHM_KEYWORD] = (float(fwhm_pixels), "[pixel] FWHM of the Gaussian PSF (demo)")
    x0, y0 = ORIGIN
    common = dict(mask_planes=BITS, x0=x0, y0=y0, calibration_mean=CALIBRATION_NJY_PER_COUNT,
                  calibration_err=0.005 * CALIBRATION_NJY_PER_COUNT, metadata=metadata)
    write_lsst_exposure(out / "calexp.fits", images.science, images.science_variance, images.mask, wcs, **common)
    write_lsst_exposure(out / "difference.fits", images.difference, images.difference_variance, images.mask, wcs, **common)


def make_demo_visit(
    out_dir: str | Path,
    *,
    size: int = 4096,
    n_objects: int = 2000,
    seed: int = 0,
    fwhm_pixels: float = 3.5,
    visit: int = 2026112400042,
    detector: int = 94,
) -> DemoVisit:
    """Write a synthetic science exposure, its difference image, DiaObjects and truth.

    Parameters
    ----------
    out_dir : directory to write into (created if missing; files are overwritten).
    size : image side in pixels (>= 64).
    n_objects : number of DiaObjects (>= 0), ~5 % of them off the detector.
    seed : seed of the random generator; the same seed gives the same files.
    fwhm_pixels : FWHM of the Gaussian PSF in pixels (> 0), written as ``PSF_FWHM``.
    visit, detector : ids written in the VisitInfo / Butler metadata.
    """
    if int(size) < 64:
        raise ValueError(f"make_demo_visit: size must be at least 64 pixels, got {size}")
    if int(n_objects) < 0:
        raise ValueError(f"make_demo_visit: n_objects must be >= 0, got {n_objects}")
    if not fwhm_pixels > 0:
        raise ValueError(f"make_demo_visit: fwhm_pixels must be > 0, got {fwhm_pixels}")
    size, n_objects = int(size), int(n_objects)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sigma = fwhm_pixels / FWHM_PER_SIGMA
    wcs = demo_wcs(size)

    star_x, star_y, star_flux = field_stars(rng, size)
    obj_x, obj_y = _object_positions(rng, n_objects, size)
    template_flux, change_flux = _object_fluxes(rng, n_objects)
    images = render_visit(rng, size, sigma, (star_x, star_y, star_flux), (obj_x, obj_y, template_flux, change_flux))
    paths = {name: out / name for name in ("calexp.fits", "difference.fits", "diaObjects.parquet", "truth.parquet")}
    write_visit(out, images, wcs, visit=visit, detector=detector, band=BAND, midpoint=MIDPOINT, fwhm_pixels=fwhm_pixels)
    x0, y0 = ORIGIN

    ra, dec = wcs.all_pix2world(obj_x, obj_y, 0)
    ids = np.sort(rng.choice(2**40, size=n_objects, replace=False)).astype(np.int64) + 600_000_000_000_000_000
    order = rng.permutation(n_objects)
    on_detector = (obj_x >= -0.5) & (obj_x < size - 0.5) & (obj_y >= -0.5) & (obj_y < size - 0.5)
    pd.DataFrame({"diaObjectId": ids, "ra": ra, "dec": dec}).iloc[order].to_parquet(paths["diaObjects.parquet"], index=False)
    truth = pd.DataFrame({
        "diaObjectId": ids, "ra": ra, "dec": dec, "x": obj_x, "y": obj_y,
        "science_flux_nJy": (template_flux + change_flux) * CALIBRATION_NJY_PER_COUNT,
        "difference_flux_nJy": change_flux * CALIBRATION_NJY_PER_COUNT,
        "on_detector": on_detector,
    })
    truth.to_parquet(paths["truth.parquet"], index=False)
    return DemoVisit(
        directory=out, calexp=paths["calexp.fits"], difference=paths["difference.fits"],
        dia_objects=paths["diaObjects.parquet"], truth=paths["truth.parquet"], visit=int(visit),
        detector=int(detector), size=size, x0=x0, y0=y0, fwhm_pixels=float(fwhm_pixels),
        calibration_mean=CALIBRATION_NJY_PER_COUNT, n_objects=n_objects,
        n_on_detector=int(on_detector.sum()), n_stars=len(star_flux),
        n_saturated_pixels=images.n_saturated, n_cosmic_ray_pixels=images.n_cosmic_ray,
    )
