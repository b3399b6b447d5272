"""A PSF model that cannot be evaluated at some positions (its sum is not positive there)
gives rows with NaN fluxes and ``invalidPsfFlag``, as LSST's ``base_InvalidPsf_flag``; the
other rows are measured as with the same model, valid everywhere; the request never fails."""

import numpy as np
import pandas as pd
from scenes import integrated_gaussian, render_stars, sip_wcs, write_exposure

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_models import SIGMA_CELL_PX, PsfexPsf

SIDE = 320
SIGMA = 1.5
CUT = 2 * SIGMA_CELL_PX  # the model is valid below this row, invalid from it on


def gaussian_model(side: int = 25) -> np.ndarray:
    return integrated_gaussian([side // 2], [side // 2], SIGMA, side)[0]


def test_positions_without_a_valid_psf_are_flagged_rows_and_the_rest_is_measured(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.uniform(30, SIDE - 30, 40)
    y = np.concatenate([rng.uniform(30, CUT - 30, 30), rng.uniform(CUT + 5, SIDE - 30, 10)])
    wcs = sip_wcs(SIDE, SIDE)
    image = render_stars((SIDE, SIDE), x, y, np.full(40, 5e3), SIGMA) + rng.normal(0, 3, (SIDE, SIDE))
    path = write_exposure(tmp_path / "calexp.fits", image, np.full(image.shape, 9.0), wcs=wcs)
    ra, dec = wcs.all_pix2world(x, y, 0)
    objects = validate_objects(pd.DataFrame({"diaObjectId": np.arange(40), "ra": ra, "dec": dec}))
    model = gaussian_model()
    # degree 1 in y: P(x, y) = G * (1 - (y - (CUT - 0.5)) / 0.01): positive below CUT, negative from it on
    psfex = PsfexPsf(np.stack([model, np.zeros_like(model), -model]), 1, (0.0, CUT - 0.5), (1.0, 0.01), 1.0, (0.0, 0.0), "test model")
    config = MeasurementConfig(backend="numpy")
    with open_exposure(path) as exposure:
        result = measure(exposure, objects, psfex, config)
        reference = measure(exposure, objects, PsfexPsf(model[None], 0, (0.0, 0.0), (1.0, 1.0), 1.0, (0.0, 0.0), "valid"), config).catalog
    got = result.catalog
    invalid = got["y"].to_numpy() >= CUT
    assert invalid.sum() == 10 and result.n_on_detector == 40 and len(got) == 40
    assert got["invalidPsfFlag"].to_numpy().tolist() == invalid.tolist()
    assert got.loc[invalid, "psfFlux_flag"].all() and got.loc[invalid, "psfFlux"].isna().all()
    assert not got.loc[~invalid, "psfFlux_flag"].any()
    for column in ("psfFlux", "psfFluxErr", "apFlux_6"):
        np.testing.assert_allclose(got.loc[~invalid, column], reference.loc[~invalid, column], rtol=1e-6)
    assert not reference["invalidPsfFlag"].any()
