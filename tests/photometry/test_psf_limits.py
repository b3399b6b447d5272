"""PSF inputs are bounded before anything is allocated: stamp sides, sampling, polynomial
degree and declared sizes, in every reader (PSFEx file, FITS image, archive records)
(hostile-client probe, round 3, item 6). Each case ran out of memory, ran to the time
limit or raised an unnamed error before."""

import time

from astropy.io import fits
import numpy as np
import pytest
from test_psf_models import DES_PSF, write_psfex

from forcedphot.photometry.archive_psfs import _gaussian, _psfex
from forcedphot.photometry.psf_models import MAX_PSF_DEGREE, ImagePsf, PsfError, PsfexPsf, SampledGaussianPsf

BASIS = fits.getdata(DES_PSF, "PSF_DATA")["PSF_MASK"][0]


@pytest.mark.parametrize("changes, fragment", [
    ({"PSF_SAMP": 300.0}, "sample spacing 300.0"),
    ({"PSF_SAMP": 1500.0}, "sample spacing 1500.0"),
    ({"PSF_SAMP": 1e6}, "sample spacing 1000000.0"),
    ({"PSF_SAMP": 1e-300}, "sample spacing 1e-300"),
    ({"POLDEG1": 3000}, "polynomial degree 3000"),
    ({"POLDEG1": MAX_PSF_DEGREE + 1}, f"polynomial degree {MAX_PSF_DEGREE + 1}"),
    ({"PSF_SAMP": 9.0}, "stamp side"),
])
def test_hostile_psfex_headers_are_refused_at_once(tmp_path, changes, fragment):
    path = write_psfex(tmp_path / "hostile.psf", BASIS, **changes)
    start = time.perf_counter()
    with pytest.raises(PsfError, match=fragment):
        PsfexPsf.from_file(path)
    assert time.perf_counter() - start < 1.0


def test_a_psf_file_declaring_a_huge_compressed_image_is_refused_before_decompression(tmp_path):
    path = tmp_path / "bomb.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(np.zeros((64, 64), np.float32), tile_shape=(64, 64))]).writeto(path)
    with fits.open(path, mode="update", disable_image_compression=True) as hdul:
        for key in ("ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2"):
            hdul[1].header[key] = 16383
    start = time.perf_counter()
    with pytest.raises(PsfError, match="HDU 1 declares 10736[0-9]+ bytes"):
        ImagePsf.from_fits(str(path))
    assert time.perf_counter() - start < 1.0


def test_a_psf_image_wider_than_a_stamp_may_be_is_refused():
    with pytest.raises(PsfError, match="image side = 129"):
        ImagePsf(np.ones((129, 129)))


@pytest.mark.parametrize("width, fragment", [(4001, "width = 4001"), (float("inf"), "width = inf"), (0, "width = 0")])
def test_archive_gaussian_psf_dimensions_are_bounded(width, fragment):
    with pytest.raises(PsfError, match=fragment):
        SampledGaussianPsf(1.5, width, 21)


class _Archive:
    """A stand-in for an afw archive holding one record per id."""

    def __init__(self, records):
        self.records = records

    def record(self, archive_id):
        return self.records[archive_id][0][0]

    def catalogs(self, archive_id):
        return self.records[archive_id]


@pytest.mark.parametrize("dims", [[float("inf"), 21], [float("nan"), 21], [4001, 4001]])
def test_archive_gaussian_records_are_bounded(dims):
    with pytest.raises(PsfError, match="GaussianPsf"):
        _gaussian(_Archive({1: [[{"sigma": 1.5, "dimensions": np.array(dims)}]]}), 1, (0, 0), False)


@pytest.mark.parametrize("sizes, arrays, fragment", [
    ({"_pixstep": 300.0}, {}, "sample spacing 300.0"),
    ({}, {"_size": np.array([4001, 4001, 10])}, "_size = 4001"),
    ({}, {"degree": np.array([3000])}, "degree 3000"),
])
def test_archive_psfex_records_are_bounded(sizes, arrays, fragment):
    base_sizes = {"ndim": 2, "ngroup": 1, "_pixstep": 0.8}
    base_arrays = {"_size": np.array([25, 25, 10]), "_comp": np.zeros(25 * 25 * 10), "degree": np.array([3]),
                   "_context_first": np.array([1000.0, 2000.0]), "_context_second": np.array([500.0, 500.0])}
    archive = _Archive({1: [[{**base_sizes, **sizes}], [{**base_arrays, **arrays}]]})
    with pytest.raises(PsfError, match=fragment):
        _psfex(archive, 1, (0, 0), False)
