"""Real LSST files (tests/data/lsst, see its README): both afw FITS layouts, and integer
planes stored with BZERO/BSCALE, read exactly and a band of rows at a time."""

from pathlib import Path

from astropy.io import fits
import numpy as np
import pytest
from scenes import sip_wcs

from forcedphot.photometry.exposure import open_exposure

LSST = Path(__file__).resolve().parents[1] / "data" / "lsst"


@pytest.mark.parametrize("name, shape, origin", [("meas_base_exposure.fits", (201, 201), (0, 0)),
                                                 ("meas_modelfit_calexp.fits", (101, 101), (1868, 2100))])
def test_the_pre_2019_layout_opens_and_its_uint16_mask_reads_exactly(name, shape, origin):
    """HDUs named by EXTTYPE only, MASK stored as BITPIX 16 with BZERO 32768."""
    path = LSST / name
    with fits.open(path, memmap=False) as hdul:
        assert "EXTNAME" not in hdul[1].header and hdul[2].header["BZERO"] == 32768
        image, mask, variance = (hdul[i].data for i in (1, 2, 3))
        mask = mask.astype(np.int64)
    with open_exposure(path) as exposure:
        assert (exposure.height, exposure.width) == shape and (exposure.x0, exposure.y0) == origin
        assert exposure.mask_planes["CR"] == 3 and exposure.calibration_source == "FLUXMAG0"
        got_image, got_variance, got_mask = exposure.read_rows(0, exposure.height)
        band = exposure.read_rows(40, 47)[2]
    np.testing.assert_array_equal(got_image, image)
    np.testing.assert_array_equal(got_variance, variance)
    np.testing.assert_array_equal(got_mask.astype(np.int64), mask)
    np.testing.assert_array_equal(band.astype(np.int64), mask[40:47])
    assert mask.max() > 0  # some bits are set, so the comparison means something


def test_a_scaled_integer_image_reads_as_its_physical_values(tmp_path):
    rng = np.random.default_rng(1)
    values = rng.normal(100.0, 10.0, (40, 50)).astype(np.float32)
    hdu = fits.ImageHDU(values.copy(), header=sip_wcs(50, 40).to_header(relax=True), name="IMAGE")  # scale() works in place
    hdu.scale("int16", bscale=0.01, bzero=100.0)
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp_path / "scaled.fits")
    with open_exposure(tmp_path / "scaled.fits") as exposure:
        got = exposure.read_rows(10, 20)[0]
    np.testing.assert_allclose(got, values[10:20], atol=0.006)  # the int16 quantisation: bscale / 2


def test_the_archive_gaussian_psf_is_used_without_a_psf_option_and_matches_meas_base_truth():
    """meas_base's synthetic exposure: its archive GaussianPsf (sigma 2 px, 17 x 17) is
    chosen with no PSF option; the isolated point source (truth row 0, second moments 4 px^2
    = sigma^2) comes out at its true flux within 1% (well within 3 sigma). Rows 3-4 are a
    blend and rows 1-2 extended: a PSF flux is not their flux."""
    import pandas as pd

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.objects import validate_objects
    from forcedphot.photometry.psf_models import choose_psf, describe_psf

    truth = fits.getdata(LSST / "meas_base_truth.fits")
    assert truth["truth_xx"][0] == truth["truth_yy"][0] == 4.0
    with open_exposure(LSST / "meas_base_exposure.fits") as exposure:
        psf = choose_psf(exposure.header, "meas_base_exposure.fits", archive=exposure.psf_record)
        ra, dec = exposure.wcs.all_pix2world(truth["truth_x"] - exposure.x0, truth["truth_y"] - exposure.y0, 0)
        objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(len(ra)), "ra": ra, "dec": dec}))
        catalog = measure(exposure, objects, psf, MeasurementConfig(backend="numpy")).catalog
    assert describe_psf(psf).startswith("LSST GaussianPsf of sigma 2 px on 17 x 17 px") and "from the archive" in describe_psf(psf)
    flux, error = catalog["psfFlux_instFlux"][0], catalog["psfFlux_instFluxErr"][0]
    assert abs(flux / truth["truth_flux"][0] - 1) < 0.01 and abs(flux - truth["truth_flux"][0]) < 3 * error


def test_the_obs_base_calexp_reads_its_psf_calibration_and_visit():
    from forcedphot.photometry.psf_models import choose_psf, describe_psf

    with open_exposure(LSST / "obs_base_calexp.fits") as exposure:
        assert (exposure.width, exposure.height) == (64, 32)
        assert exposure.calibration_source == "PhotoCalib" and exposure.calibration_mean > 0
        assert exposure.visit == 180802004 and exposure.band == "i" and exposure.midpoint_mjd_tai is not None
        psf = choose_psf(exposure.header, "calexp", archive=exposure.psf_record)
    assert "GaussianPsf of sigma 4 px on 3 x 3 px" in describe_psf(psf)


def test_an_archive_psf_not_read_yet_is_named_in_the_error():
    from forcedphot.photometry.psf_models import PsfError, choose_psf

    with open_exposure(LSST / "meas_modelfit_calexp.fits") as exposure:
        with pytest.raises(PsfError, match="its archive holds a PcaPsf, not read yet"):
            choose_psf(exposure.header, "calexp", archive=exposure.psf_record)


def _stars(tmp_path, name, fwhm, calibrated=True):
    """A 120 x 120 exposure of three stars of 1000, 2000, 3000 counts with a Gaussian PSF."""
    from scenes import render_stars, write_exposure

    x, y = np.array([30.2, 60.7, 90.1]), np.array([40.4, 70.6, 50.3])
    image = render_stars((120, 120), x, y, np.array([1000.0, 2000.0, 3000.0]), fwhm / 2.3548)
    wcs = sip_wcs(120, 120)
    if calibrated:
        path = write_exposure(tmp_path / name, image, np.ones_like(image), wcs=wcs)
        fits.setval(path, "PSF_FWHM", value=fwhm)
    else:  # plain FITS: image and WCS, no calibration of any kind
        path = tmp_path / name
        fits.PrimaryHDU(image.astype(np.float32), header=wcs.to_header(relax=True)).writeto(path)
    ra, dec = wcs.all_pix2world(x, y, 0)
    return path, ra, dec


def test_each_image_is_measured_with_its_own_psf(tmp_path):
    """DiaForcedSourceTask: the difference image's PSF for psfFlux, the science image's for scienceFlux."""
    import pandas as pd

    from forcedphot.cli import main
    from forcedphot.photometry.formats import read_provenance

    science, ra, dec = _stars(tmp_path, "calexp.fits", 3.0)
    difference, _, _ = _stars(tmp_path, "difference.fits", 5.0)
    pd.DataFrame({"diaObjectId": [1, 2, 3], "ra": ra, "dec": dec}).to_parquet(tmp_path / "o.parquet")
    out = tmp_path / "out.parquet"
    assert main(["measure", str(science), str(tmp_path / "o.parquet"), "--difference", str(difference), "-o", str(out),
                 "--backend", "numpy"]) == 0
    table = pd.read_parquet(out)
    counts = np.array([1000.0, 2000.0, 3000.0])
    np.testing.assert_allclose(table["psfFlux_instFlux"], counts, rtol=2e-3)  # a mismatched PSF would be off by tens of %
    np.testing.assert_allclose(table["scienceFlux"] / table["psfFlux"], 1.0, rtol=2e-3)
    provenance = read_provenance(out)
    assert "FWHM 5 px" in provenance["psf"] and "FWHM 3 px" in provenance["science_psf"]


def test_an_image_without_calibration_keeps_counts_and_nulls_nanojansky(tmp_path, capsys):
    import pandas as pd
    import pyarrow.parquet as pq

    from forcedphot.cli import main

    plain, ra, dec = _stars(tmp_path, "plain.fits", 3.0, calibrated=False)
    calibrated, _, _ = _stars(tmp_path, "calexp.fits", 3.0)
    pd.DataFrame({"diaObjectId": [1, 2, 3], "ra": ra, "dec": dec}).to_parquet(tmp_path / "o.parquet")
    outputs = {}
    for name, path in (("plain", plain), ("calibrated", calibrated)):
        outputs[name] = tmp_path / f"{name}.parquet"
        assert main(["measure", str(path), str(tmp_path / "o.parquet"), "-o", str(outputs[name]), "--psf-fwhm", "3",
                     "--backend", "numpy"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("has no photometric calibration") == 1
    plain_table, calibrated_table = pq.read_table(outputs["plain"]), pq.read_table(outputs["calibrated"])
    assert plain_table.column_names == calibrated_table.column_names  # same columns either way
    for column in ("psfFlux", "psfFluxErr", "apFlux_6", "apFluxErr_6"):
        assert plain_table[column].null_count == 3 and calibrated_table[column].null_count == 0
    np.testing.assert_allclose(plain_table["apFlux_12_instFlux"].to_numpy(), [1000.0, 2000.0, 3000.0], rtol=1e-3)
    assert plain_table.schema.field("apFlux_12_instFlux").metadata[b"unit"] == b"count"
    assert not any(plain_table["apFlux_6_flag"].to_pylist())
