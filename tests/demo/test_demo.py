"""make_demo_visit: files, planes, WCS and noise of the synthetic visit (512 x 512).

Read back with astropy only (independent of the project's reader), except one check that
the project's reader sees the same origin, calibration and visit metadata.
"""

from astropy.io import fits
from astropy.wcs import WCS
import numpy as np
import pandas as pd
import pytest

from forcedphot.demo import CALIBRATION_NJY_PER_COUNT, make_demo_visit
from forcedphot.photometry.exposure import open_exposure

SIZE, N_OBJECTS, FWHM = 512, 300, 3.5
BITS = {"BAD": 0, "SAT": 1, "CR": 3, "EDGE": 4}


@pytest.fixture(scope="module")
def visit(tmp_path_factory):
    return make_demo_visit(tmp_path_factory.mktemp("demo"), size=SIZE, n_objects=N_OBJECTS, seed=3, fwhm_pixels=FWHM)


@pytest.fixture(scope="module")
def planes(visit):
    """image, variance, mask of calexp and difference, as float64 / int arrays."""
    out = {}
    for name, path in (("science", visit.calexp), ("difference", visit.difference)):
        with fits.open(path) as hdul:
            out[name] = tuple(np.asarray(hdul[ext].data, dtype=float if ext != "MASK" else np.int64)
                              for ext in ("IMAGE", "VARIANCE", "MASK"))
    return out


def has(mask, plane):
    return (mask >> BITS[plane]) & 1 == 1


def test_files_and_layout(visit):
    for path in (visit.calexp, visit.difference, visit.dia_objects, visit.truth):
        assert path.exists() and path.parent == visit.directory
    with fits.open(visit.calexp) as hdul:
        assert [h.name for h in hdul[:4]] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        assert hdul["IMAGE"].data.dtype == np.dtype(">f4") and hdul["MASK"].data.dtype == np.dtype(">i4")
        assert hdul["IMAGE"].data.shape == (SIZE, SIZE)
        primary, image = hdul[0].header, hdul["IMAGE"].header
        assert primary["PSF_FWHM"] == FWHM
        assert primary["IDNUM"] == visit.visit and primary["HIERARCH LSST BUTLER DATAID DETECTOR"] == visit.detector
        assert primary["HIERARCH LSST BUTLER DATAID BAND"] == "r" and "DATE-AVG" in primary
        assert (image["CRVAL1A"], image["CRVAL2A"]) == (visit.x0, visit.y0) != (0, 0)
        assert (image["LTV1"], image["LTV2"]) == (-visit.x0, -visit.y0)
        assert image["CTYPE1"] == "RA---TAN-SIP" and image["A_ORDER"] >= 2
        assert hdul["MASK"].header["MP_SAT"] == BITS["SAT"]
        calib = hdul["PhotoCalib"].data
        assert calib["calibrationMean"][0] == pytest.approx(10 ** ((31.4 - 28.5) / 2.5))


def test_project_reader_agrees(visit):
    for path in (visit.calexp, visit.difference):
        with open_exposure(path) as exposure:
            assert (exposure.width, exposure.height) == (SIZE, SIZE)
            assert (exposure.x0, exposure.y0) == (visit.x0, visit.y0)
            assert exposure.calibration_mean == pytest.approx(CALIBRATION_NJY_PER_COUNT)
            assert (exposure.visit, exposure.detector, exposure.band) == (visit.visit, visit.detector, "r")
            assert exposure.midpoint_mjd_tai == pytest.approx(61041.21875)


def test_truth_positions_map_through_written_wcs(visit):
    truth = pd.read_parquet(visit.truth)
    objects = pd.read_parquet(visit.dia_objects)
    assert objects["diaObjectId"].dtype == np.int64 and objects["diaObjectId"].is_unique
    assert set(objects.columns) == {"diaObjectId", "ra", "dec"} and len(objects) == N_OBJECTS
    merged = objects.merge(truth, on="diaObjectId", suffixes=("", "_truth"))
    assert len(merged) == N_OBJECTS
    np.testing.assert_array_equal(merged["ra"], merged["ra_truth"])
    with fits.open(visit.calexp) as hdul:
        wcs = WCS(hdul["IMAGE"].header)
        sip_free = WCS(hdul["IMAGE"].header)
    x, y = wcs.all_world2pix(merged["ra"], merged["dec"], 0, tolerance=1e-10, maxiter=50)
    np.testing.assert_allclose(x, merged["x"], atol=1e-6)
    np.testing.assert_allclose(y, merged["y"], atol=1e-6)
    # The SIP terms are real: ignoring them moves the corners by > 0.3 px.
    sip_free.sip = None
    sip_free.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    xt, yt = sip_free.wcs_world2pix(merged["ra"], merged["dec"], 0)
    assert np.hypot(xt - x, yt - y).max() > 0.3
    # on_detector is LSST's Box2D test; ~5 % off; some objects within 1 px of the border.
    box = (x >= -0.5) & (x < SIZE - 0.5) & (y >= -0.5) & (y < SIZE - 0.5)
    np.testing.assert_array_equal(merged["on_detector"], box)
    assert 0.02 < 1 - box.mean() < 0.10
    border = np.minimum.reduce([np.abs(x + 0.5), np.abs(y + 0.5), np.abs(x - SIZE + 0.5), np.abs(y - SIZE + 0.5)])
    assert (border < 3).sum() >= 4
    assert (merged["science_flux_nJy"] >= 0).all()
    assert (merged["difference_flux_nJy"] != 0).mean() > 0.5


def test_planes_are_consistent(visit, planes):
    image, var, mask = planes["science"]
    d_image, d_var, d_mask = planes["difference"]
    assert np.isfinite(image).all() and np.isfinite(d_image).all()
    assert (var > 0).all() and (d_var > var).all()
    np.testing.assert_array_equal(d_mask, mask)
    edge = has(mask, "EDGE")
    assert edge[:8].all() and edge[-8:].all() and edge[:, :8].all() and edge[:, -8:].all()
    assert not edge[8:-8, 8:-8].any()
    sat = has(mask, "SAT")
    assert sat.sum() == visit.n_saturated_pixels > 0
    assert np.ptp(image[sat]) == 0 and image[sat][0] >= image[~sat].max()  # clipped at one level
    assert has(mask, "CR").sum() == visit.n_cosmic_ray_pixels > 0
    bad_cols = np.flatnonzero(has(mask, "BAD").all(axis=0))
    assert len(bad_cols) >= 1 and has(mask, "BAD").sum() == len(bad_cols) * SIZE


@pytest.mark.parametrize("which", ["science", "difference"])
def test_empty_sky_noise_matches_variance(planes, which):
    image, var, mask = planes[which]
    # Empty sky: no mask bit and the minimum variance (no source adds to it).
    sky = (mask == 0) & (var <= var.min() * (1 + 1e-6))
    assert sky.mean() > 0.5
    pulls = image[sky] / np.sqrt(var[sky])
    assert abs(pulls.std() - 1) < 0.05
    assert abs(pulls.mean()) < 5 / np.sqrt(sky.sum())


def test_difference_fluxes_match_truth(visit, planes):
    """Aperture sums (r = 6 px ~ 4 sigma: 0.9997 of a Gaussian) on the difference image at
    the true positions of isolated, unmasked objects recover the true difference flux:
    pulls ~ N(0, 1)."""
    image, var, mask = planes["difference"]
    truth = pd.read_parquet(visit.truth)
    x, y, flux = truth["x"].to_numpy(), truth["y"].to_numpy(), truth["difference_flux_nJy"].to_numpy()
    nearest = np.sort(np.hypot(x[:, None] - x, y[:, None] - y), axis=1)[:, 1]
    yy, xx = np.mgrid[-6:7, -6:7]
    disc = xx**2 + yy**2 <= 36
    pulls = []
    for o in np.flatnonzero(nearest > 15):
        ix, iy = int(np.floor(x[o] + 0.5)), int(np.floor(y[o] + 0.5))
        if not (6 <= ix < SIZE - 6 and 6 <= iy < SIZE - 6):
            continue
        cut = np.s_[iy - 6 : iy + 7, ix - 6 : ix + 7]
        if mask[cut][disc].any():
            continue
        measured = image[cut][disc].sum()
        pulls.append((measured - flux[o] / CALIBRATION_NJY_PER_COUNT) / np.sqrt(var[cut][disc].sum()))
    pulls = np.array(pulls)
    assert len(pulls) > 80
    assert abs(np.mean(pulls)) < 4 / np.sqrt(len(pulls))
    assert abs(np.std(pulls) - 1) < 0.2


def test_same_seed_same_files(tmp_path):
    a = make_demo_visit(tmp_path / "a", size=64, n_objects=10, seed=5)
    b = make_demo_visit(tmp_path / "b", size=64, n_objects=10, seed=5)
    with fits.open(a.calexp) as ha, fits.open(b.calexp) as hb:
        np.testing.assert_array_equal(ha["IMAGE"].data, hb["IMAGE"].data)
    pd.testing.assert_frame_equal(pd.read_parquet(a.truth), pd.read_parquet(b.truth))


@pytest.mark.parametrize("kw,match", [({"size": 32}, "size"), ({"n_objects": -1}, "n_objects"), ({"fwhm_pixels": 0.0}, "fwhm")])
def test_bad_arguments(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_demo_visit(tmp_path, **kw)
