"""A synthetic survey with a time axis: many visits of one field, variable DiaObjects, truth.

:func:`make_demo_survey` writes a repository in the default path template::

    <root>/<visit>/<detector>/calexp.fits, difference.fits, diaObjects.parquet
    <root>/diaObjects.parquet       every DiaObject of the field (diaObjectId, ra, dec)
    <root>/truth.parquet            one row per (object, visit): true fluxes and whether
                                    the object lies on that visit's detector
    <root>/objects.parquet          per object: its kind and light-curve parameters

The visits span ``days`` (at least 60) with uneven spacing, alternate between the g and r
bands, and are dithered by up to a fifth of the detector, so an object near the field's
edge is covered by only some visits. DiaObjects sit at fixed sky positions around the
field centre, isolated from each other and from field stars; a third are supernova-like (rise over ~5 days, fall over ~25, peak inside
the survey), a third periodic (sinusoids of period 2 - 20 days around their template
flux), a third constant (no difference flux). Each visit's images are made as in
:mod:`forcedphot.demo.visit` (same noise model, masks, calibration and WCS family).
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from pathlib import Path

from astropy.time import Time
import numpy as np
import pandas as pd

from forcedphot.demo.visit import (
    CALIBRATION_NJY_PER_COUNT,
    FWHM_PER_SIGMA,
    PIXEL_SCALE_ARCSEC,
    demo_wcs,
    field_stars,
    magnitudes_to_counts,
    render_visit,
    write_visit,
)

FIELD_RA, FIELD_DEC = 150.1, 2.2
FIRST_VISIT = 2026112400042
DETECTOR = 94
START_MJD = 61041.0
BANDS = ("g", "r")
BAND_SCALE = {"g": 0.8, "r": 1.0}  # variable flux in g relative to r
KINDS = ("supernova", "periodic", "constant")
ISOLATION_PX = 16.0  # DiaObjects keep this far from each other and from field stars


@dataclass(frozen=True)
class DemoSurvey:
    """What :func:`make_demo_survey` wrote."""

    root: Path
    visits: list[int]
    detector: int
    n_objects: int
    mjd_range: tuple[float, float]

    def __str__(self) -> str:
        return (f"{len(self.visits)} visits of detector {self.detector} over "
                f"{self.mjd_range[1] - self.mjd_range[0]:.0f} days (MJD {self.mjd_range[0]:.1f} - {self.mjd_range[1]:.1f}), "
                f"{self.n_objects} DiaObjects")


def variable_flux(kind: np.ndarray, params: pd.DataFrame, mjd: float, band: str) -> np.ndarray:
    """Difference flux (counts) of each object at ``mjd`` in ``band``, from its light-curve model."""
    t = mjd - params["t0"].to_numpy()
    amplitude = params["amplitude"].to_numpy() * BAND_SCALE[band]
    rise, fall = params["rise_days"].to_numpy(), params["fall_days"].to_numpy()
    with np.errstate(over="ignore"):
        supernova = amplitude * np.exp(-np.clip(t, 0, None) / fall) / (1.0 + np.exp(-t / rise))
    periodic = amplitude * np.sin(2 * math.pi * t / params["period_days"].to_numpy())
    return np.select([kind == "supernova", kind == "periodic"], [supernova, periodic], 0.0)


def _separated(rng: np.random.Generator, n: int, low: float, high: float, avoid: np.ndarray, separation: float) -> np.ndarray:
    """Up to ``n`` positions uniform in [low, high)^2, each at least ``separation`` from
    every other and from ``avoid`` (K, 2)."""
    placed: list[np.ndarray] = []
    points = avoid.reshape(-1, 2)
    for _ in range(50 * n):
        if len(placed) == n:
            break
        candidate = rng.uniform(low, high, 2)
        if not len(points) or np.min(np.hypot(*(points - candidate).T)) >= separation:
            placed.append(candidate)
            points = np.vstack([points, candidate])
    return np.array(placed).reshape(-1, 2)


def _objects(rng: np.random.Generator, n: int, size: int, days: float, stars: np.ndarray) -> pd.DataFrame:
    """Positions (sky) and light-curve parameters of ``n`` DiaObjects around the field,
    isolated: at least ``ISOLATION_PX`` from each other and from the field stars (so each
    measurement is of one source, and the truth comparison is fair)."""
    wcs = demo_wcs(size, FIELD_RA, FIELD_DEC)
    xy = _separated(rng, n, -0.1 * size, 1.1 * size, stars, ISOLATION_PX)
    n = len(xy)
    ra, dec = wcs.all_pix2world(xy[:, 0], xy[:, 1], 0)
    kind = np.array(KINDS)[rng.integers(0, len(KINDS), n)]
    template = np.where(rng.random(n) < 0.3, 0.0, magnitudes_to_counts(rng.uniform(19.5, 23.0, n)))
    amplitude = magnitudes_to_counts(rng.uniform(19.5, 22.0, n))
    periodic = kind == "periodic"
    template = np.where(periodic, np.maximum(template, 1.2 * amplitude), template)  # a sinusoid never goes below 0
    ids = np.sort(rng.choice(2**40, size=n, replace=False)).astype(np.int64) + 600_000_000_000_000_000
    return pd.DataFrame({
        "diaObjectId": ids, "ra": ra, "dec": dec, "kind": kind, "template_counts": template, "amplitude": amplitude,
        "t0": START_MJD + rng.uniform(0.1, 0.8, n) * days, "rise_days": rng.uniform(3.0, 7.0, n),
        "fall_days": rng.uniform(15.0, 35.0, n), "period_days": rng.uniform(2.0, 20.0, n),
    })


def make_demo_survey(root: str | Path, *, visits: int = 24, size: int = 512, n_objects: int = 200, days: float = 60.0,
                     seed: int = 0, fwhm_pixels: float = 3.5) -> DemoSurvey:
    """Write ``visits`` dithered visits of one field (see the module docstring).

    Parameters
    ----------
    root : repository root (created if missing; files are overwritten).
    visits : number of visits (>= 2).
    size : detector side in pixels (>= 64).
    n_objects : DiaObjects of the field (fewer when they do not fit at their isolation).
    days : time span of the visits, days (>= 1).
    seed : seed of the random generator; the same seed gives the same files.
    fwhm_pixels : Gaussian PSF FWHM in pixels, written as ``PSF_FWHM``.
    """
    if visits < 2 or size < 64 or days < 1 or n_objects < 1:
        raise ValueError(f"make_demo_survey: need visits >= 2, size >= 64, days >= 1, n_objects >= 1; got "
                         f"{visits}, {size}, {days}, {n_objects}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sigma = fwhm_pixels / FWHM_PER_SIGMA
    star_x0, star_y0, star_flux = field_stars(rng, size)
    star_ra, star_dec = demo_wcs(size, FIELD_RA, FIELD_DEC).all_pix2world(star_x0, star_y0, 0)
    objects = _objects(rng, n_objects, size, days, np.stack([star_x0, star_y0], axis=1))
    steps = np.sort(rng.uniform(0, 1, visits - 2))
    night = rng.uniform(0.1, 0.3, visits)  # time of night: uneven spacing, the span at least ``days``
    night[-1] = night[0] + 0.05
    mjds = START_MJD + days * np.concatenate([[0.0], steps, [1.0]]) + night
    dither = size * PIXEL_SCALE_ARCSEC / 3600.0 / 5.0
    truth, visit_ids = [], []
    for i, mjd in enumerate(mjds):
        visit, band = FIRST_VISIT + i, BANDS[i % len(BANDS)]
        offset = rng.uniform(-dither, dither, 2)
        wcs = demo_wcs(size, FIELD_RA + offset[0] / math.cos(math.radians(FIELD_DEC)), FIELD_DEC + offset[1])
        x, y = wcs.all_world2pix(objects["ra"], objects["dec"], 0)
        change = variable_flux(objects["kind"].to_numpy(), objects, mjd, band)
        sx, sy = wcs.all_world2pix(star_ra, star_dec, 0)
        images = render_visit(rng, size, sigma, (sx, sy, star_flux),
                              (x, y, objects["template_counts"].to_numpy(), change))
        folder = root / str(visit) / str(DETECTOR)
        folder.mkdir(parents=True, exist_ok=True)
        midpoint = Time(mjd, format="mjd", scale="tai")
        write_visit(folder, images, wcs, visit=visit, detector=DETECTOR, band=band, midpoint=midpoint, fwhm_pixels=fwhm_pixels)
        on = (x >= -0.5) & (x < size - 0.5) & (y >= -0.5) & (y < size - 0.5)
        objects.loc[on, ["diaObjectId", "ra", "dec"]].to_parquet(folder / "diaObjects.parquet", index=False)
        truth.append(pd.DataFrame({
            "diaObjectId": objects["diaObjectId"], "visit": visit, "detector": DETECTOR, "band": band,
            "midpointMjdTai": midpoint.mjd, "x": x, "y": y, "on_detector": on,
            "difference_flux_nJy": change * CALIBRATION_NJY_PER_COUNT,
            "science_flux_nJy": (objects["template_counts"].to_numpy() + change) * CALIBRATION_NJY_PER_COUNT,
        }))
        visit_ids.append(visit)
    objects[["diaObjectId", "ra", "dec"]].to_parquet(root / "diaObjects.parquet", index=False)
    objects.to_parquet(root / "objects.parquet", index=False)
    pd.concat(truth, ignore_index=True).to_parquet(root / "truth.parquet", index=False)
    return DemoSurvey(root=root, visits=visit_ids, detector=DETECTOR, n_objects=len(objects),
                      mjd_range=(float(mjds[0]), float(mjds[-1])))
