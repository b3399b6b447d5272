"""The start-up measurement: it measures, encodes and leaves nothing behind."""

from pathlib import Path
import tempfile

from forcedphot.photometry import warm_up
from forcedphot.photometry.warm_up import exercise_measurement


def test_the_warm_up_measures_encodes_and_cleans_up(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    encoded = []
    real = warm_up.encode_catalog
    monkeypatch.setattr(warm_up, "encode_catalog", lambda table, provenance, fmt: encoded.append((table, fmt)) or real(table, provenance, fmt))
    exercise_measurement(("parquet", "csv"))
    assert [fmt for _, fmt in encoded] == ["parquet", "csv"]
    table = encoded[0][0]
    assert table.num_rows == 1 and table.column("psfFlux")[0].is_valid  # the object was measured, not left unmeasured
    assert list(Path(tmp_path).iterdir()) == []
