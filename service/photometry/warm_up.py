"""One measurement on a tiny exposure written for the purpose, so that a process's first
real request does not pay its libraries' first-use costs (parquet writer, WCS, catalog,
light-curve products: ~0.1 s in all on 2 cores)."""

from pathlib import Path
import tempfile

from astropy.time import Time
from astropy.wcs import WCS
import numpy as np
import pandas as pd

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.formats import encode_catalog
from forcedphot.photometry.lightcurve_products import Products, make_products
from forcedphot.photometry.lsst_fits import afw_visit_metadata, write_lsst_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import GaussianPsf

_SIDE = 48  # px
_FWHM = 3.0  # px


def exercise_measurement(formats: tuple[str, ...] = ("parquet", "json")) -> None:
    """Measure one object on a ``48 x 48`` px TAN exposure (difference mode, the exposure
    serving as both images) on the NumPy backend, make its light-curve products, and
    encode the catalog in ``formats``; the file lives in a temporary directory, removed
    on return."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval, wcs.wcs.crpix = [10.0, 0.0], [_SIDE / 2 + 0.5, _SIDE / 2 + 0.5]
    wcs.wcs.cd = np.diag([-0.2, 0.2]) / 3600.0
    image = np.random.default_rng(0).normal(size=(_SIDE, _SIDE)).astype(np.float32)
    metadata = afw_visit_metadata(visit=1, detector=0, band="r", midpoint=Time(61000.0, format="mjd", scale="tai"), exposure_time=30.0)
    with tempfile.TemporaryDirectory(prefix="forcedphot-warm-up-") as scratch:
        path = Path(scratch) / "exposure.fits"
        write_lsst_exposure(path, image, np.ones_like(image), np.zeros(image.shape, np.int32), wcs, calibration_mean=1.0,
                            metadata=metadata)
        ra, dec = wcs.all_pix2world([_SIDE / 2], [_SIDE / 2], 0)
        objects = validate_objects(pd.DataFrame({"diaObjectId": [1], "ra": ra, "dec": dec}))
        with open_exposure(path) as exposure:
            result = measure(exposure, objects, GaussianPsf(_FWHM), MeasurementConfig(backend="numpy"), difference=exposure)
        table, products = make_products(result.table, Products())
        for fmt in formats:
            encode_catalog(table, {**result.provenance, "products": products}, fmt)
