"""Tests of the PSF stamp kernels against analytic truth, scipy and GalSim, under each namespace."""

import galsim
import numpy as np
import pytest
from scipy.special import erfc as scipy_erfc
from scipy.stats import norm

from forcedphot.kernels.psf_stamps import erfc, gaussian_stamps, lanczos_resample, lanczos_weights


def sampled_gaussian(size: int, sigma: float, cx: float, cy: float, spacing: float = 1.0) -> np.ndarray:
    """Circular Gaussian (peak 1) evaluated at sample centres spaced `spacing` pixels."""
    grid = np.arange(size) * spacing
    return np.exp(-0.5 * ((grid[None, :] - cx) ** 2 + (grid[:, None] - cy) ** 2) / sigma**2)


def test_erfc_fractional_accuracy(xp):
    x = np.linspace(-10.0, 26.0, 400_001)
    ours = np.asarray(erfc(xp.asarray(x)))
    assert np.max(np.abs(ours / scipy_erfc(x) - 1.0)) < 1.2e-7


def centred_stamps(xp, rng, n, size, sigma_low, sigma_high):
    """Gaussian stamps at random sub-pixel offsets from the central pixel, as NumPy arrays."""
    cx = size // 2 + rng.uniform(-0.5, 0.5, n)
    cy = size // 2 + rng.uniform(-0.5, 0.5, n)
    sigma = rng.uniform(sigma_low, sigma_high, n)
    stamps = np.asarray(gaussian_stamps(xp.asarray(cx), xp.asarray(cy), xp.asarray(sigma), size))
    return cx, cy, sigma, stamps


def test_gaussian_stamps_enclosed_fraction(xp, rng):
    n, size = 40, 15
    cx, cy, sigma, stamps = centred_stamps(xp, rng, n, size, 0.8, 4.0)
    assert stamps.shape == (n, size, size)

    def inside(c):
        return norm.cdf((size - 0.5 - c) / sigma) - norm.cdf((-0.5 - c) / sigma)

    # Large sigma loses up to 20% of the flux off the stamp: the sum must follow exactly.
    np.testing.assert_allclose(stamps.sum(axis=(1, 2)), inside(cx) * inside(cy), rtol=0, atol=5e-7)
    assert stamps.min() >= 0.0


def test_gaussian_stamps_moments(xp, rng):
    n, size = 30, 41
    # sigma >= 1: the pixel-sampled moments then equal the continuous ones (plus Sheppard's
    # 1/12) up to aliasing terms ~ exp(-2 pi^2 sigma^2) < 3e-9 (1e-3 at sigma = 0.5).
    cx, cy, sigma, stamps = centred_stamps(xp, rng, n, size, 1.0, 3.0)
    grid = np.arange(size, dtype=float)
    flux = stamps.sum(axis=(1, 2))
    mx = np.einsum("nji,i->n", stamps, grid) / flux
    my = np.einsum("nji,j->n", stamps, grid) / flux
    np.testing.assert_allclose(mx, cx, rtol=0, atol=1e-6)
    np.testing.assert_allclose(my, cy, rtol=0, atol=1e-6)
    vx = np.einsum("nji,ni->n", stamps, (grid[None, :] - cx[:, None]) ** 2) / flux
    vy = np.einsum("nji,nj->n", stamps, (grid[None, :] - cy[:, None]) ** 2) / flux
    # Pixel integration (a convolution with the unit box) adds 1/12 to the variance.
    np.testing.assert_allclose(vx, sigma**2 + 1.0 / 12.0, rtol=0, atol=1e-4)
    np.testing.assert_allclose(vy, sigma**2 + 1.0 / 12.0, rtol=0, atol=1e-4)


def test_gaussian_stamps_scalar_sigma_and_tails():
    cx, cy = np.array([3.2, 3.0]), np.array([2.9, 3.0])
    stamps = gaussian_stamps(cx, cy, 0.6, 7)
    np.testing.assert_array_equal(stamps, gaussian_stamps(cx, cy, np.array([0.6, 0.6]), 7))
    # Far-tail pixels keep their relative accuracy (erfc differenced on the tail side).
    exact = norm.sf(2.5 / 0.6) - norm.sf(3.5 / 0.6)  # 1-D fraction 3 pixels from the centre
    centre = norm.cdf(0.5 / 0.6) - norm.cdf(-0.5 / 0.6)
    np.testing.assert_allclose(stamps[1, 3, 6], exact * centre, rtol=1e-6)


def test_gaussian_stamps_same_under_every_namespace(xp, rng):
    cx, cy = rng.uniform(3, 4, 5), rng.uniform(3, 4, 5)
    sigma = rng.uniform(1, 2, 5)
    ours = np.asarray(gaussian_stamps(xp.asarray(cx), xp.asarray(cy), xp.asarray(sigma), 9))
    np.testing.assert_array_equal(ours, gaussian_stamps(cx, cy, sigma, 9))


def test_lanczos_integer_shifts_reproduce_model(xp, rng):
    size = 11
    model = rng.normal(size=(size, size))
    shifts = [(0, 0), (2, -1), (-3, 4), (5, 5)]
    cx = np.array([size // 2 + sx for sx, _ in shifts], dtype=float)
    cy = np.array([size // 2 + sy for _, sy in shifts], dtype=float)
    out = np.asarray(lanczos_resample(xp.asarray(model), xp.asarray(cx), xp.asarray(cy), size))
    for stamp, (sx, sy) in zip(out, shifts):
        expected = np.zeros_like(model)
        expected[max(sy, 0):size + min(sy, 0), max(sx, 0):size + min(sx, 0)] = (
            model[max(-sy, 0):size - max(sy, 0), max(-sx, 0):size - max(sx, 0)])
        np.testing.assert_array_equal(stamp, expected)


@pytest.mark.parametrize("order, tolerance", [(5, 2.5e-3), (3, 5e-3)])
def test_lanczos_subpixel_shift_matches_analytic(xp, rng, order, tolerance):
    # A Gaussian of sigma 2.5 px sampled at pixel centres, moved by sub-pixel offsets. The
    # residual (1.6e-3 of the peak for Lanczos-5, 3.5e-3 for Lanczos-3) is the Lanczos
    # kernel's passband ripple: GalSim's Lanczos shows the same (next test).
    size, sigma, n = 41, 2.5, 60
    dx, dy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    model = sampled_gaussian(size, sigma, 20.0, 20.0)
    out = np.asarray(lanczos_resample(xp.asarray(model), xp.asarray(20.0 + dx), xp.asarray(20.0 + dy),
                                      size, order=order))
    truth = np.stack([sampled_gaussian(size, sigma, 20.0 + a, 20.0 + b) for a, b in zip(dx, dy)])
    assert np.max(np.abs(out - truth)) < tolerance
    # Flux is conserved to rounding (DC-normalised weights, model far from the stamp edge).
    np.testing.assert_allclose(out.sum(axis=(1, 2)), model.sum(), rtol=1e-10)


def test_lanczos_oversampled_model_matches_analytic(xp, rng):
    # Model sampled every 0.5 px (sample_scale=0.5) onto the image grid.
    sigma, n = 2.5, 20
    dx, dy = rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)
    model = sampled_gaussian(81, sigma, 20.0, 20.0, spacing=0.5)
    out = np.asarray(lanczos_resample(xp.asarray(model), xp.asarray(20.0 + dx), xp.asarray(20.0 + dy),
                                      41, sample_scale=0.5, order=5))
    truth = np.stack([sampled_gaussian(41, sigma, 20.0 + a, 20.0 + b) for a, b in zip(dx, dy)])
    assert np.max(np.abs(out - truth)) < 2.5e-3


@pytest.mark.parametrize("order", [3, 5])
def test_lanczos_matches_galsim_interpolated_image(rng, order):
    # Peer: GalSim InterpolatedImage with Lanczos(order) (conserve_dc=True), drawn without a
    # pixel, at the same grid; differences are the DC-conservation method only.
    size, sigma = 31, 2.0
    model = sampled_gaussian(size, sigma, 15.0, 15.0) * (1 + 0.2 * rng.uniform(size=(size, size)))
    image = galsim.InterpolatedImage(galsim.Image(model, scale=1.0), x_interpolant=galsim.Lanczos(order),
                                     normalization="sb")
    for dx, dy in rng.uniform(-0.5, 0.5, (5, 2)):
        ours = lanczos_resample(model, np.array([15.0 + dx]), np.array([15.0 + dy]), size, order=order)[0]
        theirs = image.drawImage(nx=size, ny=size, scale=1.0, method="no_pixel", offset=(dx, dy)).array
        assert np.max(np.abs(ours - theirs)) < 2e-5 * model.max()


def test_lanczos_weights_conserve_dc(xp, rng):
    # Decision: each output coordinate's weights are divided by the kernel's sum over its full
    # 2*order taps, so a constant is reproduced exactly away from the model edge...
    u = rng.uniform(10.0, 20.0, 500)
    weights = np.asarray(lanczos_weights(xp.asarray(u), 31, 5))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=0, atol=1e-13)
    # ... which the raw Lanczos-5 kernel does not (it sums to 0.9993 at phase 0.25).
    taps = np.arange(-4, 6) - 0.25
    raw = np.sinc(taps) * np.sinc(taps / 5)
    assert abs(raw.sum() - 1) > 5e-4
    np.testing.assert_allclose(np.asarray(lanczos_weights(xp.asarray(np.array([15.25])), 31, 5))[0, 11:21],
                               raw / raw.sum(), rtol=1e-12)
    # Near and beyond the model edge the weights are not renormalised over the samples that
    # exist (that would make them sum to 1 and copy the edge sample outwards): 2.5 samples
    # beyond either edge, only the kernel's small tail remains.
    edge = np.asarray(lanczos_weights(xp.asarray(np.array([-2.5, 32.5])), 31, 5)).sum(axis=1)
    assert np.all(np.abs(edge) < 0.1)


def test_lanczos_per_object_models_and_namespaces(xp, rng):
    models = rng.normal(size=(4, 15, 15))
    cx, cy = rng.uniform(6, 8, 4), rng.uniform(6, 8, 4)
    ours = np.asarray(lanczos_resample(xp.asarray(models), xp.asarray(cx), xp.asarray(cy), 13,
                                       sample_scale=0.8, order=3))
    reference = lanczos_resample(models, cx, cy, 13, sample_scale=0.8, order=3)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-15)
    for n in range(4):  # batching: object n uses model n only
        single = lanczos_resample(models[n], cx[n:n + 1], cy[n:n + 1], 13, sample_scale=0.8, order=3)
        np.testing.assert_allclose(reference[n], single[0], rtol=0, atol=1e-15)
