"""Open an exposure (image, variance, mask, WCS, calibration, visit info) from FITS.

Two layouts are understood:

(a) LSST afw layout (see :mod:`forcedphot.photometry.lsst_fits`): extensions ``IMAGE``, ``MASK``,
    ``VARIANCE`` (plain or tile-compressed), visit metadata in the primary header, image
    origin in ``CRVAL1A/2A`` (``CTYPE1A = 'LINEAR'``) or ``LTV1/2``, an optional
    ``PhotoCalib`` archive table. A file whose IMAGE header carries afw's
    ``EXTTYPE = 'IMAGE'`` must have its MASK and VARIANCE too (else it is reported as
    truncated or incomplete).
(b) Plain FITS: the image is the primary HDU if it has data, otherwise the first image
    extension not named like an auxiliary plane; its header holds the WCS. Optional planes,
    found by ``EXTNAME``: variance ``VARIANCE``/``VAR``; inverse-variance weight
    ``WEIGHT``/``WHT``/``WGT``/``IVAR``/``INVVAR`` (variance = 1/weight; weight <= 0 or
    non-finite gives an infinite variance, i.e. a pixel with no information); mask
    ``MASK``/``MSK``/``BPM``/``DQ`` (integer bits, ``MP_*`` keys or the afw defaults).
    ``WGT``/``MSK`` are the DES names. Without a variance or weight plane a constant
    variance is estimated (see :func:`_estimate_variance`) and ``variance_estimated`` set.

Pixel convention: ``Exposure.wcs`` maps *local* 0-based array coordinates (astropy
``origin=0``; the centre of ``image[j, i]`` is x=i, y=j) to ICRS degrees; parent (LSST)
coordinates are local + (x0, y0). With TAN-SIP use the ``all_*``/``*_to_world``/
``world_to_*`` methods (they apply SIP), not ``wcs_*``.

Calibration (nJy per image unit), first found wins: the archive's ``PhotoCalib``
(calibrationMean, calibrationErr, constant or a ChebyshevBoundedField over the detector,
see :mod:`forcedphot.photometry.photocalib`) > ``BUNIT = 'nJy'`` (1.0) > ``FLUXMAG0`` (> 0;
3630.78e9 / FLUXMAG0, error 3630.78e9 * FLUXMAG0ERR / FLUXMAG0**2 as afw) > a zero-point
keyword ``MAGZERO``, ``MAGZPT``, ``ZEROPT``, ``ZP``, ``MAGZP``, ``PHOTZP`` (10**((31.4 - ZP)/2.5),
error 0) > none (NaN, NaN).

Visit information (primary header merged with the image header, image keys winning):
visit from ``LSST BUTLER DATAID VISIT``, ``IDNUM``, ``VISIT``, ``EXPID``, ``EXPNUM``;
detector from ``LSST BUTLER DATAID DETECTOR``, ``DETECTOR``, ``CCDNUM`` (integers only;
``DETNAME`` such as 'R22_S11' is not a detector number); band from
``LSST BUTLER DATAID BAND`` or ``BAND`` as written, else derived from a physical filter
name (``LSST BUTLER DATAID PHYSICAL_FILTER``, ``FILTER``) as its first one-letter token,
splitting at blanks, '_' and '-' ('r_57' -> 'r', 'HSC-R' -> 'r',
'r DECam SDSS c0002 6415.0 1480.0' -> 'r'; 'VR DECam c0007' -> None). Exposure midpoint
as TAI MJD from, in order: ``DATE-AVG`` (ISO-8601 in ``TIMESYS``, FITS default UTC; afw
writes TAI; a trailing 'Z' means UTC), ``TIME-MID`` (old afw key, always UTC),
``MJD-AVG`` (in TIMESYS), ``MJD-OBS`` + EXPTIME/2, ``DATE-OBS`` + EXPTIME/2 (both need
EXPTIME, else they are skipped). Unknown TIMESYS values skip the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
import math
import os
import re
from typing import NamedTuple
import warnings
import weakref

from astropy.io import fits
from astropy.time import Time, TimeDelta
from astropy.wcs import WCS, FITSFixedWarning
import numpy as np

from forcedphot.photometry.afw_archive import Archive, ArchiveError
from forcedphot.photometry.backend import Backend
from forcedphot.photometry.cutouts import DeviceCopies, ResidentPlanes
from forcedphot.photometry.fits_preflight import DeclaredTooMuch, not_fits_reason, preflight
from forcedphot.photometry.lsst_fits import AFW_DEFAULT_MASK_PLANES
from forcedphot.photometry.partial_copy import FetchError, PartialCopy, row_ranges
from forcedphot.photometry.photocalib import PhotoCalib, read_photocalib

__all__ = ["DEFAULT_LIMITS", "REFERENCE_FLUX_NJY", "Exposure", "ExposureChanged", "ExposureError", "ExposureLimits", "njy_per_count", "open_exposure"]

#: AB zero-magnitude flux density in nJy (afw ``utils::referenceFlux``): 10**(31.4/2.5).
AB_MAG_OF_ONE_NJY = 31.4  # the AB magnitude of 1 nJy
REFERENCE_FLUX_NJY = 10.0 ** (AB_MAG_OF_ONE_NJY / 2.5)


def njy_per_count(zero_point_mag: float) -> float:
    """Calibration (nJy per count) of an AB zero point (magnitude of one count)."""
    return REFERENCE_FLUX_NJY * 10.0 ** (-zero_point_mag / 2.5)


@dataclass(frozen=True)
class ExposureLimits:
    """What a file may ask of the reader, checked from its headers before any pixel is read.

    A small file can declare a huge amount of work: thousands of empty HDUs, or one
    compression tile of 20000 x 20000 pixels that must be decompressed whole.

    Attributes
    ----------
    max_hdus : int
        HDUs in the file (LSST calexps have 10-40, archive tables included).
    max_pixels : int
        Pixels of the image, variance or mask plane (an LSST detector: 16.8 million).
    max_tile_pixels : int
        Pixels of one compression tile (decompressed at once; fpack and afw write one
        row per tile).
    """

    max_hdus: int = 256
    max_pixels: int = 2**28
    max_tile_pixels: int = 2**25


DEFAULT_LIMITS = ExposureLimits()

_VARIANCE_NAMES = ("VARIANCE", "VAR")
_WEIGHT_NAMES = ("WEIGHT", "WHT", "WGT", "IVAR", "INVVAR")
_MASK_NAMES = ("MASK", "MSK", "BPM", "DQ")
_ZERO_POINT_KEYS = ("MAGZERO", "MAGZPT", "ZEROPT", "ZP", "MAGZP", "PHOTZP")
_VISIT_KEYS = ("LSST BUTLER DATAID VISIT", "IDNUM", "VISIT", "EXPID", "EXPNUM")
_DETECTOR_KEYS = ("LSST BUTLER DATAID DETECTOR", "DETECTOR", "CCDNUM")
_BAND_KEYS = ("LSST BUTLER DATAID BAND", "BAND")
_PHYSICAL_FILTER_KEYS = ("LSST BUTLER DATAID PHYSICAL_FILTER", "FILTER")
_TIME_SCALES = {"TAI": "tai", "UTC": "utc", "TT": "tt", "TDB": "tdb", "TCG": "tcg",
                "TCB": "tcb", "UT1": "ut1"}
_STRUCTURAL_KEY = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|XTENSION|PCOUNT|GCOUNT|EXTNAME|EXTVER|INHERIT|"
    r"BSCALE|BZERO|BLANK|CHECKSUM|DATASUM)$"
)
#: Rows sampled (evenly spaced) when the variance has to be estimated from the image.
_VARIANCE_SAMPLE_ROWS = 64
#: 1 / Phi^-1(3/4): converts a median absolute deviation into a Gaussian sigma.
_MAD_TO_SIGMA = 1.482602218505602
_FITS_BLOCK = 2880
INT64_MAX = 2**63 - 1
INT16_MAX = 2**15 - 1
MJD_RANGE = (0, 100_000)  # 1858-11-17 to 2132-09-01: any exposure's time
MAX_EXPTIME_S = 1e6
MAX_ZERO_POINT_MAG = 100.0
MAX_MASK_BIT = 30
MAX_ORIGIN = 2**31 - 1  # an image origin (XY0) in pixels

_ImageHDU = fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU


class ExposureError(ValueError):
    """An exposure file cannot be used; the message names the file and the problem."""


class ExposureChanged(ExposureError):
    """The file changed (rewritten, replaced, truncated) while it was open: a retry may work."""


@dataclass
class Exposure:
    """An open exposure; pixel planes are read on demand by :meth:`read_rows`.

    Attributes
    ----------
    path : str
        The FITS file.
    name : str
        How errors refer to it (the path, or the caller's reference).
    width, height : int
        Array shape along x (columns) and y (rows).
    x0, y0 : int
        Parent origin (LSST XY0): parent pixel = local pixel + (x0, y0).
    wcs : astropy.wcs.WCS
        Local 0-based pixel <-> ICRS sky (degrees).
    mask_planes : dict[str, int]
        Mask plane name -> bit number (``MP_*`` keys, afw defaults when absent).
    calibration_mean, calibration_err : float
        nJy per image unit and its 1-sigma error (NaN when no calibration was found).
    calibration_source : str
        "PhotoCalib", "BUNIT", "FLUXMAG0", "keyword:<KEY>" or "none".
    photocalib : PhotoCalib
        The calibration with its spatial variation (see :meth:`local_calibration`).
    visit, detector, band, midpoint_mjd_tai
        Visit metadata, None where absent; midpoint as MJD in the TAI scale [d].
    variance_estimated : bool
        True when the file has no variance/weight plane and a constant was estimated.
    sky_subtracted : bool
        True for an LSST afw-layout file (an archive, or ``EXTTYPE = 'IMAGE'``): the
        pipelines subtracted its background. False for plain FITS, whose sky may still be in
        the pixels (see ``MeasurementConfig.subtract_background``).
    header : astropy.io.fits.Header
        Primary metadata merged with the image header (image keys win), without
        structural keys.
    archive : Archive or None
        afw's archive of persisted objects (PSF, PhotoCalib, ...), read on demand while the
        file is open.
    """

    path: str
    name: str
    width: int
    height: int
    x0: int
    y0: int
    wcs: WCS
    mask_planes: dict[str, int]
    calibration_source: str
    visit: int | None
    detector: int | None
    band: str | None
    midpoint_mjd_tai: float | None
    variance_estimated: bool
    sky_subtracted: bool
    photocalib: PhotoCalib
    header: fits.Header = field(repr=False)
    archive: Archive | None = field(repr=False)
    _hdul: fits.HDUList | None = field(repr=False, compare=False)  # None: opened from a stored summary
    _image_hdu: _ImageHDU | PlaneFormat = field(repr=False, compare=False)  # a PlaneFormat when opened from a summary
    _variance_hdu: _ImageHDU | PlaneFormat | None = field(repr=False, compare=False)
    _variance_is_weight: bool = field(repr=False, compare=False)
    _mask_hdu: _ImageHDU | PlaneFormat | None = field(repr=False, compare=False)
    _constant_variance: float = field(repr=False, compare=False)
    _file_stamp: tuple[int, int, int] = field(repr=False, compare=False)
    _maps: PlaneMaps | None = field(repr=False, compare=False)  # None: pixels read from the file, not mapped
    _partial: PartialCopy | None = field(default=None, repr=False, compare=False)
    _resident: DeviceCopies = field(default_factory=DeviceCopies, repr=False, compare=False)

    def read_rows(self, y_start: int, y_stop: int, needed: Sequence[tuple[int, int]] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read local rows ``[y_start, y_stop)`` of the image, variance and mask.

        Returns the image (image units), variance (image units squared), each of float32
        values, and the int32 mask bits, each shaped ``(y_stop - y_start, width)``. Only
        those rows are read. Plain unscaled HDUs come back in the file's byte order: as
        read-only memory-mapped views when the exposure was opened with ``memory_map``
        (nothing is copied until a caller gathers from them, so sparse cutouts touch only
        their pages), else read from the file (a missing variance or mask is a broadcast
        constant); tile-compressed HDUs decompress only the overlapping tiles (astropy
        ``.section``) into native arrays. Callers must not write to the result. NaN image
        pixels are returned as NaN. The caller clips the range to
        ``0 <= y_start <= y_stop <= height``. ``needed``: the row ranges within it that the
        caller will look at (default: all); a partial copy of a remote file fetches only
        those, and its other rows may read as zeros.

        Raises :class:`ExposureChanged` when the file was replaced or rewritten since it
        was opened, :class:`ExposureError` when it cannot be read.
        """
        if not 0 <= y_start <= y_stop <= self.height:
            raise ExposureError(
                f"{self.name}: row range [{y_start}, {y_stop}) is outside [0, {self.height}]"
            )
        self.check_unchanged()
        if not self.fully_local:
            _fetch_rows(self._partial, self.name, (self._image_hdu, self._variance_hdu, self._mask_hdu), needed or [(y_start, y_stop)])
        mapped = self._maps
        try:
            image = _read_band(self._image_hdu, y_start, y_stop, np.float32, mapped, needed)
            if self._variance_hdu is None:
                variance = np.broadcast_to(np.float32(self._constant_variance), image.shape)
            elif self._variance_is_weight:
                variance = _weight_to_variance(_read_band(self._variance_hdu, y_start, y_stop, np.float64, mapped, needed))
            else:
                variance = _read_band(self._variance_hdu, y_start, y_stop, np.float32, mapped, needed)
            if self._mask_hdu is None:
                mask = np.broadcast_to(np.int32(0), image.shape)
            else:
                mask = _read_mask_band(self._mask_hdu, y_start, y_stop, mapped, needed)
        except (OSError, ValueError, TypeError, IndexError, EOFError) as exc:
            self.check_unchanged()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # an OSError's text names the file
            raise ExposureError(f"{self.name}: cannot read rows [{y_start}, {y_stop}) (truncated or damaged file?): {reason}") from exc
        self.check_unchanged()  # rewritten while these rows were read: they may mix old and new bytes
        return image, variance, mask

    @property
    def rows_in_place(self) -> bool:
        """:meth:`read_rows` gives views of the file's memory map, so a band of rows costs
        no memory until its pixels are gathered: the planes are plain, unscaled float32
        image and variance and int32 mask (either byte order; none missing, whose constant
        would be made at every read), and the file is all here."""
        if self._maps is None or not self.fully_local or self._variance_is_weight:
            return False
        wanted = ((self._image_hdu, np.float32), (self._variance_hdu, np.float32), (self._mask_hdu, np.int32))
        return all(hdu is not None and _stored_as(hdu, dtype) for hdu, dtype in wanted)

    @property
    def fully_local(self) -> bool:
        """Every byte of the file is on this machine (False for a partial copy of a remote
        file still being filled, whose rows are fetched when read)."""
        return self._partial is None or self._partial.complete

    def check_unchanged(self) -> None:
        """Raise :class:`ExposureChanged` if the file is no longer the one opened (size,
        modification time or inode differ: rewritten in place, replaced or truncated; a
        partial copy is compared by size and inode, as filling it writes to it)."""
        try:
            now = file_stamp(self.path, self._partial is not None)
        except OSError:
            now = None
        if now != self._file_stamp:
            raise ExposureChanged(f"{self.name}: the file changed while it was being read; retry the request")

    @property
    def calibration_mean(self) -> float:
        """nJy per image unit (the PhotoCalib's mean), NaN without calibration."""
        return self.photocalib.mean

    @property
    def calibration_err(self) -> float:
        """The calibration's 1-sigma error, nJy per image unit."""
        return self.photocalib.err

    def local_calibration(self, x_parent: np.ndarray, y_parent: np.ndarray) -> np.ndarray:
        """(N,) nJy per image unit at parent pixel positions (``calibration_mean`` unless the
        PhotoCalib varies over the detector; NaN for an uncalibrated image)."""
        return self.photocalib.at(x_parent, y_parent)

    def resident_planes(self, backend: Backend, upload: bool = True) -> ResidentPlanes | None:
        """The three planes on ``backend``'s device: copied there (read whole, three uploads)
        at the first call with ``upload``, then kept until :meth:`close`; None when they are
        not there and ``upload`` is False."""
        return self._resident.get(self, self.mask_planes, backend, upload)

    def close(self) -> None:
        """Close the underlying file (and drop any device copy of the planes)."""
        self._resident.clear()
        if self._maps is not None:
            self._maps.clear()
        if self._hdul is not None:  # None: opened from a stored summary, no astropy file
            self._hdul.close()

    def __enter__(self) -> Exposure:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_exposure(path: str | os.PathLike, *, name: str | None = None, limits: ExposureLimits = DEFAULT_LIMITS,
                  memory_map: bool = True) -> Exposure:
    """Open ``path`` (either layout, see the module docstring) and read its metadata.

    ``name`` is how errors refer to the file (default: its path; a service passes the
    caller's reference so that no server path reaches a client). ``limits`` bounds what
    the file may declare (see :class:`ExposureLimits`). ``memory_map``: read pixels
    through memory maps (fast, zero-copy; but a file truncated while mapped kills the
    process with SIGBUS, so a server process passes False and reads with plain reads).

    Raises
    ------
    ExposureError
        Missing file, not FITS, truncated FITS, no image HDU, non-2-D image, no celestial
        WCS, planes whose shape differs from the image, floating-point mask, or a file
        beyond ``limits``.
    """
    path = os.fspath(path)
    name = name or path
    if not os.path.isfile(path):
        raise ExposureError(f"{name}: no such file")
    try:
        partial = PartialCopy.of(path)
        stamp = file_stamp(path, partial is not None)
    except FileNotFoundError:
        raise ExposureError(f"{name}: no such file") from None
    except FetchError:
        raise ExposureChanged(f"{name}: the file changed while it was being opened; retry the request") from None
    hdul = None
    try:
        hdul = _open_fits(path, name, limits, memory_map)
        return _build_exposure(path, name, hdul, limits, stamp, memory_map, partial)
    except BaseException as exc:
        if hdul is not None:
            hdul.close()
        if isinstance(exc, ExposureError) or not isinstance(exc, _MALFORMED):
            raise
        # astropy reading a structurally malformed header (NAXIS = 999 without NAXIS3, an unparsable card, ...)
        raise ExposureError(f"{name}: malformed header: {type(exc).__name__}: {exc}") from None


_MALFORMED = (KeyError, ValueError, TypeError, OverflowError, IndexError, ArithmeticError, fits.VerifyError)


# --- file level -------------------------------------------------------------------------


def file_stamp(path: str, partial: bool = False) -> tuple[int, int, int]:
    """What identifies the file's contents: size, modification time (ns; 0 for a
    ``partial`` copy, which is written while it is read), inode."""
    stat = os.stat(path)
    return stat.st_size, 0 if partial else stat.st_mtime_ns, stat.st_ino


def _open_fits(path: str, name: str, limits: ExposureLimits, memory_map: bool) -> fits.HDUList:
    """Open the file and read every header now; a truncated or damaged file raises here.

    Checked: astropy can parse it, it has at most ``limits.max_hdus`` HDUs (headers are
    read one by one, so a file with too many stops early), no header was cut short
    (astropy only warns and stops), and every HDU's data ends within the file.
    """
    try:
        preflight(path, limits.max_hdus, limits.max_pixels)
    except DeclaredTooMuch as exc:
        raise ExposureError(f"{name}: {exc}") from None
    except (OSError, EOFError, ValueError) as exc:  # a damaged gzip or bzip2 stream
        raise ExposureError(f"{name}: not a readable FITS file (damaged compressed stream?): {exc}") from None
    size = os.path.getsize(path)
    problems: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, mode="readonly", memmap=memory_map, lazy_load_hdus=True)
            for index, hdu in enumerate(hdul):
                if index >= limits.max_hdus:
                    hdul.close()
                    raise ExposureError(f"{name}: more than {limits.max_hdus} HDUs; an exposure has its image, "
                                        "mask, variance and archive tables only")
                _check_axes(name, index, hdu.header)
                if not hdu.name and isinstance(hdu.header.get("EXTTYPE"), str):  # pre-2019 afw: no EXTNAME
                    hdu.name = hdu.header["EXTTYPE"].strip()
                info = hdu.fileinfo()  # per HDU: HDUList.fileinfo walks every HDU on each call
                # datSpan is padded to 2880 bytes: less than (span - 2879) bytes means lost data
                # (offsets of a gzip or bzip2 file are in its decompressed stream: astropy checks those)
                if info and info["datSpan"] and not info["file"].compression and size < info["datLoc"] + info["datSpan"] - (_FITS_BLOCK - 1):
                    problems.append(f"HDU {index} needs bytes up to {info['datLoc'] + info['datSpan']}, "
                                    f"the file has {size}")
        except ExposureError:
            raise
        except KeyError as exc:  # astropy sizing an HDU whose header lacks a NAXISn it declares
            raise ExposureError(f"{name}: malformed header: the key {exc} is declared (by NAXIS) but missing") from None
        except (OSError, ValueError, TypeError, IndexError, EOFError, UnicodeDecodeError, OverflowError, fits.VerifyError) as exc:
            if not_fits_reason(exc):
                raise ExposureError(f"{name}: {not_fits_reason(exc)}") from None
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc  # an OSError's text may name the file
            raise ExposureError(f"{name}: not a readable FITS file (damaged or truncated?): {reason}") from exc
    # astropy stops at an HDU whose header is cut short, with only a warning
    problems = [str(w.message).splitlines()[0] for w in caught
                if "Error validating header" in str(w.message)] + problems
    if problems:
        hdul.close()
        raise ExposureError(f"{name}: truncated or damaged FITS file: {problems[0]}")
    return hdul


def _fetch_rows(partial: PartialCopy, name: str, hdus: tuple[_ImageHDU | None, ...], rows: Sequence[tuple[int, int]]) -> None:
    """Fetch the row ranges ``rows`` of ``hdus`` that the ``partial`` copy lacks;
    ExposureError naming the file and the rows when they cannot be fetched."""
    try:
        partial.ensure([span for hdu in hdus if hdu is not None for start, stop in rows for span in row_ranges(hdu, start, stop)])
    except FetchError as exc:
        raise ExposureError(f"{name}: rows [{rows[0][0]}, {rows[-1][1]}) {exc}") from None


def _check_axes(name: str, index: int, header: fits.Header) -> None:
    """NAXIS (and a compressed image's ZNAXIS) must be a whole number from 0 to 999, as
    FITS allows: astropy builds a list of that many axes before anything else is read."""
    for key in ("NAXIS", "ZNAXIS"):
        value = header.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 999:
            raise ExposureError(f"{name}: HDU {index} header key {key} = {value!r} is not a whole number from 0 to 999")


def _check_size(name: str, hdu: _ImageHDU, limits: ExposureLimits) -> None:
    """Refuse a plane whose declared size (pixels, compression tile) is beyond ``limits``,
    from its header alone, before anything is decompressed."""
    shape = tuple(hdu.shape)
    pixels = math.prod(shape)
    label = hdu.name or "PRIMARY"
    if pixels > limits.max_pixels:
        raise ExposureError(f"{name}: HDU {label} declares {' x '.join(map(str, shape[::-1]))} = {pixels} pixels, "
                            f"more than the {limits.max_pixels} allowed")
    if isinstance(hdu, fits.CompImageHDU):
        tile = [int(n) for n in hdu.tile_shape]  # from ZTILEn: no pixel is decompressed
        tile_pixels = math.prod(tile)
        if tile_pixels > limits.max_tile_pixels:
            raise ExposureError(f"{name}: HDU {label} is compressed in tiles of {' x '.join(map(str, tile[::-1]))} = "
                                f"{tile_pixels} pixels, more than the {limits.max_tile_pixels} that may be decompressed at once")


def _build_exposure(path: str, name: str, hdul: fits.HDUList, limits: ExposureLimits, stamp: tuple[int, int, int],
                    memory_map: bool, partial: PartialCopy | None) -> Exposure:
    _check_afw_archive(name, hdul)
    image_index = _find_image_hdu(name, hdul)
    image_hdu = hdul[image_index]
    shape = tuple(image_hdu.shape)
    if len(shape) != 2:
        raise ExposureError(
            f"{name}: image HDU {image_index} ({image_hdu.name or 'PRIMARY'}) has "
            f"{len(shape)} axes {shape}; expected a 2-D image"
        )
    variance_hdu = _find_plane(name, hdul, _VARIANCE_NAMES, shape, image_index)
    weight_hdu = None if variance_hdu is not None else _find_plane(
        path, hdul, _WEIGHT_NAMES, shape, image_index)
    mask_hdu = _find_plane(name, hdul, _MASK_NAMES, shape, image_index)
    _check_afw_planes(name, image_hdu, variance_hdu, mask_hdu)
    for plane in (image_hdu, variance_hdu, weight_hdu, mask_hdu):
        if plane is not None:
            _check_size(name, plane, limits)
    if mask_hdu is not None and mask_hdu.header.get("BITPIX", 0) < 0:
        raise ExposureError(
            f"{name}: mask HDU {mask_hdu.name} holds floating-point data; expected integer bits"
        )

    header = _merged_header(hdul[0].header, image_hdu.header, image_index == 0)
    wcs = _celestial_wcs(name, header, shape)
    height, width = shape
    x0, y0 = _origin(name, header)
    try:
        archive = Archive.of(hdul)
    except ArchiveError as exc:
        raise ExposureError(f"{name}: {exc}") from None
    photocalib, calibration_source = _calibration(name, archive, header)
    plane_hdu = variance_hdu if variance_hdu is not None else weight_hdu
    constant_variance = math.nan
    maps = PlaneMaps() if memory_map else None
    if plane_hdu is None:
        rows = _variance_sample_rows(height)
        if partial is not None:
            _fetch_rows(partial, name, (image_hdu, mask_hdu), [(row, row + 1) for row in rows])
        constant_variance = _estimate_variance(name, image_hdu, mask_hdu, rows, maps)
    return Exposure(
        path=path,
        name=name,
        width=width,
        height=height,
        x0=x0,
        y0=y0,
        wcs=wcs,
        mask_planes=_mask_planes(name, mask_hdu),
        calibration_source=calibration_source,
        photocalib=photocalib,
        visit=_first_int(name, header, _VISIT_KEYS, 0, INT64_MAX),
        detector=_first_int(name, header, _DETECTOR_KEYS, 0, INT16_MAX),
        band=_band(header),
        midpoint_mjd_tai=_midpoint_mjd_tai(name, header),
        variance_estimated=plane_hdu is None,
        sky_subtracted=archive is not None or str(image_hdu.header.get("EXTTYPE", "")).strip().upper() == "IMAGE",
        header=header,
        _hdul=hdul,
        _image_hdu=image_hdu,
        _variance_hdu=plane_hdu,
        _variance_is_weight=weight_hdu is not None,
        _mask_hdu=mask_hdu,
        _constant_variance=constant_variance,
        _file_stamp=stamp,
        _maps=maps,
        _partial=partial,
        archive=archive,
    )


def _is_image(hdu: object) -> bool:
    return isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU))


def _find_image_hdu(path: str, hdul: fits.HDUList) -> int:
    """Index of the science image: EXTNAME IMAGE, else primary with data, else first image."""
    aux_names = set(_VARIANCE_NAMES + _WEIGHT_NAMES + _MASK_NAMES)
    for index, hdu in enumerate(hdul):
        if _is_image(hdu) and hdu.name.upper() == "IMAGE":
            return index
    if hdul[0].header.get("NAXIS", 0) > 0:
        return 0
    for index, hdu in enumerate(hdul[1:], start=1):
        if _is_image(hdu) and hdu.name.upper() not in aux_names and hdu.header.get("NAXIS", 0) > 0:
            return index
    raise ExposureError(f"{path}: no image HDU (primary is empty and no image extension found)")


def _find_plane(path: str, hdul: fits.HDUList, names: tuple[str, ...], shape: tuple[int, ...],
                image_index: int) -> _ImageHDU | None:
    """The image HDU whose EXTNAME is one of ``names``, checked against the image shape."""
    for index, hdu in enumerate(hdul):
        if index != image_index and _is_image(hdu) and hdu.name.upper() in names:
            if tuple(hdu.shape) != shape:
                raise ExposureError(
                    f"{path}: {hdu.name} plane has shape {tuple(hdu.shape)}, the image {shape}"
                )
            return hdu
    return None


def _check_afw_planes(path: str, image_hdu: _ImageHDU, variance_hdu: _ImageHDU | None,
                      mask_hdu: _ImageHDU | None) -> None:
    """An IMAGE written by afw (``EXTTYPE = 'IMAGE'``) comes with its MASK and VARIANCE."""
    if str(image_hdu.header.get("EXTTYPE", "")).strip().upper() != "IMAGE":
        return
    missing = [name for name, hdu in (("MASK", mask_hdu), ("VARIANCE", variance_hdu))
               if hdu is None]
    if missing:
        raise ExposureError(
            f"{path}: afw-layout file lacks its {' and '.join(missing)} HDU "
            "(truncated or incomplete)"
        )


def _check_afw_archive(path: str, hdul: fits.HDUList) -> None:
    """The HDU counts announced by ``AR_HDU`` (primary) and ``AR_NCAT`` (index) exist."""
    archive_hdu = _header_int(hdul[0].header, "AR_HDU")
    if archive_hdu is not None and archive_hdu > len(hdul):
        raise ExposureError(
            f"{path}: the primary header key AR_HDU = {archive_hdu} puts the archive in HDU {archive_hdu} (1-based) but the "
            f"file has {len(hdul)} HDUs (truncated or incomplete)"
        )
    if "ARCHIVE_INDEX" in hdul:
        index_position = hdul.index_of("ARCHIVE_INDEX")
        n_catalogs = _header_int(hdul[index_position].header, "AR_NCAT")
        if n_catalogs is not None and index_position + n_catalogs > len(hdul):
            raise ExposureError(
                f"{path}: ARCHIVE_INDEX announces {n_catalogs} catalogs (with itself), the file "
                f"has {len(hdul) - index_position} from there on (truncated or incomplete)"
            )


def _merged_header(primary: fits.Header, image: fits.Header, image_is_primary: bool) -> fits.Header:
    """Primary metadata updated with the image header's keys, without structural keys."""
    merged = fits.Header([card for card in primary.cards
                          if not _STRUCTURAL_KEY.match(card.keyword)])
    if not image_is_primary:
        merged.extend([card for card in image.cards if not _STRUCTURAL_KEY.match(card.keyword)],
                      update=True)
    return merged


# --- pixels -----------------------------------------------------------------------------


_RAW_TYPES = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class PlaneFormat(NamedTuple):
    """Where and how a plain HDU's pixels are stored (read once from its header)."""

    file: str
    label: str  # the HDU's name, for messages
    offset: int  # bytes from the start of the file to the data
    dtype: np.dtype  # as stored (big-endian)
    shape: tuple[int, int]
    bscale: float
    bzero: float
    blank: int | None


_FORMATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # HDU -> PlaneFormat, or None when compressed


def plane_format(hdu: _ImageHDU | PlaneFormat) -> PlaneFormat | None:
    """The HDU's :class:`PlaneFormat` (an exposure opened from its stored summary holds
    these instead of HDUs); None for a tile-compressed HDU or a whole-file compressed (gzip,
    bzip2) one, which astropy decompresses."""
    if isinstance(hdu, PlaneFormat):
        return hdu
    try:
        return _FORMATS[hdu]
    except KeyError:
        pass
    info = hdu.fileinfo()
    found = None
    if not (isinstance(hdu, fits.CompImageHDU) or info["file"].compression):
        header = hdu.header
        found = PlaneFormat(info["file"].name, hdu.name or "PRIMARY", info["datLoc"], np.dtype(_RAW_TYPES[header["BITPIX"]]), tuple(hdu.shape),
                            header.get("BSCALE", 1), header.get("BZERO", 0), header.get("BLANK"))
    _FORMATS[hdu] = found
    return found


class PlaneMaps:
    """A read-only memory map of an open file, made once (at the first read) and kept until
    :meth:`clear`, and a view of it for each plain HDU: a new map per read would cost
    system calls and, worse, a page fault for every page the read touches again."""

    def __init__(self) -> None:
        self._file: np.memmap | None = None
        self._planes: dict[int, np.ndarray] = {}

    def plane(self, plane: PlaneFormat) -> np.ndarray:
        """The whole of a plain HDU's data, as stored (the file's byte order), mapped."""
        view = self._planes.get(plane.offset)
        if view is None:  # two threads may both make it: either serves
            if self._file is None:
                self._file = np.memmap(plane.file, dtype=np.uint8, mode="r")
            view = np.ndarray(plane.shape, plane.dtype, buffer=self._file, offset=plane.offset)
            self._planes[plane.offset] = view
        return view

    def clear(self) -> None:
        """Drop the map and its views (it unmaps when no view of it is left)."""
        self._planes.clear()
        self._file = None


def _stored_as(hdu: _ImageHDU | PlaneFormat, dtype: type) -> bool:
    """A plain HDU stores unscaled values of ``dtype`` (either byte order): its rows are read as they are."""
    plane = plane_format(hdu)
    return plane is not None and plane.bscale == 1 and plane.bzero == 0 and plane.dtype.newbyteorder("=") == np.dtype(dtype)


def _raw_rows(plane: PlaneFormat, y_start: int, y_stop: int, maps: PlaneMaps | None) -> np.ndarray:
    """Rows [y_start, y_stop) of a plain (not tile-compressed) HDU as stored: raw values in
    the file's byte order. With ``maps``: a read-only view of the HDU's memory map (nothing
    is read until touched); else read from the file (a file that shrank gives a short read,
    raised as EOFError, where a memory map would kill the process with SIGBUS)."""
    if maps is not None:
        return maps.plane(plane)[y_start:y_stop]
    width = plane.shape[1]
    size = (y_stop - y_start) * width * plane.dtype.itemsize
    with open(plane.file, "rb") as f:
        f.seek(plane.offset + y_start * width * plane.dtype.itemsize)
        data = f.read(size)
    if len(data) != size:
        raise EOFError(f"{len(data)} of {size} bytes of HDU {plane.label} could be read")
    return np.frombuffer(data, plane.dtype).reshape(y_stop - y_start, width)


def _plain_rows(hdu: _ImageHDU, y_start: int, y_stop: int, maps: PlaneMaps | None) -> np.ndarray | None:
    """Rows of a plain HDU with its ``BSCALE``/``BZERO`` applied (integers stay exact as
    int64; ``BLANK`` becomes NaN for floating results), else the raw values; None for a
    tile-compressed HDU or a whole-file compressed (gzip, bzip2) one, which astropy
    decompresses. Only these rows are read."""
    plane = plane_format(hdu)
    if plane is None:
        return None
    raw = _raw_rows(plane, y_start, y_stop, maps)
    bscale, bzero = plane.bscale, plane.bzero
    if bscale == 1 and bzero == 0:
        return raw
    if raw.dtype.kind in "iu" and float(bscale).is_integer() and float(bzero).is_integer():
        return raw.astype(np.int64) * int(bscale) + int(bzero)
    values = raw.astype(np.float64) * bscale + bzero
    if plane.blank is not None and raw.dtype.kind in "iu":
        values[raw == plane.blank] = np.nan
    return values


def _read_band(hdu: _ImageHDU, y_start: int, y_stop: int, dtype: type, maps: PlaneMaps | None,
               needed: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Rows [y_start, y_stop) of ``hdu`` with values of ``dtype``: the stored values as they
    are (a memory-mapped view, with ``maps``) when the file stores exactly that type
    in either byte order, else a decoded copy."""
    values = _plain_rows(hdu, y_start, y_stop, maps)
    if values is None:
        return np.asarray(_decompressed_rows(hdu, y_start, y_stop, needed), dtype=dtype)
    if values.dtype.newbyteorder("=") == np.dtype(dtype):
        return values
    return values.astype(dtype)


def _read_mask_band(hdu: _ImageHDU, y_start: int, y_stop: int, maps: PlaneMaps | None,
                    needed: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Mask rows as int32 bit fields (uint32 planes are reinterpreted bit for bit, uint16
    planes stored with BZERO read exactly)."""
    values = _plain_rows(hdu, y_start, y_stop, maps)
    if values is None:
        values = _decompressed_rows(hdu, y_start, y_stop, needed)
    if values.dtype.newbyteorder("=") == np.dtype(np.int32):
        return values
    if values.dtype.kind in "iu" and (values.dtype.itemsize == 8 or (values.dtype.kind == "u" and values.dtype.itemsize == 4)):
        return values.astype(np.uint32).view(np.int32)
    return values.astype(np.int32)


def _decompressed_rows(hdu: _ImageHDU, y_start: int, y_stop: int, needed: Sequence[tuple[int, int]] | None) -> np.ndarray:
    """Rows [y_start, y_stop) of a compressed HDU, decompressed by astropy: only the
    ``needed`` row ranges within them (only their tiles are read), the other rows zero."""
    if not needed or list(needed) == [(y_start, y_stop)]:
        return np.asarray(hdu.section[y_start:y_stop, :])
    parts = [(start, np.asarray(hdu.section[start:stop, :])) for start, stop in needed]
    rows = np.zeros((y_stop - y_start, hdu.shape[1]), dtype=parts[0][1].dtype)
    for start, values in parts:
        rows[start - y_start:start - y_start + len(values)] = values
    return rows


def _weight_to_variance(weight: np.ndarray) -> np.ndarray:
    """Variance = 1 / weight; weight <= 0 or non-finite -> +inf (no information)."""
    usable = np.isfinite(weight) & (weight > 0)
    variance = np.full(weight.shape, np.inf)
    np.divide(1.0, weight, out=variance, where=usable)
    return variance.astype(np.float32)


def _variance_sample_rows(height: int) -> np.ndarray:
    """The rows :func:`_estimate_variance` reads: up to 64, evenly spaced."""
    return np.unique(np.linspace(0, height - 1, min(height, _VARIANCE_SAMPLE_ROWS)).astype(int))


def _estimate_variance(path: str, image_hdu: _ImageHDU, mask_hdu: _ImageHDU | None,
                       rows: np.ndarray, maps: PlaneMaps | None) -> float:
    """Constant per-pixel noise variance from the image itself.

    Uses the given ``rows`` (see :func:`_variance_sample_rows`); in each, differences of horizontally adjacent
    pixels that are both finite and unmasked (mask == 0). For white noise of variance
    s2 a difference has variance 2 s2, so s2 = (1.4826 MAD(d))**2 / 2. Differences cancel
    any smooth background; the MAD ignores sparse sources. Pixel-correlated noise (e.g.
    resampled images) biases the estimate low.
    """
    differences = []
    for row in rows:
        values = _read_band(image_hdu, row, row + 1, np.float64, maps)[0]
        good = np.isfinite(values)
        if mask_hdu is not None:
            good &= _read_mask_band(mask_hdu, row, row + 1, maps)[0] == 0
        pair_good = good[1:] & good[:-1]
        differences.append((values[1:] - values[:-1])[pair_good])
    sample = np.concatenate(differences)
    if sample.size == 0:
        raise ExposureError(
            f"{path}: no variance plane and no finite unmasked pixel pairs to estimate one from"
        )
    mad = np.median(np.abs(sample - np.median(sample)))
    return float((_MAD_TO_SIGMA * mad) ** 2 / 2.0)


# --- geometry ---------------------------------------------------------------------------


def _celestial_wcs(path: str, header: fits.Header, shape: tuple[int, int]) -> WCS:
    """The 2-axis celestial WCS of the local array, or ExposureError."""
    if "CTYPE1" not in header or "CTYPE2" not in header:
        raise ExposureError(f"{path}: no WCS in the image header (CTYPE1/CTYPE2 missing)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        try:
            wcs = WCS(header, naxis=2)
        except Exception as exc:  # astropy/wcslib raise many types for malformed WCS
            raise ExposureError(f"{path}: cannot parse the image WCS: {exc}") from exc
    if not wcs.is_celestial:
        raise ExposureError(
            f"{path}: the image WCS is not celestial (CTYPE = {list(wcs.wcs.ctype)})"
        )
    wcs.array_shape = shape
    return wcs


def _origin(path: str, header: fits.Header) -> tuple[int, int]:
    """Parent origin (X0, Y0): afw LINEAR 'A' WCS, else IRAF LTV1/2, else (0, 0)."""
    if (str(header.get("CTYPE1A", "")).strip().upper() == "LINEAR"
            and "CRVAL1A" in header and "CRVAL2A" in header):
        # parent = CRVALnA + (local + 1 - CRPIXnA), so X0 = CRVAL1A + 1 - CRPIX1A
        origin = [_number(path, header, f"CRVAL{n}A", None) + 1.0 - _number(path, header, f"CRPIX{n}A", 1.0)
                  for n in (1, 2)]
        keys = "CRVAL1A, CRVAL2A, CRPIX1A, CRPIX2A"
    else:
        origin = [-_number(path, header, f"LTV{n}", 0.0) for n in (1, 2)]
        keys = "LTV1, LTV2"
    if any(not math.isfinite(value) or abs(value) > MAX_ORIGIN for value in origin):
        raise ExposureError(f"{path}: image origin {origin} (from {keys}) is beyond the +-{MAX_ORIGIN} pixels allowed")
    rounded = [round(value) for value in origin]
    if any(abs(value - r) > 1e-6 for value, r in zip(origin, rounded)):
        raise ExposureError(f"{path}: image origin {origin} (from {keys}) is not a whole pixel")
    return rounded[0], rounded[1]


def _number(path: str, header: fits.Header, key: str, default: float | None) -> float:
    """A finite number at ``key`` (``default`` when absent), else an ExposureError naming
    the key and its value."""
    if key not in header:
        return default  # type: ignore[return-value]
    value = header[key]
    number = _header_float(header, key)
    if number is None:
        raise ExposureError(f"{path}: header key {key} = {value!r} is not a finite number")
    return number


def _mask_planes(path: str, mask_hdu: _ImageHDU | None) -> dict[str, int]:
    """Plane name -> bit from ``MP_<NAME>`` keys; afw defaults when there are none.
    ExposureError naming the key for a bit outside 0 to 30 (the mask is int32)."""
    if mask_hdu is None:
        return dict(AFW_DEFAULT_MASK_PLANES)
    planes = {key[3:]: int(value) for key, value in mask_hdu.header.items()
              if key.startswith("MP_") and isinstance(value, int) and not isinstance(value, bool)}
    for plane, bit in planes.items():
        if not 0 <= bit <= MAX_MASK_BIT:
            raise ExposureError(f"{path}: header key MP_{plane} = {bit} is not a mask bit (0 to {MAX_MASK_BIT})")
    return planes or dict(AFW_DEFAULT_MASK_PLANES)


# --- calibration ------------------------------------------------------------------------


def _calibration(path: str, archive: Archive | None, header: fits.Header) -> tuple[PhotoCalib, str]:
    """(calibration in nJy per image unit, source name) by the precedence in the module doc."""
    try:
        photocalib = read_photocalib(archive) if archive is not None else None
    except ArchiveError as exc:
        raise ExposureError(f"{path}: {exc}") from None
    if photocalib is not None:
        return photocalib, "PhotoCalib"
    if str(header.get("BUNIT", "")).strip().lower() == "njy":
        return PhotoCalib(1.0, 0.0), "BUNIT"
    fluxmag0 = _header_float(header, "FLUXMAG0")
    if fluxmag0 is not None and fluxmag0 > 0:
        fluxmag0_err = _header_float(header, "FLUXMAG0ERR") or 0.0
        with np.errstate(all="ignore"):
            mean, err = REFERENCE_FLUX_NJY / np.float64(fluxmag0), REFERENCE_FLUX_NJY * np.float64(fluxmag0_err) / np.float64(fluxmag0) ** 2
        if not (math.isfinite(mean) and mean > 0):
            raise ExposureError(f"{path}: header key FLUXMAG0 = {header['FLUXMAG0']!r} gives no usable calibration ({mean} nJy per count)")
        if not math.isfinite(err):
            raise ExposureError(f"{path}: header key FLUXMAG0ERR = {header['FLUXMAG0ERR']!r} gives no usable calibration error")
        return PhotoCalib(float(mean), float(err)), "FLUXMAG0"
    for key in _ZERO_POINT_KEYS:
        zero_point = _header_float(header, key)
        if zero_point is not None:
            if abs(zero_point) > MAX_ZERO_POINT_MAG:
                raise ExposureError(f"{path}: header key {key} = {header[key]!r} is not a usable zero point "
                                    f"(|ZP| <= {MAX_ZERO_POINT_MAG} mag)")
            return PhotoCalib(njy_per_count(zero_point), 0.0), f"keyword:{key}"
    return PhotoCalib(math.nan, math.nan), "none"


# --- visit metadata ---------------------------------------------------------------------


def _header_float(header: fits.Header, key: str) -> float | None:
    """Finite numeric value of ``key`` (numbers or numeric strings), else None."""
    value = header.get(key)
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _header_int(header: fits.Header, key: str) -> int | None:
    """Integral value of ``key`` (int, integral float or digit string), else None."""
    number = _header_float(header, key)
    if number is None or number != int(number):
        return None
    return int(number)


def _first_int(path: str, header: fits.Header, keys: tuple[str, ...], low: int, high: int) -> int | None:
    """The first whole number among ``keys``; ExposureError naming the key when it lies
    outside [low, high] (the catalog column's range)."""
    for key in keys:
        value = _header_int(header, key)
        if value is not None:
            if not low <= value <= high:
                raise ExposureError(f"{path}: header key {key} = {header[key]!r} is outside the {low} to {high} allowed")
            return value
    return None


def _band(header: fits.Header) -> str | None:
    """Band as written, else the first one-letter token of a physical filter name."""
    for key in _BAND_KEYS:
        value = str(header.get(key, "")).strip()
        if value:
            return value
    for key in _PHYSICAL_FILTER_KEYS:
        for token in re.split(r"[\s_\-]+", str(header.get(key, "")).strip()):
            if len(token) == 1 and token.isalpha():
                return token.lower()
    return None


def _midpoint_mjd_tai(path: str, header: fits.Header) -> float | None:
    """Exposure midpoint as a TAI MJD, from the first usable key (module docstring order);
    ExposureError naming the key when its value gives a time outside MJD 0 to 100000 or
    EXPTIME is outside 0 to 1e6 s."""
    scale = _TIME_SCALES.get(str(header.get("TIMESYS", "UTC")).strip().upper())
    exptime = _header_float(header, "EXPTIME")
    if exptime is not None and not 0 <= exptime <= MAX_EXPTIME_S:
        raise ExposureError(f"{path}: header key EXPTIME = {header['EXPTIME']!r} is outside the 0 to {MAX_EXPTIME_S:g} s allowed")
    # (key, value is an MJD number, time scale, key is the start so add EXPTIME/2)
    candidates = (
        ("DATE-AVG", False, scale, False),
        ("TIME-MID", False, "utc", False),
        ("MJD-AVG", True, scale, False),
        ("MJD-OBS", True, scale, True),
        ("DATE-OBS", False, scale, True),
    )
    for key, is_mjd, key_scale, is_start in candidates:
        if key not in header or key_scale is None or (is_start and exptime is None):
            continue
        if is_mjd:
            value = _header_float(header, key)
            if value is not None and not MJD_RANGE[0] <= value <= MJD_RANGE[1]:
                raise ExposureError(f"{path}: header key {key} = {header[key]!r} is outside MJD {MJD_RANGE[0]} to {MJD_RANGE[1]}")
            time = None if value is None else Time(value, format="mjd", scale=key_scale)
        else:
            time = _parse_iso(str(header[key]), key_scale)
        if time is None:
            continue
        try:
            if is_start:
                time = time + TimeDelta(exptime / 2.0, format="sec")
            mjd = float(time.tai.mjd)
        except (ValueError, OverflowError, ArithmeticError) as exc:  # erfa's ErfaError is a ValueError
            raise ExposureError(f"{path}: header key {key} = {header[key]!r} is not a usable time: {exc}") from None
        if not MJD_RANGE[0] <= mjd <= MJD_RANGE[1]:
            raise ExposureError(f"{path}: header key {key} = {header[key]!r} is outside MJD {MJD_RANGE[0]} to {MJD_RANGE[1]}")
        return mjd
    return None


def _parse_iso(text: str, scale: str) -> Time | None:
    """ISO-8601 date-time in ``scale`` (a trailing 'Z' means UTC), or None if unparsable."""
    text = text.strip()
    if text.endswith("Z"):
        text, scale = text[:-1], "utc"
    try:
        return Time(text, scale=scale)
    except ValueError:
        return None
