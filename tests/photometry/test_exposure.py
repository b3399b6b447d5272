"""Reading exposures: LSST afw layout (plain and compressed), plain FITS, metadata, errors."""

import os
import time
import tracemalloc

from astropy.io import fits
from astropy.time import Time
import astropy.units as u
from astropy.wcs import WCS, Sip
import galsim
import numpy as np
import pytest

from forcedphot.photometry.exposure import ExposureChanged, ExposureError, open_exposure
from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES, afw_visit_metadata, write_lsst_exposure

SHAPE = (300, 200)  # (ny, nx)
CUSTOM_PLANES = {"SAT": 0, "BAD": 3, "EDGE": 7, "NO_DATA": 12, "SUSPECT": 13, "CR": 2,
                 "INTRP": 1, "MY_PLANE": 20}


def tan_sip_wcs(shape=SHAPE):
    """A TAN-SIP WCS for the local array: 0.2"/px, rotated, with ~1 px of distortion."""
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"]
    wcs.wcs.crval = [150.1, 2.2]
    wcs.wcs.crpix = [shape[1] / 2 + 0.3, shape[0] / 2 - 0.7]
    scale = 0.2 / 3600
    angle = np.deg2rad(25.0)
    wcs.wcs.cd = scale * np.array([[-np.cos(angle), np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[2, 0], a[1, 1], a[0, 3] = 4e-5, -2e-5, 1e-7
    b[0, 2], b[1, 1], b[3, 0] = 3e-5, 1e-5, -1e-7
    wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def tan_wcs():
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [30.0, -20.0]
    wcs.wcs.crpix = [100.0, 150.0]
    wcs.wcs.cdelt = [-5.5e-5, 5.5e-5]
    return wcs


def planes(rng, shape=SHAPE):
    """Image with NaNs, positive variance, mask with several bits set."""
    image = rng.normal(10.0, 3.0, shape).astype(np.float32)
    image[5, 7] = np.nan
    image[-1, :4] = np.nan
    variance = rng.uniform(4.0, 16.0, shape).astype(np.float32)
    mask = rng.integers(0, 2**14, shape, dtype=np.int32) * (rng.random(shape) < 0.1)
    return image, variance, mask.astype(np.int32)


@pytest.fixture
def afw_file(tmp_path, rng, request):
    """An afw-layout file with origin offset, custom mask planes, PhotoCalib, visit info."""
    compress = getattr(request, "param", False)
    image, variance, mask = planes(rng)
    path = tmp_path / "calexp.fits"
    metadata = afw_visit_metadata(visit=2025112400123, detector=94, band="r",
                                  physical_filter="r_57",
                                  midpoint=Time("2025-11-24T03:14:15.5", scale="utc"),
                                  exposure_time=30.0)
    write_lsst_exposure(path, image, variance, mask, tan_sip_wcs(), mask_planes=CUSTOM_PLANES,
                        x0=4072, y0=1998, calibration_mean=0.4321, calibration_err=0.0123,
                        metadata=metadata, compress=compress)
    return path, image, variance, mask


# --- LSST afw layout ----------------------------------------------------------------------


@pytest.mark.parametrize("afw_file", [False, True], indirect=True, ids=["plain", "compressed"])
def test_afw_layout_round_trip(afw_file):
    path, image, variance, mask = afw_file
    with open_exposure(path) as exposure:
        assert (exposure.width, exposure.height) == (SHAPE[1], SHAPE[0])
        assert (exposure.x0, exposure.y0) == (4072, 1998)
        assert exposure.mask_planes == CUSTOM_PLANES
        assert exposure.calibration_source == "PhotoCalib"
        assert exposure.calibration_mean == pytest.approx(0.4321, rel=1e-15)
        assert exposure.calibration_err == pytest.approx(0.0123, rel=1e-15)
        assert (exposure.visit, exposure.detector, exposure.band) == (2025112400123, 94, "r")
        assert not exposure.variance_estimated
        assert exposure.header["EXPTIME"] == 30.0
        got_image, got_variance, got_mask = exposure.read_rows(0, exposure.height)
        for got, want, dtype in ((got_image, image, np.float32),
                                 (got_variance, variance, np.float32),
                                 (got_mask, mask, np.int32)):
            assert got.dtype.newbyteorder("=") == dtype and got.shape == SHAPE
            np.testing.assert_array_equal(got, want)  # lossless both ways; NaN == NaN here
        band = exposure.read_rows(37, 61)
        for got, want in zip(band, (image, variance, mask)):
            np.testing.assert_array_equal(got, want[37:61])
        assert [a.shape for a in exposure.read_rows(10, 10)] == [(0, SHAPE[1])] * 3


def test_afw_origin_keys_written_as_afw(afw_file):
    """CRVAL1A/2A = XY0 with CTYPE1A LINEAR, LTV = -XY0, in every plane."""
    path = afw_file[0]
    with fits.open(path) as hdul:
        assert [hdu.name for hdu in hdul[:4]] == ["PRIMARY", "IMAGE", "MASK", "VARIANCE"]
        for hdu in hdul[1:4]:
            header = hdu.header
            assert header["CTYPE1A"] == "LINEAR"
            assert (header["CRVAL1A"], header["CRVAL2A"]) == (4072, 1998)
            assert (header["LTV1"], header["LTV2"]) == (-4072, -1998)
        assert hdul["PhotoCalib"].data["calibrationMean"][0] == 0.4321


def test_tan_sip_wcs_round_trip(afw_file, rng):
    """Sky -> pixel with the WCS read back returns the pixels the writer's WCS mapped from."""
    path = afw_file[0]
    truth = tan_sip_wcs()
    x = rng.uniform(-0.5, SHAPE[1] - 0.5, 500)
    y = rng.uniform(-0.5, SHAPE[0] - 0.5, 500)
    ra, dec = truth.all_pix2world(x, y, 0)
    with open_exposure(path) as exposure:
        assert exposure.wcs.sip is not None
        x_back, y_back = exposure.wcs.all_world2pix(ra, dec, 0, tolerance=1e-10, maxiter=100)
        ra_read, dec_read = exposure.wcs.all_pix2world(x, y, 0)
    assert np.max(np.hypot(x_back - x, y_back - y)) < 1e-6
    assert np.max(np.abs(ra_read - ra)) < 1e-12 and np.max(np.abs(dec_read - dec)) < 1e-12
    # the distortion is not negligible, so SIP really had to be read
    ra_lin, dec_lin = truth.wcs_pix2world(x, y, 0)
    offset_deg = np.hypot((ra_lin - ra) * np.cos(np.deg2rad(dec)), dec_lin - dec)
    assert np.max(offset_deg) * 3600 / 0.2 > 0.5  # pixels


def test_visit_midpoint_is_tai(afw_file):
    """The writer stores DATE-AVG in TAI; from the UTC midpoint the TAI MJD is 37 s later."""
    utc = Time("2025-11-24T03:14:15.5", scale="utc")
    with open_exposure(afw_file[0]) as exposure:
        shift_seconds = (exposure.midpoint_mjd_tai - utc.mjd) * 86400.0
    assert shift_seconds == pytest.approx(37.0, abs=1e-3)


@pytest.mark.parametrize(
    ("keys", "utc_midpoint"),
    [
        ({"DATE-AVG": "2024-03-01T10:00:00.000", "TIMESYS": "UTC"}, "2024-03-01T10:00:00"),
        ({"DATE-AVG": "2024-03-01T10:00:37.000", "TIMESYS": "TAI"}, "2024-03-01T10:00:00"),
        ({"DATE-AVG": "2024-03-01T10:00:00.000Z", "TIMESYS": "TAI"}, "2024-03-01T10:00:00"),
        ({"TIME-MID": "2024-03-01T10:00:00.000Z"}, "2024-03-01T10:00:00"),
        ({"MJD-AVG": Time("2024-03-01T10:00:00", scale="utc").mjd}, "2024-03-01T10:00:00"),
        ({"MJD-OBS": Time("2024-03-01T09:59:15", scale="utc").mjd, "EXPTIME": 90.0},
         "2024-03-01T10:00:00"),
        ({"DATE-OBS": "2024-03-01T09:59:15", "EXPTIME": 90.0}, "2024-03-01T10:00:00"),
    ],
    ids=["date-avg-utc", "date-avg-tai", "date-avg-z", "time-mid", "mjd-avg", "mjd-obs",
         "date-obs"],
)
def test_midpoint_keys(tmp_path, rng, keys, utc_midpoint):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), metadata=keys)
    expected_tai = Time(utc_midpoint, scale="utc").tai.mjd
    with open_exposure(path) as exposure:
        assert exposure.midpoint_mjd_tai == pytest.approx(expected_tai, abs=1e-3 / 86400)
        # UTC -> TAI on this date is 37 s: the reader did convert
        shift_seconds = (exposure.midpoint_mjd_tai - Time(utc_midpoint).mjd) * 86400
        assert shift_seconds == pytest.approx(37.0, abs=1e-3)


def test_midpoint_needs_exptime_with_start_keys(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), metadata={"MJD-OBS": 60400.25})
    with open_exposure(path) as exposure:
        assert exposure.midpoint_mjd_tai is None


@pytest.mark.parametrize(
    ("keys", "visit", "detector", "band"),
    [
        ({"VISIT": 7, "CCDNUM": 12, "FILTER": "r DECam SDSS c0002 6415.0 1480.0"}, 7, 12, "r"),
        ({"EXPNUM": 154912, "CCDNUM": 12, "BAND": "z"}, 154912, 12, "z"),
        ({"EXPID": 11, "DETECTOR": 3, "FILTER": "i_39"}, 11, 3, "i"),
        ({"IDNUM": 21, "DETECTOR": "R22_S11", "FILTER": "HSC-R"}, 21, None, "r"),
        ({"FILTER": "VR DECam c0007 6300.0 2600.0"}, None, None, None),
    ],
)
def test_visit_keys(tmp_path, rng, keys, visit, detector, band):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), metadata=keys)
    with open_exposure(path) as exposure:
        assert (exposure.visit, exposure.detector, exposure.band) == (visit, detector, band)


def test_default_mask_planes_when_no_mp_keys(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), mask_planes={})
    with open_exposure(path) as exposure:
        assert exposure.mask_planes == AFW_DEFAULT_MASK_PLANES
        assert exposure.mask_planes["EDGE"] == 4 and exposure.mask_planes["NO_DATA"] == 8


def _allocation_peak(function):
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("compress", [False, True], ids=["memmap", "compressed"])
def test_read_rows_reads_only_the_band(tmp_path, compress):
    """Reading 16 rows of a 1024x1024 exposure allocates a small fraction of one plane.

    Rows 600-616 straddle two 16-row compression tiles, so at most 2 of 64 tiles per plane
    should be decompressed. The full read is measured the same way, to show that the
    measurement sees plane-sized allocations (3 planes x 4 MiB). Plain files return
    memory-mapped views: no read allocates pixels, and the band is a view of the file.
    """
    shape = (1024, 1024)
    image = np.add.outer(np.arange(shape[0]), np.arange(shape[1])).astype(np.float32)
    mask = (np.arange(image.size).reshape(shape) % 7 == 0).astype(np.int32)
    path = tmp_path / "big.fits"
    write_lsst_exposure(path, image, image + 1, mask, tan_wcs(), compress=compress)
    plane_bytes = image.nbytes
    with open_exposure(path) as exposure:
        band = exposure.read_rows(500, 516)  # warm-up: astropy's one-off objects
        np.testing.assert_array_equal(band[0], image[500:516])
        np.testing.assert_array_equal(band[2], mask[500:516])
        band_peak = _allocation_peak(lambda: exposure.read_rows(600, 616))
        full_peak = _allocation_peak(lambda: exposure.read_rows(0, shape[0]))
    if compress:
        assert full_peak > 3 * plane_bytes
    else:
        assert full_peak < 0.25 * plane_bytes
        assert not any(plane.flags.owndata for plane in band)
    assert band_peak < 0.25 * plane_bytes


# --- plain FITS ---------------------------------------------------------------------------


def _write(path, hdus):
    fits.HDUList(hdus).writeto(path, overwrite=True)
    return path


def test_plain_primary_with_variance_and_mask(tmp_path, rng):
    image, variance, mask = planes(rng)
    header = tan_wcs().to_header()
    header["LTV1"], header["LTV2"] = -30, -40
    mask_header = fits.Header({"MP_EDGE": 9, "MP_BAD": 2})
    path = _write(tmp_path / "p.fits",
                  [fits.PrimaryHDU(image, header), fits.ImageHDU(variance, name="VAR"),
                   fits.ImageHDU(mask.astype(np.int16), mask_header, name="BPM")])
    with open_exposure(path) as exposure:
        assert (exposure.x0, exposure.y0) == (30, 40)
        assert exposure.mask_planes == {"EDGE": 9, "BAD": 2}
        assert not exposure.variance_estimated
        got_image, got_variance, got_mask = exposure.read_rows(100, 150)
    np.testing.assert_array_equal(got_image, image[100:150])
    np.testing.assert_array_equal(got_variance, variance[100:150])
    np.testing.assert_array_equal(got_mask, mask[100:150].astype(np.int16))


@pytest.mark.parametrize("name", ["WEIGHT", "WHT", "WGT", "IVAR", "INVVAR"])
def test_plain_extension_with_weight(tmp_path, rng, name):
    image, variance, _ = planes(rng)
    weight = (1.0 / variance).astype(np.float32)
    weight[0, :10] = 0.0
    weight[1, :5] = -1.0
    weight[2, 0] = np.nan
    path = _write(tmp_path / "w.fits", [fits.PrimaryHDU(),
                                        fits.ImageHDU(image, tan_wcs().to_header(), name="SCI"),
                                        fits.ImageHDU(weight, name=name)])
    with open_exposure(path) as exposure:
        assert not exposure.variance_estimated
        assert exposure.mask_planes == AFW_DEFAULT_MASK_PLANES
        got_image, got_variance, got_mask = exposure.read_rows(0, 20)
    np.testing.assert_array_equal(got_image, image[:20])
    assert np.all(np.isposinf(got_variance[0, :10])) and np.all(np.isposinf(got_variance[1, :5]))
    assert np.isposinf(got_variance[2, 0])
    usable = np.isfinite(weight[:20]) & (weight[:20] > 0)
    np.testing.assert_allclose(got_variance[usable], variance[:20][usable], rtol=1e-6)
    assert not np.any(got_mask)


def test_plain_tile_compressed_des_names(tmp_path, rng):
    """A .fits.fz-like file: empty primary, compressed SCI, MSK and WGT extensions."""
    image, variance, mask = planes(rng)
    weight = (1.0 / variance).astype(np.float32)
    path = _write(tmp_path / "d.fits.fz", [
        fits.PrimaryHDU(),
        fits.CompImageHDU(image, tan_wcs().to_header(), name="SCI", compression_type="GZIP_2",
                          quantize_level=0.0),
        fits.CompImageHDU(mask.astype(np.int16), name="MSK", compression_type="RICE_1"),
        fits.CompImageHDU(weight, name="WGT", compression_type="GZIP_2", quantize_level=0.0),
    ])
    with open_exposure(path) as exposure:
        got_image, got_variance, got_mask = exposure.read_rows(40, 90)
    np.testing.assert_array_equal(got_image, image[40:90])
    np.testing.assert_array_equal(got_mask, mask[40:90].astype(np.int16))
    np.testing.assert_allclose(got_variance, variance[40:90], rtol=1e-6)


def test_estimated_variance_matches_noise(tmp_path, rng):
    """No variance plane: the estimate is within 5% of the true noise variance, despite a
    sky gradient, NaNs and a masked bright source."""
    sigma = 3.0
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    image = 100.0 + 0.05 * xx + 0.03 * yy + rng.normal(0.0, sigma, SHAPE)
    image[150:170, 90:110] += 5000.0
    image[rng.random(SHAPE) < 0.01] = np.nan
    mask = np.zeros(SHAPE, np.int32)
    mask[148:172, 88:112] = 1 << 5
    path = _write(tmp_path / "n.fits",
                  [fits.PrimaryHDU(image.astype(np.float32), tan_wcs().to_header()),
                   fits.ImageHDU(mask, name="MASK")])
    with open_exposure(path) as exposure:
        assert exposure.variance_estimated
        _, variance, _ = exposure.read_rows(3, 9)
    assert variance.dtype == np.float32 and np.all(variance == variance[0, 0])
    assert variance[0, 0] == pytest.approx(sigma**2, rel=0.05)


def test_estimated_variance_of_pure_noise_image(tmp_path, rng):
    sigma = 0.7
    image = rng.normal(0.0, sigma, SHAPE).astype(np.float32)
    path = _write(tmp_path / "n.fits", [fits.PrimaryHDU(image, tan_wcs().to_header())])
    with open_exposure(path) as exposure:
        assert exposure.variance_estimated
        assert exposure.read_rows(0, 1)[1][0, 0] == pytest.approx(np.var(image), rel=0.05)


# --- calibration --------------------------------------------------------------------------

AB_ZERO_NJY = 3630.78e9  # the spec's reference flux, nJy


@pytest.mark.parametrize(
    ("keys", "calibration_mean", "calibration_err", "source"),
    [
        ({"BUNIT": "nJy", "FLUXMAG0": 1e11}, 1.0, 0.0, "BUNIT"),
        ({"FLUXMAG0": 1e11, "HIERARCH FLUXMAG0ERR": 1e9, "MAGZERO": 25.0},
         AB_ZERO_NJY / 1e11, AB_ZERO_NJY * 1e9 / 1e22, "FLUXMAG0"),
        ({"MAGZERO": 27.0}, (27.0 * u.ABmag).to_value(u.nJy), 0.0, "keyword:MAGZERO"),
        ({"MAGZPT": 31.4}, 1.0, 0.0, "keyword:MAGZPT"),
        ({"ZEROPT": 26.5}, (26.5 * u.ABmag).to_value(u.nJy), 0.0, "keyword:ZEROPT"),
        ({"ZP": 28.0}, (28.0 * u.ABmag).to_value(u.nJy), 0.0, "keyword:ZP"),
        ({"MAGZP": 30.0}, (30.0 * u.ABmag).to_value(u.nJy), 0.0, "keyword:MAGZP"),
        ({"PHOTZP": 29.5}, (29.5 * u.ABmag).to_value(u.nJy), 0.0, "keyword:PHOTZP"),  # the ESO / VST keyword
        ({"FLUXMAG0": 0.0, "ZP": 28.0}, (28.0 * u.ABmag).to_value(u.nJy), 0.0, "keyword:ZP"),
    ],
)
def test_header_calibration(tmp_path, rng, keys, calibration_mean, calibration_err, source):
    """nJy per count from header keys; zero points checked against astropy's AB magnitude."""
    header = tan_wcs().to_header()
    header.update(keys)
    path = _write(tmp_path / "c.fits", [fits.PrimaryHDU(planes(rng)[0], header)])
    with open_exposure(path) as exposure:
        assert exposure.calibration_source == source
        assert exposure.calibration_mean == pytest.approx(calibration_mean, rel=1e-6)
        assert exposure.calibration_err == pytest.approx(calibration_err, rel=1e-6, abs=1e-15)


def test_photocalib_wins_over_header_keys(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), calibration_mean=0.25, bunit="nJy",
                        metadata={"FLUXMAG0": 1e11, "MAGZERO": 27.0})
    with open_exposure(path) as exposure:
        assert (exposure.calibration_source, exposure.calibration_mean) == ("PhotoCalib", 0.25)


def test_bunit_njy_on_afw_image(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs(), bunit="nJy", metadata={"FLUXMAG0": 1e11})
    with open_exposure(path) as exposure:
        assert (exposure.calibration_source, exposure.calibration_mean) == ("BUNIT", 1.0)


def test_no_calibration(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs())
    with open_exposure(path) as exposure:
        assert exposure.calibration_source == "none"
        assert np.isnan(exposure.calibration_mean) and np.isnan(exposure.calibration_err)


# --- bad input ----------------------------------------------------------------------------


def _assert_error(path, *phrases):
    with pytest.raises(ExposureError) as info:
        open_exposure(path)
    message = str(info.value)
    prefix = f"{path}: "
    assert message.startswith(prefix), message
    for phrase in phrases:  # searched after the path, which may itself contain the phrase
        assert phrase in message[len(prefix):], message


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.fits", "no such file")


def test_not_fits(tmp_path):
    path = tmp_path / "table.fits"
    path.write_text("diaObjectId,ra,dec\n1,2,3\n" * 200)
    _assert_error(path, "not a FITS file (it does not start with the SIMPLE card")
    with pytest.raises(ExposureError) as info:
        open_exposure(path)
    assert "ignore_missing_simple" not in str(info.value)  # astropy's advice of its own option (issue 23, item 10)


def _cut_points(path, kind):
    """Byte counts at which to cut ``path``: fractions of the file, HDU boundaries (a cut
    there leaves a valid-looking shorter FITS file) and points inside each header."""
    size = path.stat().st_size
    if kind == "fractions":
        return [int(size * fraction) for fraction in (0.3, 0.5, 0.9)]
    with fits.open(path) as hdul:
        starts = [hdul.fileinfo(index)["hdrLoc"] for index in range(1, len(hdul))]
    return starts if kind == "hdu-boundaries" else [start + 1000 for start in starts]


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "compressed"])
@pytest.mark.parametrize("kind", ["fractions", "hdu-boundaries", "inside-headers"])
def test_truncated_file_fails_at_open(tmp_path, rng, compress, kind):
    full = tmp_path / "full.fits"
    write_lsst_exposure(full, *planes(rng), tan_wcs(), calibration_mean=1.0, compress=compress)
    content = full.read_bytes()
    for n_bytes in _cut_points(full, kind):
        cut = tmp_path / f"cut{n_bytes}.fits"
        cut.write_bytes(content[:n_bytes])
        _assert_error(cut, "truncated")


def test_no_image_hdu(tmp_path):
    table = fits.BinTableHDU.from_columns([fits.Column("a", "D", array=[1.0])])
    _assert_error(_write(tmp_path / "t.fits", [fits.PrimaryHDU(), table]), "no image HDU")


def test_no_wcs(tmp_path, rng):
    _assert_error(_write(tmp_path / "a.fits", [fits.PrimaryHDU(planes(rng)[0])]), "no WCS")


def test_non_celestial_wcs(tmp_path, rng):
    header = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CRPIX1": 1.0, "CRPIX2": 1.0,
                          "CRVAL1": 0.0, "CRVAL2": 0.0})
    _assert_error(_write(tmp_path / "a.fits", [fits.PrimaryHDU(planes(rng)[0], header)]),
                  "not celestial")


def test_mismatched_plane_shapes(tmp_path, rng):
    image, variance, _ = planes(rng)
    path = _write(tmp_path / "m.fits", [fits.PrimaryHDU(image, tan_wcs().to_header()),
                                        fits.ImageHDU(variance[:-1], name="VARIANCE")])
    _assert_error(path, "VARIANCE plane has shape (299, 200)", "(300, 200)")


def test_non_2d_image(tmp_path, rng):
    cube = rng.normal(size=(3, 30, 20)).astype(np.float32)
    _assert_error(_write(tmp_path / "c.fits", [fits.PrimaryHDU(cube)]), "3 axes", "2-D")


def test_float_mask(tmp_path, rng):
    image, _, mask = planes(rng)
    path = _write(tmp_path / "f.fits", [fits.PrimaryHDU(image, tan_wcs().to_header()),
                                        fits.ImageHDU(mask.astype(np.float32), name="MASK")])
    _assert_error(path, "floating-point")


def test_read_rows_out_of_range(afw_file):
    with open_exposure(afw_file[0]) as exposure:
        with pytest.raises(ExposureError, match="outside"):
            exposure.read_rows(290, 301)
        with pytest.raises(ExposureError, match="outside"):
            exposure.read_rows(-1, 3)


@pytest.mark.parametrize("memory_map", [True, False])
def test_file_truncated_after_open(tmp_path, rng, memory_map):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs())
    with open_exposure(path, memory_map=memory_map) as exposure:
        with open(path, "r+b") as stream:
            stream.truncate(100_000)
        with pytest.raises(ExposureChanged, match="changed while it was being read"):
            exposure.read_rows(200, 210)


def test_file_rewritten_in_place_while_open_is_refused_and_plain_reads_equal_mapped(tmp_path, rng):
    path = tmp_path / "e.fits"
    write_lsst_exposure(path, *planes(rng), tan_wcs())
    with open_exposure(path, memory_map=False) as plain, open_exposure(path) as mapped:
        for a, b in zip(plain.read_rows(10, 60), mapped.read_rows(10, 60)):
            np.testing.assert_array_equal(a, b)
        data = path.read_bytes()
        with open(path, "r+b") as stream:  # same size, new bytes, as a writer rewriting the file in place
            stream.write(data[: len(data) // 2])
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        with pytest.raises(ExposureChanged):
            plain.read_rows(10, 60)


def test_real_des_header(tmp_path, rng):
    """A real DECam CCD header (TPV WCS, EXPNUM/CCDNUM, 'Y DECam ...' filter, MJD-OBS in UTC)
    on a small image: metadata as DES defines it, TAI midpoint (TAI - UTC = 35 s in 2012),
    TPV sky positions as GalSim computes them."""
    des = fits.getheader("/work/shared/data/des/DECam_00154912_12_header.fits")
    header = fits.Header([card for card in des.cards
                          if card.keyword not in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "EXTEND")])
    path = _write(tmp_path / "des.fits",
                  [fits.PrimaryHDU(rng.normal(size=(64, 32)).astype(np.float32), header)])
    with open_exposure(path) as exposure:
        assert (exposure.visit, exposure.detector, exposure.band) == (154912, 12, "y")
        expected = des["MJD-OBS"] + (des["EXPTIME"] / 2 + 35.0) / 86400
        assert exposure.midpoint_mjd_tai == pytest.approx(expected, abs=1e-3 / 86400)
        assert exposure.calibration_source == "none"
        assert (exposure.x0, exposure.y0) == (0, 0)
        x = rng.uniform(0, 2047, 200)
        y = rng.uniform(0, 4095, 200)
        ra, dec = exposure.wcs.all_pix2world(x, y, 0)
        x_back, y_back = exposure.wcs.all_world2pix(ra, dec, 0, tolerance=1e-10)
    assert np.max(np.hypot(x_back - x, y_back - y)) < 1e-6
    # peer: GalSim's own TPV implementation (1-based FITS pixels)
    peer = galsim.GSFitsWCS(header=des)
    for xi, yi, rai, deci in zip(x[:20], y[:20], ra[:20], dec[:20]):
        sky = peer.toWorld(galsim.PositionD(xi + 1.0, yi + 1.0))
        separation = np.hypot((sky.ra.deg - rai) * np.cos(np.deg2rad(deci)), sky.dec.deg - deci)
        assert separation * 3600 < 1e-6
