"""Tests of forcedphot.kernels.aperture: exact circle-pixel overlap and aperture sums.

Truth comes from geometry (pi r^2, pixels fully in or out, 1-D quadrature of chords),
from the analytic enclosed flux of a Gaussian, from the peers photutils and SEP run on
the same pixels, and from noise realisations (pulls).
"""

import array_api_strict
import numpy as np
from photutils.aperture import CircularAperture, aperture_photometry
import pytest
from scipy.integrate import quad
from scipy.special import ndtr
import sep

from forcedphot.kernels.aperture import aperture_fluxes, circle_overlap_fractions

RADII = (3.0, 4.5, 6.0, 9.0, 12.0)
K = 27  # stamp side: holds r = 12 around any centre within half a pixel of pixel 13
H = K // 2


def _centred(rng, n):
    """Sub-pixel positions within half a pixel of the stamp centre pixel (H, H)."""
    return H + rng.uniform(-0.5, 0.5, n), H + rng.uniform(-0.5, 0.5, n)


def _fluxes(xp, image, variance, valid, cx, cy, radii=RADII):
    """aperture_fluxes under namespace xp on NumPy inputs; results as NumPy arrays."""
    args = (image, variance, valid, cx, cy)
    out = aperture_fluxes(*(xp.asarray(a) for a in args), radii)
    return tuple(np.asarray(o) for o in out[:3])


def test_the_area_is_the_flux_of_a_unit_background_over_valid_pixels(xp, rng):
    """``area`` (what a local background subtraction scales by): pi r^2 for a whole circle,
    and always the flux of an image of ones over the same valid pixels."""
    n = 50
    cx, cy = _centred(rng, n)
    valid = rng.random((n, K, K)) > 0.05
    image = rng.normal(0, 1, (n, K, K))
    out = aperture_fluxes(*(xp.asarray(a) for a in (image, np.ones_like(image), valid, cx, cy)), RADII)
    ones = aperture_fluxes(*(xp.asarray(a) for a in (np.ones_like(image), np.ones_like(image), valid, cx, cy)), RADII)
    np.testing.assert_allclose(np.asarray(out.area), np.asarray(ones.flux), rtol=1e-12)
    whole = aperture_fluxes(*(xp.asarray(a) for a in (image, np.ones_like(image), np.ones(image.shape, bool), cx, cy)), RADII)
    np.testing.assert_allclose(np.asarray(whole.area), np.broadcast_to(np.pi * np.asarray(RADII) ** 2, (n, len(RADII))), rtol=1e-10)


def _overlap(xp, cx, cy, r, size=K):
    return np.asarray(circle_overlap_fractions(xp.asarray(cx), xp.asarray(cy), r, size))


def _pixel_distances(cx, cy, size):
    """Nearest and farthest distance (px) of each pixel of each stamp from the centre."""
    lo = np.arange(size) - 0.5

    def gaps(c):
        d_lo, d_hi = lo[None, :] - c[:, None], lo[None, :] + 1 - c[:, None]
        near = np.maximum(np.maximum(d_lo, -d_hi), 0)
        far = np.maximum(abs(d_lo), abs(d_hi))
        return near, far

    (nx, fx), (ny, fy) = gaps(cx), gaps(cy)
    near = np.hypot(ny[:, :, None], nx[:, None, :])
    far = np.hypot(fy[:, :, None], fx[:, None, :])
    return near, far


def _gaussian_stamps(cx, cy, sigma, size):
    """Unit-flux circular Gaussian integrated exactly over each pixel, (N, size, size)."""
    edges = np.arange(size + 1) - 0.5
    px = np.diff(ndtr((edges[None, :] - cx[:, None]) / sigma), axis=1)
    py = np.diff(ndtr((edges[None, :] - cy[:, None]) / sigma), axis=1)
    return py[:, :, None] * px[:, None, :]


# ---------------------------------------------------------------- geometry


def test_overlap_sums_to_circle_area(xp, rng):
    n = 200
    for r in np.concatenate([np.linspace(0.5, 12.0, 9), rng.uniform(0.5, 12.0, 6)]):
        cx, cy = _centred(rng, n)
        w = _overlap(xp, cx, cy, r)
        assert w.shape == (n, K, K) and w.dtype == np.float64
        assert w.min() >= 0.0 and w.max() <= 1.0
        np.testing.assert_allclose(w.sum(axis=(1, 2)), np.pi * r * r, rtol=1e-10, atol=0)


def test_overlap_of_single_pixels(xp, rng):
    n = 50
    cx, cy = _centred(rng, n)
    near, far = _pixel_distances(cx, cy, K)
    edges = np.arange(K + 1) - 0.5
    checked = 0
    for r in (0.7, 3.0, 6.3, 11.0):
        w = _overlap(xp, cx, cy, r)
        assert np.all(w[far <= r] == 1.0)  # fully inside
        assert np.all(w[near >= r] == 0.0)  # fully outside
        partial = np.argwhere((near < r) & (far > r))
        assert np.all(w[tuple(partial.T)] > 0) and np.all(w[tuple(partial.T)] < 1)
        # Independent truth for some partial pixels: integrate the chord length in x.
        for k, j, i in partial[rng.choice(len(partial), 12, replace=False)]:

            def chord(x, k=k, j=j):
                half = np.sqrt(max(r * r - (x - cx[k]) ** 2, 0.0))
                return max(min(edges[j + 1], cy[k] + half) - max(edges[j], cy[k] - half), 0.0)

            x0, x1 = max(edges[i], cx[k] - r), min(edges[i + 1], cx[k] + r)
            truth, _ = quad(chord, x0, x1, epsabs=1e-13, epsrel=1e-12, limit=200)
            assert w[k, j, i] == pytest.approx(truth, abs=1e-11)
            checked += 1
    assert checked == 48


def test_circle_smaller_than_a_pixel(xp):
    r = 0.3
    area = np.pi * r * r
    # Inside pixel (13, 13) without touching its edges: all of the area there.
    w = _overlap(xp, np.array([13.1]), np.array([12.85]), r)[0]
    assert w[13, 13] == pytest.approx(area, rel=1e-12)
    assert np.count_nonzero(w) == 1
    # On the corner shared by pixels 12 and 13 in both axes: a quarter in each.
    w = _overlap(xp, np.array([12.5]), np.array([12.5]), r)[0]
    np.testing.assert_allclose(w[12:14, 12:14], area / 4, rtol=1e-12)
    assert np.count_nonzero(w) == 4
    # On the edge between columns 12 and 13 of row 13: half in each.
    w = _overlap(xp, np.array([12.5]), np.array([13.0]), r)[0]
    np.testing.assert_allclose(w[13, 12:14], area / 2, rtol=1e-12)
    assert np.count_nonzero(w) == 2


# ---------------------------------------------------------------- fluxes


def test_gaussian_enclosed_flux(xp, rng):
    """Noiseless pixel-integrated Gaussian (sigma = 3 px, unit flux) vs 1 - exp(-r^2/2s^2).

    The aperture spreads each pixel's flux uniformly over the pixel, so it cannot be exact
    for a curved profile. Averaged over sub-pixel positions its weight map is the disc
    convolved with two unit boxes (variance 1/6 per axis), so to leading order the bias
    is (1/12) * integral of the Laplacian over the disc = (2 pi r / 12) f'(r) =
    -r^2 exp(-r^2 / 2 s^2) / (12 s^4), i.e. -0.56%, -0.68%, -0.50%, -0.093%, -0.005%
    of the flux for r = 3 .. 12. Measured: mean deviation 0.987, 0.995, 0.999,
    1.019, 1.048 x that prediction (higher orders grow with r / s), each object within
    1.14x of it, at most 0.75% of the flux; tolerances 10%, 1.5x and 1%.
    """
    sigma, n = 3.0, 400
    cx, cy = _centred(rng, n)
    image = _gaussian_stamps(cx, cy, sigma, K)
    flux, _, truncated = _fluxes(xp, image, np.ones_like(image), np.ones(image.shape, bool), cx, cy)
    r = np.array(RADII)
    analytic = 1 - np.exp(-(r**2) / (2 * sigma**2))
    bias = -(r**2) * np.exp(-(r**2) / (2 * sigma**2)) / (12 * sigma**4)
    deviation = flux - analytic
    assert not truncated.any()
    np.testing.assert_allclose(deviation.mean(axis=0), bias, rtol=0.10)
    assert np.all(np.abs(deviation) <= 1.5 * np.abs(bias))
    assert np.all(np.abs(deviation) < 0.01)  # below 1% of the total flux everywhere


def _tile(stamps):
    """Lay (N, K, K) stamps side by side in one (K, N K) image."""
    n = stamps.shape[0]
    return np.ascontiguousarray(stamps.transpose(1, 0, 2).reshape(K, n * K))


def test_peers_photutils_and_sep(xp, rng):
    """Same pixels, same positions: photutils (method='exact') and SEP (subpix=0)."""
    n = 40
    cx, cy = _centred(rng, n)
    variance = rng.uniform(0.5, 2.0, (n, K, K))
    image = (
        rng.uniform(50, 500, n)[:, None, None] * _gaussian_stamps(cx, cy, 2.0, K)
        + rng.uniform(5, 10, (n, 1, 1))
        + rng.normal(0, np.sqrt(variance))
    )
    flux, err, truncated = _fluxes(xp, image, variance, np.ones(image.shape, bool), cx, cy)
    assert not truncated.any()

    big, big_var = _tile(image), _tile(variance)
    x = np.arange(n) * K + cx  # stamp n starts at image column n K; rows coincide
    for k, r in enumerate(RADII):
        aperture = CircularAperture(np.column_stack([x, cy]), r)
        phot = aperture_photometry(big, aperture, error=np.sqrt(big_var), method="exact")
        sep_sum, sep_err, sep_flag = sep.sum_circle(big, x, cy, r, var=big_var, subpix=0)
        assert np.all(sep_flag == 0)
        np.testing.assert_allclose(flux[:, k], phot["aperture_sum"], rtol=1e-6)
        np.testing.assert_allclose(flux[:, k], sep_sum, rtol=1e-6)

        # Their errors are sqrt(sum(w V)) with our weights; ours is sqrt(sum(w^2 V)) with
        # photutils' weights.
        w = _overlap(xp, cx, cy, r)
        upper = np.sqrt((w * variance).sum(axis=(1, 2)))
        np.testing.assert_allclose(phot["aperture_sum_err"], upper, rtol=1e-6)
        np.testing.assert_allclose(sep_err, upper, rtol=1e-6)
        w_phot = np.stack(
            [m.to_image(big.shape)[:, j * K : (j + 1) * K] for j, m in enumerate(aperture.to_mask(method="exact"))]
        )
        np.testing.assert_allclose(w, w_phot, rtol=0, atol=1e-10)
        np.testing.assert_allclose(err[:, k], np.sqrt((w_phot**2 * variance).sum(axis=(1, 2))), rtol=1e-10)
        assert np.all(err[:, k] < upper)


def test_peers_pixel_convention(xp):
    """A lone unit pixel at row 5, column 7 and circles of r = 1 px centred on it or
    beside it: pixel centres are at integer 0-based coordinates for all three codes.

    (r = 1 because SEP with subpix=0 counts the whole central pixel for r < ~0.71 px when
    the centre is on a pixel centre: 1.0 instead of pi r^2 for r = 0.3, 0.4, 0.5.)
    """
    image = np.zeros((11, 11))
    image[5, 7] = 1.0
    half_band = np.sqrt(3) / 4 + np.pi / 6  # unit circle within |y| <= 1/2, one side of x = 0
    cases = (
        (7.0, 5.0, 1.0),  # the whole pixel lies inside the circle
        (7.5, 5.0, half_band),
        (6.5, 5.0, half_band),
        (7.0, 4.5, half_band),
        (8.0, 5.0, half_band - 0.5),
    )
    for x, y, expected in cases:
        ours = _fluxes(xp, image[None], image[None], np.ones((1, 11, 11), bool), [x], [y], (1.0,))[0]
        phot = aperture_photometry(image, CircularAperture((x, y), 1.0), method="exact")["aperture_sum"][0]
        sep_sum = sep.sum_circle(image, [x], [y], 1.0, subpix=0)[0][0]
        assert ours[0, 0] == pytest.approx(expected, rel=1e-12)
        assert phot == pytest.approx(expected, rel=1e-12)
        assert sep_sum == pytest.approx(expected, rel=1e-6)


def _sky_pulls(xp, rng, n, size, radii, sky=3.0):
    """Flat sky plus Gaussian noise of random known per-pixel variance, one realisation
    per object at its own sub-pixel position; true flux = sky pi r^2. Returns the pulls
    (flux - true) / flux_err and the same with the upper bound sqrt(sum(w V)) instead."""
    h = size // 2
    cx, cy = h + rng.uniform(-0.5, 0.5, n), h + rng.uniform(-0.5, 0.5, n)
    variance = rng.uniform(0.5, 2.0, (n, size, size))
    image = sky + rng.normal(0.0, np.sqrt(variance))
    flux, err, truncated = _fluxes(xp, image, variance, np.ones(image.shape, bool), cx, cy, radii)
    assert not truncated.any()
    residual = flux - sky * np.pi * np.array(radii) ** 2
    upper = np.stack(
        [np.sqrt((_overlap(xp, cx, cy, r, size) * variance).sum(axis=(1, 2))) for r in radii], axis=1
    )
    return residual / err, residual / upper


def test_pulls(xp, rng):
    """n = 4000 realisations: the sampling error of the pull mean is 0.016 and of its std
    0.011 (tolerances 0.05 and 5%)."""
    pulls, _ = _sky_pulls(xp, rng, 4000, K, RADII)
    assert np.all(np.abs(pulls.mean(axis=0)) < 0.05)
    assert np.all(np.abs(pulls.std(axis=0) - 1) < 0.05)


def test_pulls_tell_exact_error_from_upper_bound(xp, rng):
    """At r = 3 px the peers' sqrt(sum(w V)) exceeds sqrt(sum(w^2 V)) by ~6%, too close
    to the 5% tolerance above to be told apart there. With n = 40000 (std of the pull std
    0.0035): ours gives std 1 within 0.015; the upper bound gives std < 0.97 (expected
    ~0.94, the mean ratio of the two errors)."""
    pulls, upper_pulls = _sky_pulls(xp, rng, 40000, 11, (3.0,))
    assert abs(pulls.mean()) < 0.02
    assert abs(pulls.std() - 1) < 0.015
    assert upper_pulls.std() < 0.97


# ---------------------------------------------------------------- truncation


def test_truncation_at_the_stack_edge(xp, rng):
    """Centres anywhere on a small stack: truncated exactly when the circle crosses the
    stack boundary, and the flux is that of the part inside (photutils clips the same)."""
    size, n, radii = 15, 1500, (1.0, 2.5, 4.0, 9.0)
    cx, cy = rng.uniform(-0.5, size - 0.5, n), rng.uniform(-0.5, size - 0.5, n)
    stamp = rng.uniform(1.0, 2.0, (size, size))
    image = np.broadcast_to(stamp, (n, size, size))
    flux, err, truncated = _fluxes(xp, image, image, np.ones(image.shape, bool), cx, cy, radii)
    for k, r in enumerate(radii):
        crosses = (np.minimum(cx, cy) - r < -0.5) | (np.maximum(cx, cy) + r > size - 0.5)
        np.testing.assert_array_equal(truncated[:, k], crosses)
        phot = aperture_photometry(stamp, CircularAperture(np.column_stack([cx, cy]), r), method="exact")
        np.testing.assert_allclose(flux[:, k], phot["aperture_sum"], rtol=1e-10)
    assert truncated[:, 0].mean() < 0.5 and truncated[:, -1].all()


def test_truncation_by_invalid_pixels(xp, rng):
    """One invalid pixel (NaN data and variance) per object, within 8 px of the centre:
    truncated exactly for radii reaching into that pixel, and the flux is the sum over
    the remaining pixels (photutils with the pixel masked)."""
    n = 300
    cx, cy = _centred(rng, n)
    near, _ = _pixel_distances(cx, cy, K)
    image = rng.uniform(1.0, 2.0, (n, K, K))
    variance = rng.uniform(0.5, 2.0, (n, K, K))
    valid = np.ones((n, K, K), bool)
    bad = []
    for k in range(n):
        candidates = np.argwhere(near[k] < 8.0)
        j, i = candidates[rng.integers(len(candidates))]
        valid[k, j, i] = False
        bad.append(near[k, j, i])
    image[~valid] = np.nan
    variance[~valid] = np.nan
    flux, err, truncated = _fluxes(xp, image, variance, valid, cx, cy)

    expected = np.array(bad)[:, None] < np.array(RADII)[None, :]
    np.testing.assert_array_equal(truncated, expected)
    assert 0 < expected[:, 0].mean() < 1 and expected[:, -1].all()
    assert np.all(np.isfinite(flux)) and np.all(np.isfinite(err))
    for k in range(0, n, 15):
        apertures = [CircularAperture((cx[k], cy[k]), r) for r in RADII]
        phot = aperture_photometry(image[k], apertures, mask=~valid[k], method="exact")
        sums = [phot[f"aperture_sum_{m}"][0] for m in range(len(RADII))]
        np.testing.assert_allclose(flux[k], sums, rtol=1e-10)


# ---------------------------------------------------------------- backends, input checks


def test_array_api_strict_matches_numpy(rng):
    n = 500
    cx, cy = rng.uniform(-2, K + 1, n), rng.uniform(-2, K + 1, n)
    image = rng.normal(10.0, 3.0, (n, K, K)).astype(np.float32)
    variance = rng.uniform(0.5, 2.0, (n, K, K)).astype(np.float32)
    valid = rng.random((n, K, K)) > 0.02
    ref = _fluxes(np, image, variance, valid, cx, cy)
    strict = _fluxes(array_api_strict, image, variance, valid, cx, cy)
    for a, b in zip(ref[:2], strict[:2]):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(strict[2], ref[2])
    np.testing.assert_allclose(_overlap(array_api_strict, cx, cy, 4.5), _overlap(np, cx, cy, 4.5), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": np.zeros((3, K, K - 1))}, "image must be an"),
        ({"variance": np.zeros((3, K, K + 1))}, "variance shape"),
        ({"valid": np.ones((3, K, K))}, "valid must be a bool"),
        ({"cx": np.zeros(4)}, "cx and cy must be"),
        ({"radii": (3.0, -1.0)}, "radius must be finite and > 0"),
        ({"radii": ()}, "at least one aperture radius"),
    ],
)
def test_bad_input_is_named(xp, change, message):
    args = {
        "image": np.zeros((3, K, K)),
        "variance": np.ones((3, K, K)),
        "valid": np.ones((3, K, K), bool),
        "cx": np.full(3, 13.0),
        "cy": np.full(3, 13.0),
        "radii": (3.0,),
    } | change
    radii = args.pop("radii")
    with pytest.raises(ValueError, match=message):
        aperture_fluxes(*(xp.asarray(a) for a in args.values()), radii)
    with pytest.raises(ValueError, match="radius must be finite"):
        circle_overlap_fractions(xp.asarray(np.zeros(2)), xp.asarray(np.zeros(2)), float("nan"), K)
