"""An exposure's photometric calibration as afw's ``PhotoCalib``: constant or a Chebyshev field.

afw persists a ``PhotoCalib`` as one archive row: ``calibrationMean`` and ``calibrationErr``
(nJy per image unit), ``flags`` (bit 0: ``isConstant``) and ``field``, the archive id of a
``BoundedField``. A constant calibration is ``calibrationMean`` everywhere; otherwise the
field, a ``ChebyshevBoundedField``, is evaluated at each source's *parent* pixel position
(``instFluxToNanojansky(instFlux, point)``). ``calibrationErr`` is one number either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from numpy.polynomial import chebyshev

from forcedphot.photometry.afw_archive import Archive, ArchiveError

__all__ = ["ChebyshevField", "PhotoCalib", "read_photocalib"]


@dataclass(frozen=True)
class ChebyshevField:
    """afw ``ChebyshevBoundedField``: ``sum_ij c[j, i] T_i(x') T_j(y')`` over an integer bbox.

    ``x'``, ``y'`` map the bbox's pixel *edges* (``Box2D(bbox)``: min - 0.5 to max + 0.5,
    parent pixels, bounds inclusive) to [-1, 1]; ``coefficients`` is ``(ny, nx)``, ordered
    by y then x as afw stores them.
    """

    x_min: int
    y_min: int
    x_max: int
    y_max: int
    coefficients: np.ndarray

    def __call__(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The field at parent pixel positions ``(x, y)`` (float64, same shape)."""
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        xs = (2.0 * x - (self.x_min + self.x_max)) / (self.x_max - self.x_min + 1)
        ys = (2.0 * y - (self.y_min + self.y_max)) / (self.y_max - self.y_min + 1)
        return chebyshev.chebval2d(ys, xs, self.coefficients)

    @classmethod
    def from_record(cls, record: dict) -> ChebyshevField:
        """The field of a ``ChebyshevBoundedField`` archive row."""
        nx = int(record["order_x"]) + 1
        coefficients = np.atleast_1d(np.asarray(record["coefficients"], np.float64))
        if nx < 1 or coefficients.size % nx:
            raise ArchiveError(f"ChebyshevBoundedField: {coefficients.size} coefficients do not fill rows of order_x + 1 = {nx}")
        field = cls(int(record["bbox_min_x"]), int(record["bbox_min_y"]), int(record["bbox_max_x"]), int(record["bbox_max_y"]),
                    coefficients.reshape(-1, nx))
        if field.x_max < field.x_min or field.y_max < field.y_min:
            raise ArchiveError(f"ChebyshevBoundedField: empty bbox ({field.x_min}, {field.y_min})-({field.x_max}, {field.y_max})")
        return field


@dataclass(frozen=True)
class PhotoCalib:
    """nJy per image unit: ``mean`` (and its error ``err``) or, when ``field`` is set, the
    field at each position."""

    mean: float
    err: float
    field: ChebyshevField | None = None

    def at(self, x_parent: np.ndarray, y_parent: np.ndarray) -> np.ndarray:
        """(N,) float64 calibration at parent pixel positions."""
        x_parent = np.asarray(x_parent, np.float64)
        if self.field is None:
            return np.full(x_parent.shape, self.mean)
        return self.field(x_parent, y_parent)


def read_photocalib(archive: Archive) -> PhotoCalib | None:
    """The exposure's ``PhotoCalib`` (None when the archive has none).

    Raises :class:`ArchiveError` for a row without ``calibrationMean`` or a spatially
    varying calibration whose field is not a ``ChebyshevBoundedField``.
    """
    archive_id = archive.component("PhotoCalib")
    if archive_id is None:
        return None
    record = archive.record(archive_id)
    if "calibrationMean" not in record:
        raise ArchiveError("the PhotoCalib row has no calibrationMean")
    mean, err = _finite(record, "calibrationMean"), _finite(record, "calibrationErr", 0.0)
    if not mean > 0:
        raise ArchiveError(f"the PhotoCalib's calibrationMean = {mean!r} is not positive")
    flags = np.atleast_1d(record.get("flags", [True]))
    field_id = int(_finite(record, "field", 0.0))
    if bool(flags[0]) or field_id <= 0:
        return PhotoCalib(mean, err)
    kind = archive.class_name(field_id)
    if kind != "ChebyshevBoundedField":
        raise ArchiveError(f"the PhotoCalib varies over the detector as a {kind}; only ChebyshevBoundedField is read")
    return PhotoCalib(mean, err, ChebyshevField.from_record(archive.record(field_id)))


def _finite(record: dict, column: str, default: float | None = None) -> float:
    """A finite number in ``column`` of a PhotoCalib row, else ArchiveError naming it."""
    value = record.get(column)
    value = default if value is None else value
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, (bool, str, bytes)) or not math.isfinite(number):
        raise ArchiveError(f"the PhotoCalib's {column} = {value!r} is not a finite number")
    return number
