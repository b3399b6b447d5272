"""Local linear WCS at each object (LSST ``base_LocalWcs``).

``localWcs_CDMatrix_{1_1,1_2,2_1,2_2}`` is the Jacobian of pixel -> local gnomonic
(tangent-plane) sky coordinates about the object's own sky position, in radians per
pixel: ``[[dxi/dx, dxi/dy], [deta/dx, deta/dy]]`` with ``xi`` increasing with right
ascension (east) and ``eta`` with declination (north). Derivatives are central
differences over +-0.5 px through the full WCS (SIP included).
"""

from astropy.wcs import WCS
import numpy as np

_STEP_PX = 0.5


def _gnomonic(ra: np.ndarray, dec: np.ndarray, ra0: np.ndarray, dec0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Tangent-plane coordinates (radians) of (ra, dec) about (ra0, dec0), all radians."""
    cos_c = np.sin(dec0) * np.sin(dec) + np.cos(dec0) * np.cos(dec) * np.cos(ra - ra0)
    xi = np.cos(dec) * np.sin(ra - ra0) / cos_c
    eta = (np.cos(dec0) * np.sin(dec) - np.sin(dec0) * np.cos(dec) * np.cos(ra - ra0)) / cos_c
    return xi, eta


def local_cd_matrix(wcs: WCS, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N, 2, 2) local CD matrices (radians per pixel) at local pixel positions (x, y)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = x.size
    # the positions and their four +-0.5 px neighbours through the WCS in one call
    offsets = ((0.0, 0.0), (_STEP_PX, 0.0), (-_STEP_PX, 0.0), (0.0, _STEP_PX), (0.0, -_STEP_PX))
    ra, dec = np.deg2rad(wcs.all_pix2world(np.concatenate([x + dx for dx, _ in offsets]),
                                           np.concatenate([y + dy for _, dy in offsets]), 0))
    ra, dec = ra.reshape(len(offsets), n), dec.reshape(len(offsets), n)
    xi, eta = _gnomonic(ra[1:], dec[1:], ra[0], dec[0])  # the four neighbours at once: (4, N)
    cd = np.empty(x.shape + (2, 2))
    for axis in range(2):
        cd[..., 0, axis] = (xi[2 * axis] - xi[2 * axis + 1]) / (2 * _STEP_PX)
        cd[..., 1, axis] = (eta[2 * axis] - eta[2 * axis + 1]) / (2 * _STEP_PX)
    return cd
