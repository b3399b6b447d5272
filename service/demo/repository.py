"""The embedded demo repository: a few synthetic visits, written once into the data directory.

Layout (matches the default path template ``{visit}/{detector}/{datasetType}.fits``)::

    <root>/<visit>/<detector>/calexp.fits, difference.fits, diaObjects.parquet, truth.parquet

Made with :func:`forcedphot.demo.make_demo_visit`. A file lock makes concurrent server
processes wait for one writer; a marker file records that the repository is complete and
with which parameters, so a restart reuses it and a change of parameters rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
import fcntl
import json
from pathlib import Path
import shutil

from forcedphot.demo.visit import make_demo_visit

FIRST_VISIT = 2026112400042
DETECTOR = 94
MARKER = ".complete.json"


@dataclass(frozen=True)
class DemoVisitId:
    visit: int
    detector: int


def demo_visit_ids(visits: int) -> list[DemoVisitId]:
    """The data ids of the demo repository's visits."""
    return [DemoVisitId(FIRST_VISIT + i, DETECTOR) for i in range(visits)]


def ensure_demo_repository(root: Path, *, visits: int, size: int, objects: int) -> list[DemoVisitId]:
    """Create the demo repository at ``root`` unless it is already complete; return its data ids."""
    wanted = {"visits": visits, "size": size, "objects": objects, "first_visit": FIRST_VISIT, "detector": DETECTOR}
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = root / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            return demo_visit_ids(visits)
        building = root.parent / f"{root.name}.building"
        shutil.rmtree(building, ignore_errors=True)
        for seed, data_id in enumerate(demo_visit_ids(visits)):
            make_demo_visit(building / str(data_id.visit) / str(data_id.detector), size=size, n_objects=objects,
                            seed=seed, visit=data_id.visit, detector=data_id.detector)
        (building / MARKER).write_text(json.dumps(wanted))
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
    return demo_visit_ids(visits)
