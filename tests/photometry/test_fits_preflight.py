"""Whole-file gzip and bzip2 exposures, and headers astropy would trust, are checked from
their first header blocks before anything is decompressed or parsed (hostile-client
probe, round 3, items 13 and 14)."""

import bz2
import gzip
import time

from astropy.io import fits
import numpy as np
import pytest
from scenes import sip_wcs

from forcedphot.photometry.exposure import ExposureError, ExposureLimits, open_exposure


def declaring(side: int) -> bytes:
    """A FITS file of one header declaring side x side float32 pixels, and no data."""
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": 2, "NAXIS1": side, "NAXIS2": side})
    return header.tostring().encode()


@pytest.mark.parametrize("compress, suffix", [(gzip.compress, ".fits.gz"), (bz2.compress, ".fits.bz2")])
def test_a_compressed_file_declaring_gigabytes_is_refused_before_decompression(tmp_path, compress, suffix):
    path = tmp_path / f"bomb{suffix}"
    path.write_bytes(compress(declaring(32768) + b"\0" * 2880 * 64))  # 4 GiB declared; the file is a few KB
    assert path.stat().st_size < 10_000
    start = time.perf_counter()
    with pytest.raises(ExposureError, match="declares 32768 x 32768 = 1073741824 pixels"):
        open_exposure(path, name="upload.fits.gz")
    assert time.perf_counter() - start < 0.5


def test_a_compressed_file_declaring_more_than_its_planes_in_all_is_refused(tmp_path):
    """Planes each within the limit, but more bytes in all than three planes of 16 bytes a
    pixel would hold: refused once the declared total passes that, not decompressed to the end."""
    side = 256
    hdus = [fits.PrimaryHDU(np.zeros((side, side), np.float32))] + [fits.ImageHDU(np.zeros((side, side), np.float64)) for _ in range(3)]
    plain = tmp_path / "many.fits"
    fits.HDUList(hdus).writeto(plain)
    path = tmp_path / "many.fits.gz"
    path.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ExposureError, match="declares more than 1048576 bytes of data in all"):
        open_exposure(path, name="u", limits=ExposureLimits(max_pixels=side * side))
    with pytest.raises(ExposureError, match="no WCS"):  # plain: past the limits (planes are read a band at a time), to the WCS
        open_exposure(plain, name="u", limits=ExposureLimits(max_pixels=side * side))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress])
def test_an_ordinary_compressed_exposure_still_opens(tmp_path, compress):
    image = np.random.default_rng(1).normal(0, 1, (40, 50)).astype(np.float32)
    plain = tmp_path / "e.fits"
    fits.PrimaryHDU(image, sip_wcs(50, 40).to_header(relax=True)).writeto(plain)
    packed = tmp_path / "e.fits.z"
    packed.write_bytes(compress(plain.read_bytes()))
    with open_exposure(packed) as exposure:
        np.testing.assert_array_equal(exposure.read_rows(0, 40)[0], image)


@pytest.mark.parametrize("key, value, fragment", [
    ("NAXIS", "2147483648", "NAXIS = 2147483648"), ("NAXIS1", "-5", "NAXIS1 = -5"), ("BITPIX", "7", "BITPIX = 7"),
    ("NAXIS2", "'abc'", "NAXIS2 = 'abc'"),
])
def test_structural_keys_are_named_before_astropy_parses_them(tmp_path, key, value, fragment):
    path = tmp_path / "e.fits"
    fits.PrimaryHDU(np.zeros((8, 8), np.float32)).writeto(path)
    data = bytearray(path.read_bytes())
    for i in range(0, 2880, 80):
        if data[i:i + 8].decode().rstrip() == key:
            data[i:i + 80] = f"{key:8s}= {value}".ljust(80).encode()
    path.write_bytes(bytes(data))
    start = time.perf_counter()
    with pytest.raises(ExposureError, match=fragment):
        open_exposure(path, name="upload.fits")
    assert time.perf_counter() - start < 0.5
