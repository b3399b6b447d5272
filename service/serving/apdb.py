"""The APDB (Rubin's Alert Production Database, ``lsst-dax-apdb``) as a source of DiaObjects
and a sink of DiaForcedSources.

* :func:`objects_on` reads the DiaObjects overlapping an exposure (the convex hull of its
  border, ICRS) with ``nDiaSources >= min_dia_sources``, as Rubin's ``DiaForcedSourceTask``
  selects them (threshold 2 by default);
* :func:`objects_by_id` finds DiaObjects by ``diaObjectId`` (their latest version);
* :func:`store_forced_sources` writes a catalog's DiaForcedSources, idempotently: rows whose
  primary key ``(diaObjectId, visit, detector)`` is already stored are left alone, the rest are
  written in one transaction (nothing half-stored), and the count written is returned.

A database that cannot be reached raises :class:`ApdbUnavailable` (the service answers 503
with ``Retry-After``); its message names the kind of failure, never a URL or a path.
``lsst.dax.apdb`` is imported on first use (about a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
import threading
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa

from forcedphot.defaults import DEFAULT_MIN_DIA_SOURCES
from forcedphot.photometry.objects import InputError

if TYPE_CHECKING:
    from lsst.dax.apdb import Apdb

#: the DiaForcedSource columns of sdm_schemas' apdb.yaml, in its order
FORCED_SOURCE_COLUMNS = ("diaForcedSourceId", "diaObjectId", "ra", "dec", "visit", "detector", "psfFlux", "psfFluxErr",
                         "midpointMjdTai", "scienceFlux", "scienceFluxErr", "band", "timeProcessedMjdTai", "timeWithdrawnMjdTai")
_SAME_MIDPOINT_DAYS = 1e-6  # 0.09 s: rows of one visit share its midpoint


class ApdbUnavailable(RuntimeError):
    """The APDB's database cannot be reached or cannot take the request now; retry later."""


@dataclass(frozen=True)
class ApdbObjects:
    """DiaObjects to read from an APDB for each exposure measured: those overlapping it with
    at least ``min_dia_sources`` DiaSources. ``config`` is the APDB's configuration file."""

    config: str
    min_dia_sources: int = DEFAULT_MIN_DIA_SOURCES


_OPEN_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _opened(config: str) -> Apdb:
    from lsst.dax.apdb import Apdb

    return Apdb.from_uri(config)


def open_apdb(config: str) -> Apdb:
    """The APDB of configuration file ``config`` (one instance per process and file).

    Raises :class:`ApdbUnavailable` when its database cannot be opened.
    """
    with _OPEN_LOCK, reachable("opening the APDB"):
        return _opened(config)


class reachable:  # noqa: N801 - used as a context manager, named for how it reads
    """Turn the database errors of an APDB call into :class:`ApdbUnavailable` (``what`` says
    which call); integrity errors pass through (they are the caller's to handle)."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, traceback) -> bool:
        if exc is None or isinstance(exc, (InputError, ApdbUnavailable)) or _is_integrity_error(exc):
            return False
        if _is_database_error(exc):
            raise ApdbUnavailable(f"{self.what} failed: the APDB's database cannot be reached or refused the "
                                  f"request ({_reason(exc)})") from None
        return False


def _database_errors() -> tuple[type[BaseException], ...]:
    import sqlalchemy.exc

    return (sqlalchemy.exc.SQLAlchemyError, pd.errors.DatabaseError, ConnectionError, TimeoutError)


def _is_database_error(exc: BaseException) -> bool:
    return isinstance(exc, _database_errors())


def _is_integrity_error(exc: BaseException) -> bool:
    import sqlalchemy.exc

    cause = exc.__cause__ or exc.__context__
    return isinstance(exc, sqlalchemy.exc.IntegrityError) or isinstance(cause, sqlalchemy.exc.IntegrityError) or (
        isinstance(exc, pd.errors.DatabaseError) and "unique" in str(exc).lower())


def _reason(exc: BaseException) -> str:
    """The kind of a database failure, without statements, URLs or paths."""
    original = getattr(exc, "orig", None) or exc.__cause__ or exc
    return type(original).__name__


def _region(footprint: list[tuple[float, float]]):
    """The convex hull (an ``lsst.sphgeom.ConvexPolygon``) of sky positions (ra, dec), deg."""
    from lsst import sphgeom

    vertices = [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(ra, dec)) for ra, dec in footprint]
    return sphgeom.ConvexPolygon.convexHull(vertices)


def _whole_sky():
    """The whole sky (SQL APDBs select forced sources by object id and ignore the region)."""
    from lsst import sphgeom

    return sphgeom.Box.full()


def objects_on(apdb: Apdb, footprint: list[tuple[float, float]], min_dia_sources: int) -> pd.DataFrame:
    """The DiaObjects of ``apdb`` inside the convex hull of ``footprint`` (ICRS deg, an
    exposure's border) with ``nDiaSources >= min_dia_sources``: columns ``diaObjectId``
    (int64), ``ra``, ``dec`` (deg), ``nDiaSources``, ``coord_valid``; possibly no rows."""
    with reachable("reading DiaObjects from the APDB"):
        found = apdb.getDiaObjects(_region(footprint))
    return _objects_frame(found[found["nDiaSources"] >= min_dia_sources])


def _objects_frame(found: pd.DataFrame) -> pd.DataFrame:
    frame = pd.DataFrame({
        "diaObjectId": found["diaObjectId"].to_numpy(np.int64),
        "ra": found["ra"].to_numpy(np.float64),
        "dec": found["dec"].to_numpy(np.float64),
        "nDiaSources": found["nDiaSources"].to_numpy(np.int64),
    }).sort_values("diaObjectId", kind="stable").reset_index(drop=True)
    ra, dec = frame["ra"].to_numpy(), frame["dec"].to_numpy()
    frame["coord_valid"] = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90)
    return frame


def objects_by_id(apdb: Apdb, ids: list[int]) -> pd.DataFrame:
    """The latest version of the DiaObjects ``ids`` (columns as :func:`objects_on`); ids the
    APDB does not hold are absent. SQL APDBs only: the APDB interface selects by region, so
    this reads the ``DiaObject`` table of apdb.yaml through the APDB's own database URL."""
    import sqlalchemy

    config = apdb.config
    if not hasattr(config, "db_url"):
        raise ApdbUnavailable("finding DiaObjects by id needs an SQL APDB (SQLite or PostgreSQL)")
    with reachable("finding DiaObjects in the APDB"):
        engine = _engine(config.db_url)
        metadata = sqlalchemy.MetaData(schema=config.namespace or None)
        table = sqlalchemy.Table(f"{config.prefix or ''}DiaObject", metadata, autoload_with=engine)
        query = (sqlalchemy.select(table.c.diaObjectId, table.c.ra, table.c.dec, table.c.nDiaSources, table.c.validityStartMjdTai)
                 .where(table.c.diaObjectId.in_([int(i) for i in ids])))
        with engine.connect() as connection:
            rows = pd.DataFrame(connection.execute(query).fetchall(), columns=["diaObjectId", "ra", "dec", "nDiaSources", "validityStartMjdTai"])
    latest = rows.sort_values("validityStartMjdTai").drop_duplicates("diaObjectId", keep="last")
    return _objects_frame(latest)


@lru_cache(maxsize=4)
def _engine(url: str):
    import sqlalchemy

    return sqlalchemy.create_engine(url, pool_pre_ping=True)


def stored_forced_sources(apdb: Apdb, ids: list[int], start_mjd_tai: float = 0.0) -> pd.DataFrame:
    """The DiaForcedSources stored for the DiaObjects ``ids`` with midpoints from
    ``start_mjd_tai`` (MJD, TAI) on; the columns of apdb.yaml."""
    from astropy.time import Time

    start = Time(start_mjd_tai, format="mjd", scale="tai")
    with reachable("reading DiaForcedSources from the APDB"):
        found = apdb.getDiaForcedSources(_whole_sky(), ids, Time.now(), start_time=start)
    return found if found is not None else pd.DataFrame(columns=FORCED_SOURCE_COLUMNS)


def forced_sources_of(catalog: pa.Table) -> pd.DataFrame:
    """The DiaForcedSource rows of a catalog, as the APDB stores them: the rows measured on
    the detector (not those off it or with unusable coordinates), the columns of apdb.yaml.
    A catalog whose exposure has no visit, detector or midpoint cannot be stored (InputError)."""
    frame = catalog.select(list(FORCED_SOURCE_COLUMNS) + ["pixelFlags_offimage"]).to_pandas()
    frame = frame[~frame.pop("pixelFlags_offimage").to_numpy(bool)]
    for column in ("visit", "detector", "midpointMjdTai"):
        if frame[column].isna().any():
            raise InputError(f"cannot store DiaForcedSources in the APDB: the exposure has no {column} "
                             "(its header needs it; see the README's exposure keywords)")
    frame["visit"] = frame["visit"].astype(np.int64)
    frame["detector"] = frame["detector"].astype(np.int16)
    return frame.reset_index(drop=True)


def store_forced_sources(apdb: Apdb, catalog: pa.Table) -> int:
    """Store the DiaForcedSources of ``catalog`` (one exposure) not stored yet; how many were
    written. One transaction; a concurrent store of the same rows is not an error."""
    rows = forced_sources_of(catalog)
    if rows.empty:
        return 0
    for attempt in range(2):
        new = _not_stored(apdb, rows)
        if new.empty:
            return 0
        try:
            with reachable("storing DiaForcedSources in the APDB"):
                _store(apdb, new)
            return len(new)
        except Exception as exc:
            if attempt or not _is_integrity_error(exc):
                raise _as_unavailable(exc) from None
    raise AssertionError("unreachable")


def _as_unavailable(exc: Exception) -> Exception:
    if _is_integrity_error(exc):
        return ApdbUnavailable(f"storing DiaForcedSources in the APDB failed: another store of the same rows "
                               f"interfered ({_reason(exc)}); nothing was written by this request")
    return exc


def _store(apdb: Apdb, rows: pd.DataFrame) -> None:
    from astropy.time import Time

    visit_time = Time(float(rows["midpointMjdTai"].iloc[0]), format="mjd", scale="tai")
    no_objects = pd.DataFrame({"diaObjectId": pd.Series([], dtype=np.int64), "ra": pd.Series([], dtype=np.float64),
                               "dec": pd.Series([], dtype=np.float64)})
    apdb.store(visit_time, no_objects, forced_sources=rows)


def _not_stored(apdb: Apdb, rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose (diaObjectId, visit, detector) the APDB does not hold yet."""
    from astropy.time import Time

    midpoint = float(rows["midpointMjdTai"].min())
    start = Time(midpoint - _SAME_MIDPOINT_DAYS, format="mjd", scale="tai")
    visit_time = Time(float(rows["midpointMjdTai"].max()), format="mjd", scale="tai")
    with reachable("reading DiaForcedSources from the APDB"):
        stored = apdb.getDiaForcedSources(_whole_sky(), rows["diaObjectId"].tolist(),
                                          visit_time, start_time=start)
    if stored is None or stored.empty:
        return rows
    key = ["diaObjectId", "visit", "detector"]
    present = set(map(tuple, stored[key].astype(np.int64).to_numpy().tolist()))
    keep = [tuple(k) not in present for k in rows[key].astype(np.int64).to_numpy().tolist()]
    return rows[np.asarray(keep, bool)]
