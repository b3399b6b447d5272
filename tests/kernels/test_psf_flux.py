"""base_PsfFlux kernel: analytic truth, noise properties, flags, peer (photutils)."""

import numpy as np
from scenes import integrated_gaussian

from forcedphot.kernels.psf_flux import psf_flux

SIGMA = 1.5
K = 25  # 8 sigma half-width: the stamp holds all but ~1e-15 of the flux


def positions(rng, n):
    h = K // 2
    return h + rng.uniform(-0.5, 0.5, n), h + rng.uniform(-0.5, 0.5, n)


def run(xp, data, variance, psf, inside=None, usable=None):
    inside = np.ones(data.shape, bool) if inside is None else inside
    usable = inside if usable is None else usable
    out = psf_flux(*(xp.asarray(a) for a in (data, variance, psf, inside, usable)))
    return type(out)(*(np.asarray(v) for v in out))


def stars_and_psf(rng, n, low, high):
    """True fluxes, unit-flux star images and their PSF (normalised over the stamp)."""
    cx, cy = positions(rng, n)
    truth = rng.uniform(low, high, n)
    stars = integrated_gaussian(cx, cy, SIGMA, K)
    return truth, stars, stars / stars.sum(axis=(1, 2), keepdims=True)


def test_noiseless_flux_recovered_to_1e4(xp, rng):
    truth, stars, psf = stars_and_psf(rng, 200, 100, 1e5)
    out = run(xp, truth[:, None, None] * stars, np.ones_like(stars), psf)
    assert np.max(np.abs(out.inst_flux / truth - 1)) < 1e-4
    assert np.all(out.npixels == K * K)
    assert not out.flag.any() and not out.flag_edge.any()
    # effective area of a pixel-integrated Gaussian ~ 4 pi (sigma^2 + 1/12)
    np.testing.assert_allclose(out.area, 4 * np.pi * (SIGMA**2 + 1 / 12), rtol=0.01)


def test_edge_clipped_stamp_is_flagged_and_still_unbiased(xp, rng):
    n = 50
    cx, cy = positions(rng, n)
    stars = integrated_gaussian(cx, cy, SIGMA, K)
    psf = stars / stars.sum(axis=(1, 2), keepdims=True)
    inside = np.ones(stars.shape, bool)
    inside[:, :, :8] = False  # left 8 columns beyond the image edge
    data = np.where(inside, 1000.0 * stars, np.nan)
    out = run(xp, data, np.where(inside, 1.0, np.nan), psf, inside=inside)
    assert out.flag_edge.all() and out.flag.all()
    assert np.all(out.npixels == K * (K - 8))
    np.testing.assert_allclose(out.inst_flux, 1000.0, rtol=1e-10)


def test_no_good_pixels(xp, rng):
    cx, cy = positions(rng, 3)
    stars = integrated_gaussian(cx, cy, SIGMA, K)
    usable = np.zeros(stars.shape, bool)
    out = run(xp, stars, np.ones_like(stars), stars, usable=usable)
    assert out.flag_no_good_pixels.all() and out.flag.all()
    assert np.isnan(out.inst_flux).all() and np.all(out.npixels == 0)


def test_non_finite_error_sets_general_flag(xp, rng):
    cx, cy = positions(rng, 2)
    stars = integrated_gaussian(cx, cy, SIGMA, K)
    variance = np.ones_like(stars)
    variance[0, K // 2, K // 2] = np.inf
    out = run(xp, stars, variance, stars)
    assert out.flag[0] and not out.flag[1]
    assert np.isnan(out.inst_flux[0]) and np.isfinite(out.inst_flux[1])
    assert not out.flag_edge.any() and not out.flag_no_good_pixels.any()


def test_pulls_and_chi2(xp, rng):
    """(flux - true) / err ~ N(0, 1) and chi2 ~ npixels - 1 under sky + Poisson-like noise."""
    truth, stars, psf = stars_and_psf(rng, 4000, 200, 5000)
    model = truth[:, None, None] * stars
    variance = 400.0 + model  # sky variance 400 (counts^2) plus source shot noise
    data = model + rng.normal(size=model.shape) * np.sqrt(variance)
    out = run(xp, data, variance, psf)
    pull = (out.inst_flux - truth) / out.inst_flux_err
    assert abs(pull.mean()) < 0.05
    assert abs(pull.std() - 1) < 0.05
    assert abs(out.chi2.mean() / (K * K - 1) - 1) < 0.01


def test_strict_matches_numpy(rng):
    import array_api_strict

    n = 30
    cx, cy = positions(rng, n)
    stars = integrated_gaussian(cx, cy, SIGMA, K)
    data = 500 * stars + rng.normal(size=stars.shape)
    inside = rng.uniform(size=stars.shape) > 0.1
    a = run(np, data, np.ones_like(data), stars, inside=inside)
    b = run(array_api_strict, data, np.ones_like(data), stars, inside=inside)
    for mine, strict in zip(a, b):
        np.testing.assert_allclose(mine, strict, rtol=1e-12, atol=0, equal_nan=True)


def test_matches_photutils_fixed_position_psf_photometry(rng):
    """photutils PSFPhotometry with fixed positions and the same Gaussian PRF."""
    from astropy.table import QTable
    from photutils.psf import CircularGaussianPRF, PSFPhotometry

    fwhm = SIGMA * 2 * np.sqrt(2 * np.log(2))
    size, h = 200, K // 2
    grid = np.arange(20, size - 20, 32)
    xs, ys = np.meshgrid(grid, grid)
    x = xs.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    y = ys.ravel() + rng.uniform(-0.5, 0.5, xs.size)
    flux = rng.uniform(500, 5000, x.size)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    image = rng.normal(0, 5.0, (size, size))
    stamps = integrated_gaussian(h + x - ix, h + y - iy, SIGMA, K)
    for k in range(x.size):
        image[iy[k] - h : iy[k] + h + 1, ix[k] - h : ix[k] + h + 1] += flux[k] * stamps[k]

    model = CircularGaussianPRF(fwhm=fwhm)
    model.x_0.fixed = True
    model.y_0.fixed = True
    phot = PSFPhotometry(model, fit_shape=(K, K), aperture_radius=4)
    table = phot(image, error=np.full(image.shape, 5.0), init_params=QTable({"x": x, "y": y, "flux": flux}))

    cutouts = np.stack([image[iy[k] - h : iy[k] + h + 1, ix[k] - h : ix[k] + h + 1] for k in range(x.size)])
    psf = stamps / stamps.sum(axis=(1, 2), keepdims=True)
    ours = run(np, cutouts, np.full(cutouts.shape, 25.0), psf)
    theirs = np.asarray(table["flux_fit"])
    # Same linear estimator: agreement far below the statistical error (5 counts x ~2.7 px)
    assert np.max(np.abs(ours.inst_flux - theirs) / ours.inst_flux_err) < 1e-3
    np.testing.assert_allclose(ours.inst_flux_err, np.asarray(table["flux_err"]), rtol=1e-3)
