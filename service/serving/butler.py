"""A Butler repository (``lsst-daf-butler``) as the source of exposures and of their coverage.

A reference ``{"datasetType": "visit_image", "instrument": "LSSTCam", "visit": V,
"detector": D}`` is resolved by the registry (``find_dataset`` in the configured
collections, then ``getURI``); the file is read by this package's own reader, so a
repository written by the Rubin pipelines works without obs_base (its datastore records
name ``lsst.obs.base...FitsExposureFormatter``, which is never imported: only the file's
location is asked for). ``calexp`` and ``difference`` stand for the configured science and
difference dataset types (default Rubin's current ``visit_image`` and ``difference_image``),
so requests written for a plain repository work unchanged. ``instrument`` may be left out
when the repository has one.

Coverage comes from the registry, not from a scan of files: the ``visit_detector_region``
region of each (visit, detector), the ``visit`` record's timespan (its TAI midpoint) and
its band, in one query per request (:meth:`ButlerSource.covering_many`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
import threading
import time
from typing import Any

from lsst.daf.butler import Butler
from lsst.daf.butler.registry import MissingCollectionError, MissingDatasetTypeError
from lsst.resources import ResourcePath
import lsst.sphgeom as sphgeom
import numpy as np

from forcedphot.photometry.exposure import DEFAULT_LIMITS, ExposureError, ExposureLimits
from forcedphot.photometry.fits_preflight import DeclaredTooMuch
from forcedphot.photometry.partial_copy import SUFFIX, PartialCopy, sidecar
from forcedphot.serving.index import DIFFERENCE, SCIENCE, IndexedExposure, RefreshReport
from forcedphot.serving.repository import (DEFAULT_PATH_TEMPLATE, BadReference, DataIdRef, ExposureRef, Repository, RepositoryError,
                                           UnknownDatasetType, UnknownReference, UriRef, describe)

#: how long a resolved data id is reused (a registry query is ~5 ms, two per request): a
#: dataset added or removed in the collections is seen after at most this long
RESOLVED_SECONDS = 30.0
RESOLVED_ENTRIES = 4096
DEFAULT_REMOTE_CACHE_BYTES = 8 * 2**30  # local copies of files in object storage
DEFAULT_SCIENCE_TYPE = "visit_image"
DEFAULT_DIFFERENCE_TYPE = "difference_image"


class ButlerUnavailable(RepositoryError):
    """The repository cannot be opened or queried now; the message says why (no path)."""

    status = 503
    slug = "butler-unavailable"


class AmbiguousReference(RepositoryError):
    """A data id that leaves a required dimension open (e.g. the instrument of a repository of several)."""

    status = 422
    slug = "ambiguous-reference"


class ButlerSource:
    """Exposures and their coverage from one Butler repository, opened once.

    Parameters
    ----------
    repository : str
        Its root (a folder with ``butler.yaml``) or the URI of its configuration.
    collections : list[str]
        Searched in order for every dataset.
    science_type, difference_type : str
        The dataset types measured as the science and the difference image.
    table_roots : list[Path]
        Folders whose files ``{"uri": ...}`` references may name (object tables, PSF files);
        none: such references are refused.
    remote : RemoteFiles, optional
        Where files in object storage are copied to be read; none: they are refused (503).
    """

    def __init__(self, repository: str, collections: list[str], science_type: str = DEFAULT_SCIENCE_TYPE,
                 difference_type: str = DEFAULT_DIFFERENCE_TYPE, table_roots: list[Path] | None = None,
                 remote: RemoteFiles | None = None):
        self.remote = remote
        self.roots = [Path(root) for root in table_roots or []]
        self._files = Repository(self.roots, DEFAULT_PATH_TEMPLATE) if self.roots else None
        self.collections = list(collections)
        self.types = {SCIENCE: science_type, DIFFERENCE: difference_type}
        self._lock = threading.RLock()  # a Butler is not safe to share between threads: its calls take turns (each is milliseconds)
        self._resolved: dict[tuple, tuple[Path, float]] = {}  # data id -> (file, monotonic expiry)
        try:
            self.butler = Butler.from_config(repository, collections=self.collections, writeable=False)
        except Exception as exc:  # daf_butler raises many kinds for a missing or damaged repository
            raise ButlerUnavailable(f"the Butler repository cannot be opened ({type(exc).__name__})") from None
        known = set(self.butler.collections.query("*"))
        missing = [c for c in self.collections if c not in known]
        if missing:
            raise ButlerUnavailable(f"the Butler repository has no collection {', '.join(map(repr, missing))}")
        instruments = [record.name for record in self.butler.query_dimension_records("instrument", explain=False)]
        self.instrument = instruments[0] if len(instruments) == 1 else None

    def readable(self) -> list[str]:
        """Problems that stop the repository from being served (empty when all is well)."""
        return self._files.readable() if self._files is not None else []

    def dataset_type(self, name: str) -> str:
        """The repository's dataset type for a reference's ``datasetType`` ("calexp" and
        "difference" stand for the configured science and difference types)."""
        return self.types.get(name, name)

    def resolve(self, ref: ExposureRef) -> Path:
        """The local file a data id names in the collections; raises :class:`RepositoryError`."""
        if isinstance(ref, UriRef):
            if self._files is not None:
                return self._files.resolve(ref)
            raise BadReference(f"{ref.uri!r}: a Butler repository is addressed by data ids "
                               '({"datasetType", "instrument", "visit", "detector"}), not by file names')
        dataset_type = self.dataset_type(ref.datasetType)
        instrument = ref.instrument or self.instrument
        if instrument is None:
            raise AmbiguousReference(f"{describe(ref)}: the repository has several instruments; give \"instrument\"")
        key = (dataset_type, instrument, ref.visit, ref.detector)
        known = self._resolved.get(key)
        if known is not None and known[1] > time.monotonic() and known[0].is_file():
            return known[0]
        path = self._find(ref, dataset_type, instrument)
        with self._lock:
            self._resolved[key] = (path, time.monotonic() + RESOLVED_SECONDS)
            while len(self._resolved) > RESOLVED_ENTRIES:
                self._resolved.pop(next(iter(self._resolved)))
        return path

    def _find(self, ref: DataIdRef, dataset_type: str, instrument: str) -> Path:
        """The registry's answer for one data id (:meth:`resolve` keeps it a while)."""
        try:
            with self._lock:
                found = self.butler.find_dataset(dataset_type, instrument=instrument, visit=ref.visit, detector=ref.detector,
                                                 collections=self.collections)
                uri = self.butler.getURI(found) if found is not None else None
        except MissingDatasetTypeError:
            raise UnknownDatasetType(f"{describe(ref)}: the repository has no dataset type {dataset_type!r}") from None
        except MissingCollectionError as exc:
            raise ButlerUnavailable(f"a collection is missing from the Butler repository: {exc}") from None
        except LookupError as exc:  # an unknown instrument, visit or detector value
            raise UnknownReference(f"{describe(ref)}: {exc}") from None
        if found is None:
            raise UnknownReference(f"no {dataset_type} for {describe(ref)} in the collections {', '.join(self.collections)}")
        return _local_path(uri, describe(ref), self.remote)

    # --- coverage (the exposure index's interface) -------------------------------------

    def refresh(self, roots: list[Path], template: str) -> RefreshReport:
        """Nothing to do: the registry is the index."""
        return RefreshReport()

    def count(self) -> int:
        """Science datasets in the collections."""
        with self._lock:
            return len(self.butler.query_datasets(self.types[SCIENCE], collections=self.collections, explain=False, limit=None))

    def unreadable(self) -> dict[str, str]:
        return {}

    def covering(self, ra: float, dec: float, *, radius_deg: float = 0.0, bands: list[str] | None = None,
                 mjd_min: float | None = None, mjd_max: float | None = None) -> list[IndexedExposure]:
        """Exposures whose region holds (ra, dec), or comes within ``radius_deg``; by time."""
        found = self.covering_many(np.array([ra]), np.array([dec]), radius_deg=radius_deg, bands=bands, mjd_min=mjd_min, mjd_max=mjd_max)
        return [exposure for exposure, _ in found]

    def covering_many(self, ra: np.ndarray, dec: np.ndarray, *, radius_deg: float = 0.0, bands: list[str] | None = None,
                      mjd_min: float | None = None, mjd_max: float | None = None) -> list[tuple[IndexedExposure, np.ndarray]]:
        """For positions (deg), every science exposure whose ``visit_detector_region`` holds
        at least one of them (within ``radius_deg``), with the indices of those positions;
        in time order. One registry query over a circle around all the positions."""
        ra, dec = np.asarray(ra, np.float64), np.asarray(dec, np.float64)
        if ra.size == 0:
            return []
        points = [sphgeom.UnitVector3d(sphgeom.LonLat.fromDegrees(float(r), float(d))) for r, d in zip(ra, dec)]
        centre = sphgeom.UnitVector3d(sum(p.x() for p in points), sum(p.y() for p in points), sum(p.z() for p in points))
        reach = max(_separation_deg(centre, p) for p in points)
        circle = sphgeom.Circle(centre, sphgeom.Angle.fromDegrees(min(180.0, reach + radius_deg + 1e-6)))
        with self._lock:
            science = self._query(self.types[SCIENCE], circle)
            differences = {_key(ref): ref for ref in self._query(self.types[DIFFERENCE], circle, optional=True)}
            uris = {ref.id: uri.primaryURI for ref, uri in self.butler.get_many_uris([*science, *differences.values()]).items()}
        lon, lat = np.radians(ra), np.radians(dec)
        found = []
        for ref in science:
            records = ref.dataId.records
            region = records["visit_detector_region"].region
            if radius_deg > 0:
                rows = np.flatnonzero([not (region.relate(sphgeom.Circle(p, sphgeom.Angle.fromDegrees(radius_deg))) & sphgeom.DISJOINT)
                                       for p in points])
            else:
                rows = np.flatnonzero(region.contains(lon, lat))
            if rows.size == 0:
                continue
            difference = differences.get(_key(ref))
            exposure = self._exposure(ref, region, uris[ref.id], uris[difference.id] if difference is not None else None)
            if bands and exposure.band not in bands:
                continue
            midpoint = exposure.midpoint_mjd_tai
            if (mjd_min is not None or mjd_max is not None) and midpoint is None:
                continue
            if (mjd_min is not None and midpoint < mjd_min) or (mjd_max is not None and midpoint > mjd_max):
                continue
            found.append((exposure, rows))
        found.sort(key=lambda item: (item[0].midpoint_mjd_tai is None, item[0].midpoint_mjd_tai or 0.0, item[0].visit, item[0].detector))
        return found

    def _query(self, dataset_type: str, region: sphgeom.Region, optional: bool = False) -> list[Any]:
        try:
            return self.butler.query_datasets(dataset_type, collections=self.collections, with_dimension_records=True, explain=False,
                                              where="visit_detector_region.region OVERLAPS search", bind={"search": region})
        except MissingDatasetTypeError:
            if optional:
                return []
            raise UnknownDatasetType(f"the repository has no dataset type {dataset_type!r}") from None

    def _exposure(self, ref: Any, region: sphgeom.Region, science_uri: Any, difference_uri: Any | None) -> IndexedExposure:
        data_id, records = ref.dataId, ref.dataId.records
        visit = records["visit"]
        midpoint = None
        if visit.timespan is not None and visit.timespan.begin is not None and visit.timespan.end is not None:
            begin, end = visit.timespan.begin.tai, visit.timespan.end.tai
            midpoint = float((begin + (end - begin) / 2).mjd)
        vertices = [sphgeom.LonLat(v) for v in region.getVertices()] if hasattr(region, "getVertices") else []
        footprint = [(v.getLon().asDegrees(), v.getLat().asDegrees()) for v in vertices]
        centre = sphgeom.LonLat(region.getCentroid()) if hasattr(region, "getCentroid") else sphgeom.LonLat(region.getBoundingCircle().getCenter())
        label = describe(DataIdRef(visit=data_id["visit"], detector=data_id["detector"], datasetType=SCIENCE,
                                          instrument=data_id["instrument"]))
        return IndexedExposure(
            visit=int(data_id["visit"]), detector=int(data_id["detector"]), band=_band(data_id), midpoint_mjd_tai=midpoint,
            exposure_time=visit.exposure_time, ra=centre.getLon().asDegrees(), dec=centre.getLat().asDegrees(), footprint=footprint,
            psf_fwhm_px=None, calibration=None, science_path=str(_local_path(science_uri, label, self.remote)),
            difference_path=str(_local_path(difference_uri, label, self.remote)) if difference_uri is not None else None)


def _band(data_id: Any) -> str | None:
    try:
        return str(data_id["band"])
    except (KeyError, LookupError):
        return None


def _key(ref: Any) -> tuple:
    return ref.dataId["instrument"], ref.dataId["visit"], ref.dataId["detector"]


def _separation_deg(a: sphgeom.UnitVector3d, b: sphgeom.UnitVector3d) -> float:
    return sphgeom.NormalizedAngle(a, b).asDegrees()


class RemoteFiles:
    """Local copies of datastore files kept in object storage (``s3://``, ``gs://``,
    ``https://``: whatever ``lsst-resources`` reads), as partial copies
    (:mod:`forcedphot.photometry.partial_copy`): a copy is made with the file's headers and
    tables, and the pixel rows (or compressed tiles) a request reads are fetched when it
    reads them, so a few objects on a large exposure fetch a few percent of it. Copies
    live in ``folder``; the least recently used are removed beyond ``max_bytes`` of
    fetched data. ``limits`` bound what a file may declare, checked before anything beyond
    its headers is fetched.
    """

    def __init__(self, folder: Path, max_bytes: int, limits: ExposureLimits = DEFAULT_LIMITS):
        self.folder, self.max_bytes, self.limits = Path(folder), int(max_bytes), limits
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._making: dict[Path, threading.Lock] = {}

    def local(self, uri: Any) -> Path:
        """The local copy of ``uri`` (made now, with its headers, if it is not here)."""
        path = self.folder / f"{hashlib.sha256(str(uri).encode()).hexdigest()[:32]}{uri.getExtension() or '.fits'}"
        with self._lock:
            making = self._making.setdefault(path, threading.Lock())
        with making:  # one thread makes a copy; the others wait for it
            if path.is_file():
                os.utime(sidecar(path))  # recently used
                return path
            PartialCopy.create(path, uri, self.limits.max_hdus, self.limits.max_pixels)
        self._evict(keep=path)
        return path

    def _evict(self, keep: Path) -> None:
        """Remove the least recently used copies (data first, so that no copy is seen
        without its sidecar) until the fetched bytes are within ``max_bytes``."""
        with self._lock:
            used = []
            for blocks in self.folder.glob(f"*{SUFFIX}"):
                copy = blocks.with_name(blocks.name.removesuffix(SUFFIX))
                try:
                    used.append((blocks.stat().st_mtime, copy.stat().st_blocks * 512, copy, blocks))
                except FileNotFoundError:
                    continue  # being removed, or a sidecar left by an interrupted removal
            total = sum(size for _, size, _, _ in used)
            for _, size, copy, blocks in sorted(used, key=lambda entry: entry[0]):
                if total <= self.max_bytes:
                    break
                if copy != keep:
                    total -= size
                    copy.unlink(missing_ok=True)
                    blocks.unlink(missing_ok=True)


def _local_path(uri: Any, label: str, remote: RemoteFiles | None) -> Path:
    """The local file behind a datastore URI: the file itself, or a local copy of a remote one."""
    if uri.scheme in ("file", ""):
        return Path(uri.ospath)
    if remote is None:
        raise ButlerUnavailable(f"{label}: the file is in {uri.scheme}:// storage and this server keeps no local copies")
    try:
        return remote.local(uri)
    except DeclaredTooMuch as exc:
        raise ExposureError(f"{label}: {exc}") from None
    except Exception as exc:  # lsst-resources raises per scheme: botocore errors, OSError, FileNotFoundError ...
        raise ButlerUnavailable(f"{label}: the file cannot be fetched from {uri.scheme}:// storage ({type(exc).__name__})") from None
