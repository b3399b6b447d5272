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
