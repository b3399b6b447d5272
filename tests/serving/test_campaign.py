"""Campaigns: one task per exposure on a Dask LocalCluster (2 workers) or a local process
pool give the light-curve catalog measured in one process; failed tasks are retried, and
those out of retries, like unreadable exposures, are named, never dropped."""

from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pytest

from forcedphot.demo.survey import make_demo_survey
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.lightcurve_products import with_epoch_columns
from forcedphot.photometry.objects import read_objects
from forcedphot.serving.campaign import MANIFEST, finished_count, measure_epoch, run_campaign
from forcedphot.serving.executor import MeasureService
from forcedphot.serving.exposure_cache import ExposureCache
from forcedphot.serving.index import ExposureIndex
from forcedphot.serving.lightcurves import plan_lightcurves
from forcedphot.serving.repository import DEFAULT_PATH_TEMPLATE

KEYS = ["diaObjectId", "visit"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("campaign-survey")
    make_demo_survey(folder, visits=6, size=256, n_objects=60, seed=11)
    return folder


@pytest.fixture(scope="module")
def plan(root):
    index = ExposureIndex(root / "index.sqlite")
    index.refresh([root], DEFAULT_PATH_TEMPLATE)
    objects = read_objects(root / "diaObjects.parquet")
    return plan_lightcurves(index, objects, MeasurementConfig(backend="numpy"), psf_fwhm=3.5)


@pytest.fixture(scope="module")
def in_one_process(plan) -> pd.DataFrame:
    service = MeasureService(ExposureCache(0), select_backend("numpy"), threads=1)
    try:
        return _sorted(with_epoch_columns(service.run_lightcurves(plan).table).to_pandas())  # a campaign's rows have them too
    finally:
        service.close()


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=["timeProcessedMjdTai"]).sort_values(KEYS).reset_index(drop=True)


def _dataset(folder: Path) -> pd.DataFrame:
    return _sorted(ds.dataset(folder, format="parquet").to_table().to_pandas())


@pytest.mark.parametrize("where", ["dask", "local"])
def test_a_campaign_equals_the_light_curves_measured_in_one_process(plan, in_one_process, tmp_path, where):
    seen = []
    report = run_campaign(plan, tmp_path / "out", where=where, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert report.errors == [] and report.epochs == len(plan.epochs) == 6
    assert report.partitions == 6 and report.rows == len(in_one_process) > 100
    assert seen[-1] == (6, 6) and len(seen) == 6
    assert (where == "dask") == report.where.startswith("dask LocalCluster, 2 workers")
    pd.testing.assert_frame_equal(_dataset(tmp_path / "out"), in_one_process)
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == MANIFEST


def fails_once_on_task_1(job):
    """Raises the first time task 1 runs (a marker beside its partition remembers)."""
    marker = Path(job.path).parent.with_name(Path(job.path).name + ".tried")
    if job.number == 1 and not marker.exists():
        marker.touch()
        raise OSError("the worker's disk hiccupped")
    return measure_epoch(job)


def always_fails_on_task_2(job):
    if job.number == 2:
        raise RuntimeError("this exposure's task always fails")
    return measure_epoch(job)


@pytest.mark.parametrize("where", ["dask", "local"])
def test_failed_tasks_are_retried_and_those_out_of_retries_are_named(plan, in_one_process, tmp_path, where):
    retried = run_campaign(plan, tmp_path / "retried", where=where, workers=2, retries=1, measure=fails_once_on_task_1)
    assert retried.errors == [] and (tmp_path / "part-000001.parquet.tried").exists()
    pd.testing.assert_frame_equal(_dataset(tmp_path / "retried"), in_one_process)

    failing = run_campaign(plan, tmp_path / "failing", where=where, workers=2, retries=1, measure=always_fails_on_task_2)
    (error,) = failing.errors
    assert error["exposure"] == (plan.epochs[2].difference or plan.epochs[2].science).label
    assert "task 2 failed 2 times: RuntimeError: this exposure's task always fails" in error["detail"]
    assert failing.partitions == 5 and not (tmp_path / "failing" / "part-000002.parquet").exists()
    assert '"errors": [' in (tmp_path / "failing" / MANIFEST).read_text() and "task 2 failed" in (tmp_path / "failing" / MANIFEST).read_text()


def test_an_unreadable_exposure_is_reported_and_the_rest_measured(plan, tmp_path):
    from dataclasses import replace

    from forcedphot.serving.executor import EpochInput, ExposureInput

    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"not a FITS file" * 100)
    first = plan.epochs[0]
    epochs = [EpochInput(ExposureInput(broken, "visit 0 (damaged)"), None, first.rows), *plan.epochs[1:]]
    report = run_campaign(replace(plan, epochs=epochs), tmp_path / "out", where="local", workers=2)
    assert [e["exposure"] for e in report.errors] == ["visit 0 (damaged)"] and report.partitions == 5


def test_a_campaign_never_writes_into_a_folder_holding_files(plan, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        run_campaign(plan, tmp_path / "out", where="local")


def test_the_campaign_command_writes_the_dataset(root, in_one_process, tmp_path, capsys):
    from forcedphot.cli import main

    code = main(["campaign", str(root), "--objects", str(root / "diaObjects.parquet"), "-o", str(tmp_path / "lc"),
                 "--where", "local", "--workers", "2", "--backend", "numpy", "--psf-fwhm", "3.5"])
    assert code == 0
    pd.testing.assert_frame_equal(_dataset(tmp_path / "lc"), in_one_process)
    out = capsys.readouterr().out
    assert f"{len(in_one_process)} measurements in 6 partitions" in out and "local, 2 processes" in out
    # issue 24: a campaign's bins, beside its partitions (which dataset readers still read alone)
    code = main(["campaign", str(root), "--objects", str(root / "diaObjects.parquet"), "-o", str(tmp_path / "binned"),
                 "--where", "local", "--workers", "2", "--backend", "numpy", "--psf-fwhm", "3.5", "--bin", "night",
                 "--baseline-mjd-max", "70000", "--baseline-min-epochs", "2"])
    assert code == 0
    pd.testing.assert_frame_equal(_dataset(tmp_path / "binned"), in_one_process)
    bins = pd.read_parquet(tmp_path / "binned" / "_lightcurves.parquet")
    good = in_one_process[in_one_process["epochStatus"] == 0]
    assert len(bins) == good.groupby(["diaObjectId", "band", (good["midpointMjdTai"] - 0.5) // 1]).ngroups
    assert bins["psfFluxCorrected"].notna().any() and f"{len(bins)} bins ->" in capsys.readouterr().out


class Interrupt:
    """A progress callback that presses Ctrl-C once ``after`` exposures are done."""

    def __init__(self, after: int):
        self.after = after

    def __call__(self, done: int, total: int) -> None:
        if done >= self.after:
            raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["dask", "local"])
def test_an_interrupted_campaign_resumes_measuring_only_what_is_left(plan, in_one_process, tmp_path, where):
    """Issue 23, item 5: finished exposures are kept, the same campaign finishes them, and
    the dataset equals an uninterrupted one."""
    with pytest.raises(KeyboardInterrupt):
        run_campaign(plan, tmp_path / "out", where=where, workers=2, progress=Interrupt(after=2))
    kept = finished_count(tmp_path / "out")
    assert 2 <= kept < 6 and not (tmp_path / "out" / MANIFEST).exists()
    seen = []
    report = run_campaign(plan, tmp_path / "out", where=where, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert report.resumed == kept and report.errors == [] and report.partitions == 6 and seen[0] == (kept + 1, 6) and seen[-1] == (6, 6)
    pd.testing.assert_frame_equal(_dataset(tmp_path / "out"), in_one_process)
    assert not list((tmp_path / "out").rglob(".*.partial"))


def test_a_campaign_folder_takes_only_its_own_campaign(plan, tmp_path):
    from dataclasses import replace

    with pytest.raises(KeyboardInterrupt):
        run_campaign(plan, tmp_path / "out", where="local", workers=2, progress=Interrupt(after=1))
    other = replace(plan, psf_fwhm=4.0)
    with pytest.raises(ValueError, match="holds an interrupted campaign of other objects, exposures or options"):
        run_campaign(other, tmp_path / "out", where="local")
    run_campaign(plan, tmp_path / "out", where="local", workers=2)
    with pytest.raises(ValueError, match="holds a finished campaign; give a new folder"):
        run_campaign(plan, tmp_path / "out", where="local")


def test_ctrl_c_in_the_campaign_command_says_what_is_kept(root, tmp_path, capsys, monkeypatch):
    import forcedphot.serving.campaign as campaign
    from forcedphot.cli import main

    def interrupted(task, output, **options):
        return run_campaign(task, output, **{**options, "progress": Interrupt(after=3)})

    monkeypatch.setattr(campaign, "run_campaign", interrupted)
    code = main(["campaign", str(root), "--objects", str(root / "diaObjects.parquet"), "-o", str(tmp_path / "lc"),
                 "--where", "local", "--workers", "2", "--backend", "numpy", "--psf-fwhm", "3.5"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err and "nothing was written" not in err
    assert f"interrupted; {finished_count(tmp_path / 'lc')} of 6 exposures finished and kept in {tmp_path / 'lc'}; the same command resumes" in err
