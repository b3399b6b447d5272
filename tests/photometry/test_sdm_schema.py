"""The DiaForcedSource columns as Rubin defines them: read from the installed
``lsst-sdm-schemas`` package's ``apdb.yaml`` (not a copied list) and compared column by
column with a catalog this package writes: names, types, units and nullability."""

from pathlib import Path

import lsst.sdm.schemas
import pyarrow as pa
import pytest
from service_helpers import FWHM
import yaml

from forcedphot.photometry.formats import encode_catalog
from forcedphot.photometry.objects import validate_objects

ARROW = {"long": pa.int64(), "int": pa.int32(), "short": pa.int16(), "double": pa.float64(), "float": pa.float32(), "char": pa.string(),
         "string": pa.string(), "boolean": pa.bool_()}


def apdb_columns(table: str) -> list[dict]:
    schema = yaml.safe_load((Path(lsst.sdm.schemas.__file__).parent / "apdb.yaml").read_text())
    return next(t for t in schema["tables"] if t["name"] == table)["columns"]


@pytest.fixture(scope="module")
def table(repo):
    import io

    import pyarrow.parquet as pq

    from forcedphot.photometry.config import MeasurementConfig
    from forcedphot.photometry.exposure import open_exposure
    from forcedphot.photometry.measure import measure
    from forcedphot.photometry.psf_models import load_psf

    with open_exposure(repo["calexp"]) as science, open_exposure(repo["difference"]) as difference:
        result = measure(science, validate_objects(repo["objects"]), load_psf(fwhm_pixels=FWHM), MeasurementConfig(backend="numpy"),
                         difference=difference)
    return pq.read_table(io.BytesIO(encode_catalog(result.table, result.provenance, "parquet")))  # as a client reads it


def test_every_diaforcedsource_column_is_there_as_the_apdb_defines_it(table):
    columns = apdb_columns("DiaForcedSource")
    assert len(columns) == 14
    for column in columns:
        name = column["name"]
        assert name in table.column_names, name
        field = table.schema.field(name)
        assert field.type == ARROW[column["datatype"]], (name, field.type, column["datatype"])
        unit = (field.metadata or {}).get(b"unit", b"").decode() or None
        expected = column.get("ivoa:unit") or column.get("fits:tunit")
        assert unit == expected, (name, unit, expected)
        if not column.get("nullable", True):
            assert table.column(name).null_count == 0, name
        if column["datatype"] == "char":
            assert all(value is None or len(value) <= column["length"] for value in table.column(name).to_pylist()), name


def test_a_row_not_withdrawn_has_a_null_withdrawal_time(table):
    assert table.column("timeWithdrawnMjdTai").null_count == table.num_rows


