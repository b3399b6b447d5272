"""Every header value the reader consults, whatever a client writes there, gives either a
usable exposure or an ExposureError (a 422) naming the key and its value: never another
exception, never a non-finite calibration or time, never an id out of its column's range
(hypothesis, over raw card values; hostile-client probe, round 3, item 13)."""

import math
from pathlib import Path
import tempfile

from astropy.io import fits
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
from scenes import sip_wcs

from forcedphot.photometry.exposure import ExposureError, open_exposure
from forcedphot.photometry.psf_choice import choose_psf
from forcedphot.photometry.psf_models import PsfError

pytestmark = pytest.mark.filterwarnings("ignore::astropy.io.fits.verify.VerifyWarning")  # the cards are malformed on purpose

IMAGE_KEYS = ("LTV1", "LTV2", "CRVAL1A", "CRVAL2A", "CRPIX1A", "CRPIX2A", "MJD-AVG", "MJD-OBS", "DATE-AVG", "DATE-OBS", "TIME-MID",
              "EXPTIME", "TIMESYS", "VISIT", "IDNUM", "EXPID", "EXPNUM", "DETECTOR", "CCDNUM", "BAND", "FILTER", "FLUXMAG0",
              "FLUXMAG0ERR", "MAGZERO", "MAGZPT", "ZEROPT", "ZP", "MAGZP", "PHOTZP", "BUNIT", "PSF_FWHM", "AR_HDU", "NAXIS", "NAXIS1", "BITPIX")
ZERO_POINT_KEYS = ("MAGZERO", "MAGZPT", "ZEROPT", "ZP", "MAGZP", "PHOTZP")
MASK_KEYS = ("MP_BAD", "MP_SAT", "BITPIX", "NAXIS2")
SIDE = 32

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.17E}"),
    st.sampled_from(["1E400", "-1E400", "1E-320", "1E300", "-1E300", "NAN", "INF", "0", "-1", "2147483648", "18446744073709551616"]),
)
texts = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126, exclude_characters="'"), max_size=24).map(lambda t: f"'{t}'")
values = st.one_of(numbers, texts, st.sampled_from(["T", "F"]))


def exposure_with(path: Path, key: str, raw: str, *, in_mask: bool) -> Path:
    """A small plain exposure (WCS, visit metadata, LINEAR origin, a mask) whose ``key``
    card (in the image or the mask header) holds ``raw`` exactly as written."""
    header = sip_wcs(SIDE, SIDE).to_header(relax=True)
    header.update({"VISIT": 5, "DETECTOR": 3, "BAND": "r", "MJD-OBS": 61000.0, "EXPTIME": 30.0, "PSF_FWHM": 3.0})
    if key not in ZERO_POINT_KEYS:  # FLUXMAG0 wins over a zero point: only one is read
        header["FLUXMAG0"] = 1e11
    if not key.startswith("LTV"):  # the afw origin wins over IRAF's LTV: only one is read
        header.update({"CTYPE1A": "LINEAR", "CTYPE2A": "LINEAR", "CRVAL1A": 0.0, "CRVAL2A": 0.0, "CRPIX1A": 1.0, "CRPIX2A": 1.0})
    mask_header = fits.Header({"MP_BAD": 0, "MP_SAT": 1})
    target = mask_header if in_mask else header
    if key not in target and key not in ("NAXIS", "NAXIS1", "NAXIS2", "BITPIX"):
        target[key] = 0
    rng = np.random.default_rng(1)
    fits.HDUList([fits.PrimaryHDU(rng.normal(0, 1, (SIDE, SIDE)).astype(np.float32), header),
                  fits.ImageHDU(np.zeros((SIDE, SIDE), np.int32), mask_header, name="MASK")]).writeto(path, overwrite=True)
    data = bytearray(path.read_bytes())
    long = len(key) > 8  # written as a HIERARCH card
    card = (f"HIERARCH {key} = {raw}" if long else f"{key:8s}= {raw}").ljust(80)[:80].encode()
    start = bytes(data).index(b"XTENSION") if in_mask else 0
    for i in range(start, len(data), 80):
        text = data[i:i + 80].decode("ascii", "replace")
        if (text.startswith(f"HIERARCH {key} ") if long else text[:8].rstrip() == key):
            data[i:i + 80] = card
            break
    else:
        raise AssertionError(f"no {key} card to replace")
    path.write_bytes(bytes(data))
    return path


def check(key: str, raw: str, in_mask: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = exposure_with(Path(folder) / "e.fits", key, raw, in_mask=in_mask)
        try:
            with open_exposure(path, name="upload.fits", memory_map=False) as exposure:
                image, variance, mask = exposure.read_rows(0, 4)
                assert exposure.visit is None or 0 <= exposure.visit < 2**63
                assert exposure.detector is None or 0 <= exposure.detector < 2**15
                assert exposure.midpoint_mjd_tai is None or 0 <= exposure.midpoint_mjd_tai <= 100_000
                mean, err = exposure.calibration_mean, exposure.calibration_err
                assert (math.isnan(mean) and exposure.calibration_source == "none") or (math.isfinite(mean) and mean > 0 and math.isfinite(err))
                assert all(0 <= bit <= 30 for bit in exposure.mask_planes.values())
                assert abs(exposure.x0) < 2**31 and abs(exposure.y0) < 2**31
                try:
                    choose_psf(exposure, "upload.fits")
                except PsfError as error:
                    assert "PSF_FWHM" in str(error), str(error)
        except ExposureError as error:
            message = str(error)
            assert message.startswith("upload.fits: ") and folder not in message, message
            structural = ("not a readable FITS file", "malformed header", "WCS", "HDU", "plane")  # NAXIS, BITPIX: what the HDU lacks
            assert key in message or any(words in message for words in structural), message


@pytest.mark.parametrize("key", IMAGE_KEYS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=values)
def test_image_header_values(key, raw):
    check(key, raw, in_mask=False)


@pytest.mark.parametrize("key", MASK_KEYS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=values)
def test_mask_header_values(key, raw):
    check(key, raw, in_mask=True)


@pytest.mark.parametrize("key, raw, fragment", [
    ("LTV1", "'abc'", "LTV1 = 'abc'"), ("LTV1", "1E400", "LTV1 = inf"), ("CRVAL1A", "NAN", "CRVAL1A"), ("CRPIX1A", "1E400", "CRPIX1A"),
    ("MJD-AVG", "1E300", "MJD-AVG"), ("VISIT", "1E300", "VISIT"), ("VISIT", "18446744073709551616", "VISIT"),
    ("DETECTOR", "-1E19", "DETECTOR"), ("FLUXMAG0", "1E-320", "FLUXMAG0"), ("MAGZERO", "-1E300", "MAGZERO"),
    ("NAXIS", "999", "NAXIS3"), ("NAXIS", "2147483648", "NAXIS = 2147483648"), ("EXPTIME", "1E300", "EXPTIME"),
])
def test_the_probes_values_are_named(tmp_path, key, raw, fragment):
    path = exposure_with(tmp_path / "e.fits", key, raw, in_mask=False)
    with pytest.raises(ExposureError, match=fragment.replace("(", r"\(")):
        open_exposure(path, name="upload.fits", memory_map=False)


@pytest.mark.parametrize("raw", ["99", "31", "-1"])
def test_mask_bits_outside_int32_are_named(tmp_path, raw):
    path = exposure_with(tmp_path / "e.fits", "MP_BAD", raw, in_mask=True)
    with pytest.raises(ExposureError, match=f"MP_BAD = {raw}"):
        open_exposure(path, name="upload.fits")
