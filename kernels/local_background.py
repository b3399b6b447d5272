"""Local background in an annulus around each object, as LSST ``base_LocalBackground``.

Reference: lsst/meas_base ``src/LocalBackground.cc`` (``LocalBackgroundAlgorithm``) and
lsst/afw ``src/math/Statistics.cc`` (``MEANCLIP | STDEVCLIP``), read for this module.

Annulus
-------
LSST builds the outer and inner discs with ``SpanSet::fromShape`` of a circle (afw
``ellipses::PixelRegion``): on pixel row ``y`` with ``dy = y - cy``, a circle of radius
``r`` covers the pixel centres ``x`` with ``|x - cx| <= sqrt(r^2 - dy^2)``, and only on
rows where ``r^2 - dy^2 > 0``. So a disc is ``{dx^2 + dy^2 <= r^2 and dy^2 < r^2}``
(:func:`disc_membership`): inclusive at the rim except at the two points straight above
and below the centre, which a tangent row never holds. The annulus is the outer disc
(``r = outer * sigma``) minus the inner disc (``r = inner * sigma``), clipped to the
image, minus masked pixels; here "clipped and unmasked" is the caller's ``valid`` (LSST's
``badMaskPlanes`` default is BAD, SAT, NO_DATA). Non-finite values are dropped too (afw
statistics are NaN-safe by default).

Clipping (afw ``Statistics`` with ``StatisticsControl(bgRej=3, bgIter=3)``)
-------------------------------------------------------------------------
The sample is the ``n`` annulus pixels. Quantiles use ``idx = f (n - 1)`` with linear
interpolation between the neighbouring order statistics (afw ``medianAndQuartiles``, the
same as NumPy's default ``'linear'`` method). ``n_iter`` passes (``bgIter = 3``: one with
the median, two with the mean), each re-clipping the *full* sample, keeping
``|x - centre| <= half_width`` (inclusive):

* pass 0: centre = median, half-width = ``n_sigma * 0.741301109252802 * IQR``;
* pass k > 0: centre = previous clipped mean, half-width = ``n_sigma`` x previous clipped
  standard deviation (``ddof = 1``); when the whole sample has a single pixel, afw falls
  back to the IQR half-width (0), so that pixel stays.

Results: clipped mean and clipped standard deviation (per pixel, not the error of the
mean). ``n == 0`` -> LSST raises ``NO_GOOD_PIXELS``: mean and std NaN, flag set. ``n == 1``
-> mean = that pixel, std NaN (afw's ``n/(n-1)`` debiasing gives 0 * inf), no flag. A pass
that keeps no pixel (only possible with a NaN half-width) gives NaN, as afw does.

Deliberate differences
----------------------
* LSST computes the radii in float32 (``float psfSigma``); here float64, which moves a
  pixel across the rim only when its distance equals the radius to ~1e-7.
* The clip test is ``centre - half_width <= x <= centre + half_width`` on the sorted
  values (equal to afw's ``|x - centre| <= half_width`` up to the last bit at the edge).
* Sums are taken about the median (afw: about the clip centre); the variance is
  ``(S2 - S1^2 / n) / (n - 1)`` in both, so values agree to ~1e-12 relative. The run sums
  are differences of prefix sums, so pixels *below* the kept run add rounding of
  ~1e-16 x (their squared distance from the median) to S2: below 1e-10 relative unless
  unmasked pixels lie ~1e3 sigma under the background.

Work
----
Only pixels that can lie in some object's annulus are touched: one index list, computed
from the largest outer radius, the smallest inner radius and the spread of the positions,
is gathered from every row first. Quantiles come from one sort per row (in the input
dtype, exact for order statistics) with non-annulus entries pushed to ``+inf``, read with
``take_along_axis`` at per-row positions. Because the pixels a clipping pass keeps form a
contiguous run of the sorted row, each pass costs two comparisons per pixel (to find the
run) and four gathers from prefix sums, computed once, of the values and their squares.
Rows are processed in blocks so that work arrays stay ~16 MB (on the host, page faults
on large temporaries cost more than the arithmetic); blocks are not objects, each is
fully vectorised.
"""

import math
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

Array = Any


class LocalBackground(NamedTuple):
    """Results of :func:`local_background`, each ``(N,)``.

    Attributes
    ----------
    mean : float64
        Clipped mean per pixel, image units (LSST ``localBackground_instFlux``).
    std : float64
        Clipped standard deviation per pixel (``localBackground_instFluxErr``).
    n_pixels : int64
        Good annulus pixels before clipping.
    flag_no_good_pixels : bool
        ``n_pixels == 0``; mean and std are NaN there.
    """

    mean: Array
    std: Array
    n_pixels: Array
    flag_no_good_pixels: Array

IQ_TO_STDEV = 0.741301109252802
"""Gaussian sigma per unit interquartile range, as afw ``Statistics`` uses it."""

_BLOCK_ELEMENTS = 2**21
"""Candidate pixels x objects handled at once (float64 work arrays of ~16 MB)."""


def disc_membership(d2: Array, dy2: Array, r2: Array) -> Array:
    """Pixel centres inside a circle as afw ``SpanSet::fromShape`` selects them.

    Parameters
    ----------
    d2, dy2 : float arrays
        Squared distance of pixel centres from the circle's centre, and its y part, px^2.
    r2 : float array
        Squared radius, px^2 (all three broadcastable).

    Returns
    -------
    bool array
        True where ``d2 <= r2`` on a row with ``dy2 < r2`` (a row exactly tangent to the
        circle holds no pixel: afw's ``PixelRegion`` returns an empty span when
        ``r^2 - dy^2 <= 0``).
    """
    return (dy2 < r2) & (d2 <= r2)


def _candidate_pixels(xp: Any, k: int, cx: Array, cy: Array, r_in: Array, r_out: Array) -> Array:
    """Flat indices (into ``K * K``) of the pixels that may fall in any object's annulus.

    A pixel at distance ``d0`` from a reference point lies at distance within
    ``d0 +- spread`` of every object (``spread`` = largest distance of an object from that
    point); it can be in an annulus only if ``d0 - spread <= max(r_out)`` and
    ``d0 + spread > min(r_in)``.
    """
    finite = xp.isfinite(cx) & xp.isfinite(cy) & xp.isfinite(r_in) & xp.isfinite(r_out)
    if not bool(xp.any(finite)):
        return xp.zeros((0,), dtype=xp.int64, device=device(cx))
    inf = math.inf
    x_ref = 0.5 * (xp.min(xp.where(finite, cx, inf)) + xp.max(xp.where(finite, cx, -inf)))
    y_ref = 0.5 * (xp.min(xp.where(finite, cy, inf)) + xp.max(xp.where(finite, cy, -inf)))
    spread = xp.max(xp.where(finite, xp.sqrt((cx - x_ref) ** 2 + (cy - y_ref) ** 2), 0.0))
    r_out_max = xp.max(xp.where(finite, r_out, 0.0))
    r_in_min = xp.min(xp.where(finite, r_in, inf))
    grid = xp.arange(k, dtype=xp.float64, device=device(cx))
    d0 = xp.sqrt((grid[None, :] - x_ref) ** 2 + (grid[:, None] - y_ref) ** 2)
    # Slack of 1e-9 px guards the bound against rounding in the distances.
    maybe = (d0 - spread <= r_out_max + 1e-9) & (d0 + spread + 1e-9 > r_in_min)
    return xp.nonzero(xp.reshape(maybe, (k * k,)))[0]


def annulus_candidates(k: int, cx: Array, cy: Array, sigma: Array, inner: float = 7.0, outer: float = 15.0) -> Array:
    """Flat indices (into ``K * K``) of the pixels that may lie in any object's annulus
    (``inner`` to ``outer`` times ``sigma`` around ``(cx, cy)``, px), in the arrays' own
    namespace. Reads the arrays and makes a data-dependent shape: call it on the host's
    copies and pass the result (moved to the device) as ``candidates``."""
    xp = array_namespace(cx, cy, sigma)
    cx, cy, sigma = (xp.astype(a, xp.float64) for a in (cx, cy, sigma))
    return _candidate_pixels(xp, k, cx, cy, inner * sigma, outer * sigma)


def _quantiles(xp: Any, ordered: Array, n: Array, fractions: tuple[float, ...]) -> list[Array]:
    """Linearly interpolated quantiles (afw / NumPy ``'linear'``) of the first ``n[row]``
    entries of each row of the row-sorted ``ordered`` ``(N, M)``; NaN where ``n == 0``."""
    has = n > 0
    last = xp.maximum(n - 1, xp.zeros_like(n))
    last_f = xp.astype(last, xp.float64)
    out = []
    for f in fractions:
        pos = f * last_f
        lo = xp.astype(xp.floor(pos), xp.int64)
        hi = xp.minimum(lo + 1, last)
        w = pos - xp.astype(lo, xp.float64)
        # Rows without members hold only +inf padding: zero it before the arithmetic.
        v_lo = xp.where(has, xp.astype(xp.take_along_axis(ordered, lo[:, None], axis=1)[:, 0], xp.float64), 0.0)
        v_hi = xp.where(has, xp.astype(xp.take_along_axis(ordered, hi[:, None], axis=1)[:, 0], xp.float64), 0.0)
        out.append(xp.where(has, (1.0 - w) * v_lo + w * v_hi, math.nan))
    return out


def _run_sum(xp: Any, prefix: Array, lo: Array, hi: Array) -> Array:
    """Sum of the entries ``[lo, hi)`` of each row, from its inclusive prefix sums."""

    def upto(i: Array) -> Array:  # sum of the first i entries
        at = xp.take_along_axis(prefix, xp.maximum(i - 1, xp.zeros_like(i))[:, None], axis=1)[:, 0]
        return xp.where(i > 0, at, 0.0)

    return upto(hi) - upto(lo)


def _annulus_block(
    xp: Any,
    image: Array,
    valid: Array,
    cx: Array,
    cy: Array,
    r_in: Array,
    r_out: Array,
    idx: Array,
    px: Array,
    py: Array,
    n_iter: int,
    n_sigma: float,
) -> tuple[Array, Array, Array]:
    """Clipped mean, clipped std and annulus pixel count for one block of rows.

    ``idx`` are the flat stamp indices of the candidate pixels, ``px, py`` their centres.
    """
    n_obj, k = image.shape[0], image.shape[1]
    values = xp.take(xp.reshape(image, (n_obj, k * k)), idx, axis=1)
    member = xp.take(xp.reshape(valid, (n_obj, k * k)), idx, axis=1) & xp.isfinite(values)
    dy2 = (py[None, :] - cy[:, None]) ** 2
    d2 = (px[None, :] - cx[:, None]) ** 2 + dy2
    in_outer = disc_membership(d2, dy2, (r_out * r_out)[:, None])
    in_inner = disc_membership(d2, dy2, (r_in * r_in)[:, None])
    member = member & in_outer & ~in_inner
    n_pixels = xp.sum(xp.astype(member, xp.int64), axis=1)

    # One sort per row, in the input dtype; non-members go to the end as +inf.
    ordered = xp.sort(xp.where(member, values, math.inf), axis=1, stable=False)
    q1, median, q3 = _quantiles(xp, ordered, n_pixels, (0.25, 0.5, 0.75))
    iqr_width = n_sigma * IQ_TO_STDEV * (q3 - q1)

    # The pixels a pass keeps are a contiguous run [lo, hi) of the sorted row, so prefix
    # sums of (value - median) and of its square give each pass's mean and variance from
    # a few gathers. Centring on the median keeps the one-pass variance free of
    # cancellation (afw likewise accumulates about the clip centre).
    # Only runs within the first n_pixels entries are ever summed, so the +inf padding
    # beyond them never reaches a result.
    ordered = xp.astype(ordered, xp.float64)
    shifted = ordered - median[:, None]
    p1 = xp.cumulative_sum(shifted, axis=1)
    p2 = xp.cumulative_sum(shifted * shifted, axis=1)
    nan = math.nan
    centre, half_width = median, iqr_width
    for _ in range(n_iter):
        lo = xp.sum(xp.astype(ordered < (centre - half_width)[:, None], xp.int64), axis=1)
        hi = xp.sum(xp.astype(ordered <= (centre + half_width)[:, None], xp.int64), axis=1)
        hi = xp.maximum(xp.minimum(hi, n_pixels), lo)
        count = xp.astype(hi - lo, xp.float64)
        s1 = _run_sum(xp, p1, lo, hi)
        s2 = _run_sum(xp, p2, lo, hi)
        mean_shift = s1 / xp.where(count > 0, count, 1.0)
        var = xp.maximum(s2 - s1 * mean_shift, 0.0)
        var = var / xp.where(count > 1, count - 1.0, 1.0)
        # afw: empty pass -> NaN mean; fewer than two kept -> NaN variance (n / (n - 1)).
        centre = xp.where(count > 0, median + mean_shift, nan)
        std = xp.where(count > 1, xp.sqrt(var), nan)
        half_width = xp.where(n_pixels > 1, n_sigma * std, iqr_width)
    return centre, std, n_pixels


def local_background(
    image: Array,
    valid: Array,
    cx: Array,
    cy: Array,
    sigma: Array,
    *,
    inner: float = 7.0,
    outer: float = 15.0,
    n_iter: int = 3,
    n_sigma: float = 3.0,
    candidates: Array | None = None,
    block_rows: int | None = None,
) -> LocalBackground:
    """Sigma-clipped background per pixel in an annulus around each object.

    Parameters
    ----------
    image : (N, K, K) float array
        Image units (counts or nJy) per pixel.
    valid : (N, K, K) bool array
        The pixel lies on the image, is finite and carries none of the BAD / SAT / NO_DATA
        bits (built by the caller).
    cx, cy : (N,) float arrays
        Object position in stamp pixel coordinates (centre of pixel ``[j, i]`` at ``(i, j)``).
    sigma : (N,) float array
        PSF determinant radius ``(Ixx Iyy - Ixy^2)^(1/4)``, px.
    inner, outer : float
        Annulus radii in units of ``sigma``: pixel centres at distance ``<= outer * sigma``
        and ``> inner * sigma`` (see :func:`disc_membership` for the exact rim rule).
    n_iter : int
        Clipping passes (LSST ``bgIter``, >= 1).
    n_sigma : float
        Clipping half-width in (robust) standard deviations (LSST ``bgRej``).
    candidates : (M,) int64 array, optional
        :func:`annulus_candidates` of the positions, computed on the host and moved to the
        arrays' device. Without it the kernel finds them itself, which reads scalars and
        makes a data-dependent shape (synchronisations on a GPU).
    block_rows : int, optional
        Objects per block of work (each block's temporaries are ``(block_rows, M)``);
        default: blocks of about 2 million elements, which suits a CPU's caches.

    Returns
    -------
    LocalBackground
        ``(N,)`` arrays: clipped mean and standard deviation per pixel (float64, image
        units; LSST ``localBackground_instFlux(Err)``), good annulus pixels before
        clipping (int64) and the no-good-pixels flag (mean and std NaN there).
    """
    if n_iter < 1:
        raise ValueError(f"local_background: n_iter must be >= 1, got {n_iter}")
    if not 0 <= inner < outer:
        raise ValueError(f"local_background: need 0 <= inner < outer, got {inner}, {outer}")
    xp = array_namespace(image, valid, cx, cy, sigma)
    if image.ndim != 3 or image.shape[1] != image.shape[2] or valid.shape != image.shape:
        raise ValueError(
            f"local_background: image and valid must be (N, K, K) alike, got {image.shape}, {valid.shape}"
        )
    n_obj, k = image.shape[0], image.shape[1]
    if not xp.isdtype(image.dtype, "real floating"):
        image = xp.astype(image, xp.float64)
    cx = xp.astype(cx, xp.float64)
    cy = xp.astype(cy, xp.float64)
    sigma = xp.astype(sigma, xp.float64)
    r_in = inner * sigma
    r_out = outer * sigma

    idx = _candidate_pixels(xp, k, cx, cy, r_in, r_out) if candidates is None else candidates
    dev = device(image)
    if idx.shape[0] == 0:  # no pixel centre can lie in any annulus (e.g. a tiny PSF): all flagged
        nan = xp.full((n_obj,), math.nan, dtype=xp.float64, device=dev)
        return LocalBackground(nan, nan, xp.zeros((n_obj,), dtype=xp.int64, device=dev), xp.ones((n_obj,), dtype=xp.bool, device=dev))
    grid = xp.arange(k, dtype=xp.float64, device=dev)
    px = xp.take(xp.reshape(xp.broadcast_to(grid[None, :], (k, k)), (k * k,)), idx)
    py = xp.take(xp.reshape(xp.broadcast_to(grid[:, None], (k, k)), (k * k,)), idx)

    # Blocks of rows bound every (rows, M) work array to ~16 MB: large temporaries cost
    # more in page faults than in arithmetic on the host.
    rows = block_rows or max(1, _BLOCK_ELEMENTS // max(1, idx.shape[0]))
    parts = []
    for a in range(0, n_obj, rows):
        b = min(a + rows, n_obj)
        parts.append(
            _annulus_block(
                xp, image[a:b, ...], valid[a:b, ...], cx[a:b], cy[a:b], r_in[a:b], r_out[a:b],
                idx, px, py, n_iter, n_sigma,
            )
        )
    if parts:
        mean, std, n_pixels = (xp.concat([p[i] for p in parts]) for i in range(3))
    else:
        mean = std = xp.zeros((0,), dtype=xp.float64, device=dev)
        n_pixels = xp.zeros((0,), dtype=xp.int64, device=dev)
    no_good = n_pixels == 0
    return LocalBackground(mean, std, n_pixels, no_good)
