"""LSST's own reference for DiaForcedSources: ap_association's ``test_diaForcedSource.py``
scene (a CFHT SIN WCS on a 1024 x 1153 detector at XY0 = (1, 1), one bright pixel of 10 on
the direct and 20 on the difference image, variances 1 and 2, PhotoCalib 10000 +- 100 nJy
per count, a 15 x 15 Gaussian PSF of FWHM 5 px, five DiaObjects at parent (100 + i, 100 + i)).

Its current expected values (since afw 29, March 2025: ``fluxErr = instFluxErr x
calibration``, the calibration error no longer in quadrature) are checked here to the
precision of the float32 columns: psfFlux and scienceFlux per object, psfFluxErr
106369.21398772747 and scienceFluxErr 75214.39252 nJy for every object."""

from astropy.io import fits
from astropy.wcs import WCS
import numpy as np
import pandas as pd
import pytest

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.lsst_fits import write_lsst_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import SampledGaussianPsf

HEADER = {"NAXIS": 2, "NAXIS1": 1024, "NAXIS2": 1153, "RADESYS": "FK5", "EQUINOX": 2000.0, "CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN",
          "CRVAL1": 215.604025685476, "CRVAL2": 53.1595451514076, "CRPIX1": 1109.99981456774, "CRPIX2": 560.018167811613,
          "CD1_1": 5.10808596133527e-05, "CD1_2": 1.85579539217196e-07, "CD2_1": -8.27440751733828e-07, "CD2_2": -5.10281493481982e-05}
SCIENCE_FLUX = [199854.48417094944, 160097.40719241602, 82299.17897267535, 27148.604434624354, 5746.988388215507]
DIFFERENCE_FLUX = [399708.9683418989, 320194.81438483205, 164598.3579453507, 54297.20886924871, 11493.976776431015]
SCIENCE_FLUX_ERR = 75214.39252
DIFFERENCE_FLUX_ERR = 106369.21398772747
FLOAT32 = 2e-7  # relative: the columns are float32


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ap_association")
    parent = WCS(fits.Header(HEADER))  # afw's SkyWcs of the parent image: FITS pixel 1 is parent pixel 0
    local = parent.deepcopy()
    local.wcs.crpix = local.wcs.crpix - 1  # local pixel 0 is parent pixel 1 (XY0 = 1)
    for name, value, variance in (("direct", 10.0, 1.0), ("difference", 20.0, 2.0)):
        image = np.zeros((1153, 1024), np.float32)
        image[99, 99] = value  # parent pixel (100, 100)
        write_lsst_exposure(folder / f"{name}.fits", image, np.full(image.shape, variance, np.float32), np.zeros(image.shape, np.int32),
                            local, x0=1, y0=1, calibration_mean=10000.0, calibration_err=100.0)
    ra, dec = parent.all_pix2world(100.0 + np.arange(5), 100.0 + np.arange(5), 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(5), "ra": ra, "dec": dec}))
    psf = SampledGaussianPsf(5 / (2 * np.sqrt(2 * np.log(2))), 15, 15)  # afw's DoubleGaussianPsf(15, 15, sigma), one Gaussian
    with open_exposure(folder / "direct.fits") as direct, open_exposure(folder / "difference.fits") as difference:
        return measure(direct, objects, psf, MeasurementConfig(backend="numpy"), difference=difference, science_psf=psf).catalog


def test_fluxes_equal_lsst(catalog):
    np.testing.assert_allclose(catalog["psfFlux"], DIFFERENCE_FLUX, rtol=FLOAT32)
    np.testing.assert_allclose(catalog["scienceFlux"], SCIENCE_FLUX, rtol=FLOAT32)


def test_errors_follow_the_current_lsst_convention(catalog):
    np.testing.assert_allclose(catalog["psfFluxErr"], DIFFERENCE_FLUX_ERR, rtol=FLOAT32)
    np.testing.assert_allclose(catalog["scienceFluxErr"], SCIENCE_FLUX_ERR, rtol=FLOAT32)
    # the calibration's error is kept apart, not lost
    np.testing.assert_allclose(catalog["localPhotoCalibErr"], 100.0)
