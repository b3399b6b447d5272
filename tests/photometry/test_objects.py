"""DiaObject table reading and validation: every bad input names the problem."""

import json

import numpy as np
import pandas as pd
import pytest

from forcedphot.photometry.objects import InputError, ObjectArrays, plain_records, read_objects, records_frame, validate_objects


def table(**columns):
    base = {"diaObjectId": [1, 2, 3], "ra": [10.0, 10.1, 10.2], "dec": [-5.0, -5.1, -5.2]}
    base.update(columns)
    return pd.DataFrame({k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_reads_each_format(tmp_path, fmt):
    path = tmp_path / f"objects.{fmt}"
    frame = table()
    {"parquet": lambda p: frame.to_parquet(p), "csv": lambda p: frame.to_csv(p, index=False),
     "json": lambda p: frame.to_json(p, orient="records")}[fmt](path)
    out = read_objects(path)
    assert out["diaObjectId"].dtype == np.int64
    np.testing.assert_array_equal(out["ra"], frame["ra"])
    assert out["coord_valid"].all()
    again = read_objects(path.read_bytes(), media_type=fmt)
    pd.testing.assert_frame_equal(out, again)


def test_decl_is_accepted_for_dec():
    out = validate_objects(table(dec=None, decl=[1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(out["dec"], [1.0, 2.0, 3.0])


def test_missing_column_is_named():
    with pytest.raises(InputError, match=r"missing column\(s\) ra"):
        validate_objects(table(ra=None))


def test_misnamed_column_lists_what_is_there():
    frame = table().rename(columns={"diaObjectId": "objectId"})
    with pytest.raises(InputError, match="diaObjectId.*objectId"):
        validate_objects(frame)


def test_duplicate_ids_are_named():
    with pytest.raises(InputError, match="duplicate diaObjectId 7"):
        validate_objects(table(diaObjectId=[7, 8, 7]))


def test_non_integer_ids_name_the_rows():
    with pytest.raises(InputError, match=r"row 1 \(2.5\)"):
        validate_objects(table(diaObjectId=[1, 2.5, 3]))


@pytest.mark.parametrize("value", [2**64 - 1, 2**63, 1e19, 600000138039884002.0, True, "1e18", "12a"])
def test_ids_that_are_not_exact_int64_are_refused_naming_row_and_value(value):
    """No id is wrapped, clipped or rounded: uint64 beyond int64, floats beyond 2**53,
    booleans and non-integer text are refused (the APDB type is a signed 64-bit int)."""
    with pytest.raises(InputError, match=r"diaObjectId must hold signed 64-bit integers.*row 1 \("):
        validate_objects(pd.DataFrame.from_records([{"diaObjectId": 5, "ra": 1.0, "dec": 1.0},
                                                    {"diaObjectId": value, "ra": 2.0, "dec": 2.0}]))


def test_ids_beyond_2_53_stay_exact_in_every_format(tmp_path):
    big = [600000138039884002, 1000000000000000000, 1000000000000000001, -(2**63), 2**63 - 1]
    frame = pd.DataFrame({"diaObjectId": big, "ra": [1.0] * 5, "dec": [2.0] * 5})
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    (tmp_path / "t.json").write_text(json.dumps(frame.to_dict(orient="records")))
    for suffix in ("parquet", "csv", "json"):
        assert read_objects(tmp_path / f"t.{suffix}")["diaObjectId"].tolist() == big, suffix


def test_uint64_ids_within_int64_are_taken_and_beyond_refused():
    ids = np.array([5, 2**63 - 1], dtype=np.uint64)
    assert validate_objects(pd.DataFrame({"diaObjectId": ids, "ra": [1.0, 1.0], "dec": [1.0, 1.0]}))["diaObjectId"].tolist() == [5, 2**63 - 1]
    with pytest.raises(InputError, match="row 1 \\(18446744073709551615\\)"):
        validate_objects(pd.DataFrame({"diaObjectId": np.array([5, 2**64 - 1], dtype=np.uint64), "ra": [1.0, 1.0], "dec": [1.0, 1.0]}))


def test_csv_ids_written_as_floats_are_not_duplicates_of_each_other():
    """pandas reads 1e18 as a float, equal to 1000000000000000001 once rounded; here it is refused."""
    with pytest.raises(InputError, match="row 0 \\('1e18'\\)"):
        read_objects(b"diaObjectId,ra,dec\n1e18,1,1\n1000000000000000001,2,2\n", media_type="csv")


def test_boolean_coordinates_are_refused():
    with pytest.raises(InputError, match="column ra must be numeric.*true/false"):
        validate_objects(pd.DataFrame.from_records([{"diaObjectId": 1, "ra": True, "dec": 1.0}]))


def test_non_numeric_coordinates_name_the_rows():
    with pytest.raises(InputError, match="column ra must be numeric.*rows 2"):
        validate_objects(table(ra=[1.0, 2.0, "abc"]))


def test_empty_table():
    with pytest.raises(InputError, match="empty"):
        validate_objects(table().iloc[:0])


def test_bad_coordinates_flag_rows_not_the_table():
    out = validate_objects(table(ra=[np.nan, 400.0, 10.0], dec=[0.0, 0.0, 95.0]))
    assert out["coord_valid"].tolist() == [False, False, False]
    out = validate_objects(table(ra=[359.9, 0.0, 10.0], dec=[90.0, -90.0, 0.0]))
    assert out["coord_valid"].all()


def test_unreadable_file_and_unknown_format(tmp_path):
    bad = tmp_path / "objects.parquet"
    bad.write_bytes(b"not a parquet file")
    with pytest.raises(InputError, match="objects.parquet: cannot read as parquet"):
        read_objects(bad)
    with pytest.raises(InputError, match="no such file"):
        read_objects(tmp_path / "missing.csv")
    with pytest.raises(InputError, match="unknown table format 'xlsx'"):
        read_objects(b"", media_type="xlsx")


PLAIN = [{"diaObjectId": 2**62 + 1, "ra": 10.0, "dec": -5.0}, {"diaObjectId": -3, "ra": 359, "dec": 90.0},
         {"diaObjectId": 7, "ra": float("nan"), "dec": 0.0}, {"diaObjectId": 8, "ra": 360.0, "dec": 0.0},
         {"dec": -90.5, "ra": 1.5, "diaObjectId": 9}]


def test_plain_records_read_without_a_table_equal_the_validated_table():
    arrays = plain_records(PLAIN)
    want = ObjectArrays.of(validate_objects(records_frame(PLAIN, "objects")))
    for got, expected in zip(vars(arrays).values(), vars(want).values()):
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    assert arrays.coord_valid.tolist() == [True, True, False, False, False] and arrays.ids[0] == 2**62 + 1


@pytest.mark.parametrize("change", [
    {"diaObjectId": True}, {"diaObjectId": 2**63}, {"diaObjectId": 1.0}, {"diaObjectId": "1"}, {"diaObjectId": 8},  # 8: a duplicate
    {"ra": True}, {"ra": "10"}, {"ra": None}, {"dec": 10**400}, {"flux": 1.0}, {"ra": [1.0]},
])
def test_records_in_any_other_form_go_through_the_table_checks(change):
    """Not the plain form: None, so the caller validates a table of the records, which
    names the problem (or converts the values, as ``1.0`` for an id)."""
    records = [dict(r) for r in PLAIN]
    records[0].update(change)
    assert plain_records(records) is None
    assert plain_records([{k: v for k, v in r.items() if k != "dec"} for r in PLAIN]) is None
