"""diaForcedSourceId determinism and uniqueness; column naming; parquet units."""

import numpy as np

from forcedphot.photometry.catalog import aperture_name, forced_source_ids, table_with_units, unit_of
from forcedphot.photometry.formats import encode_catalog


def test_ids_are_deterministic_unique_and_positive():
    ids = np.arange(1, 200_001, dtype=np.int64) * 7919
    a = forced_source_ids(ids, 1234, 42)
    assert np.array_equal(a, forced_source_ids(ids, 1234, 42))
    assert len(np.unique(a)) == len(ids) and (a >= 0).all()
    # a permuted table gives each object the same id
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(forced_source_ids(ids[perm], 1234, 42), a[perm])
    # another visit or detector gives other ids
    assert not np.any(forced_source_ids(ids, 1235, 42) == a)
    assert not np.any(forced_source_ids(ids, 1234, 43) == a)


def test_aperture_names_and_units():
    assert aperture_name(4.5) == "apFlux_4_5"
    assert aperture_name(12.0) == "apFlux_12"
    assert unit_of("apFlux_4_5") == "nJy" and unit_of("apFluxErr_12") == "nJy"
    assert unit_of("apFlux_4_5_flag") is None
    assert unit_of("psfFlux") == "nJy" and unit_of("diaObjectId") is None


def test_parquet_carries_units_and_provenance():
    import io
    import json

    import pyarrow.parquet as pq

    catalog = table_with_units({"diaObjectId": np.array([1]), "psfFlux": np.float32([3.0]), "apFlux_3": np.float32([2.0])})
    table = pq.read_table(io.BytesIO(encode_catalog(catalog, {"exposure": "x.fits"}, "parquet")))
    assert table.schema.field("psfFlux").metadata[b"unit"] == b"nJy"
    assert table.schema.field("apFlux_3").metadata[b"unit"] == b"nJy"
    assert json.loads(table.schema.metadata[b"forcedphot"])["exposure"] == "x.fits"


def test_unknown_visit_stays_null_in_every_format():
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from forcedphot.photometry.formats import to_pandas

    catalog = table_with_units({"diaObjectId": np.array([1, 2]), "visit": pa.nulls(2, pa.int64()), "detector": np.int16([5, 5])})
    frame = to_pandas(catalog)
    assert str(frame["visit"].dtype) == "Int64" and frame["visit"].isna().all()
    assert str(frame["detector"].dtype) == "Int16" and list(frame["detector"]) == [5, 5]
    assert pq.read_table(io.BytesIO(encode_catalog(catalog, {}, "parquet")))["visit"].null_count == 2
    assert [row["visit"] for row in json.loads(encode_catalog(catalog, {}, "json"))] == [None, None]
    rows = [line for line in encode_catalog(catalog, {}, "csv").decode().splitlines() if not line.startswith("#")]
    assert rows[:2] == ["diaObjectId,visit,detector", "1,,5"]
