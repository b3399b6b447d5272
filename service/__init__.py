"""forcedphot: batched forced photometry of DiaObjects on LSST-style exposures.

The data path, one module per stage::

    exposure.py (read FITS) -> selection.py (WCS, Box2D) -> cutouts.py (N, K, K stacks)
    -> forcedphot.kernels (PSF flux, apertures, background, flags) -> catalog.py (table, parquet)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("forcedphot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
