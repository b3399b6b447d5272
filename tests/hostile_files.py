"""Small FITS files that declare far more work than they hold (the hostile-client probe's)."""

from pathlib import Path

from astropy.io import fits
import numpy as np


def compression_bomb(path: Path, side: int = 20000) -> Path:
    """A tile-compressed image whose header declares ``side`` x ``side`` pixels in one
    tile (decompressing it would take side**2 * 4 bytes); the file itself is small."""
    small = fits.CompImageHDU(np.zeros((64, 64), np.float32), compression_type="GZIP_1", tile_shape=(64, 64), name="IMAGE")
    fits.HDUList([fits.PrimaryHDU(), small]).writeto(path, overwrite=True)
    with fits.open(path, mode="update", disable_image_compression=True) as hdul:
        header = hdul[1].header
        for key in ("ZNAXIS1", "ZNAXIS2", "ZTILE1", "ZTILE2"):
            header[key] = side
    return path


def many_hdus(path: Path, count: int = 20000) -> Path:
    """A valid FITS file of ``count`` empty image extensions."""
    fits.HDUList([fits.PrimaryHDU()] + [fits.ImageHDU() for _ in range(count)]).writeto(path, overwrite=True)
    return path
