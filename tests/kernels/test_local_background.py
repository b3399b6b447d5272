"""local_background: LSST base_LocalBackground annulus statistics.

Checked against analytic truth (Gaussian noise, planted stars), an independent
per-object reimplementation of afw's spans + Statistics(MEANCLIP | STDEVCLIP), and
hand-worked annulus membership at the rims.
"""

import math

import numpy as np
import pytest

from forcedphot.kernels.local_background import local_background

IQ_TO_STDEV = 0.741301109252802  # afw Statistics


def afw_disc_pixels(cx: float, cy: float, r: float, k: int) -> set[tuple[int, int]]:
    """Pixels ``(i, j)`` of a ``k x k`` stamp in afw ``SpanSet::fromShape`` of a circle:
    per row ``j`` the span ``ceil(cx - w) .. floor(cx + w)``, ``w = sqrt(r^2 - dy^2)``,
    only on rows where ``r^2 - dy^2 > 0`` (afw ``PixelRegion::getSpanAt``)."""
    out = set()
    for j in range(k):
        d = r * r - (j - cy) ** 2
        if not d > 0.0:
            continue
        w = math.sqrt(d)
        for i in range(max(math.ceil(cx - w), 0), min(math.floor(cx + w), k - 1) + 1):
            out.add((i, j))
    return out


def reference_background(image, valid, cx, cy, sigma, inner=7.0, outer=15.0, n_iter=3, n_sigma=3.0):
    """One object at a time, the way LSST does it: annulus spans, good finite values,
    afw medianAndQuartiles (NumPy 'linear' percentiles), then clipping passes."""
    n_obj, k = image.shape[0], image.shape[1]
    mean = np.full(n_obj, np.nan)
    std = np.full(n_obj, np.nan)
    count = np.zeros(n_obj, int)
    for n in range(n_obj):
        ring = afw_disc_pixels(cx[n], cy[n], outer * sigma[n], k) - afw_disc_pixels(cx[n], cy[n], inner * sigma[n], k)
        x = np.array([image[n, j, i] for i, j in ring if valid[n, j, i] and np.isfinite(image[n, j, i])], float)
        count[n] = x.size
        if x.size == 0:
            continue
        q1, med, q3 = np.percentile(x, [25, 50, 75])
        centre, width = med, n_sigma * IQ_TO_STDEV * (q3 - q1)
        for _ in range(n_iter):
            kept = x[np.abs(x - centre) <= width]
            m = kept.mean() if kept.size else np.nan
            s = kept.std(ddof=1) if kept.size > 1 else np.nan
            centre = m
            width = n_sigma * s if x.size > 1 else n_sigma * IQ_TO_STDEV * (q3 - q1)
        mean[n], std[n] = m, s
    return mean, std, count


def run(xp, image, valid, cx, cy, sigma, **kw):
    """local_background under namespace ``xp`` on NumPy inputs; NumPy outputs."""
    args = (xp.asarray(a) for a in (image, valid, cx, cy, sigma))
    return tuple(np.asarray(a) for a in local_background(*args, **kw))


def noise_stack(rng, n, k, level, noise, dtype=np.float64):
    return (level + noise * rng.standard_normal((n, k, k))).astype(dtype)


def test_matches_reference_on_random_data(xp, rng):
    n, k = 40, 41
    h = k // 2
    image = noise_stack(rng, n, k, 100.0, 5.0, np.float32)
    # Stars and a few deep holes (some in the annulus), NaNs that valid lets through.
    for _ in range(6 * n):
        o, j, i = rng.integers(n), rng.integers(k), rng.integers(k)
        image[o, j, i] += rng.choice([1.0e3, 5.0e2, -3.0e2])
    image[rng.random(image.shape) < 0.002] = np.nan
    valid = rng.random(image.shape) < 0.9
    cx = h + rng.uniform(-0.5, 0.5, n)
    cy = h + rng.uniform(-0.5, 0.5, n)
    cx[:4] += np.array([6.0, -7.5, 0.0, 3.3])  # annulus cut by the stamp edge
    sigma = rng.uniform(0.8, 1.5, n)  # outer radius up to 22.5 px > h = 20
    valid[5] = False  # no good pixels
    valid[6] = False
    valid[6, h, h + 10] = True  # exactly one
    image[6, h, h + 10] = 97.0
    valid[7] = False
    valid[7, h + 10, h - 2 : h + 1] = True  # three
    cx[6:8], cy[6:8], sigma[6:8] = h, h, 1.0
    mean, std, count, flag = run(xp, image, valid, cx, cy, sigma)
    ref_mean, ref_std, ref_count = reference_background(image, valid, cx, cy, sigma)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(flag, ref_count == 0)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-10, atol=0, equal_nan=True)
    np.testing.assert_allclose(std, ref_std, rtol=1e-10, atol=0, equal_nan=True)
    assert count[5] == 0 and np.isnan(mean[5]) and np.isnan(std[5])
    assert count[6] == 1 and mean[6] == 97.0 and np.isnan(std[6])
    assert count[7] == 3 and np.isfinite(std[7])
    assert np.isfinite(mean[8:]).all() and np.isfinite(std[8:]).all()


@pytest.mark.parametrize("n_iter,n_sigma,inner,outer", [(1, 3.0, 7.0, 15.0), (5, 2.5, 4.0, 9.0)])
def test_matches_reference_other_settings(xp, rng, n_iter, n_sigma, inner, outer):
    n, k = 20, 31
    image = noise_stack(rng, n, k, -3.0, 2.0)
    image[:, ::7, ::5] += 40.0
    valid = rng.random(image.shape) < 0.95
    cx = k // 2 + rng.uniform(-0.5, 0.5, n)
    cy = k // 2 + rng.uniform(-0.5, 0.5, n)
    sigma = rng.uniform(0.9, 1.6, n)
    kw = dict(n_iter=n_iter, n_sigma=n_sigma, inner=inner, outer=outer)
    mean, std, count, _ = run(xp, image, valid, cx, cy, sigma, **kw)
    ref_mean, ref_std, ref_count = reference_background(image, valid, cx, cy, sigma, **kw)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-10, atol=0)
    np.testing.assert_allclose(std, ref_std, rtol=1e-10, atol=0)


def test_gaussian_noise_on_constant(xp, rng):
    n, k, level, noise = 300, 53, 50.0, 4.0
    image = noise_stack(rng, n, k, level, noise)
    valid = np.ones(image.shape, bool)
    h = k // 2
    cx, cy = h + rng.uniform(-0.5, 0.5, n), h + rng.uniform(-0.5, 0.5, n)
    mean, std, count, flag = run(xp, image, valid, cx, cy, np.full(n, 1.7))
    assert not flag.any()
    assert count.min() > 1500  # ~pi (25.5^2 - 11.9^2) pixels
    pulls = (mean - level) / (std / np.sqrt(count))
    assert abs(pulls.mean()) < 4 / np.sqrt(n)
    assert 0.85 < pulls.std() < 1.15
    # Clipping at ~3 sigma trims the tails: the clipped std of a Gaussian is ~0.987 sigma.
    assert abs(np.median(std) / noise - 1) < 0.03


def test_stars_in_annulus_are_clipped(xp, rng):
    n, k, level, noise = 100, 53, 20.0, 2.0
    h = k // 2
    image = noise_stack(rng, n, k, level, noise)
    yy, xx = np.mgrid[0:k, 0:k]
    for o in range(n):  # two bright stars in the annulus of each object
        for _ in range(2):
            ang, rad = rng.uniform(0, 2 * np.pi), rng.uniform(14.0, 23.0)
            sx, sy = h + rad * np.cos(ang), h + rad * np.sin(ang)
            image[o] += 5000.0 * np.exp(-((xx - sx) ** 2 + (yy - sy) ** 2) / (2 * 1.7**2))
    valid = np.ones(image.shape, bool)
    cx, cy = h + rng.uniform(-0.5, 0.5, n), h + rng.uniform(-0.5, 0.5, n)
    mean, std, count, _ = run(xp, image, valid, cx, cy, np.full(n, 1.7))
    standard_error = noise / np.sqrt(count)
    # The stars' faint wings (< 3 sigma) survive clipping and bias the mean slightly up.
    assert np.all(np.abs(mean - level) < 6 * standard_error)
    assert abs(np.median(std) / noise - 1) < 0.05
    ring = np.hypot(xx - h, yy - h)
    plain = image[:, (ring > 11.9) & (ring <= 25.5)].mean(axis=1)
    assert np.all(plain - level > 100 * standard_error)  # the stars matter without clipping


def test_annulus_rims_integer_centre(xp, rng):
    """Centre on a pixel, sigma = 1: inner 7 px, outer 15 px. afw keeps pixel centres at
    distance <= 15 and > 7, except that a row tangent to a circle holds no pixel: (0, +-15)
    is out of the outer disc and (0, +-7) out of the inner disc (so in the annulus)."""
    k, h = 33, 16
    probes = {  # (dx, dy) -> in the annulus?
        (9, 12): True,  # distance exactly 15
        (15, 0): True,  # distance 15 on the centre row
        (0, 15): False,  # tangent row of the outer circle
        (0, -15): False,
        (7, 0): False,  # distance exactly 7: inside the inner disc
        (0, 7): True,  # tangent row of the inner circle
        (5, 5): True,  # distance^2 = 50 > 49
        (4, 5): False,  # 41 <= 49
        (10, 12): False,  # 244 > 225
    }
    n = len(probes) + 1
    image = noise_stack(rng, n, k, 0.0, 1.0)
    valid = np.ones(image.shape, bool)
    for o, (dx, dy) in enumerate(probes, start=1):
        valid[o, h + dy, h + dx] = False
    _, _, count, _ = run(xp, image, valid, np.full(n, float(h)), np.full(n, float(h)), np.ones(n))
    # Gauss circle counts: 709 lattice points within 15, 149 within 7; the tangent-row
    # rule removes 2 from each disc.
    assert count[0] == (709 - 2) - (149 - 2)
    for o, inside in enumerate(probes.values(), start=1):
        assert count[0] - count[o] == int(inside)


@pytest.mark.parametrize("eps,inside", [(1e-9, True), (-1e-9, False)])
def test_outer_rim_fractional_centre(xp, rng, eps, inside):
    k, h = 41, 20
    cx, cy = h + 0.3, h - 0.2
    i, j = h + 9, h - 12  # the probe pixel
    dist = math.hypot(i - cx, j - cy)
    sigma = dist / 15.0 * (1.0 + eps)
    image = noise_stack(rng, 2, k, 0.0, 1.0)
    valid = np.ones(image.shape, bool)
    valid[1, j, i] = False
    _, _, count, _ = run(xp, image, valid, np.full(2, cx), np.full(2, cy), np.full(2, sigma))
    assert count[0] - count[1] == int(inside)


def test_partly_invalid_annulus(xp, rng):
    n, k, level, noise = 60, 53, 10.0, 3.0
    h = k // 2
    image = noise_stack(rng, n, k, level, noise)
    valid = np.ones(image.shape, bool)
    valid[:, :, : h - 3] = False  # left half of the annulus off the image / masked ...
    image[:, :, : h - 3] = 1.0e6  # ... holding garbage that must not leak in
    image[:, : h // 2, h - 3 :] = np.nan
    valid[:, : h // 2, h - 3 :] = False
    cx, cy = h + rng.uniform(-0.5, 0.5, n), h + rng.uniform(-0.5, 0.5, n)
    mean, std, count, flag = run(xp, image, valid, cx, cy, np.full(n, 1.7))
    _, _, full, _ = run(xp, image, np.ones(image.shape, bool), cx, cy, np.full(n, 1.7))
    assert not flag.any()
    assert np.all(count < 0.5 * full) and np.all(count > 300)
    assert np.all(np.abs(mean - level) < 5 * noise / np.sqrt(count))
    assert abs(np.median(std) / noise - 1) < 0.05


def test_no_good_pixels_flagged(xp, rng):
    k, h = 41, 20
    image = noise_stack(rng, 3, k, 5.0, 1.0)
    valid = np.zeros(image.shape, bool)
    valid[1, h - 3 : h + 4, h - 3 : h + 4] = True  # good pixels, but inside the inner radius
    valid[2] = True
    cxy = np.full(3, float(h))
    mean, std, count, flag = run(xp, image, valid, cxy, cxy, np.ones(3))
    np.testing.assert_array_equal(flag, [True, True, False])
    np.testing.assert_array_equal(count[:2], [0, 0])
    assert np.isnan(mean[:2]).all() and np.isnan(std[:2]).all()
    assert np.isfinite(mean[2]) and np.isfinite(std[2])


def test_float32_input_same_as_float64(xp, rng):
    n, k = 30, 41
    image = noise_stack(rng, n, k, 7.0, 2.0, np.float32)
    valid = rng.random(image.shape) < 0.9
    cx, cy = 20 + rng.uniform(-0.5, 0.5, n), 20 + rng.uniform(-0.5, 0.5, n)
    a = run(xp, image, valid, cx, cy, np.full(n, 1.2))
    b = run(xp, image.astype(np.float64), valid, cx, cy, np.full(n, 1.2))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_strict_equals_numpy(rng):
    import array_api_strict

    n, k = 25, 41
    image = noise_stack(rng, n, k, 3.0, 1.5, np.float32)
    image[:, 3, :] += 80.0
    valid = rng.random(image.shape) < 0.9
    cx, cy = 20 + rng.uniform(-2, 2, n), 20 + rng.uniform(-2, 2, n)
    sigma = rng.uniform(0.8, 1.4, n)
    a = run(np, image, valid, cx, cy, sigma)
    b = run(array_api_strict, image, valid, cx, cy, sigma)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_empty_stack(xp):
    out = run(xp, np.zeros((0, 9, 9)), np.zeros((0, 9, 9), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    assert all(a.shape == (0,) for a in out)


def test_bad_arguments():
    z = np.zeros((2, 9, 9))
    v = np.ones((2, 9, 9), bool)
    c = np.full(2, 4.0)
    with pytest.raises(ValueError, match="n_iter"):
        local_background(z, v, c, c, c, n_iter=0)
    with pytest.raises(ValueError, match="inner < outer"):
        local_background(z, v, c, c, c, inner=5.0, outer=5.0)
    with pytest.raises(ValueError, match=r"\(N, K, K\)"):
        local_background(z, v[:, :8, :], c, c, c)


def test_an_empty_annulus_is_a_flagged_row_not_an_exception(xp):
    """A PSF so small that no pixel centre lies in any 7-15 sigma annulus (objects on
    pixel centres): every row is NaN and flagged (this raised IndexError before)."""
    image = xp.asarray(np.zeros((3, 21, 21)))
    valid = xp.asarray(np.ones((3, 21, 21), dtype=bool))
    centre = xp.asarray(np.full(3, 10.0))
    out = local_background(image, valid, centre, centre, xp.asarray(np.full(3, 0.1 / 2.3548)))
    assert np.all(np.asarray(out.flag_no_good_pixels)) and np.all(np.isnan(np.asarray(out.mean)))
    assert np.all(np.asarray(out.n_pixels) == 0)
