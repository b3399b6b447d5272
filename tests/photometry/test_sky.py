"""Local background subtraction (issue 23, item 6): plain FITS images still holding their
sky get each object's local background subtracted from its fluxes (by default), LSST files
and difference images do not; fluxes against truth, errors by their pulls, both CPU kernel
paths alike."""

import io

from astropy.io import fits
import numpy as np
import pandas as pd
import pytest
from scenes import render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import load_psf

SIDE, FWHM, SKY, NOISE = 600, 3.5, 100.0, 10.0
SIGMA = FWHM / 2.3548


@pytest.fixture(scope="module")
def field(tmp_path_factory):
    """A plain FITS image (primary image + VARIANCE, WCS, nothing of LSST's) of 144 stars of
    known flux on 100 counts/px of sky, and the same pixels as an LSST file."""
    rng = np.random.default_rng(23)
    grid = np.arange(40, SIDE - 40, 44.0)
    x, y = (a.ravel() + rng.uniform(-0.5, 0.5, a.size) for a in np.meshgrid(grid, grid))
    flux = rng.uniform(2e3, 2e4, x.size)
    flux[0] = 5000.0
    image = SKY + render_stars((SIDE, SIDE), x, y, flux, SIGMA) + rng.normal(0, NOISE, (SIDE, SIDE))
    variance = np.full(image.shape, NOISE**2)
    wcs = sip_wcs(SIDE, SIDE)
    folder = tmp_path_factory.mktemp("sky")
    plain = folder / "plain.fits"
    fits.HDUList([fits.PrimaryHDU(image.astype(np.float32), header=wcs.to_header(relax=True)),
                  fits.ImageHDU(variance.astype(np.float32), name="VARIANCE")]).writeto(plain)
    lsst = write_exposure(folder / "lsst.fits", image, variance, wcs=wcs)
    difference = write_exposure(folder / "difference.fits", rng.normal(0, NOISE, (SIDE, SIDE)), variance, wcs=wcs)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(x.size) + 1, "ra": ra, "dec": dec}))
    return {"plain": plain, "lsst": lsst, "difference": difference, "objects": objects, "flux": flux}


def run(path, objects, difference=None, **config):
    with open_exposure(path) as science:
        diff = open_exposure(difference) if difference else None
        try:
            return measure(science, objects, load_psf(fwhm_pixels=FWHM), MeasurementConfig(backend="numpy", **config), difference=diff)
        finally:
            if diff is not None:
                diff.close()


def test_a_plain_image_has_its_sky_subtracted_by_default(field):
    result = run(field["plain"], field["objects"])
    catalog = result.catalog.sort_values("diaObjectId")
    assert result.provenance["local_background_subtracted"] == {"exposure": True, "science": None}
    flux, err = catalog["psfFlux_instFlux"].to_numpy(), catalog["psfFlux_instFluxErr"].to_numpy()
    pulls = (flux - field["flux"]) / err
    assert abs(pulls.mean()) < 0.25 and 0.85 < pulls.std() < 1.15  # errors right, the background's own included
    assert abs(flux[0] - 5000.0) < 4 * err[0]  # the star: 7253 before
    np.testing.assert_allclose(catalog["localBackground_instFlux"], SKY, atol=1.0)  # still reported as measured
    aperture = catalog["apFlux_12_instFlux"].to_numpy()  # 12 px: the whole star (sigma 1.5 px)
    assert np.abs((aperture - field["flux"]) / catalog["apFlux_12_instFluxErr"]).max() < 5


def test_off_keeps_the_sky_and_the_difference_is_the_background_times_the_response(field):
    on = run(field["plain"], field["objects"]).catalog.sort_values("diaObjectId")
    off = run(field["plain"], field["objects"], subtract_background="off")
    assert off.provenance["local_background_subtracted"]["exposure"] is False
    off = off.catalog.sort_values("diaObjectId")
    excess = (off["psfFlux_instFlux"] - on["psfFlux_instFlux"]).to_numpy()
    # sum P / sum P^2 of a pixel-integrated Gaussian: 4 pi (sigma^2 + 1/12), the pixel's own width included
    np.testing.assert_allclose(excess, on["localBackground_instFlux"] * 4 * np.pi * (SIGMA**2 + 1 / 12), rtol=0.01)
    ring = (off["apFlux_9_instFlux"] - on["apFlux_9_instFlux"]).to_numpy()
    np.testing.assert_allclose(ring, on["localBackground_instFlux"] * np.pi * 81, rtol=1e-6)  # float32 columns
    assert (off["psfFlux_instFluxErr"] < on["psfFlux_instFluxErr"]).all()  # the background's error is added


def test_lsst_files_and_difference_images_are_left_as_they_are(field):
    lsst = run(field["lsst"], field["objects"])
    assert lsst.provenance["local_background_subtracted"]["exposure"] is False
    assert np.nanmedian(lsst.catalog["psfFlux_instFlux"].to_numpy() - field["flux"]) > 1000  # its sky stays: the file says it has none
    paired = run(field["plain"], field["objects"], difference=field["difference"])
    assert paired.provenance["local_background_subtracted"] == {"exposure": False, "science": True}
    catalog = paired.catalog.sort_values("diaObjectId")
    science = run(field["plain"], field["objects"]).catalog.sort_values("diaObjectId")
    np.testing.assert_allclose(catalog["scienceFlux"], science["psfFlux"], rtol=1e-9)  # the direct image's sky subtracted too
    forced = run(field["lsst"], field["objects"], subtract_background="on").catalog.sort_values("diaObjectId")
    np.testing.assert_allclose(forced["psfFlux_instFlux"], science["psfFlux_instFlux"], rtol=1e-6)


def test_both_cpu_kernel_paths_subtract_alike(field):
    fused = run(field["plain"], field["objects"]).catalog.sort_values("diaObjectId")
    array_api = run(field["plain"], field["objects"], cpu_kernels="array-api").catalog.sort_values("diaObjectId")
    for column in ("psfFlux_instFlux", "psfFlux_instFluxErr", "apFlux_3_instFlux", "apFlux_12_instFluxErr"):
        np.testing.assert_allclose(fused[column], array_api[column], rtol=1e-10, err_msg=column)


def test_the_command_line_and_the_upload_form_take_the_option(field, tmp_path):
    from fastapi.testclient import TestClient
    from service_helpers import AUTH, settings_for

    from forcedphot.api.app import create_app
    from forcedphot.cli import main
    from forcedphot.photometry.formats import read_provenance

    objects = tmp_path / "objects.parquet"
    field["objects"][["diaObjectId", "ra", "dec"]].to_parquet(objects)
    for setting, subtracted in (("auto", True), ("off", False)):
        out = tmp_path / f"{setting}.parquet"
        assert main(["measure", str(field["plain"]), str(objects), "--psf-fwhm", str(FWHM), "--backend", "numpy",
                     "--subtract-background", setting, "-o", str(out)]) == 0
        assert read_provenance(out)["local_background_subtracted"]["exposure"] is subtracted
    with TestClient(create_app(settings_for(tmp_path, tmp_path / "data")), headers=AUTH) as client:
        answer = client.post("/v1/forced-photometry", data={"psf_fwhm": str(FWHM), "subtract_background": "off"},
                             files={"exposure": ("plain.fits", field["plain"].read_bytes()), "objects": ("o.parquet", objects.read_bytes())})
        assert answer.status_code == 200, answer.text
        kept_sky = pd.read_parquet(io.BytesIO(answer.content))
        assert kept_sky["psfFlux_instFlux"].median() > np.median(field["flux"]) + 2000
        refused = client.post("/v1/forced-photometry", data={"psf_fwhm": str(FWHM), "subtract_background": "maybe"},
                              files={"exposure": ("plain.fits", field["plain"].read_bytes()), "objects": ("o.parquet", objects.read_bytes())})
        assert refused.status_code == 422 and "subtract_background" in refused.json()["detail"]
