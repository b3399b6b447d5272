"""Selection as df2RefCat: WCS inverse, half-open Box2D, invalid coordinates."""

from astropy.wcs import WCS
import numpy as np

from forcedphot.photometry.local_wcs import local_cd_matrix
from forcedphot.photometry.selection import select_on_image, sky_to_pixel

WIDTH, HEIGHT = 100, 80


def tan_wcs(sip: bool = False) -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN-SIP", "DEC--TAN-SIP"] if sip else ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [50.5, 40.5]
    scale = 0.2 / 3600
    wcs.wcs.cd = [[-scale, 0.0], [0.0, scale]]
    if sip:
        from astropy.wcs import Sip

        a = np.zeros((3, 3)); b = np.zeros((3, 3))
        a[2, 0] = 2e-6; b[0, 2] = -1.5e-6; a[1, 1] = 1e-6
        wcs.sip = Sip(a, b, None, None, wcs.wcs.crpix)
    return wcs


def test_box2d_is_half_open():
    wcs = tan_wcs()
    # the WCS round trip is good to ~1e-9 px, so probe the edges 1e-6 px either side
    e = 1e-6
    x = np.array([-0.5 + e, -0.5 - e, WIDTH - 0.5 + e, WIDTH - 0.5 - e, 10.0])
    y = np.array([10.0, 10.0, 10.0, 10.0, HEIGHT - 0.5 + e])
    ra, dec = wcs.all_pix2world(x, y, 0)
    sel = select_on_image(wcs, WIDTH, HEIGHT, ra, dec, np.ones(5, bool))
    assert sel.on_image.tolist() == [True, False, False, True, False]
    assert sel.count == 2


def test_sip_round_trip_and_invalid_rows():
    wcs = tan_wcs(sip=True)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, WIDTH, 50), rng.uniform(0, HEIGHT, 50)
    ra, dec = wcs.all_pix2world(x, y, 0)
    px, py = sky_to_pixel(wcs, ra, dec)
    np.testing.assert_allclose(px, x, atol=1e-6)
    np.testing.assert_allclose(py, y, atol=1e-6)
    valid = np.ones(50, bool)
    valid[3] = False
    ra[4] = np.nan
    sel = select_on_image(wcs, WIDTH, HEIGHT, ra, dec, valid)
    assert not sel.on_image[3] and not sel.on_image[4] and sel.on_image.sum() == 48


def test_far_side_of_the_sky_is_off_image():
    wcs = tan_wcs()
    px, py = sky_to_pixel(wcs, np.array([330.0]), np.array([-2.0]))
    assert np.isnan(px[0]) and np.isnan(py[0])


def test_local_cd_matrix_equals_linear_wcs_for_pure_tan():
    """At the reference pixel of a TAN WCS the local CD matrix is the WCS CD (radians)."""
    wcs = tan_wcs()
    cd = local_cd_matrix(wcs, np.array([49.5]), np.array([39.5]))[0]
    np.testing.assert_allclose(cd, np.deg2rad(wcs.wcs.cd), rtol=1e-6, atol=1e-15)
    # away from it the pixel scale of a gnomonic projection changes only slowly
    far = local_cd_matrix(wcs, np.array([0.0]), np.array([0.0]))[0]
    np.testing.assert_allclose(far, np.deg2rad(wcs.wcs.cd), rtol=1e-4, atol=1e-11)
