"""The Python API: ``from forcedphot import ...`` gives the library's own functions, and
the README's example runs as written."""

from pathlib import Path
import re

import pandas as pd

import forcedphot
from forcedphot.photometry.measure import measure
from forcedphot.photometry.psf_models import load_psf

README = Path(__file__).resolve().parents[1] / "README.md"


def test_public_names_are_the_library_functions():
    from forcedphot import load_psf as api_load_psf
    from forcedphot import measure as api_measure

    assert api_measure is measure and api_load_psf is load_psf
    assert set(forcedphot.__all__) <= set(dir(forcedphot))
    for name in forcedphot.__all__:
        assert getattr(forcedphot, name) is not None


def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's Python block, run in a directory holding a small demo visit."""
    from forcedphot.demo import make_demo_visit

    make_demo_visit(tmp_path, size=256, n_objects=20, seed=1)
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has a ```python example"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    catalog = pd.read_parquet(tmp_path / "forced.parquet")
    truth = pd.read_parquet(tmp_path / "truth.parquet")
    assert len(catalog) == int(truth["on_detector"].sum()) > 0
    assert catalog["psfFlux"].notna().all()


def test_tables_made_in_memory_are_measured_and_validated_as_files(tmp_path):
    """Issue 23, item 4: a DataFrame (also with ``decl``), an astropy Table or an Arrow table
    is accepted by ``read_objects`` and ``measure`` alike, validated as a file is; and
    ``choose_psf(exposure)`` needs no other argument."""
    from astropy.table import Table
    import numpy as np
    import pyarrow as pa
    import pytest

    from forcedphot import choose_psf, open_exposure, read_objects
    from forcedphot.demo import make_demo_visit
    from forcedphot.photometry.objects import InputError

    make_demo_visit(tmp_path, size=256, n_objects=20, seed=1)
    from_file = read_objects(tmp_path / "diaObjects.parquet")
    frame = pd.read_parquet(tmp_path / "diaObjects.parquet")[["diaObjectId", "ra", "dec"]]
    for table in (frame, frame.rename(columns={"dec": "decl"}), Table.from_pandas(frame), pa.Table.from_pandas(frame)):
        pd.testing.assert_frame_equal(read_objects(table)[from_file.columns], from_file)
    with pytest.raises(InputError, match="duplicate diaObjectId"):
        read_objects(pd.concat([frame, frame.head(1)]))
    with open_exposure(tmp_path / "calexp.fits") as science:
        psf = choose_psf(science)
        from_memory = measure(science, frame.rename(columns={"dec": "decl"}), psf).table
        validated = measure(science, from_file, psf).table
    pd.testing.assert_frame_equal(from_memory.to_pandas().drop(columns="timeProcessedMjdTai"),
                                  validated.to_pandas().drop(columns="timeProcessedMjdTai"))
    assert np.isfinite(from_memory.column("psfFlux").to_numpy(zero_copy_only=False)).any()
