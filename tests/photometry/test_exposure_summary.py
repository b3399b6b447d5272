"""Exposures opened from the index's summaries (issue 22: a cold light curve reads only
pixels): the same pixels, WCS, metadata and catalog as the file opened the usual way;
a file changed since its summary is opened again; what a summary cannot describe
exactly gets none; the index keeps them and a light curve opens no header."""

import json
import os
import shutil
import sqlite3

from astropy.io import fits
import numpy as np
import pandas as pd
import pytest

from forcedphot.demo.survey import make_demo_survey
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import open_exposure
from forcedphot.photometry.exposure_summary import open_summarized, summarize
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.psf_choice import choose_psfs
from forcedphot.photometry.backend import select_backend
from forcedphot.serving import exposure_cache
from forcedphot.serving.executor import MeasureService
from forcedphot.serving.exposure_cache import ExposureCache
from forcedphot.serving.index import ExposureIndex
from forcedphot.serving.lightcurves import plan_lightcurves

LSST_DATA = os.path.join(os.path.dirname(__file__), "..", "data", "lsst")


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("summary-survey")
    make_demo_survey(root, visits=4, size=128, n_objects=30, seed=2)
    return root


def folders(root):
    return sorted(p.parent for p in root.glob("*/*/calexp.fits"))


def reopened(path):
    with open_exposure(path) as exposure:
        summary = summarize(exposure)
    assert summary is not None
    return open_summarized(path, json.loads(json.dumps(summary)))


def test_a_summarized_exposure_is_the_file(survey):
    folder = folders(survey)[0]
    for name in ("calexp.fits", "difference.fits"):
        with open_exposure(folder / name) as direct:
            stored = reopened(folder / name)
            for a, b in zip(direct.read_rows(0, direct.height), stored.read_rows(0, stored.height)):
                assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
            for attribute in ("width", "height", "x0", "y0", "mask_planes", "photocalib", "calibration_source", "visit", "detector",
                              "band", "midpoint_mjd_tai", "variance_estimated", "sky_subtracted"):
                assert getattr(stored, attribute) == getattr(direct, attribute), attribute
            x, y = np.meshgrid(np.linspace(-3, 130, 11), np.linspace(-3, 130, 11))
            assert np.array_equal(direct.wcs.all_pix2world(x, y, 0), stored.wcs.all_pix2world(x, y, 0))
            stored.close()


def test_the_catalog_of_a_summarized_pair_is_the_files(survey):
    folder = folders(survey)[1]
    objects = validate_objects(pd.read_parquet(survey / "diaObjects.parquet"))
    config = MeasurementConfig(backend="numpy")
    tables = []
    for opener in (open_exposure, reopened):
        science, difference = opener(folder / "calexp.fits"), opener(folder / "difference.fits")
        psf, science_psf = choose_psfs(science, difference, "s", "d")
        tables.append(measure(science, objects, psf, config, difference=difference, science_psf=science_psf).table)
        science.close()
        difference.close()
    direct, stored = (t.drop_columns(["timeProcessedMjdTai"]) for t in tables)
    assert direct.num_rows > 5 and direct.equals(stored)


def test_a_file_changed_since_its_summary_is_opened_again(survey, tmp_path):
    copy = tmp_path / "calexp.fits"
    shutil.copy(folders(survey)[0] / "calexp.fits", copy)
    with open_exposure(copy) as exposure:
        summary = summarize(exposure)
    assert open_summarized(copy, summary) is not None
    os.utime(copy, ns=(0, 10**9))
    assert open_summarized(copy, summary) is None
    copy.unlink()
    assert open_summarized(copy, summary) is None


@pytest.mark.parametrize("name", ["obs_base_calexp.fits", "piff/exp.fits"])
def test_an_exposure_a_summary_cannot_describe_gets_none(name):
    """LSST files whose PSF lives in the archive (read from the file each time)."""
    with open_exposure(os.path.join(LSST_DATA, name)) as exposure:
        assert summarize(exposure) is None


def test_a_compressed_exposure_gets_none(survey, tmp_path):
    with fits.open(folders(survey)[0] / "calexp.fits") as hdul:
        packed = fits.HDUList([hdul[0]] + [fits.CompImageHDU(h.data, h.header) if h.is_image and h.data is not None else h
                                           for h in hdul[1:]])
        packed.writeto(tmp_path / "packed.fits")
    with open_exposure(tmp_path / "packed.fits") as exposure:
        assert summarize(exposure) is None


def test_the_index_keeps_summaries_and_a_cold_light_curve_opens_no_header(survey, tmp_path, monkeypatch):
    index = ExposureIndex(tmp_path / "index.sqlite")
    index.refresh([survey], "{visit}/{detector}/{datasetType}.fits")
    objects = validate_objects(pd.read_parquet(survey / "diaObjects.parquet"))
    config = MeasurementConfig(backend="numpy")
    expected = MeasureService(ExposureCache(0), select_backend("numpy"), threads=1).run_lightcurves(plan_lightcurves(index, objects, config))

    def refused(*args, **kwargs):
        raise AssertionError("a file was opened")

    monkeypatch.setattr(exposure_cache, "open_exposure", refused)
    task = plan_lightcurves(index, objects, config)
    assert task.epochs and all(e.science.summary and e.difference.summary for e in task.epochs)
    cold = MeasureService(ExposureCache(0), select_backend("numpy"), threads=1).run_lightcurves(task)
    assert not cold.errors and cold.table.num_rows == expected.table.num_rows > 10
    assert cold.table.drop_columns(["timeProcessedMjdTai"]).equals(expected.table.drop_columns(["timeProcessedMjdTai"]))


def test_an_index_made_before_summaries_gets_them_at_its_next_refresh(survey, tmp_path):
    path = tmp_path / "index.sqlite"
    ExposureIndex(path).refresh([survey], "{visit}/{detector}/{datasetType}.fits")
    with sqlite3.connect(path) as db:  # as the previous version made it
        db.execute("ALTER TABLE exposures DROP COLUMN science_summary")
        db.execute("ALTER TABLE exposures DROP COLUMN difference_summary")
    index = ExposureIndex(path)
    assert index.refresh([survey], "{visit}/{detector}/{datasetType}.fits").updated == len(folders(survey))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM exposures WHERE science_summary IS NULL").fetchone()[0] == 0
