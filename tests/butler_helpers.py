"""Real Butler repositories for the tests (``lsst-daf-butler``, no LSST stack): files under
names no path template could guess, datastore records that name obs_base's formatter as a
Rubin-written repository's do, and a registry with regions and timespans."""

from pathlib import Path
import shutil
import sqlite3
import uuid

from forcedphot.demo.butler import INSTRUMENT, Registered, register_exposures  # noqa: F401  (INSTRUMENT: for the tests)

RUN = "LSSTCam/runs/forced-test"
OBS_BASE_FORMATTER = "lsst.obs.base.formatters.fitsExposure.FitsExposureFormatter"


def make_butler_repository(root: Path, exposures: list[tuple[int, int, Path, Path | None]], *, registry_url: str | None = None) -> Path:
    """A Butler repository at ``root`` holding, for each ``(visit, detector, science file,
    difference file or None)``, a ``visit_image`` (and ``difference_image``) copied under an
    unguessable name, with the visit's timespan, band and each detector's region; on SQLite
    its datastore records then name obs_base's formatter (not installed here)."""
    store = root.parent / f"{root.name}-files"
    store.mkdir(parents=True, exist_ok=True)

    def hidden(path: Path | None) -> Path | None:
        if path is None:
            return None
        copy = store / f"{uuid.uuid4().hex}.fits"
        shutil.copy(path, copy)
        return copy

    registry = {"db": registry_url, "namespace": f"butler_{uuid.uuid4().hex[:8]}"} if registry_url else None
    register_exposures(root, [Registered(v, d, hidden(s), hidden(f)) for v, d, s, f in exposures], run=RUN, registry=registry)
    if registry_url is None:
        with sqlite3.connect(root / "gen3.sqlite3") as db:
            db.execute("UPDATE file_datastore_records SET formatter = ?", (OBS_BASE_FORMATTER,))
    return root
