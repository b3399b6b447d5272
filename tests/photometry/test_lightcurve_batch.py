"""Light curves measured as one batch (the cutouts of every epoch through one kernel call
per cutout size) give the rows that measuring each epoch on its own gives, on every
kernel path, with mixed PSF models and with batches small enough to need several calls."""

from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from forcedphot.demo.survey import make_demo_survey
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.exposure import ExposureError, open_exposure
from forcedphot.photometry.lightcurve import Epoch, measure_epochs, sort_lightcurves
from forcedphot.photometry.measure import measure
from forcedphot.photometry.objects import ObjectArrays, validate_objects
from forcedphot.photometry.psf_models import GaussianPsf, SampledGaussianPsf
from forcedphot.photometry.runner import run_directly

NOW = "timeProcessedMjdTai"


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch-survey")
    make_demo_survey(root, visits=8, size=160, n_objects=40, seed=5)
    objects = validate_objects(pd.read_parquet(root / "diaObjects.parquet"))
    visits = sorted(p.parent for p in root.glob("*/*/calexp.fits"))
    return objects, visits


def psf_of(i: int, science):
    """Mixed models: pixel-integrated Gaussians of each visit's FWHM, and every third epoch
    LSST's sampled Gaussian (another class: its stamps are made on their own)."""
    fwhm = float(science.header["PSF_FWHM"])
    if i % 3 == 2:
        return SampledGaussianPsf(fwhm / 2.3548, 2 * int(np.ceil(2.5 * fwhm)) + 1, 2 * int(np.ceil(2.5 * fwhm)) + 1)
    return GaussianPsf(fwhm)


def epochs(objects, visits: list[Path]) -> list[Epoch]:
    arrays = ObjectArrays.of(objects)

    def one(i: int, folder: Path) -> Epoch:
        @contextmanager
        def files():
            with ExitStack() as stack:
                yield (stack.enter_context(open_exposure(folder / "calexp.fits")),
                       stack.enter_context(open_exposure(folder / "difference.fits")))

        return Epoch(label=folder.name, open=files, objects=arrays, psf=lambda science, difference: (psf_of(i, science),) * 2)

    return [one(i, folder) for i, folder in enumerate(visits)]


def one_at_a_time(objects, visits, config):
    tables = []
    for i, folder in enumerate(visits):
        with open_exposure(folder / "calexp.fits") as science, open_exposure(folder / "difference.fits") as difference:
            psf = psf_of(i, science)
            tables.append(measure(science, objects, psf, config, difference=difference, science_psf=psf).table)
    return sort_lightcurves(pa.concat_tables(tables))


@pytest.mark.parametrize("backend, cpu_kernels, measurements", [("numpy", "fused", "all"), ("numpy", "array-api", "all"),
                                                                  ("stand-in", "fused", "all"), ("numpy", "fused", "psf"),
                                                                  ("stand-in", "fused", "psf")])
@pytest.mark.parametrize("batch_mib", [128, 0.05])
def test_one_batch_gives_each_epochs_rows(survey, backend, cpu_kernels, measurements, batch_mib):
    objects, visits = survey
    config = MeasurementConfig(backend=backend, cpu_kernels=cpu_kernels, batch_bytes=int(batch_mib * 2**20), include_offimage=False,
                               measurements=measurements)
    calls = []

    def counted(runner, inputs, scope):
        calls.append(len(inputs))
        return run_directly(runner, inputs, scope)

    batched = measure_epochs(epochs(objects, visits), config, backend=select_backend(backend), execute=counted)
    alone = one_at_a_time(objects, visits, config)
    assert batched.epochs == len(visits) and batched.table.num_rows == alone.num_rows > 3 * len(visits)
    assert batched.table.column_names == alone.column_names
    assert ("apFlux_3" in alone.column_names) == (measurements == "all")
    for name in alone.column_names:
        if name == NOW:
            continue
        got, want = batched.table[name].to_numpy(zero_copy_only=False), alone[name].to_numpy(zero_copy_only=False)
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
        else:
            assert (got == want).all(), name
    assert pc.all(pc.is_valid(batched.table[NOW])).as_py()
    if batch_mib == 128:  # one call per (cutout size, PSF stamp size, scope): fewer than two per epoch
        assert len(calls) < len(visits)
    else:  # the bound splits the work into more calls
        assert len(calls) > len(visits)


def test_an_epoch_that_fails_is_reported_and_the_others_measured(survey):
    objects, visits = survey
    good = epochs(objects, visits[:3])

    @contextmanager
    def broken():
        raise OSError("gone")
        yield

    bad = Epoch(label="missing", open=broken, objects=good[0].objects, psf=good[0].psf)
    result = measure_epochs([good[0], bad, *good[1:]], MeasurementConfig(backend="numpy"), errors_of=(OSError,))
    assert result.epochs == 4 and result.errors == [{"exposure": "missing", "detail": "gone"}]
    assert set(result.table["visit"].to_pylist()) == {int(v.parent.name) for v in visits[:3]}


def test_an_epoch_failing_part_way_leaves_the_others_rows_alone(survey):
    """Small batches run while an epoch is still being staged; when a later read of that
    epoch fails, what already ran for it must not land on the next epoch's rows."""
    objects, visits = survey
    config = MeasurementConfig(backend="numpy", batch_bytes=int(0.05 * 2**20))
    good = epochs(objects, visits)

    def failing_late(epoch: Epoch) -> Epoch:
        @contextmanager
        def files():
            with epoch.open() as (science, difference):
                def unreadable(*args, **kwargs):
                    raise ExposureError("science rows unreadable")

                science.read_rows = unreadable  # the difference image's cutouts are staged (and measured) first
                yield science, difference

        return Epoch(label="late", open=files, objects=epoch.objects, psf=epoch.psf)

    # in the middle, and last (where its rows would lie beyond the table's)
    result = measure_epochs([*good[:2], failing_late(good[2]), *good[3:-1], failing_late(good[-1])], config, errors_of=(ExposureError,))
    expected = measure_epochs([*good[:2], *good[3:-1]], config)
    assert result.errors == [{"exposure": "late", "detail": "science rows unreadable"}] * 2
    assert result.table.num_rows == expected.table.num_rows > 10
    assert result.table.drop_columns([NOW]).equals(expected.table.drop_columns([NOW]))


def test_check_is_called_bare_once_an_epoch_however_many_kernel_calls(survey):
    """The command line's progress line counts the bare calls as epochs."""
    objects, visits = survey
    calls = []
    result = measure_epochs(epochs(objects, visits), MeasurementConfig(backend="numpy", batch_bytes=int(0.05 * 2**20)),
                            check=lambda *progress: calls.append(progress))
    assert result.epochs == len(visits) and calls.count(()) == len(visits)
    assert len(calls) > 2 * len(visits)  # and after each of the many kernel calls, with the epochs begun so far
    assert all(len(c) == 1 and 1 <= c[0] <= len(visits) for c in calls if c)
