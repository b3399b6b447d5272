"""Circular-aperture photometry, batched, with the exact circle-pixel overlap.

Geometry
--------
Pixel ``[n, j, i]`` of a stack covers ``[i - 0.5, i + 0.5) x [j - 0.5, j + 0.5)`` in
stamp coordinates (pixel centres at integers, 0-based, as LSST / astropy ``origin=0``,
photutils and SEP). Its weight ``w`` is the exact area (in pixels, so also the fraction
of the pixel) of its intersection with the circle of radius ``r`` px centred at
``(cx[n], cy[n])``.

The area comes from a closed form. With ``(u, v)`` measured from the circle centre, let
``F(x, y)`` be the signed area of the circle inside the rectangle with opposite corners
``(0, 0)`` and ``(x, y)`` (odd in ``x`` and in ``y``). For ``x, y >= 0``, with
``x' = min(x, r)``, ``y' = min(y, r)``::

    F = x' y'                                              if x'^2 + y'^2 <= r^2
    F = (a y' + x' s + r^2 (atan2(y', a) - atan2(s, x'))) / 2   otherwise,

    a = sqrt(r^2 - y'^2),  s = sqrt(r^2 - x'^2)

(the rectangle up to ``u = a``, plus the area under the arc from ``a`` to ``x'``, written
as a sector and two triangles). ``F`` is evaluated once on the ``(K+1) x (K+1)`` grid of
pixel corners (in :func:`aperture_fluxes` only the rows and columns some circle can
reach) and each pixel's area is the inclusion-exclusion of its four corners. ``F``
differs from the area of the circle below-left of a corner only by terms that cancel in
the four-corner sum; anchoring it at the centre keeps ``|F| <= pi r^2 / 4``, so the
cancellation error of a pixel is ~1e-13 px^2 at most (float64 throughout; the areas sum
to ``pi r^2`` within 1e-15 relative). Pixels whose nearest
point lies at distance ``>= r`` get exactly 0 and pixels whose farthest corner lies within
``r`` get exactly 1, so ``w > 0`` is a reliable test for "touched by the aperture".

Errors
------
``flux = sum(w D)`` and ``flux_err = sqrt(sum(w^2 V))`` over valid pixels: the exact
variance of the weighted sum for independent pixel noise of variance ``V``. photutils
(``aperture_photometry``, ``method='exact'``: ``sqrt(sum(w err^2))``) and SEP
(``sum_circle``, ``subpix=0``: ``sqrt(sum(w V))``) report ``sqrt(sum(w V))`` instead,
which is an upper bound (``w^2 <= w``) that differs only through the partially covered
boundary pixels: on average by 6% at r = 3 px, 3% at 6 px, 1.4% at 12 px. Correlated noise (e.g.
on a warped difference image) is not accounted for by either.
"""

from collections.abc import Sequence
from math import ceil, floor, isfinite
from typing import Any, NamedTuple

from array_api_compat import array_namespace, device

Array = Any


class ApertureFluxes(NamedTuple):
    """Results of :func:`aperture_fluxes`, each ``(N, R)`` for ``R`` radii.

    Attributes
    ----------
    flux : float64
        ``sum(w D)`` over valid pixels, image unit x px.
    flux_err : float64
        ``sqrt(sum(w^2 V))`` over valid pixels.
    truncated : bool
        An invalid pixel is touched, or the circle reaches beyond the stack.
    area : float64
        ``sum(w)`` over valid pixels, px: the flux a uniform background of one image unit
        adds (what subtracting a local background scales by).
    """

    flux: Array
    flux_err: Array
    truncated: Array
    area: Array


def _corner_area(xp: Any, u: Array, v: Array, r: Array) -> Array:
    """Signed area ``F(u, v)`` of the circle of radius ``r`` centred at the origin inside
    the rectangle with corners ``(0, 0)`` and ``(u, v)``.

    ``u`` is shaped ``(N, 1, Mx)`` (x offsets of corner columns), ``v`` ``(N, My, 1)``
    (y offsets of corner rows), ``r`` a 0-d float64 array; returns ``(N, My, Mx)``, px^2.
    """
    sign_u = 1.0 - 2.0 * xp.astype(u < 0, xp.float64)
    sign_v = 1.0 - 2.0 * xp.astype(v < 0, xp.float64)
    xc = xp.minimum(xp.abs(u), r)
    yc = xp.minimum(xp.abs(v), r)
    # (r - c)(r + c) rather than r^2 - c^2: accurate where c is close to r.
    s = xp.sqrt((r - xc) * (r + xc))
    a = xp.sqrt((r - yc) * (r + yc))
    # Per-row and per-column parts first; only the combinations below are (N, My, Mx).
    rows = a * yc + r * r * xp.atan2(yc, a)
    cols = xc * s - r * r * xp.atan2(s, xc)
    corner_inside = xc * xc + yc * yc <= r * r
    area = xp.where(corner_inside, xc * yc, 0.5 * (rows + cols))
    return (sign_v * sign_u) * area


def _axis_gaps(xp: Any, edges: Array) -> tuple[Array, Array]:
    """Nearest and farthest distance from the centre, along one axis, of each pixel whose
    edges (offsets from the centre) are ``edges[..., :-1]`` and ``edges[..., 1:]``."""
    lo = edges[..., :-1]
    hi = edges[..., 1:]
    near = xp.maximum(xp.maximum(lo, -hi), 0.0)
    far = xp.maximum(xp.abs(lo), xp.abs(hi))
    return near, far


def _overlap_window(xp: Any, cx: Array, cy: Array, r: Array, cols: range, rows: range) -> Array:
    """Exact circle-pixel overlap (px^2) for the pixels ``[rows, cols]`` of the stamps:
    ``(N, len(rows), len(cols))`` float64; ``cx, cy`` float64 ``(N,)``, ``r`` 0-d."""
    f64 = xp.float64
    col_edges = xp.arange(cols.start, cols.stop + 1, dtype=f64, device=device(cx)) - 0.5
    row_edges = xp.arange(rows.start, rows.stop + 1, dtype=f64, device=device(cx)) - 0.5
    u = col_edges[None, :] - cx[:, None]  # x offsets of the corner columns from the centre
    v = row_edges[None, :] - cy[:, None]  # y offsets of the corner rows
    corners = _corner_area(xp, u[:, None, :], v[:, :, None], r)
    across_x = corners[:, :, 1:] - corners[:, :, :-1]
    area = xp.clip(across_x[:, 1:, :] - across_x[:, :-1, :], min=0.0, max=1.0)

    near_x, far_x = _axis_gaps(xp, u)
    near_y, far_y = _axis_gaps(xp, v)
    r2 = r * r
    outside = (near_y * near_y)[:, :, None] + (near_x * near_x)[:, None, :] >= r2
    inside = (far_y * far_y)[:, :, None] + (far_x * far_x)[:, None, :] <= r2
    return xp.where(outside, 0.0, xp.where(inside, 1.0, area))


def centre_bounds(cx: Array, cy: Array) -> tuple[float, float, float, float] | None:
    """``(min cx, max cx, min cy, max cy)`` as Python floats (NaN if a centre is not
    finite), None for no centres. Reads the arrays: call it on the host's copies."""
    xp = array_namespace(cx, cy)
    if cx.shape[0] == 0:
        return None
    return float(xp.min(cx)), float(xp.max(cx)), float(xp.min(cy)), float(xp.max(cy))


def _touched(bounds: tuple[float, float] | None, radius: float, size: int) -> range:
    """Pixel indices along one axis that any of the circles (centres within ``bounds``,
    px) can touch, clipped to ``[0, size)``; all of them if a centre is not finite."""
    if bounds is None:
        return range(0)
    lo, hi = bounds
    if not (isfinite(lo) and isfinite(hi)):
        return range(size)
    first = max(0, min(size, floor(lo - radius + 0.5)))
    stop = min(size, max(first, ceil(hi + radius + 0.5)))
    return range(first, stop)


def check_radius(radius: float) -> float:
    """``radius`` as a float, else ValueError: an aperture radius must be finite and > 0 px."""
    radius = float(radius)
    if not (isfinite(radius) and radius > 0):
        raise ValueError(f"aperture radius must be finite and > 0 px, got {radius!r}")
    return radius


def circle_overlap_fractions(cx: Array, cy: Array, radius: float, size: int) -> Array:
    """Exact overlap of a circle with every pixel of a stack of stamps.

    Parameters
    ----------
    cx, cy : (N,) arrays
        Circle centres in stamp coordinates, px (pixel ``[j, i]`` is centred at
        ``(x=i, y=j)`` and covers ``[i - 0.5, i + 0.5) x [j - 0.5, j + 0.5)``).
    radius : float
        Circle radius in px, finite and > 0.
    size : int
        Stamp side K, > 0.

    Returns
    -------
    (N, K, K) float64 array
        Area of the intersection of circle ``n`` with pixel ``[j, i]`` (axis 1 = y,
        axis 2 = x), in px^2 = fraction of the pixel, in ``[0, 1]``. Exactly 0 for pixels
        that do not touch the disc's interior and exactly 1 for pixels inside it. The parts
        of the circle beyond the stamp are not counted.
    """
    radius = check_radius(radius)
    if int(size) != size or size < 1:
        raise ValueError(f"stamp size must be a positive integer, got {size!r}")
    xp = array_namespace(cx, cy)
    if cx.ndim != 1 or cy.shape != cx.shape:
        raise ValueError(f"cx and cy must be (N,) vectors of one length, got shapes {cx.shape} and {cy.shape}")
    f64 = xp.float64
    everything = range(int(size))
    r = xp.asarray(radius, dtype=f64, device=device(cx))
    return _overlap_window(xp, xp.astype(cx, f64), xp.astype(cy, f64), r, everything, everything)


def aperture_fluxes(
    image: Array,
    variance: Array,
    valid: Array,
    cx: Array,
    cy: Array,
    radii: Sequence[float],
    bounds: tuple[float, float, float, float] | None = None,
) -> ApertureFluxes:
    """Sum a stack of stamps in circular apertures with exact pixel overlap weights.

    Parameters
    ----------
    image, variance : (N, K, K) arrays
        Stamps of the image (any flux unit per pixel) and of its per-pixel variance (that
        unit squared). Values at invalid pixels are ignored (may be NaN).
    valid : (N, K, K) bool array
        True where the stamp pixel lies on the image and is usable (finite data and
        variance, no rejecting mask bit).
    cx, cy : (N,) arrays
        Aperture centres in stamp coordinates, px (see :func:`circle_overlap_fractions`).
    radii : sequence of float
        Aperture radii in px, each finite and > 0.
    bounds : tuple of 4 floats, optional
        :func:`centre_bounds` of ``cx, cy``, computed where they live on the host; it sets
        which pixels can be touched. Without it the kernel reads it from the arrays (four
        scalar reads, a device synchronisation on a GPU).

    Returns
    -------
    ApertureFluxes, whose fields are:

    flux : (N, R) float64
        ``sum(w D)`` over valid pixels, image unit x px (``w`` = overlap fraction).
    flux_err : (N, R) float64
        ``sqrt(sum(w^2 V))`` over valid pixels: the exact standard deviation of ``flux``
        for independent pixel noise. photutils and SEP report ``sqrt(sum(w V))``, an
        upper bound (see the module docstring).
    area : (N, R) float64
        ``sum(w)`` over valid pixels, px.
    truncated : (N, R) bool
        True when a pixel with ``w > 0`` is invalid, or the circle reaches beyond the
        stack (``cx - r < -0.5``, ``cx + r > K - 0.5``, or the same in y). The flux then
        covers only the valid part of the aperture; nothing is extrapolated. The caller
        must make K large enough (``K >= 2 ceil(r_max + 0.5) + 1`` for a stamp centred on
        the nearest pixel) so that only the image edge or bad pixels truncate.
    """
    xp = array_namespace(image, variance, valid, cx, cy)
    f64 = xp.float64
    if image.ndim != 3 or image.shape[1] != image.shape[2]:
        raise ValueError(f"image must be an (N, K, K) stack, got shape {image.shape}")
    for name, arr in (("variance", variance), ("valid", valid)):
        if arr.shape != image.shape:
            raise ValueError(f"{name} shape {arr.shape} differs from image shape {image.shape}")
    if valid.dtype != xp.bool:
        raise ValueError(f"valid must be a bool array, got dtype {valid.dtype}")
    n, size = image.shape[0], image.shape[2]
    if cx.shape != (n,) or cy.shape != (n,):
        raise ValueError(f"cx and cy must be ({n},) vectors, got shapes {cx.shape} and {cy.shape}")
    radii = [check_radius(r) for r in radii]
    if not radii:
        raise ValueError("radii must contain at least one aperture radius")

    cx = xp.astype(cx, f64)
    cy = xp.astype(cy, f64)
    bounds = centre_bounds(cx, cy) if bounds is None else bounds
    x_bounds, y_bounds = (bounds[:2], bounds[2:]) if bounds is not None else (None, None)
    # Only pixels the largest circle can touch are converted (the stack may be larger,
    # e.g. sized for a background annulus); smaller circles touch a subset of them.
    cols_all, rows_all = _touched(x_bounds, max(radii), size), _touched(y_bounds, max(radii), size)
    crop = (slice(None), slice(rows_all.start, rows_all.stop), slice(cols_all.start, cols_all.stop))
    data = xp.where(valid[crop], xp.astype(image[crop], f64), 0.0)
    var = xp.where(valid[crop], xp.astype(variance[crop], f64), 0.0)
    invalid = xp.logical_not(valid[crop])
    lo_edge, hi_edge = -0.5, size - 0.5

    valid_weight = xp.astype(valid[crop], f64)
    fluxes, errors, truncations, areas = [], [], [], []
    for radius in radii:
        # Only the pixels some circle can touch; all others have w = 0.
        cols, rows = _touched(x_bounds, radius, size), _touched(y_bounds, radius, size)
        window = (
            slice(None),
            slice(rows.start - rows_all.start, rows.stop - rows_all.start),
            slice(cols.start - cols_all.start, cols.stop - cols_all.start),
        )
        w = _overlap_window(xp, cx, cy, xp.asarray(radius, dtype=f64, device=device(cx)), cols, rows)
        fluxes.append(xp.sum(w * data[window], axis=(1, 2)))
        errors.append(xp.sqrt(xp.sum(w * w * var[window], axis=(1, 2))))
        areas.append(xp.sum(w * valid_weight[window], axis=(1, 2)))
        bad_touched = xp.any(xp.logical_and(w > 0, invalid[window]), axis=(1, 2))
        beyond = (
            (cx - radius < lo_edge) | (cx + radius > hi_edge) | (cy - radius < lo_edge) | (cy + radius > hi_edge)
        )
        truncations.append(bad_touched | beyond)
    return ApertureFluxes(xp.stack(fluxes, axis=1), xp.stack(errors, axis=1), xp.stack(truncations, axis=1), xp.stack(areas, axis=1))
