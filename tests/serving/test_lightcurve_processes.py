"""Light curves in measurement processes: the same rows as in one thread, and each file
always measured by the same process (it keeps the file open for the next request)."""

import asyncio

import pandas as pd
import pyarrow as pa
import pytest

from forcedphot.demo.survey import make_demo_survey
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.objects import validate_objects
from forcedphot.serving.executor import LightCurveTask, MeasureService
from forcedphot.serving.exposure_cache import ExposureCache
from forcedphot.serving.index import ExposureIndex
from forcedphot.serving.lightcurves import plan_lightcurves

PROCESSES = 2


def _files_open_here() -> set[str]:
    """Run in a measurement process: the files its handle cache holds open."""
    from forcedphot.serving import executor

    return {exposure.path for exposure, _ in executor._PROCESS_SERVICE.handles._open.values()}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("survey")
    make_demo_survey(root, visits=12, size=160, n_objects=30, seed=4)
    index = ExposureIndex(tmp_path_factory.mktemp("index") / "index.sqlite")
    index.refresh([root], "{visit}/{detector}/{datasetType}.fits")
    objects = validate_objects(pd.read_parquet(root / "diaObjects.parquet"))
    return plan_lightcurves(index, objects, MeasurementConfig(backend="numpy"))


def _rows(table: pa.Table) -> pd.DataFrame:
    return table.to_pandas().drop(columns="timeProcessedMjdTai").reset_index(drop=True)


def test_each_file_is_measured_by_one_process_and_the_rows_equal_one_threads(task):
    files = {str(epoch.science.path) for epoch in task.epochs} | {str(e.difference.path) for e in task.epochs if e.difference}
    assert len(task.epochs) >= 8
    service = MeasureService(ExposureCache(0), select_backend("numpy"), threads=1, processes=PROCESSES)
    try:
        service.warm_up()
        # requests over other sets of the epochs (another time range, other objects) in between
        for epochs in (task.epochs, task.epochs[1:], task.epochs[::2], task.epochs[3:], task.epochs):
            asked = LightCurveTask(epochs, task.objects, task.config)
            alone = service.run_lightcurves(asked)
            served = asyncio.run(service.measure_lightcurves(asked))
            pd.testing.assert_frame_equal(_rows(served.table), _rows(alone.table))
            assert served.epochs == alone.epochs == len(epochs)
        held = [service._schedule(i, _files_open_here, (), None).result() for i in range(PROCESSES)]
    finally:
        service.close()
    assert all(held), "each process measures some of the files"
    assert set.union(*held) == files
    assert sum(len(h) for h in held) == len(files), "a file was opened by more than one process"
