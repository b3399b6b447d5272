"""Tests of the PSF models: the real DES PSFEx model against GalSim's reader, pixelized and
Gaussian PSFs against analytic truth and GalSim, adaptive moments against GalSim's HSM, and
clear errors for bad PSF files."""

import copy
from pathlib import Path

from astropy.io import fits
import galsim
import galsim.des
import numpy as np
import pytest

from forcedphot.kernels.psf_stamps import gaussian_stamps
from forcedphot.photometry.psf_models import GaussianPsf, ImagePsf, PsfError, PsfexPsf, PsfModel, adaptive_moments, determinant_radius, load_psf

DES_PSF = Path(__file__).parents[1] / "data" / "des" / "DECam_00154912_12_psfcat.psf"

# Corners and centre of the 2048 x 4096 CCD (0-based pixel centres), and sub-pixel positions.
X = np.array([0.0, 2047.0, 0.0, 2047.0, 1023.5, 100.3, 1500.7, 611.49, 1800.5])
Y = np.array([0.0, 0.0, 4095.0, 4095.0, 2047.5, 3000.45, 17.2, 2222.51, 1000.0])

# Our stamps vs GalSim, in units of the stamp's peak. Measured: 4.1e-6 (the two ways of
# conserving DC in the Lanczos-3 kernel differ at that level). Tighter than 1e-4 on purpose:
# this model varies by only 2e-5..8e-5 of its peak per pixel of position, so 1e-4 could not
# see a 1-pixel position error (test_psfex_one_based_convention shows 1e-5 does).
STAMP_TOL = 1e-5


@pytest.fixture(scope="module")
def des():
    return galsim.des.DES_PSFEx(str(DES_PSF))


@pytest.fixture(scope="module")
def psfex():
    return PsfexPsf.from_file(str(DES_PSF))


def galsim_stamps(des, x, y, size, dx=1.0, dy=1.0, interpolant=None):
    """GalSim's DES PSFEx model at 1-based image position (x + dx, y + dy), drawn without a
    pixel on our stamp grid (stamp centred on pixel floor(x+0.5)), normalised to sum 1."""
    out = []
    for xi, yi in zip(x, y):
        psf = des.getPSF(galsim.PositionD(xi + dx, yi + dy))
        if interpolant is not None:  # same model image, another interpolant
            array = des.getPSFArray(galsim.PositionD(xi + dx, yi + dy))
            psf = galsim.InterpolatedImage(galsim.Image(array), scale=des.getSampleScale(), flux=1,
                                           x_interpolant=interpolant)
        offset = (xi - np.floor(xi + 0.5), yi - np.floor(yi + 0.5))
        image = psf.drawImage(nx=size, ny=size, scale=1.0, method="no_pixel", offset=offset).array
        out.append(image / image.sum())
    return np.stack(out)


def peak_relative_error(ours, theirs):
    """Max |difference| over each stamp divided by that stamp's peak, max over stamps."""
    return np.max(np.abs(ours - theirs).max(axis=(1, 2)) / np.abs(theirs).max(axis=(1, 2)))


def test_psfex_reads_des_model(psfex):
    assert isinstance(psfex, PsfModel)
    assert psfex.basis.shape == (6, 25, 25)
    assert psfex.sample_scale == pytest.approx(0.97556132)
    assert psfex.stamp_size == 25  # 2 ceil(12 * 0.9756) + 1 covers the model


def test_psfex_matches_galsim(psfex, des, xp):
    stamps = psfex.stamps(X, Y, xp)
    assert stamps.shape == (len(X), 25, 25)
    stamps = np.asarray(stamps)
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), 1.0, rtol=1e-12)
    assert peak_relative_error(stamps, galsim_stamps(des, X, Y, 25)) < STAMP_TOL


def test_psfex_one_based_convention(psfex, des):
    # The model on its own sample grid, before resampling: our 1-based polynomial evaluation
    # equals GalSim's getPSFArray (which casts to float32) at X_IMAGE = x + 1, Y_IMAGE = y + 1.
    ours = (psfex.coefficients(X, Y) @ psfex.basis.reshape(6, -1)).reshape(-1, 25, 25)
    theirs = np.stack([des.getPSFArray(galsim.PositionD(x + 1, y + 1)) for x, y in zip(X, Y)])
    assert peak_relative_error(ours, theirs) < 1e-6
    for dx, dy in [(0, 1), (1, 0)]:  # forgetting the +1 on either axis is seen at 1e-5
        off_by_one = np.stack([des.getPSFArray(galsim.PositionD(x + dx, y + dy)) for x, y in zip(X, Y)])
        assert peak_relative_error(ours, off_by_one) > 1e-5
    # Drawn stamps: a 1-pixel position error makes the GalSim comparison fail at STAMP_TOL
    # (measured 8e-5 in x, 5e-5 in y), whereas the right convention passes (previous test).
    stamps = psfex.stamps(X, Y, np)
    for dx, dy in [(0, 1), (1, 0), (2, 1), (1, 2)]:
        assert peak_relative_error(stamps, galsim_stamps(des, X, Y, 25, dx, dy)) > 2 * STAMP_TOL


def test_no_objects_give_empty_stacks(psfex):
    for model in (psfex, GaussianPsf(3.0), ImagePsf(elliptical_gaussian(9, np.eye(2) * 2))):
        empty = np.zeros(0)
        assert model.stamps(empty, empty, np).shape == (0, model.stamp_size, model.stamp_size)
        assert model.sigma(empty, empty).shape == (0,)


def test_psfex_sample_scale_matters(psfex, des):
    # Resampling at PSF_SAMP = 0.9756 is needed: treating samples as pixels fails by 4e-2.
    unscaled = copy.copy(psfex)
    unscaled.sample_scale = 1.0
    truth = galsim_stamps(des, X, Y, 25)
    assert peak_relative_error(unscaled.stamps(X, Y, np), truth) > 100 * STAMP_TOL


def test_psfex_dc_conservation_matters(psfex, des):
    # GalSim's default Lanczos conserves DC like ours; its raw kernel differs by ~5e-4 of the peak.
    raw = galsim_stamps(des, X[:4], Y[:4], 25, interpolant=galsim.Lanczos(3, conserve_dc=False))
    assert peak_relative_error(psfex.stamps(X[:4], Y[:4], np), raw) > 10 * STAMP_TOL


def test_psfex_sigma_matches_galsim_hsm(psfex, des):
    shape = psfex.shape(X, Y)
    sigma = determinant_radius(shape)
    # sigma() evaluates once per 128 px cell: within a cell the width changes by at most
    # 0.2% (measured 2.0e-3 at a CCD corner), i.e. 0.06 px on a 15-sigma annulus radius
    np.testing.assert_allclose(psfex.sigma(X, Y), sigma, rtol=3e-3)
    for n, (x, y) in enumerate(zip(X, Y)):
        image = des.getPSF(galsim.PositionD(x + 1, y + 1)).drawImage(nx=25, ny=25, scale=1.0,
                                                                      method="no_pixel")
        hsm = galsim.hsm.FindAdaptiveMom(image)
        assert sigma[n] == pytest.approx(hsm.moments_sigma, rel=1e-4)
        trace = shape[n, 0] + shape[n, 1]
        e1, e2 = (shape[n, 0] - shape[n, 1]) / trace, 2 * shape[n, 2] / trace
        assert e1 == pytest.approx(hsm.observed_shape.e1, abs=1e-4)
        assert e2 == pytest.approx(hsm.observed_shape.e2, abs=1e-4)
    # FWHM 4.6 px in the header: sigma near FWHM / 2.355 = 1.95 px.
    assert np.all((sigma > 1.6) & (sigma < 2.1))


def elliptical_gaussian(size, cov, cx=None, cy=None):
    """Gaussian with covariance `cov` (x, y order), sampled at pixel centres, peak 1."""
    cx = size // 2 if cx is None else cx
    cy = size // 2 if cy is None else cy
    grid = np.arange(size, dtype=float)
    dx, dy = np.meshgrid(grid - cx, grid - cy)
    inv = np.linalg.inv(cov)
    return np.exp(-0.5 * (inv[0, 0] * dx**2 + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy**2))


def test_adaptive_moments_of_gaussians(rng):
    # Covariance eigenvalues >= 2 px^2: the weighted image (covariance C/2) is then well sampled
    # (aliasing ~ exp(-2 pi^2 * 1) = 3e-9; at C = 1.2 I it would bias Ixx by 3e-4).
    covs = [np.array([[4.0, 1.0], [1.0, 2.5]]), np.array([[2.2, 0.0], [0.0, 2.2]]),
            np.array([[6.0, -2.0], [-2.0, 3.0]])]
    images = np.stack([elliptical_gaussian(41, c, 20 + rng.uniform(-1, 1), 20 + rng.uniform(-1, 1))
                       for c in covs])
    shape = adaptive_moments(images)
    expected = np.array([[c[0, 0], c[1, 1], c[0, 1]] for c in covs])
    np.testing.assert_allclose(shape, expected, rtol=0, atol=1e-6)
    hsm = [galsim.hsm.FindAdaptiveMom(galsim.Image(im)).moments_sigma for im in images]
    np.testing.assert_allclose(determinant_radius(shape), hsm, rtol=1e-5)
    # No positive weighted flux: NaN, not an exception.
    assert np.all(np.isnan(adaptive_moments(-images[:1])))


def test_gaussian_psf_stamps_and_sigma(xp, rng):
    psf = GaussianPsf(fwhm_pixels=3.0)
    sigma = 3.0 / (2 * np.sqrt(2 * np.log(2)))
    assert psf.stamp_size == 2 * int(np.ceil(5 * sigma)) + 1 == 15
    x, y = rng.uniform(10, 500, 20), rng.uniform(10, 500, 20)
    stamps = np.asarray(psf.stamps(x, y, xp))
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), 1.0, rtol=1e-13)
    cx, cy = 7 + x - np.floor(x + 0.5), 7 + y - np.floor(y + 0.5)
    raw = gaussian_stamps(cx, cy, sigma, 15)
    np.testing.assert_allclose(stamps, raw / raw.sum(axis=(1, 2))[:, None, None], rtol=1e-12)
    grid = np.arange(15.0)
    np.testing.assert_allclose(np.einsum("nji,i->n", stamps, grid), cx, atol=1e-6)
    # sigma is the profile's, without the pixel (as LSST's GaussianPsf reports).
    np.testing.assert_allclose(psf.sigma(x, y), sigma, rtol=1e-15)
    # Peer: GalSim's Gaussian convolved with the pixel (real-space integration; its default
    # FFT drawing is only good to 5e-5), drawn on the same grid. Measured 1.1e-7 of the peak.
    for n in range(3):
        image = galsim.Gaussian(sigma=sigma).drawImage(nx=15, ny=15, scale=1.0, method="real_space",
                                                       offset=(cx[n] - 7, cy[n] - 7), dtype=np.float64)
        theirs = image.array / image.array.sum()
        assert np.max(np.abs(stamps[n] - theirs)) < 1e-6 * theirs.max()
    assert GaussianPsf(3.0, stamp_size=9).stamps(x, y, np).shape == (20, 9, 9)


def test_image_psf_integer_positions_reproduce_image(xp, rng):
    image = elliptical_gaussian(21, np.array([[3.0, 0.5], [0.5, 2.0]])) + rng.uniform(0, 1e-3, (21, 21))
    psf = ImagePsf(image)
    stamps = np.asarray(psf.stamps(np.array([5.0, 130.0]), np.array([7.0, 44.0]), xp))
    np.testing.assert_allclose(stamps, np.broadcast_to(image / image.sum(), (2, 21, 21)), rtol=1e-14, atol=0)


def test_image_psf_subpixel_matches_galsim_lanczos5(xp, rng):
    image = elliptical_gaussian(25, np.array([[3.0, 0.5], [0.5, 2.0]]))
    psf = ImagePsf(image)
    x, y = rng.uniform(0, 100, 6), rng.uniform(0, 100, 6)
    stamps = np.asarray(psf.stamps(x, y, xp))
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), 1.0, rtol=1e-12)
    peer = galsim.InterpolatedImage(galsim.Image(image, scale=1.0), x_interpolant=galsim.Lanczos(5))
    for n in range(len(x)):
        offset = (x[n] - np.floor(x[n] + 0.5), y[n] - np.floor(y[n] + 0.5))
        theirs = peer.drawImage(nx=25, ny=25, scale=1.0, method="no_pixel", offset=offset).array
        theirs /= theirs.sum()
        assert np.max(np.abs(stamps[n] - theirs)) < 2e-5 * theirs.max()
        # and the analytic shifted Gaussian, within Lanczos-5's own ripple (see kernel tests)
        truth = elliptical_gaussian(25, np.array([[3.0, 0.5], [0.5, 2.0]]), 12 + offset[0], 12 + offset[1])
        assert np.max(np.abs(stamps[n] - truth / truth.sum())) < 2.5e-3 * stamps[n].max()


def test_image_psf_sigma_is_adaptive_moments():
    cov = np.array([[4.0, 0.5], [0.5, 3.0]])
    psf = ImagePsf(elliptical_gaussian(31, cov))
    expected = np.linalg.det(cov) ** 0.25
    np.testing.assert_allclose(psf.sigma(np.zeros(3), np.zeros(3)), expected, rtol=1e-7)
    np.testing.assert_allclose(psf.shape([1.0], [2.0])[0], [4.0, 3.0, 0.5], atol=1e-6)


def test_image_psf_from_fits(tmp_path):
    image = elliptical_gaussian(15, np.eye(2) * 2.0)
    path = tmp_path / "psf.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(np.zeros((3, 5)), name="OTHER"),
                  fits.ImageHDU(image.astype(np.float32), name="PSF")]).writeto(path)
    np.testing.assert_allclose(ImagePsf.from_fits(str(path), hdu="PSF").image, image, rtol=1e-7)
    np.testing.assert_allclose(ImagePsf.from_fits(str(path), hdu=2).image, image, rtol=1e-7)
    loaded = load_psf(path=str(path), hdu="PSF")
    assert isinstance(loaded, ImagePsf) and loaded.stamp_size == 15
    with pytest.raises(PsfError, match="psf.fits.*odd side"):  # default: first 2-D image (3x5)
        ImagePsf.from_fits(str(path))
    with pytest.raises(PsfError, match="psf.fits.*no HDU 'MISSING'"):
        ImagePsf.from_fits(str(path), hdu="MISSING")


def test_load_psf_dispatch(tmp_path):
    assert isinstance(load_psf(fwhm_pixels=4.0), GaussianPsf)
    assert isinstance(load_psf(path=str(DES_PSF)), PsfexPsf)
    renamed = tmp_path / "model.fits"  # a PSFEx file not named .psf is recognised by PSF_DATA
    renamed.write_bytes(DES_PSF.read_bytes())
    assert isinstance(load_psf(path=str(renamed)), PsfexPsf)
    for kwargs in ({}, {"fwhm_pixels": 3.0, "path": str(DES_PSF)}):
        with pytest.raises(PsfError, match="exactly one"):
            load_psf(**kwargs)


@pytest.mark.parametrize("fwhm", [0.0, -2.0, float("nan"), float("inf")])
def test_bad_fwhm(fwhm):
    with pytest.raises(PsfError, match="FWHM"):
        load_psf(fwhm_pixels=fwhm)


def test_bad_stamp_size():
    with pytest.raises(PsfError, match="odd"):
        GaussianPsf(3.0, stamp_size=10)


@pytest.mark.parametrize("image, problem", [
    (np.ones((4, 4)), "odd side"), (np.ones((5, 7)), "odd side"), (np.ones(5), "odd side"),
    (np.full((5, 5), np.nan), "non-finite"), (np.zeros((5, 5)), "positive sum"),
])
def test_bad_psf_image(image, problem):
    with pytest.raises(PsfError, match=problem):
        ImagePsf(image)


def write_psfex(path, basis, drop=(), **changes):
    """A PSFEx file with the DES model's header keywords, `basis` as PSF_MASK, edited."""
    header = fits.getheader(DES_PSF, "PSF_DATA")
    nbasis, rows, cols = basis.shape
    column = fits.Column(name="PSF_MASK", format=f"{basis.size}E", dim=f"({cols}, {rows}, {nbasis})",
                         array=basis[None].astype(np.float32))
    table = fits.BinTableHDU.from_columns([column], name="PSF_DATA")
    for key in ("POLNAXIS", "POLGRP1", "POLNAME1", "POLZERO1", "POLSCAL1", "POLGRP2", "POLNAME2",
                "POLZERO2", "POLSCAL2", "POLNGRP", "POLDEG1", "PSF_FWHM", "PSF_SAMP", "PSFNAXIS"):
        if key not in drop:
            table.header[key] = header[key]
    table.header.update(PSFAXIS1=cols, PSFAXIS2=rows, PSFAXIS3=nbasis)
    table.header.update(changes)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    return str(path)


def test_psfex_writer_round_trip(tmp_path):
    # The helper writes a valid model (so the failures below are due to the edits alone).
    basis = fits.getdata(DES_PSF, "PSF_DATA")["PSF_MASK"][0]
    rewritten = PsfexPsf.from_file(write_psfex(tmp_path / "ok.psf", basis))
    np.testing.assert_array_equal(rewritten.stamps(X, Y, np), PsfexPsf.from_file(str(DES_PSF)).stamps(X, Y, np))


def bad_psf_files(tmp_path):
    """(path, expected message fragment) for each kind of broken PSF file."""
    raw = DES_PSF.read_bytes()
    basis = fits.getdata(DES_PSF, "PSF_DATA")["PSF_MASK"][0]
    cases = []
    text = tmp_path / "text.psf"
    text.write_text("not a FITS file\n" * 200)
    cases.append((text, r"not a FITS file \(it does not start with the SIMPLE card"))
    for cut in (100, 2880 + 1000, len(raw) - 2880):
        truncated = tmp_path / f"truncated{cut}.psf"
        truncated.write_bytes(raw[:cut])
        cases.append((truncated, "not a readable FITS file|no PSF_DATA"))
    image_only = tmp_path / "image.psf"
    fits.PrimaryHDU(np.ones((5, 5))).writeto(image_only)
    cases.append((image_only, "no PSF_DATA"))
    cases.append((write_psfex(tmp_path / "nopol.psf", basis, drop=("POLZERO1", "POLDEG1")),
                  "lacks POLZERO1, POLDEG1"))
    cases.append((write_psfex(tmp_path / "even.psf", basis[:, :24, :24]), "24x24.*not square with an odd side"))
    cases.append((write_psfex(tmp_path / "nonsquare.psf", basis[:, :23, :]), "23x25.*not square"))
    cases.append((write_psfex(tmp_path / "degree.psf", basis, POLDEG1=3), "degree 3 needs 10"))
    cases.append((write_psfex(tmp_path / "text_key.psf", basis, POLSCAL2="wide"), "POLSCAL2 are not numbers"))
    cases.append((write_psfex(tmp_path / "groups.psf", basis, POLNGRP=2), "unsupported polynomial"))
    cases.append((write_psfex(tmp_path / "context.psf", basis, POLNAME1="MAG_AUTO"), "X_IMAGE"))
    cases.append((write_psfex(tmp_path / "samp.psf", basis, PSF_SAMP=0.0), "PSF_SAMP"))
    cases.append((write_psfex(tmp_path / "shape.psf", basis, PSFAXIS1=23, PSFAXIS2=23),
                  r"PSF_MASK shape \(6, 25, 25\) does not match"))
    cases.append((tmp_path / "missing.psf", "not found"))
    return cases


def test_bad_psf_files_raise_psf_error_naming_the_file(tmp_path):
    for path, problem in bad_psf_files(tmp_path):
        with pytest.raises(PsfError, match=problem) as error:
            load_psf(path=str(path))
        assert str(path) in str(error.value)


def test_truncated_psf_image_raises(tmp_path):
    path = tmp_path / "image.fits"
    fits.PrimaryHDU(np.ones((41, 41), dtype=np.float64)).writeto(path)
    path.write_bytes(path.read_bytes()[:2880 + 5000])
    with pytest.raises(PsfError, match="image.fits: not a readable FITS file"):
        load_psf(path=str(path))
