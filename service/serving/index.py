"""The exposure index of a repository: which exposures cover a sky position, in milliseconds.

:meth:`ExposureIndex.refresh` scans the files the path template finds under each root
(science ``calexp`` and, when present, ``difference`` of each (visit, detector)) and
records, from the headers only: visit, detector, band, TAI midpoint, exposure time, the
sky footprint (the detector's border, 4 points a side, through the WCS, SIP included),
the PSF FWHM (``PSF_FWHM``), the calibration, and each file's path, size and mtime. A new
or changed file is read again; unchanged ones are not; a file that cannot be read is
listed with its reason.

Spatial index: HEALPix (astropy-healpix, nested, ``nside`` 256 by default: 13.7 arcmin
pixels, the size of an LSST detector). Each exposure is filed under every pixel its
footprint's bounding circle touches; a query looks up the pixel(s) of the position, then
tests the few candidates exactly: point in the footprint polygon, in the gnomonic
projection about the footprint's centre (so RA = 0 and the poles need no special case).
HEALPix over HTM (lsst-sphgeom) because astropy-healpix is a small, well-kept astropy
package with wheels everywhere, and one pixel look-up per position is all a query needs.

Storage: SQLite (WAL), one file.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import re
import sqlite3
import threading
import time
from typing import Any

from astropy import units as u
from astropy.coordinates import Latitude, Longitude
from astropy_healpix import HEALPix
import numpy as np

from forcedphot.photometry.exposure import Exposure, ExposureError, open_exposure
from forcedphot.photometry.exposure_summary import summarize
from forcedphot.photometry.psf_models import PsfError, header_fwhm_pixels
from forcedphot.serving.sqlite_wal import keep_open

SCIENCE, DIFFERENCE = "calexp", "difference"
DEFAULT_NSIDE = 256
POINTS_PER_SIDE = 4

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exposures (
    id INTEGER PRIMARY KEY,
    visit INTEGER NOT NULL,
    detector INTEGER NOT NULL,
    band TEXT,
    midpoint_mjd_tai REAL,
    exposure_time REAL,
    ra REAL NOT NULL,
    dec REAL NOT NULL,
    radius_deg REAL NOT NULL,
    footprint TEXT NOT NULL,
    psf_fwhm_px REAL,
    calibration REAL,
    science_path TEXT NOT NULL,
    science_size INTEGER NOT NULL,
    science_mtime_ns INTEGER NOT NULL,
    difference_path TEXT,
    difference_size INTEGER,
    difference_mtime_ns INTEGER,
    science_summary TEXT,
    difference_summary TEXT,
    UNIQUE (visit, detector)
);
CREATE TABLE IF NOT EXISTS sky (hpx INTEGER NOT NULL, exposure INTEGER NOT NULL REFERENCES exposures (id) ON DELETE CASCADE);
CREATE INDEX IF NOT EXISTS sky_by_pixel ON sky (hpx);
CREATE INDEX IF NOT EXISTS exposures_by_time ON exposures (midpoint_mjd_tai);
CREATE TABLE IF NOT EXISTS unreadable (path TEXT PRIMARY KEY, reason TEXT NOT NULL, size INTEGER, mtime_ns INTEGER);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class IndexUnavailable(Exception):
    """The index's database failed a call (full disk, read-only, damaged); the message says why."""


@dataclass(frozen=True)
class IndexedExposure:
    """One (visit, detector) of the index: its metadata and files."""

    visit: int
    detector: int
    band: str | None
    midpoint_mjd_tai: float | None
    exposure_time: float | None
    ra: float  # footprint centre, deg
    dec: float
    footprint: list[tuple[float, float]] = field(repr=False)  # (ra, dec) vertices, deg
    psf_fwhm_px: float | None
    calibration: float | None  # nJy per count
    science_path: str
    difference_path: str | None
    science_summary: str | None = field(default=None, repr=False)  # JSON (photometry/exposure_summary): open without reading headers
    difference_summary: str | None = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """What a client may see (no server paths)."""
        return {"visit": self.visit, "detector": self.detector, "band": self.band, "midpointMjdTai": self.midpoint_mjd_tai,
                "exposureTime": self.exposure_time, "psfFwhmPixels": self.psf_fwhm_px, "calibration": self.calibration,
                "datasetTypes": [SCIENCE] + ([DIFFERENCE] if self.difference_path else []),
                "center": {"ra": self.ra, "dec": self.dec}, "footprint": [list(v) for v in self.footprint]}


@dataclass
class RefreshReport:
    """What a refresh did."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)  # path relative to its root -> reason
    seconds: float = 0.0

    def __str__(self) -> str:
        text = (f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.unchanged} unchanged, "
                f"{len(self.unreadable)} unreadable in {self.seconds:.2f} s")
        return text + "".join(f"\n  unreadable: {path}: {reason}" for path, reason in sorted(self.unreadable.items()))


def template_pattern(template: str) -> tuple[str, re.Pattern]:
    """The glob pattern and the regular expression of a path template such as
    ``{visit}/{detector}/{datasetType}.fits``."""
    glob_pattern = re.sub(r"\{\w+\}", "*", template)
    regex = ""
    for part in re.split(r"(\{\w+\})", template):
        if re.fullmatch(r"\{\w+\}", part):
            name = part[1:-1]
            regex += rf"(?P<{name}>[^/]+)"
        else:
            regex += re.escape(part)
    return glob_pattern, re.compile(regex + r"\Z")


def _unit_vectors(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    ra, dec = np.radians(ra), np.radians(dec)
    return np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], axis=-1)


def _gnomonic(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(E, N, 2) gnomonic coordinates of unit vectors ``points`` ((N, 3), or (E, N, 3)) about
    each of the unit vectors ``centres`` (E, 3); points on the far hemisphere come out as NaN."""
    east = np.cross([0.0, 0.0, 1.0], centres)
    at_pole = np.linalg.norm(east, axis=-1) < 1e-12
    east[at_pole] = [0.0, 1.0, 0.0]
    east /= np.linalg.norm(east, axis=-1, keepdims=True)
    north = np.cross(centres, east)
    along = np.einsum("nk,ek->en" if points.ndim == 2 else "enk,ek->en", points, centres)
    axes = np.stack([east, north], axis=-1)  # (E, 3, 2)
    projected = points @ axes  # (E, N, 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = projected / along[..., None]
    xy[along <= 0] = np.nan
    return xy


def _inside(polygons: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(E, M) bool: points ``xy`` (E, M, 2) inside each closed polygon (E, V, 2) (even-odd rule)."""
    x, y = xy[..., 0:1], xy[..., 1:2]
    x1, y1 = polygons[:, None, :, 0], polygons[:, None, :, 1]
    x2, y2 = np.roll(x1, -1, axis=-1), np.roll(y1, -1, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        crosses = ((y1 > y) != (y2 > y)) & (x < (x2 - x1) * (y - y1) / (y2 - y1) + x1)
    return (np.count_nonzero(crosses, axis=-1) % 2) == 1


def _segment_distance(polygons: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """(E, M) distance (gnomonic units, ~radians) from points ``xy`` (E, M, 2) to the border
    of each polygon (E, V, 2)."""
    a = polygons[:, None, :, :]
    b = np.roll(polygons, -1, axis=1)[:, None, :, :]
    p = xy[:, :, None, :]
    ab = b - a
    t = np.clip(np.sum((p - a) * ab, axis=-1) / np.maximum(np.sum(ab * ab, axis=-1), 1e-300), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.min(np.linalg.norm(p - closest, axis=-1), axis=-1)


def _covered(footprints: list[list[tuple[float, float]]], centres: np.ndarray, points: np.ndarray, radius_deg: float) -> list[np.ndarray]:
    """For each exposure (its footprint's vertices and centre, ra/dec deg): which of the unit
    vectors ``points`` (M, 3) lie inside it (or within ``radius_deg`` of its border).
    Exposures with equal vertex counts are tested together, a bounded number at a time."""
    hits: list[np.ndarray | None] = [None] * len(footprints)
    by_count: dict[int, list[int]] = {}
    for i, footprint in enumerate(footprints):
        by_count.setdefault(len(footprint), []).append(i)
    for count, members in by_count.items():
        step = max(1, _TEST_ELEMENTS // max(1, count * len(points)))
        for lo in range(0, len(members), step):
            chosen = members[lo:lo + step]
            corners = np.array([footprints[i] for i in chosen], dtype=np.float64)  # (E, V, 2)
            middle = _unit_vectors(centres[chosen, 0], centres[chosen, 1])
            polygons = _gnomonic(_unit_vectors(corners[..., 0], corners[..., 1]), middle)
            xy = _gnomonic(points, middle)
            hit = _inside(polygons, xy)
            if radius_deg > 0:
                hit |= _segment_distance(polygons, xy) <= math.radians(radius_deg)
            hit &= np.isfinite(xy[..., 0])
            for i, row in zip(chosen, hit):
                hits[i] = row
    return hits


_TEST_ELEMENTS = 1 << 21  # exposures x points x vertices tested in one step (a few tens of MB of temporaries)


def footprint_of(exposure: Exposure) -> list[tuple[float, float]]:
    """The detector's border (local Box2D, ``POINTS_PER_SIDE`` points a side) in (ra, dec), deg."""
    w, h = exposure.width - 0.5, exposure.height - 0.5
    s = np.linspace(0.0, 1.0, POINTS_PER_SIDE, endpoint=False)
    x = np.concatenate([-0.5 + s * (w + 0.5), np.full_like(s, w), w - s * (w + 0.5), np.full_like(s, -0.5)])
    y = np.concatenate([np.full_like(s, -0.5), -0.5 + s * (h + 0.5), np.full_like(s, h), h - s * (h + 0.5)])
    ra, dec = exposure.wcs.all_pix2world(x, y, 0)
    return [(float(r), float(d)) for r, d in zip(ra, dec)]


def _centre_and_radius(footprint: list[tuple[float, float]]) -> tuple[float, float, float]:
    vectors = _unit_vectors(np.array([v[0] for v in footprint]), np.array([v[1] for v in footprint]))
    centre = vectors.mean(axis=0)
    centre /= np.linalg.norm(centre)
    radius = float(np.degrees(np.max(np.arccos(np.clip(vectors @ centre, -1, 1)))))
    ra = float(np.degrees(np.arctan2(centre[1], centre[0])) % 360.0)
    return ra, float(np.degrees(np.arcsin(np.clip(centre[2], -1, 1)))), radius


class ExposureIndex:
    """The index (see the module docstring); thread safe, one SQLite connection per call."""

    def __init__(self, path: str | Path, nside: int = DEFAULT_NSIDE):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.healpix = HEALPix(nside=nside, order="nested")
        self._lock = threading.Lock()  # one refresh at a time
        with self._session() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(exposures)")}
            if "science_summary" not in columns:  # an index made before summaries: add them, and re-read every file at the next refresh
                db.execute("ALTER TABLE exposures ADD COLUMN science_summary TEXT")
                db.execute("ALTER TABLE exposures ADD COLUMN difference_summary TEXT")
                db.execute("UPDATE exposures SET science_mtime_ns = -1")
            stored = db.execute("SELECT value FROM meta WHERE key = 'nside'").fetchone()
            if stored is None:
                db.execute("INSERT INTO meta VALUES ('nside', ?)", (str(nside),))
            elif int(stored[0]) != nside:
                db.execute("DELETE FROM exposures")  # filed under other pixels: rebuild
                db.execute("DELETE FROM sky")
                db.execute("UPDATE meta SET value = ? WHERE key = 'nside'", (str(nside),))
        self._keeper = keep_open(self.path)  # reads keep working on a full disk (see sqlite_wal.keep_open)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        db.execute("PRAGMA foreign_keys=ON")
        return db

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """A connection; SQLite's errors leave as :class:`IndexUnavailable`."""
        try:
            db = self._connect()
            try:
                yield db
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise IndexUnavailable(str(exc)) from exc

    # --- building -----------------------------------------------------------------------

    def refresh(self, roots: list[Path], template: str) -> RefreshReport:
        """Bring the index up to date with the files under ``roots`` (see the module docstring)."""
        with self._lock:
            return self._refresh([Path(r) for r in roots], template)

    def _refresh(self, roots: list[Path], template: str) -> RefreshReport:
        start = time.perf_counter()
        report = RefreshReport()
        glob_pattern, regex = template_pattern(template)
        found: dict[tuple[int, int], dict[str, tuple[Path, str]]] = {}
        outside: dict[str, str] = {}
        for root in roots:
            real_root = root.resolve()
            for path in root.glob(glob_pattern):
                relative = path.relative_to(root).as_posix()
                match = regex.match(relative)
                if not match or not path.is_file():
                    continue
                if not path.resolve().is_relative_to(real_root):  # the rule references follow (serving/repository.py)
                    outside[relative] = "leads out of the repository (through a symbolic link); not indexed"
                    continue
                try:
                    key = (int(match["visit"]), int(match["detector"]))
                except ValueError:
                    continue
                if match["datasetType"] in (SCIENCE, DIFFERENCE):
                    found.setdefault(key, {})[match["datasetType"]] = (path, relative)
        db = self._connect()
        try:
            known = {(row[0], row[1]): row for row in db.execute(
                "SELECT visit, detector, id, science_path, science_size, science_mtime_ns, difference_path, difference_size, "
                "difference_mtime_ns FROM exposures")}
            unreadable = {row[0]: (row[1], row[2], row[3]) for row in db.execute("SELECT path, reason, size, mtime_ns FROM unreadable")}
            db.execute("DELETE FROM unreadable")
            report.unreadable.update(outside)
            for key, files in sorted(found.items()):
                if SCIENCE not in files:
                    continue
                science, relative = files[SCIENCE]
                difference = files.get(DIFFERENCE, (None, None))[0]
                stamp = _stamp(science) + (_stamp(difference) if difference else (None, None))
                row = known.pop(key, None)
                previous = unreadable.get(str(science))
                if row is not None and (row[3], row[4], row[5], row[6], row[7], row[8]) == (
                        str(science), *stamp[:2], str(difference) if difference else None, *stamp[2:]):
                    report.unchanged += 1
                    continue
                if previous is not None and previous[1:] == stamp[:2]:  # still the same unreadable file
                    db.execute("INSERT INTO unreadable VALUES (?, ?, ?, ?)", (str(science), previous[0], *stamp[:2]))
                    report.unreadable[relative] = previous[0]
                    continue
                try:
                    record = self._read(key, science, difference, stamp)
                except (ExposureError, PsfError, OSError, ValueError) as exc:
                    reason = str(exc).replace(str(science), relative)
                    db.execute("INSERT INTO unreadable VALUES (?, ?, ?, ?)", (str(science), reason, *stamp[:2]))
                    report.unreadable[relative] = reason
                    if row is not None:
                        db.execute("DELETE FROM exposures WHERE id = ?", (row[2],))
                        report.removed += 1
                    continue
                db.execute("BEGIN")
                if row is not None:
                    db.execute("DELETE FROM exposures WHERE id = ?", (row[2],))
                self._insert(db, record)
                db.execute("COMMIT")
                if row is None:
                    report.added += 1
                else:
                    report.updated += 1
            for row in known.values():  # files gone
                db.execute("DELETE FROM exposures WHERE id = ?", (row[2],))
                report.removed += 1
        finally:
            db.close()
        report.seconds = time.perf_counter() - start
        return report

    def _read(self, key: tuple[int, int], science: Path, difference: Path | None, stamp: tuple) -> dict[str, Any]:
        difference_summary = None
        if difference is not None:
            with open_exposure(difference, memory_map=False) as exposure:
                difference_summary = summarize(exposure)
        with open_exposure(science, memory_map=False) as exposure:  # the server process maps no repository file
            footprint = footprint_of(exposure)
            fwhm = header_fwhm_pixels(exposure.header, str(science))
            return {
                "science_summary": summarize(exposure), "difference_summary": difference_summary,
                "visit": key[0], "detector": key[1], "band": exposure.band, "midpoint_mjd_tai": exposure.midpoint_mjd_tai,
                "exposure_time": _exposure_time(exposure), "footprint": footprint, "psf_fwhm_px": fwhm,
                "calibration": exposure.calibration_mean if math.isfinite(exposure.calibration_mean) else None,
                "science_path": str(science), "difference_path": str(difference) if difference else None, "stamp": stamp,
            }

    def add(self, records: list[dict[str, Any]]) -> None:
        """Insert exposures given as records (the fields of :meth:`_read`); for synthetic indexes."""
        db = self._connect()
        try:
            db.execute("BEGIN")
            for record in records:
                self._insert(db, record)
            db.execute("COMMIT")
        finally:
            db.close()

    def _insert(self, db: sqlite3.Connection, record: dict[str, Any]) -> None:
        ra, dec, radius = _centre_and_radius(record["footprint"])
        stamp = record.get("stamp") or (0, 0, None, None)
        cursor = db.execute(
            "INSERT INTO exposures (visit, detector, band, midpoint_mjd_tai, exposure_time, ra, dec, radius_deg, footprint, "
            "psf_fwhm_px, calibration, science_path, science_size, science_mtime_ns, difference_path, difference_size, "
            "difference_mtime_ns, science_summary, difference_summary) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record["visit"], record["detector"], record["band"], record["midpoint_mjd_tai"], record["exposure_time"], ra, dec,
             radius, json.dumps(record["footprint"]), record["psf_fwhm_px"], record["calibration"], record["science_path"],
             stamp[0], stamp[1], record["difference_path"], stamp[2], stamp[3],
             *(None if record.get(key) is None else json.dumps(record[key]) for key in ("science_summary", "difference_summary"))))
        pixels = self._pixels_near(ra, dec, radius)
        db.executemany("INSERT INTO sky VALUES (?, ?)", [(int(p), cursor.lastrowid) for p in pixels])

    def _pixels_near(self, ra: float, dec: float, radius_deg: float) -> np.ndarray:
        """HEALPix pixels any part of which lies within ``radius_deg`` of (ra, dec)."""
        pad = self.healpix.pixel_resolution.to_value(u.deg)  # a pixel's width: no pixel touching the circle is missed
        return self.healpix.cone_search_lonlat(Longitude(ra * u.deg), Latitude(dec * u.deg), (radius_deg + pad) * u.deg)

    # --- queries ------------------------------------------------------------------------

    def count(self) -> int:
        with self._session() as db:
            return db.execute("SELECT count(*) FROM exposures").fetchone()[0]

    def unreadable(self) -> dict[str, str]:
        """Files that could not be indexed, by path, with the reason."""
        with self._session() as db:
            return dict(db.execute("SELECT path, reason FROM unreadable"))

    def covering(self, ra: float, dec: float, *, radius_deg: float = 0.0, bands: list[str] | None = None,
                 mjd_min: float | None = None, mjd_max: float | None = None) -> list[IndexedExposure]:
        """Exposures whose footprint contains (ra, dec) (or comes within ``radius_deg`` of
        it), optionally of the given bands and midpoints in [mjd_min, mjd_max], by time."""
        found = self.covering_many(np.array([ra]), np.array([dec]), radius_deg=radius_deg, bands=bands, mjd_min=mjd_min, mjd_max=mjd_max)
        return [exposure for exposure, _ in found]

    def covering_many(self, ra: np.ndarray, dec: np.ndarray, *, radius_deg: float = 0.0, bands: list[str] | None = None,
                      mjd_min: float | None = None, mjd_max: float | None = None) -> list[tuple[IndexedExposure, np.ndarray]]:
        """For many positions: each covering exposure (by time) with the indices of the
        positions it covers."""
        ra, dec = np.asarray(ra, float), np.asarray(dec, float)
        if radius_deg > 0:
            pixels = np.unique(np.concatenate([self._pixels_near(r, d, radius_deg) for r, d in zip(ra, dec)] or [[]])).astype(int)
        else:
            pixels = np.unique(self.healpix.lonlat_to_healpix(Longitude(ra * u.deg), Latitude(dec * u.deg)))
        sql = ("SELECT DISTINCT e.visit, e.detector, e.band, e.midpoint_mjd_tai, e.exposure_time, e.ra, e.dec, e.footprint, "
               "e.psf_fwhm_px, e.calibration, e.science_path, e.difference_path, e.science_summary, e.difference_summary "
               "FROM sky s JOIN exposures e ON e.id = s.exposure "
               f"WHERE s.hpx IN ({','.join('?' * len(pixels))})")
        args: list[Any] = [int(p) for p in pixels]
        if bands:
            sql += f" AND e.band IN ({','.join('?' * len(bands))})"
            args += list(bands)
        if mjd_min is not None:
            sql += " AND e.midpoint_mjd_tai >= ?"
            args.append(mjd_min)
        if mjd_max is not None:
            sql += " AND e.midpoint_mjd_tai <= ?"
            args.append(mjd_max)
        sql += " ORDER BY e.midpoint_mjd_tai, e.visit, e.detector"
        with self._session() as db:
            rows = db.execute(sql, args).fetchall() if len(pixels) else []
        points = _unit_vectors(ra, dec)
        footprints = [[tuple(v) for v in json.loads(row[7])] for row in rows]
        hits = _covered(footprints, np.array([(row[5], row[6]) for row in rows], dtype=np.float64).reshape(-1, 2), points, radius_deg)
        out = []
        for row, footprint, hit in zip(rows, footprints, hits):
            if hit.any():
                exposure = IndexedExposure(visit=row[0], detector=row[1], band=row[2], midpoint_mjd_tai=row[3], exposure_time=row[4],
                                           ra=row[5], dec=row[6], footprint=footprint, psf_fwhm_px=row[8], calibration=row[9],
                                           science_path=row[10], difference_path=row[11], science_summary=row[12],
                                           difference_summary=row[13])
                out.append((exposure, np.flatnonzero(hit)))
        return out


def _stamp(path: Path) -> tuple[int, int]:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


def _exposure_time(exposure: Exposure) -> float | None:
    value = exposure.header.get("EXPTIME")
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
