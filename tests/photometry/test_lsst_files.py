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
