"""``measurements="psf"``: the PSF fluxes alone, as Rubin's DiaForcedSourceTask measures them
(base_PsfFlux on the difference and the direct image). Its catalog is the full catalog's
DiaForcedSource and PSF-fit columns, value for value, without the apertures, the local
background and the pixel flags; its cutouts are the PSF stamp's size; both CPU kernel paths
agree; a local background still comes off where one is subtracted."""

import numpy as np
import pandas as pd
import pytest
from scenes import MASK_BITS, render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure, plan_measurement
from forcedphot.photometry.objects import ObjectArrays, validate_objects
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.psf_models import GaussianPsf
from forcedphot.photometry.runner import Scope
from forcedphot.serving.apdb import FORCED_SOURCE_COLUMNS

WIDTH, HEIGHT, FWHM, VARIANCE = 240, 200, 3.2, 16.0
SIGMA = FWHM / 2.3548
LEFT_OUT = ("apFlux", "localBackground_")  # prefixes of the columns only 'all' gives, with pixelFlags_* but offimage


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A direct image of stars and a difference image of varying ones (LSST files, a
    saturated pixel under one star), objects inside, on the edges and off the detector."""
    rng = np.random.default_rng(31)
    grid = np.arange(30, 200, 28.0)
    gx, gy = np.meshgrid(grid, grid[grid < HEIGHT - 20])
    x = np.concatenate([gx.ravel() + rng.uniform(-0.5, 0.5, gx.size), [0.7, WIDTH - 1.2, 120.0, -30.0]])
    y = np.concatenate([gy.ravel() + rng.uniform(-0.5, 0.5, gx.size), [90.0, 40.0, HEIGHT - 0.8, 60.0]])
    n = gx.size
    wcs = sip_wcs(WIDTH, HEIGHT)
    science = render_stars((HEIGHT, WIDTH), x[:n], y[:n], rng.uniform(2e3, 2e4, n), SIGMA) + rng.normal(0, 4, (HEIGHT, WIDTH))
    change = render_stars((HEIGHT, WIDTH), x[:n], y[:n], rng.uniform(-800, 800, n), SIGMA) + rng.normal(0, 5, (HEIGHT, WIDTH))
    mask = np.zeros((HEIGHT, WIDTH), np.int32)
    mask[int(round(y[0])), int(round(x[0]))] |= 1 << MASK_BITS["SAT"]
    folder = tmp_path_factory.mktemp("psf_only")
    paths = (write_exposure(folder / "calexp.fits", science, np.full(science.shape, VARIANCE), mask, wcs=wcs, calibration=1.5),
             write_exposure(folder / "difference.fits", change, np.full(change.shape, 2 * VARIANCE), mask, wcs=wcs, calibration=1.5))
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(len(x)) + 100, "ra": ra, "dec": dec}))
    return paths, objects


def run(pair, **config):
    (science_path, difference_path), objects = pair
    with open_exposure(science_path) as science, open_exposure(difference_path) as difference:
        return measure(science, objects, GaussianPsf(FWHM), MeasurementConfig(backend="numpy", include_offimage=True, **config),
                       difference=difference)


def same(a, b) -> bool:
    """Two catalog columns hold the same values, bit for bit (NaN as NaN, nulls where nulls)."""
    a, b = a.to_numpy(zero_copy_only=False), b.to_numpy(zero_copy_only=False)
    return a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def left_out(name: str) -> bool:
    return name.startswith(LEFT_OUT) or (name.startswith("pixelFlags_") and name != "pixelFlags_offimage")


@pytest.mark.parametrize("kernels", ["fused", "array-api"])
def test_the_psf_catalog_is_the_full_catalogs_psf_columns_value_for_value(pair, kernels):
    every = run(pair, cpu_kernels=kernels).table
    psf = run(pair, cpu_kernels=kernels, measurements="psf").table
    assert psf.column_names == [name for name in every.column_names if not left_out(name)]
    assert set(FORCED_SOURCE_COLUMNS) <= set(psf.column_names)  # what the APDB stores
    assert len(psf.column_names) < len(every.column_names) - 40  # apertures, background and 30 pixel flags gone
    assert psf.schema.field("psfFlux").metadata == every.schema.field("psfFlux").metadata  # units kept
    for name in psf.column_names:
        if name != "timeProcessedMjdTai":
            assert same(psf.column(name), every.column(name)), name
    frame = psf.to_pandas().set_index("diaObjectId")
    assert frame["pixelFlags_offimage"].sum() == 1 and frame["psfFlux_flag_edge"].sum() >= 3  # edges and the one off
    assert np.isfinite(frame["scienceFlux"]).sum() >= len(frame) - 4


def test_the_fused_and_array_api_kernels_agree_on_the_psf_catalog(pair):
    fused = run(pair, measurements="psf").catalog
    portable = run(pair, measurements="psf", cpu_kernels="array-api").catalog
    for name in fused.columns:
        if name not in ("timeProcessedMjdTai", "band"):
            np.testing.assert_allclose(fused[name].astype(float), portable[name].astype(float), rtol=1e-10, atol=1e-9, err_msg=name)


def test_psf_cutouts_are_the_stamps_size(pair):
    (science_path, difference_path), objects = pair
    psf, backend = GaussianPsf(FWHM), select_backend("numpy")
    with open_exposure(science_path) as science, open_exposure(difference_path) as difference:
        sizes = {}
        for what in ("all", "psf"):
            plan = plan_measurement(science, ObjectArrays.of(objects), psf, MeasurementConfig(backend="numpy", measurements=what),
                                    backend, difference=difference)
            sizes[what] = (plan.scope, plan.size, plan.science_side.size)
    assert sizes["psf"] == (Scope.PSF, psf.stamp_size, psf.stamp_size)
    assert sizes["all"][0] is Scope.ALL and sizes["all"][1] >= 2 * 15 * SIGMA  # the background's annulus: 15 sigma


def test_a_subtracted_background_still_comes_off_but_is_not_reported(pair):
    on = run(pair, subtract_background="on")
    psf = run(pair, subtract_background="on", measurements="psf")
    assert psf.provenance["local_background_subtracted"] == on.provenance["local_background_subtracted"] == {"exposure": True,
                                                                                                             "science": True}
    assert not any(name.startswith("localBackground_") for name in psf.table.column_names)
    for name in ("psfFlux", "psfFluxErr", "scienceFlux", "scienceFluxErr", "psfFlux_flag"):
        assert same(psf.table.column(name), on.table.column(name)), name
    off = run(pair, subtract_background="off", measurements="psf")
    assert not same(psf.table.column("psfFluxErr"), off.table.column("psfFluxErr"))  # the background's error was added
