"""Select the DiaObjects that fall on a detector, as LSST's ``df2RefCat`` does.

Pixel positions come from the exposure's WCS inverse (astropy ``all_world2pix`` with
``origin=0``, SIP included) in LOCAL array coordinates: the centre of array pixel
``[j, i]`` is ``(x=i, y=j)``; PARENT coordinates add the image origin ``(x0, y0)``.
An object is on the detector when its position lies in the half-open ``Box2D`` of the
image, ``[-0.5, width - 0.5) x [-0.5, height - 0.5)`` in local coordinates.
"""

from dataclasses import dataclass
import warnings

from astropy.wcs import WCS, WCSCOMPARE_ANCILLARY
import numpy as np


@dataclass(frozen=True)
class Selection:
    """Where each object falls on one exposure; arrays are (N,) in the table's row order."""

    x: np.ndarray  # local x, px (NaN where the WCS has no inverse for the position)
    y: np.ndarray  # local y, px
    on_image: np.ndarray  # bool: inside Box2D and coordinates valid

    @property
    def count(self) -> int:
        """Number of objects on the image."""
        return int(np.count_nonzero(self.on_image))


def sky_to_pixel(wcs: WCS, ra_deg: np.ndarray, dec_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Local 0-based pixel coordinates of sky positions; NaN where undefined.

    Positions more than 90 degrees from the projection's reference point have no
    gnomonic (TAN) image and come back NaN, as do non-finite inputs.
    """
    ra_deg = np.asarray(ra_deg, dtype=np.float64)
    dec_deg = np.asarray(dec_deg, dtype=np.float64)
    x = np.full(ra_deg.shape, np.nan)
    y = np.full(ra_deg.shape, np.nan)
    ok = np.isfinite(ra_deg) & np.isfinite(dec_deg) & _near_reference(wcs, ra_deg, dec_deg)
    if np.any(ok):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SIP inverse convergence notes for far-off points
            px, py = wcs.all_world2pix(ra_deg[ok], dec_deg[ok], 0, quiet=True)
        x[ok], y[ok] = px, py
    return x, y


def _near_reference(wcs: WCS, ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """True within 80 degrees of the WCS reference point, where the TAN inverse is sane."""
    ra0, dec0 = np.deg2rad(wcs.wcs.crval[:2])
    ra, dec = np.deg2rad(ra_deg), np.deg2rad(dec_deg)
    cos_distance = np.sin(dec) * np.sin(dec0) + np.cos(dec) * np.cos(dec0) * np.cos(ra - ra0)
    return cos_distance > np.cos(np.deg2rad(80.0))


def same_wcs(a: WCS, b: WCS) -> bool:
    """True when two WCSs map every pixel to the same sky position: the same object, or
    identical parameters and SIP polynomials and no other distortion (a difference image
    made on its science image's grid, as LSST's are). False when unsure."""
    if a is b:
        return True
    if a.cpdis1 or a.cpdis2 or b.cpdis1 or b.cpdis2 or a.det2im1 or a.det2im2 or b.det2im1 or b.det2im2:
        return False
    if not a.wcs.compare(b.wcs, cmp=WCSCOMPARE_ANCILLARY):
        return False
    if a.sip is None or b.sip is None:
        return a.sip is None and b.sip is None
    return all(np.array_equal(getattr(a.sip, k), getattr(b.sip, k)) for k in ("a", "b", "ap", "bp", "crpix"))


def select_on_image(wcs: WCS, width: int, height: int, ra_deg: np.ndarray, dec_deg: np.ndarray, coord_valid: np.ndarray) -> Selection:
    """Positions of all objects and which of them lie on a ``width`` x ``height`` image."""
    x, y = sky_to_pixel(wcs, ra_deg, dec_deg)
    with np.errstate(invalid="ignore"):
        inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return Selection(x=x, y=y, on_image=inside & np.asarray(coord_valid, dtype=bool))
