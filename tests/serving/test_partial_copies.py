"""Partial copies of remote files: a copy holds the headers and tables, and a measurement
fetches only the pixel rows (or compressed tiles) its objects need, with the same numbers
as the whole file; against ``file://`` sources and a local S3 server (moto)."""

import gzip
import os
from pathlib import Path

from lsst.resources import ResourcePath
import numpy as np
import pandas as pd
import pytest
from scenes import render_stars, sip_wcs

from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import ExposureError, open_exposure
from forcedphot.photometry.lsst_fits import write_lsst_exposure
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import validate_objects
from forcedphot.photometry.partial_copy import BLOCK_BYTES, PartialCopy, sidecar
from forcedphot.photometry.psf_models import load_psf

WIDTH, HEIGHT, FWHM = 512, 2048, 3.5
MAX_HDUS, MAX_PIXELS = 64, 10**8


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "tile-compressed"])
def exposure(request, tmp_path_factory):
    """A 512 x 2048 afw-layout exposure with six stars spread over it, and their objects."""
    rng = np.random.default_rng(5)
    y, x = np.array([40.0, 600, 1100, 1500, 1900, 2000]), np.array([30.0, 480, 250, 100, 400, 260])
    image = render_stars((HEIGHT, WIDTH), x, y, rng.uniform(3e3, 2e4, 6), FWHM / 2.3548) + rng.normal(0, 3, (HEIGHT, WIDTH))
    mask = (rng.random((HEIGHT, WIDTH)) < 0.001).astype(np.int32) * 4
    wcs = sip_wcs(WIDTH, HEIGHT)
    path = tmp_path_factory.mktemp("remote") / "visit.fits"
    write_lsst_exposure(path, image, np.full(image.shape, 9.0), mask, wcs, calibration_mean=0.5, compress=request.param)
    ra, dec = wcs.all_pix2world(x, y, 0)
    return path, pd.DataFrame({"diaObjectId": np.arange(6) + 1, "ra": ra, "dec": dec})


def catalog(path, objects, memory_map=True):
    with open_exposure(path, memory_map=memory_map) as science:
        result = measure(science, validate_objects(objects), load_psf(fwhm_pixels=FWHM), MeasurementConfig(backend="numpy"))
    return result.catalog.drop(columns="timeProcessedMjdTai")


def fetched(copy: Path) -> int:
    return sum(PartialCopy.of(copy)._marks()) * BLOCK_BYTES


@pytest.mark.parametrize("memory_map", [True, False], ids=["mapped", "read"])
def test_a_few_objects_fetch_a_few_rows_and_measure_as_the_whole_file(exposure, tmp_path, memory_map):
    source, objects = exposure
    copy = tmp_path / "copy.fits"
    PartialCopy.create(copy, ResourcePath(f"file://{source}"), MAX_HDUS, MAX_PIXELS)
    size = source.stat().st_size
    assert copy.stat().st_size == size and fetched(copy) < 0.1 * size  # headers and tables only
    with open_exposure(copy) as partial, open_exposure(source) as whole:
        assert (partial.width, partial.height, partial.visit, partial.calibration_mean) == (whole.width, whole.height, whole.visit, whole.calibration_mean)
        assert not partial.fully_local and whole.fully_local
    pd.testing.assert_frame_equal(catalog(copy, objects, memory_map), catalog(source, objects), check_exact=True)
    assert fetched(copy) < 0.4 * size  # six objects' rows of the three planes


def test_a_copy_read_whole_is_the_file(exposure, tmp_path):
    source, _ = exposure
    copy = tmp_path / "copy.fits"
    PartialCopy.create(copy, ResourcePath(f"file://{source}"), MAX_HDUS, MAX_PIXELS)
    with open_exposure(copy, memory_map=False) as partial, open_exposure(source) as whole:
        for got, expected in zip(partial.read_rows(0, HEIGHT), whole.read_rows(0, HEIGHT)):
            np.testing.assert_array_equal(got, expected)
        assert partial.fully_local
    assert copy.read_bytes() == source.read_bytes()


def test_a_whole_file_gzip_is_fetched_whole(exposure, tmp_path):
    source, objects = exposure
    packed = tmp_path / "visit.fits.gz"
    packed.write_bytes(gzip.compress(source.read_bytes(), compresslevel=1))
    copy = tmp_path / "copy.fits.gz"
    PartialCopy.create(copy, ResourcePath(f"file://{packed}"), MAX_HDUS, MAX_PIXELS)
    assert copy.read_bytes() == packed.read_bytes()
    pd.testing.assert_frame_equal(catalog(copy, objects), catalog(source, objects), check_exact=True)


def test_a_source_that_changed_is_named_when_its_rows_are_read(exposure, tmp_path):
    source, _ = exposure
    moved = tmp_path / "visit.fits"
    moved.write_bytes(source.read_bytes())
    copy = tmp_path / "copy.fits"
    PartialCopy.create(copy, ResourcePath(f"file://{moved}"), MAX_HDUS, MAX_PIXELS)
    os.truncate(moved, moved.stat().st_size // 2)
    with open_exposure(copy, name="visit 1 detector 2") as partial:
        with pytest.raises(ExposureError, match=r"visit 1 detector 2: rows \[1600, 1650\) cannot be fetched: the source holds fewer bytes .*changed") as raised:
            partial.read_rows(1600, 1650)
    assert str(tmp_path) not in str(raised.value)
    moved.unlink()
    with open_exposure(copy) as partial, pytest.raises(ExposureError, match="cannot be fetched from the source"):
        partial.read_rows(1300, 1310)


def test_an_ordinary_file_is_not_a_partial_copy(exposure):
    assert PartialCopy.of(exposure[0]) is None and not sidecar(exposure[0]).exists()


def test_files_in_s3_are_read_in_parts(exposure, s3, tmp_path):
    """Through the service's local copies of ``s3://`` files (moto's server on 127.0.0.1)."""
    from forcedphot.serving.butler import RemoteFiles

    source, objects = exposure
    s3.upload_file(str(source), "survey", "visits/visit.fits")
    copies = RemoteFiles(tmp_path / "copies", 10**9)
    copy = copies.local(ResourcePath("s3://survey/visits/visit.fits"))
    assert copies.local(ResourcePath("s3://survey/visits/visit.fits")) == copy
    pd.testing.assert_frame_equal(catalog(copy, objects, memory_map=False), catalog(source, objects), check_exact=True)
    assert fetched(copy) < 0.4 * source.stat().st_size
