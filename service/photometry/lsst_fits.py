"""Write exposures in the LSST afw FITS layout (for tests, demos and benchmarks).

Layout written by :func:`write_lsst_exposure` (what ``lsst.afw.image.ExposureF.writeFits``
produces, reduced to the parts this project reads):

- HDU0: empty primary holding the exposure metadata. ``EXPINFO_V`` plus whatever the
  caller passes in ``metadata`` (see :func:`afw_visit_metadata` for the VisitInfo keys afw
  writes and the Butler provenance keys Rubin adds) and, with a calibration, the archive
  pointers ``AR_HDU``, ``PHOTOCALIB_ID`` and ``ARCHIVE_ID_PHOTOCALIB``.
- HDU1 ``IMAGE`` float32, HDU2 ``MASK`` int32, HDU3 ``VARIANCE`` float32. Each carries the
  FITS WCS of the *local* array (pixel (0, 0) is the first array element, astropy
  ``origin=0``), the image origin as the afw ``A`` alternate WCS (``CRVAL1A/2A`` = X0/Y0,
  ``CRPIX1A/2A`` = 1, ``CTYPE1A/2A`` = ``LINEAR``, ``CUNIT1A/2A`` = ``PIXEL``) and the IRAF
  ``LTV1/2`` = -X0/-Y0; parent pixel = local pixel + (X0, Y0). The MASK header holds one
  ``MP_<PLANE>`` = bit-number key per mask plane.
- With ``calibration_mean``: ``ARCHIVE_INDEX`` (columns id, cat_archive, cat_persistable,
  row0, nrows, name, module as in afw's ArchiveIndexSchema, '.' written as '_') and one
  ``PhotoCalib`` row as afw writes it (flags bit 0 = isConstant, calibrationMean,
  calibrationErr, field, version=1); with ``calibration_field`` also the
  ``ChebyshevBoundedField`` row that ``field`` points at (order_x, bbox_min/max_x/y,
  coefficients ordered y then x).

Compression (``compress=True``): the three planes become tile-compressed ``CompImageHDU``
with tiles of 16 full rows, so a band of rows decompresses only the tiles it touches.
IMAGE and VARIANCE use ``GZIP_2`` (byte-shuffled gzip) with quantisation disabled, i.e.
lossless float32 (RICE on floats would require lossy quantisation); MASK uses ``RICE_1``,
lossless on integers.
"""

from __future__ import annotations

from collections.abc import Mapping
import os

from astropy.io import fits
from astropy.time import Time
from astropy.wcs import WCS
import numpy as np

from forcedphot.photometry.photocalib import ChebyshevField

__all__ = ["AFW_DEFAULT_MASK_PLANES", "afw_visit_metadata", "write_lsst_exposure"]

#: afw's default mask plane bit numbers (lsst.afw.image.Mask), used when a MASK header
#: carries no ``MP_*`` keys.
AFW_DEFAULT_MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
    "VIGNETTED": 9,
    "STREAK": 10,
}

#: ExposureInfo FITS serialisation version written to ``EXPINFO_V`` (>0: PhotoCalib in the
#: archive rather than FLUXMAG0 in the header).
_EXPINFO_VERSION = 4
_COMPRESSION_TILE_ROWS = 16


def afw_visit_metadata(
    *,
    visit: int,
    detector: int,
    band: str,
    midpoint: Time,
    exposure_time: float,
    physical_filter: str | None = None,
    instrument: str = "LSSTCam",
) -> dict[str, object]:
    """Primary-header metadata in the form afw and the Rubin Butler write.

    afw ``VisitInfo`` keys (lsst/afw ``setVisitInfoMetadata``): ``EXPID`` (exposure id;
    equal to the visit id for one-snap visits), ``IDNUM`` (visit id), ``EXPTIME`` and
    ``DARKTIME`` [s], ``DATE-AVG`` (exposure midpoint, ISO-8601 *in TAI*, no time-zone
    letter) with ``TIMESYS = 'TAI'``, ``INSTRUMENT``; the afw ``FILTER`` key (physical
    filter). Butler provenance keys: ``LSST BUTLER DATAID VISIT / DETECTOR / BAND /
    PHYSICAL_FILTER / INSTRUMENT`` (written as HIERARCH cards).

    Parameters
    ----------
    midpoint : astropy.time.Time
        Exposure midpoint in any time scale; written in TAI.
    exposure_time : float
        Shutter-open time in seconds.
    """
    physical = physical_filter if physical_filter is not None else band
    return {
        "EXPID": int(visit),
        "IDNUM": int(visit),
        "EXPTIME": float(exposure_time),
        "DARKTIME": float(exposure_time),
        "DATE-AVG": midpoint.tai.isot,
        "TIMESYS": "TAI",
        "INSTRUMENT": instrument,
        "FILTER": physical,
        "LSST BUTLER DATAID VISIT": int(visit),
        "LSST BUTLER DATAID DETECTOR": int(detector),
        "LSST BUTLER DATAID BAND": band,
        "LSST BUTLER DATAID PHYSICAL_FILTER": physical,
        "LSST BUTLER DATAID INSTRUMENT": instrument,
    }


def _card_key(key: str) -> str:
    """FITS keyword for ``key``: HIERARCH for long or spaced keys (avoids astropy warnings)."""
    if len(key) > 8 or " " in key:
        return key if key.upper().startswith("HIERARCH ") else f"HIERARCH {key}"
    return key


def _plane_header(wcs: WCS, x0: int, y0: int) -> fits.Header:
    """Header shared by IMAGE, MASK and VARIANCE: local-pixel WCS plus the afw origin keys."""
    header = wcs.to_header(relax=True)
    header["CTYPE1A"] = ("LINEAR", "Type of projection")
    header["CTYPE2A"] = ("LINEAR", "Type of projection")
    header["CRPIX1A"] = (1.0, "Column Pixel Coordinate of Reference")
    header["CRPIX2A"] = (1.0, "Row Pixel Coordinate of Reference")
    header["CRVAL1A"] = (float(x0), "Column pixel of Reference Pixel")
    header["CRVAL2A"] = (float(y0), "Row pixel of Reference Pixel")
    header["CUNIT1A"] = ("PIXEL", "Column unit")
    header["CUNIT2A"] = ("PIXEL", "Row unit")
    header["LTV1"] = (-int(x0), "IRAF: physical = local - LTV")
    header["LTV2"] = (-int(y0), "IRAF: physical = local - LTV")
    header["INHERIT"] = (True, "inherit the primary header")
    return header


def _plane_hdu(data: np.ndarray, header: fits.Header, name: str, compress: bool) -> fits.ImageHDU:
    """One image-like HDU, tile-compressed (lossless) when ``compress``."""
    if not compress:
        return fits.ImageHDU(data=data, header=header, name=name)
    tile_shape = (min(_COMPRESSION_TILE_ROWS, data.shape[0]), data.shape[1])
    if np.issubdtype(data.dtype, np.floating):
        return fits.CompImageHDU(data=data, header=header, name=name, compression_type="GZIP_2",
                                 quantize_level=0.0, tile_shape=tile_shape)
    return fits.CompImageHDU(data=data, header=header, name=name, compression_type="RICE_1",
                             tile_shape=tile_shape)


def _archive_table(name: str, catalog: int, columns: list[fits.Column]) -> fits.BinTableHDU:
    """One ``ARCHIVE_DATA`` catalog of class ``name``."""
    table = fits.BinTableHDU.from_columns(columns)
    table.header["EXTNAME"] = name  # astropy upper-cases ``name=``; afw does not
    table.header["EXTTYPE"] = "ARCHIVE_DATA"
    table.header["AR_CATN"] = (catalog, "catalog number within the archive")
    table.header["AR_NAME"] = name
    return table


def _archive_hdus(calibration_mean: float, calibration_err: float, field: ChebyshevField | None) -> list[fits.BinTableHDU]:
    """afw archive with a PhotoCalib (archive id 1): constant, or varying as ``field`` (id 2)."""
    entries = [("PhotoCalib", "lsst.afw.image")] + ([("ChebyshevBoundedField", "lsst.afw.math")] if field is not None else [])
    index = fits.BinTableHDU.from_columns(
        [
            fits.Column("id", "J", array=np.arange(1, len(entries) + 1)),
            fits.Column("cat_archive", "J", array=np.arange(1, len(entries) + 1)),
            fits.Column("cat_persistable", "J", array=np.zeros(len(entries))),
            fits.Column("row0", "J", array=np.zeros(len(entries))),
            fits.Column("nrows", "J", array=np.ones(len(entries))),
            fits.Column("name", "64A", array=[name for name, _ in entries]),
            fits.Column("module", "64A", array=[module for _, module in entries]),
        ],
        name="ARCHIVE_INDEX",
    )
    index.header["EXTTYPE"] = "ARCHIVE_INDEX"
    index.header["AR_NCAT"] = (len(entries) + 1, "catalogs in the archive, with the index")
    hdus = [index, _archive_table("PhotoCalib", 1, [
        fits.Column("flags", "1X", array=np.array([[field is None]])),  # bit 0: isConstant
        fits.Column("calibrationMean", "D", array=[calibration_mean]),
        fits.Column("calibrationErr", "D", array=[calibration_err]),
        fits.Column("field", "J", array=[2 if field is not None else 0]),
        fits.Column("version", "J", array=[1]),
    ])]
    if field is not None:
        coefficients = np.asarray(field.coefficients, np.float64)
        hdus.append(_archive_table("ChebyshevBoundedField", 2, [
            fits.Column("order_x", "J", array=[coefficients.shape[1] - 1]),
            fits.Column("bbox_min_x", "J", array=[field.x_min]),
            fits.Column("bbox_min_y", "J", array=[field.y_min]),
            fits.Column("bbox_max_x", "J", array=[field.x_max]),
            fits.Column("bbox_max_y", "J", array=[field.y_max]),
            fits.Column("coefficients", f"{coefficients.size}D", array=coefficients.reshape(1, -1)),
        ]))
    return hdus


def write_lsst_exposure(
    path: str | os.PathLike,
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    wcs: WCS,
    *,
    mask_planes: dict[str, int] | None = None,
    x0: int = 0,
    y0: int = 0,
    calibration_mean: float | None = None,
    calibration_err: float = 0.0,
    calibration_field: ChebyshevField | None = None,
    metadata: Mapping[str, object] | None = None,
    bunit: str | None = None,
    compress: bool = False,
) -> None:
    """Write an exposure in the LSST afw FITS layout (see the module docstring).

    Parameters
    ----------
    path : str or path-like
        Output file; overwritten if it exists.
    image, variance, mask : 2-D arrays of one shape (ny, nx)
        Written as float32, float32 and int32. Units: image units (``bunit``) and their
        square for the variance; the mask holds bit fields.
    wcs : astropy.wcs.WCS
        Celestial WCS of the *local* array (0-based pixel (0, 0) = ``image[0, 0]``), TAN or
        TAN-SIP; written with ``relax=True`` so SIP terms are kept.
    mask_planes : dict, optional
        Plane name -> bit number, written as ``MP_<NAME>`` keys (afw defaults if None).
    x0, y0 : int
        Parent-image origin: parent pixel = local pixel + (x0, y0).
    calibration_mean, calibration_err : float
        nJy per image unit and its 1-sigma error; when ``calibration_mean`` is given an afw
        archive with a ``PhotoCalib`` table is appended.
    calibration_field : ChebyshevField, optional
        A calibration that varies over the detector (parent pixels); ``calibration_mean``
        is then written as its mean, as afw does.
    metadata : mapping, optional
        Primary-header keys written verbatim (long keys as HIERARCH cards), e.g. from
        :func:`afw_visit_metadata`.
    bunit : str, optional
        ``BUNIT`` of the IMAGE HDU (``'nJy'`` for images that are already calibrated).
    compress : bool
        Write the planes as lossless tile-compressed HDUs (16-row tiles).
    """
    image = np.asarray(image, dtype=np.float32)
    variance = np.asarray(variance, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.int32)
    if image.ndim != 2 or variance.shape != image.shape or mask.shape != image.shape:
        raise ValueError(
            f"image, variance and mask must be 2-D arrays of one shape; got "
            f"{image.shape}, {variance.shape}, {mask.shape}"
        )
    if not wcs.has_celestial:
        raise ValueError("wcs has no celestial axes")

    primary = fits.PrimaryHDU()
    primary.header[_card_key("EXPINFO_V")] = (_EXPINFO_VERSION, "ExposureInfo FITS version")
    for key, value in (metadata or {}).items():
        primary.header[_card_key(key)] = value

    plane_header = _plane_header(wcs, x0, y0)
    image_header = plane_header.copy()
    image_header["EXTTYPE"] = "IMAGE"
    if bunit is not None:
        image_header["BUNIT"] = bunit
    mask_header = plane_header.copy()
    mask_header["EXTTYPE"] = "MASK"
    planes = AFW_DEFAULT_MASK_PLANES if mask_planes is None else mask_planes
    for name, bit in planes.items():
        mask_header[_card_key(f"MP_{name.upper()}")] = int(bit)
    variance_header = plane_header.copy()
    variance_header["EXTTYPE"] = "VARIANCE"

    hdus: list[fits.hdu.base.ExtensionHDU] = [
        _plane_hdu(image, image_header, "IMAGE", compress),
        _plane_hdu(mask, mask_header, "MASK", compress),
        _plane_hdu(variance, variance_header, "VARIANCE", compress),
    ]
    if calibration_mean is not None:
        primary.header["AR_HDU"] = (5, "HDU (1-indexed) containing the archive index")
        primary.header[_card_key("PHOTOCALIB_ID")] = (1, "archive ID for the PhotoCalib")
        primary.header[_card_key("ARCHIVE_ID_PHOTOCALIB")] = (1, "archive ID for the PhotoCalib")
        hdus += _archive_hdus(float(calibration_mean), float(calibration_err), calibration_field)
    fits.HDUList([primary, *hdus]).writeto(path, overwrite=True)
