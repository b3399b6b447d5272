"""The embedded demo repository: a synthetic survey, written once into the data directory.

Layout (matches the default path template ``{visit}/{detector}/{datasetType}.fits``)::

    <root>/<visit>/<detector>/calexp.fits, difference.fits, diaObjects.parquet
    <root>/diaObjects.parquet, truth.parquet, objects.parquet

The files are registered in a Butler repository at ``<root>/butler`` (collection
:data:`~forcedphot.demo.butler.RUN`, dataset types ``visit_image`` and ``difference_image``),
through which the service serves them, and its DiaObjects are stored in an APDB at
``<root>/apdb/apdb.yaml`` (SQLite): the demo takes a Rubin deployment's code paths.

Made with :func:`forcedphot.demo.survey.make_demo_survey`. A file lock makes concurrent server
processes wait for one writer; a marker file records that the repository is complete and
with which parameters, so a restart reuses it and a change of parameters rebuilds it.
"""

from __future__ import annotations

from dataclasses import dataclass
import fcntl
import json
from pathlib import Path
import shutil

from forcedphot.demo.survey import DETECTOR, FIRST_VISIT, make_demo_survey

MARKER = ".complete.json"
BUTLER = "butler"  # the demo's Butler repository, inside its root
APDB = "apdb/apdb.yaml"  # the demo's APDB configuration, inside its root
DIA_SOURCE_NJY = 1000.0  # a visit counts as a DiaSource of an object when |difference flux| exceeds this (about 24 mag AB)


@dataclass(frozen=True)
class DemoVisitId:
    visit: int
    detector: int


def demo_visit_ids(visits: int) -> list[DemoVisitId]:
    """The data ids of the demo repository's visits."""
    return [DemoVisitId(FIRST_VISIT + i, DETECTOR) for i in range(visits)]


def ensure_demo_repository(root: Path, *, visits: int, size: int, objects: int) -> list[DemoVisitId]:
    """Create the demo repository at ``root`` unless it is already complete; return its data ids."""
    wanted = {"visits": visits, "size": size, "objects": objects, "first_visit": FIRST_VISIT, "detector": DETECTOR, "kind": "survey+butler+apdb"}
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = root / MARKER
        if marker.is_file() and json.loads(marker.read_text()) == wanted:
            return demo_visit_ids(visits)

        building = root.parent / f"{root.name}.building"
        shutil.rmtree(building, ignore_errors=True)
        make_demo_survey(building, visits=visits, size=size, n_objects=objects)
        shutil.rmtree(root, ignore_errors=True)
        building.rename(root)
        from forcedphot.demo.butler import Registered, register_exposures  # loads the Butler: only when one is written

        ids = demo_visit_ids(visits)
        folder = "{visit}/{detector}"
        register_exposures(root / BUTLER, [Registered(i.visit, i.detector, root / folder.format(visit=i.visit, detector=i.detector) / "calexp.fits",
                                                      root / folder.format(visit=i.visit, detector=i.detector) / "difference.fits")
                                           for i in ids])
        _write_apdb(root)
        (root / MARKER).write_text(json.dumps(wanted))  # last: only a repository with its Butler and APDB is complete
    return demo_visit_ids(visits)


def _write_apdb(root: Path) -> None:
    """The survey's DiaObjects in an APDB, ``nDiaSources`` counted from the truth: the visits
    on which the object's difference flux exceeds :data:`DIA_SOURCE_NJY` (at least 1: every
    DiaObject was made from a DiaSource)."""
    import pandas as pd

    from forcedphot.demo.apdb import create_apdb, store_dia_objects

    truth = pd.read_parquet(root / "truth.parquet")
    seen = truth[truth["on_detector"] & (truth["difference_flux_nJy"].abs() > DIA_SOURCE_NJY)].groupby("diaObjectId").size()
    objects = pd.read_parquet(root / "diaObjects.parquet")
    objects["nDiaSources"] = objects["diaObjectId"].map(seen).fillna(0).astype("int32").clip(lower=1)
    config = create_apdb(root / APDB)
    store_dia_objects(config, objects, float(truth["midpointMjdTai"].min()))
