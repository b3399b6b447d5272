"""Batched measurement kernels, written once against the Python array API.

Every function takes stacks of cutouts shaped ``(N, K, K)`` (axis 1 is y, axis 2 is x)
and per-object vectors shaped ``(N,)``, finds the array namespace with
``array_api_compat.array_namespace`` and uses only what the standard offers, so the
same code runs on NumPy, CuPy and ``array_api_strict``.

Pixel convention (LSST, astropy ``origin=0``): the centre of cutout pixel ``[n, j, i]``
is at cutout coordinates ``(x=i, y=j)``; pixel ``[n, j, i]`` covers
``[i - 0.5, i + 0.5) x [j - 0.5, j + 0.5)``. Positions ``cx, cy`` are in those
coordinates, in pixels.

No kernel reads a value back from its arrays when the caller passes what only the data
could tell it (crop windows :func:`centre_bounds` and :func:`footprint_window`, the
annulus pixels :func:`annulus_candidates`): the host, which knows the positions, computes
those on its own copies, so a GPU never waits on a scalar read inside a kernel.
"""

from forcedphot.kernels.aperture import ApertureFluxes, aperture_fluxes, centre_bounds, circle_overlap_fractions
from forcedphot.kernels.local_background import LocalBackground, annulus_candidates, disc_membership, local_background
from forcedphot.kernels.pixel_flags import PixelFlags, footprint_window, pixel_flags
from forcedphot.kernels.psf_flux import PsfFluxResult, psf_flux
from forcedphot.kernels.psf_stamps import gaussian_stamps, lanczos_resample, lanczos_weights

__all__ = [
    "ApertureFluxes",
    "LocalBackground",
    "PixelFlags",
    "PsfFluxResult",
    "annulus_candidates",
    "aperture_fluxes",
    "centre_bounds",
    "circle_overlap_fractions",
    "disc_membership",
    "footprint_window",
    "gaussian_stamps",
    "lanczos_resample",
    "lanczos_weights",
    "local_background",
    "pixel_flags",
    "psf_flux",
]
