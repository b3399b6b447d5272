"""Catalogs merged and converted on disk a bounded number of rows at a time give the same
files as the whole table in memory (what a batch job's result is made with)."""

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from forcedphot.photometry.catalog_files import convert, merge_parts, write_part
from forcedphot.photometry.formats import encode_catalog, read_provenance
from forcedphot.photometry.lightcurve import sort_lightcurves


def exposures(n_exposures: int = 9, n_objects: int = 40) -> list[pa.Table]:
    """One table per exposure: each object at most once, rows in object order, as the engine writes."""
    rng = np.random.default_rng(3)
    tables = []
    for i in range(n_exposures):
        ids = np.sort(rng.choice(np.arange(1000, 1000 + n_objects), size=rng.integers(1, n_objects), replace=False))
        tables.append(pa.table({
            "diaObjectId": pa.array(ids, pa.int64()),
            "visit": pa.array(np.full(ids.size, 100 + i), pa.int64()),
            "detector": pa.array(np.full(ids.size, 7), pa.int16()),
            "band": pa.array(["gr"[i % 2]] * ids.size),
            "midpointMjdTai": pa.array(np.full(ids.size, 61000.0 + rng.uniform(0, 30))),
            "psfFlux": pa.array(rng.normal(0, 1, ids.size)),
            "psfFluxErr": pa.array(rng.uniform(0.5, 1.5, ids.size)),
            "localPhotoCalib": pa.array(np.full(ids.size, 0.5)),
        }))
    return tables


@pytest.mark.parametrize("lightcurve", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 7, 10_000])
def test_merged_parts_equal_the_whole_table(tmp_path, lightcurve, chunk_rows):
    tables = exposures()
    parts = [write_part(t, tmp_path / f"part-{i}.parquet") for i, t in enumerate(tables)]
    rows = merge_parts(parts, tmp_path / "merged.parquet", {"job": "j"}, lightcurve=lightcurve, chunk_rows=chunk_rows)
    whole = pa.concat_tables(tables)
    expected = sort_lightcurves(whole) if lightcurve else whole
    got = pq.read_table(tmp_path / "merged.parquet")
    assert rows == whole.num_rows and got.select(expected.column_names).equals(expected)
    assert ("epochStatus" in got.column_names) == lightcurve  # light curves get their products
    assert read_provenance(tmp_path / "merged.parquet")["job"] == "j"
    in_memory = pq.read_table(io.BytesIO(encode_catalog(expected, {"job": "j"}, "parquet"))).schema.metadata
    assert got.schema.metadata[b"table::len::band"] == in_memory[b"table::len::band"]


@pytest.mark.parametrize("fmt", ["csv", "ecsv", "json", "fits", "votable"])
def test_converted_results_equal_the_whole_table_encoded(tmp_path, fmt):
    tables = exposures()
    source = tmp_path / "result.parquet"
    merge_parts([write_part(t, tmp_path / f"p{i}.parquet") for i, t in enumerate(tables)], source, {"job": "j"}, lightcurve=True)
    convert(source, fmt, tmp_path / f"result.{fmt}", chunk_rows=5)
    got = (tmp_path / f"result.{fmt}").read_bytes()
    written = {k: v for k, v in read_provenance(source).items() if k not in ("software", "version")}  # the job's, with its products
    assert written["job"] == "j" and written["products"]["snr_limit"] == 3.0
    expected = encode_catalog(pq.read_table(source), written, fmt)
    if fmt == "json":
        assert json.loads(got) == json.loads(expected)
    elif fmt in ("csv", "ecsv"):
        assert got == expected
        assert len(pd.read_csv(io.BytesIO(got), comment="#")) == sum(t.num_rows for t in tables)
    else:
        assert len(got) == len(expected)
    assert not list(tmp_path.glob("*.partial"))


def test_a_light_curve_job_result_is_made_into_products_one_object_range_at_a_time(tmp_path):
    """Baselines and bins of a job's light curves, written by object ranges (chunks of 1 and
    7 rows and the whole), equal those made of the whole table at once."""
    from forcedphot.photometry.lightcurve_products import BaselineWindow, Products, make_products

    tables = exposures()
    parts = [write_part(t, tmp_path / f"part-{i}.parquet") for i, t in enumerate(tables)]
    whole = sort_lightcurves(pa.concat_tables(tables))
    mjd = whole.column("midpointMjdTai").to_numpy()
    products = Products(baseline=BaselineWindow(mjd_max=float(np.median(mjd)), min_epochs=2), bin_days=1.0)
    expected, done = make_products(whole, products)
    assert expected.num_rows > 40 and sum("baseline" in summary for summary in done["baseline"]) > 10  # something to compare
    for chunk_rows in (1, 7, 10_000):
        out = tmp_path / f"merged-{chunk_rows}.parquet"
        assert merge_parts(parts, out, {"job": "j"}, lightcurve=True, chunk_rows=chunk_rows, products=products) == expected.num_rows
        assert pq.read_table(out).equals(expected.replace_schema_metadata(pq.read_table(out).schema.metadata))
        assert read_provenance(out)["products"]["baseline"] == json.loads(json.dumps(done["baseline"]))
