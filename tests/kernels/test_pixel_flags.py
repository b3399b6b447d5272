"""pixel_flags: LSST base_PixelFlags from mask cutouts.

Planted bits (footprint only, centre 3x3, all of it, outside, in padding, objects half
off the stack) with hand-worked answers, and random masks against an independent
per-object reimplementation of PixelFlags.cc's any/all bit accumulation.
"""

import math

import numpy as np
import pytest
from test_local_background import afw_disc_pixels

from forcedphot.kernels.pixel_flags import pixel_flags

PLANES = {"edge": 4, "nodata": 8, "interpolated": 2, "saturated": 1, "cr": 3, "bad": 0, "suspect": 7}
# Planes for which "<p>" is exactly "bit in the footprint" (edge also takes NO_DATA).
PLAIN = [p for p in PLANES if p != "edge"]


def reference_flags(mask, inside, cx, cy, radius, planes):
    """PixelFlags.cc, one object at a time: OR (any) / AND (all, starting from ~0) of the
    mask words over the footprint spans and the 3x3 box, both clipped to the image."""
    n_obj, k = mask.shape[0], mask.shape[1]
    out = {f"{p}{s}": np.zeros(n_obj, bool) for p in planes for s in ("", "Center", "CenterAll")}
    for n in range(n_obj):
        ix, iy = math.floor(cx[n] + 0.5), math.floor(cy[n] + 0.5)
        foot = afw_disc_pixels(cx[n], cy[n], radius[n], k) | {(ix, iy)}
        box = {(i, j) for i in range(ix - 1, ix + 2) for j in range(iy - 1, iy + 2)}
        any_bits, centre_any, centre_all = 0, 0, ~0
        for i, j in foot:
            if 0 <= i < k and 0 <= j < k and inside[n, j, i]:
                any_bits |= int(mask[n, j, i])
        for i, j in box:
            if 0 <= i < k and 0 <= j < k and inside[n, j, i]:
                centre_any |= int(mask[n, j, i])
                centre_all &= int(mask[n, j, i])
        for p, bit in planes.items():
            out[p][n] = bool(any_bits >> bit & 1)
            out[p + "Center"][n] = bool(centre_any >> bit & 1)
            out[p + "CenterAll"][n] = bool(centre_all >> bit & 1)
    return out


def run(xp, mask, inside, cx, cy, radius, planes=PLANES):
    """pixel_flags under namespace ``xp`` on NumPy inputs; NumPy outputs."""
    out = pixel_flags(*(xp.asarray(a) for a in (mask, inside, cx, cy, radius)), planes)
    return {name: np.asarray(v) for name, v in out.as_dict(list(planes)).items()}


K, H = 21, 10
CX, CY, R = 10.2, 9.9, 4.5  # nearest pixel (10, 10); footprint: distance <= 4.5


def single(xp, pixels, bit, inside=None, cx=CX, cy=CY, r=R):
    """Flags of one object whose mask has ``bit`` at the ``(i, j)`` pixels."""
    mask = np.zeros((1, K, K), np.int32)
    for i, j in pixels:
        mask[0, j, i] |= 1 << bit
    if inside is None:
        inside = np.ones((1, K, K), bool)
    return run(xp, mask, inside, np.array([cx]), np.array([cy]), np.array([r]))


BOX = [(i, j) for i in (H - 1, H, H + 1) for j in (H - 1, H, H + 1)]


@pytest.mark.parametrize("plane", PLAIN)
@pytest.mark.parametrize(
    "pixels,expected",
    [
        ([(H + 3, H - 2)], (True, False, False)),  # footprint only (distance 3.4)
        ([(H + 1, H - 1)], (True, True, False)),  # one pixel of the 3x3
        (BOX, (True, True, True)),  # the whole 3x3
        (BOX[:-1], (True, True, False)),  # all but one
        ([(H + 5, H), (H, H + 5), (H - 3, H - 4)], (False, False, False)),  # just outside (4.8 .. 5.1)
    ],
)
def test_planted_bits(xp, plane, pixels, expected):
    out = single(xp, pixels, PLANES[plane])
    got = tuple(bool(out[plane + s][0]) for s in ("", "Center", "CenterAll"))
    assert got == expected
    others = {name for name, v in out.items() if not name.startswith(plane) and v[0]}
    # Nothing else is set (CenterAll of other planes: the box has pixels without them);
    # NO_DATA does not set edge (LSST since November 2024).
    assert others == set()


@pytest.mark.parametrize("plane", PLAIN)
def test_bits_in_padding_are_ignored(xp, plane):
    inside = np.ones((1, K, K), bool)
    pixels = [(H + 3, H - 2), (H + 1, H + 1)]  # in the footprint, one in the box
    for i, j in pixels:
        inside[0, j, i] = False
    out = single(xp, pixels, PLANES[plane], inside=inside)
    assert not (out[plane][0] or out[plane + "Center"][0] or out[plane + "CenterAll"][0])


def test_object_half_off_the_stack(xp):
    """Object 0.3 px right of the image's left edge (image column 0 = stamp column H):
    its 3x3 box keeps 6 pixels on the image; CenterAll asks for those 6 only."""
    inside = np.zeros((1, K, K), bool)
    inside[0, :, H:] = True
    cx, cy = H + 0.3, H - 0.2  # nearest pixel (H, H)
    on_image_box = [(i, j) for i, j in BOX if i >= H]
    bit = PLANES["saturated"]
    out = single(xp, on_image_box, bit, inside=inside, cx=cx, cy=cy)
    assert out["saturated"][0] and out["saturatedCenter"][0] and out["saturatedCenterAll"][0]
    out = single(xp, on_image_box[1:], bit, inside=inside, cx=cx, cy=cy)
    assert out["saturatedCenter"][0] and not out["saturatedCenterAll"][0]
    out = single(xp, [(H - 1, H), (H - 3, H + 1)], bit, inside=inside, cx=cx, cy=cy)  # padding only
    assert not (out["saturated"][0] or out["saturatedCenter"][0] or out["saturatedCenterAll"][0])


def test_box_entirely_off_the_image(xp):
    """afw starts the all-bits word at ~0: with no box pixel on the image, every CenterAll
    flag is set and no Center flag."""
    inside = np.zeros((1, K, K), bool)
    inside[0, :, H + 2 :] = True  # centre 2 px left of the image edge
    out = single(xp, [(H + 2, H)], PLANES["cr"], inside=inside, cx=H + 0.1, cy=H)
    assert out["cr"][0]  # the footprint reaches onto the image
    for p in PLANES:
        assert out[p + "CenterAll"][0] and not out[p + "Center"][0]


def test_nodata_does_not_set_edge(xp):
    out = single(xp, [(H + 3, H + 1)], PLANES["nodata"])
    assert out["nodata"][0] and not out["edge"][0]
    assert not out["edgeCenter"][0] and not out["edgeCenterAll"][0]
    out = single(xp, [(H + 3, H + 1)], PLANES["edge"])
    assert out["edge"][0] and not out["nodata"][0]


def test_tiny_footprint_is_the_peak(xp):
    out = single(xp, [(H, H)], PLANES["bad"], r=0.1)
    assert out["bad"][0]
    out = single(xp, [(H + 1, H)], PLANES["bad"], r=0.1)
    assert not out["bad"][0] and out["badCenter"][0]


def test_random_masks_match_reference(xp, rng):
    n, k = 120, 25
    h = k // 2
    bits = rng.integers(0, 11, (n, k, k))
    mask = np.where(rng.random((n, k, k)) < 0.06, 1 << bits, 0).astype(np.int32)
    mask[rng.random((n, k, k)) < 0.01] |= 0b11111111  # some pixels carry many planes
    mask[:20, h - 1 : h + 2, h - 1 : h + 2] |= 1 << 3  # some full boxes
    inside = np.ones((n, k, k), bool)
    for o in range(n):  # objects near an image edge: padding on one side
        side, cut = rng.integers(6), rng.integers(h - 3, h + 3)
        if side == 0:
            inside[o, :, :cut] = False
        elif side == 1:
            inside[o, cut:, :] = False
        elif side == 2:
            inside[o, :cut, :cut] = False
    cx = h + rng.uniform(-0.5, 0.5, n)
    cy = h + rng.uniform(-0.5, 0.5, n)
    cx[:6] = [0.2, k - 1.3, 3.7, -1.2, h, k + 0.4]  # boxes cut by the stamp border / beyond it
    radius = rng.uniform(0.4, 9.0, n)  # up to past the stamp border
    got = run(xp, mask, inside, cx, cy, radius)
    ref = reference_flags(mask, inside, cx, cy, radius, PLANES)
    assert got.keys() == ref.keys()
    for name in ref:
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    assert 0 < sum(got["crCenterAll"]) < n  # the random case exercises both outcomes


def test_strict_equals_numpy(rng):
    import array_api_strict

    n, k = 40, 21
    mask = np.where(rng.random((n, k, k)) < 0.05, 1 << rng.integers(0, 9, (n, k, k)), 0).astype(np.int32)
    inside = rng.random((n, k, k)) < 0.97
    cx, cy = 10 + rng.uniform(-3, 3, n), 10 + rng.uniform(-3, 3, n)
    radius = rng.uniform(1, 6, n)
    a = run(np, mask, inside, cx, cy, radius)
    b = run(array_api_strict, mask, inside, cx, cy, radius)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_bad_arguments():
    mask = np.zeros((1, 5, 5), np.int32)
    inside = np.ones((1, 5, 5), bool)
    c = np.array([2.0])
    with pytest.raises(ValueError, match="'bad'"):
        pixel_flags(mask, inside, c, c, c, {"bad": 31})
    with pytest.raises(ValueError, match="integers"):
        pixel_flags(mask.astype(np.float32), inside, c, c, c, {"bad": 0})
    with pytest.raises(ValueError, match=r"\(N, K, K\)"):
        pixel_flags(mask, inside[:, :4, :], c, c, c, {"bad": 0})


def test_footprint_rim_follows_afw_spans(xp):
    """Radius 4 about a pixel centre: (4, 0) is in the footprint, (0, 4) is not (a row
    tangent to the circle holds no pixel in afw's PixelRegion), (3, 3) is not (18 > 16), (3, 2) is."""
    cases = {(H + 4, H): True, (H - 4, H): True, (H, H + 4): False, (H, H - 4): False, (H + 3, H + 3): False,
             (H + 3, H + 2): True}
    for (i, j), inside in cases.items():
        out = single(xp, [(i, j)], PLANES["suspect"], cx=float(H), cy=float(H), r=4.0)
        assert bool(out["suspect"][0]) == inside, (i - H, j - H)


def test_a_plane_the_mask_does_not_define_is_never_set(xp):
    """``None`` for a plane the exposure lacks: its column is there, all three flags False,
    even where every bit of the mask is set."""
    mask = np.full((2, K, K), 2**31 - 1, dtype=np.int32)
    inside = np.ones((2, K, K), bool)
    c = np.full(2, float(H))
    out = run(xp, mask, inside, c, c, np.full(2, R), {"bad": PLANES["bad"], "nodata": None})
    assert out["bad"].all() and out["badCenterAll"].all()
    assert not (out["nodata"].any() or out["nodataCenter"].any() or out["nodataCenterAll"].any())
