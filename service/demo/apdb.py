"""Write DiaObjects into a new APDB, as Rubin's alert pipeline leaves them.

For the embedded demo (its DiaObjects held in a real SQLite APDB, so that ``"objects":
{"apdb": {}}`` and the dashboard's diaObjectId search work out of the box) and for tests.
The schema is sdm_schemas' ``apdb.yaml`` as installed; the NOT NULL columns a caller does not
give (``validityStartMjdTai``, the per-band ``*_psfFluxNdata`` counts) are filled with 0 and
``pixelId`` by the APDB itself.
"""

from __future__ import annotations

from pathlib import Path

import astropy.time
import numpy as np
import pandas as pd

CONFIG = "apdb.yaml"


def create_apdb(config: Path, db_url: str | None = None) -> Path:
    """A new, empty APDB: its database at ``db_url`` (default: SQLite beside ``config``) and
    its configuration file written to ``config``; returns ``config``."""
    from lsst.dax.apdb.sql import ApdbSql

    config.parent.mkdir(parents=True, exist_ok=True)
    db_url = db_url or f"sqlite:///{(config.parent / 'apdb.sqlite3').resolve()}"
    ApdbSql.init_database(db_url=db_url).save(str(config))
    return config


def store_dia_objects(config: Path, objects: pd.DataFrame, mjd_tai: float) -> None:
    """Store DiaObjects (``diaObjectId``, ``ra``, ``dec``, ``nDiaSources``, any other
    apdb.yaml columns) valid from ``mjd_tai`` (MJD, TAI) in the APDB of ``config``."""
    from lsst.dax.apdb import Apdb, ApdbTables

    apdb = Apdb.from_uri(str(config))
    rows = objects.copy()
    rows["validityStartMjdTai"] = mjd_tai
    for column in apdb.tableDef(ApdbTables.DiaObject).columns:
        if not column.nullable and column.name not in rows and column.name != "pixelId":
            rows[column.name] = np.zeros(len(rows), np.int32 if column.datatype.value == "int" else np.float64)
    apdb.store(astropy.time.Time(mjd_tai, format="mjd", scale="tai"), rows)
