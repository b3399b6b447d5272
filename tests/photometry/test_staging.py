"""Cutout staging: windows equal direct slices, padding beyond edges, bounded batches."""

import numpy as np
import pytest

from forcedphot.photometry.cutouts import objects_per_batch, plan_windows, stage_cutouts

NO_DATA = 8


class ArrayReader:
    """An in-memory exposure that records which rows were read."""

    def __init__(self, height=120, width=90, seed=0):
        rng = np.random.default_rng(seed)
        self.height, self.width = height, width
        self.image = rng.normal(size=(height, width)).astype(np.float32)
        self.variance = rng.uniform(1, 2, (height, width)).astype(np.float32)
        self.mask = rng.integers(0, 4, (height, width)).astype(np.int32)
        self.reads = []

    def read_rows(self, y_start, y_stop, needed=None):
        self.reads.append((y_start, y_stop))
        return self.image[y_start:y_stop], self.variance[y_start:y_stop], self.mask[y_start:y_stop]


def staged(reader, x, y, size, batch_bytes=2**30):
    batches = [(w, stage_cutouts(reader, w, NO_DATA)) for w in plan_windows(x, y, size, batch_bytes=batch_bytes, band_width=reader.width)]
    n = len(x)
    out = {k: np.empty((n, size, size), dtype=getattr(batches[0][1], k).dtype) for k in ("image", "variance", "mask", "inside")}
    cx, cy = np.empty(n), np.empty(n)
    for w, s in batches:
        for k in out:
            out[k][w.index] = getattr(s, k)
        cx[w.index], cy[w.index] = w.cx, w.cy
    return out, cx, cy, [w for w, _ in batches]


@pytest.mark.parametrize("planes", ["native", "big-endian", "float64", "a few"])
def test_windows_match_direct_slices_and_positions(planes):
    """Windows wholly on the image equal direct slices: copied by the compiled path from
    float32 / int32 planes in either byte order (a FITS file's rows), gathered by NumPy from
    other types, and sliced one by one when there are a few."""
    reader = ArrayReader()
    if planes == "big-endian":
        reader.image, reader.variance, reader.mask = (a.astype(a.dtype.newbyteorder(">")) for a in (reader.image, reader.variance, reader.mask))
    elif planes in ("float64", "a few"):
        reader.image = reader.image.astype(np.float64)
    rng = np.random.default_rng(2)
    count = 5 if planes == "a few" else 40
    x, y = rng.uniform(10, 79, count), rng.uniform(10, 109, count)
    size, h = 15, 7
    out, cx, cy, _ = staged(reader, x, y, size)
    ix, iy = np.floor(x + 0.5).astype(int), np.floor(y + 0.5).astype(int)
    for k in range(len(x)):
        window = np.s_[iy[k] - h : iy[k] + h + 1, ix[k] - h : ix[k] + h + 1]
        np.testing.assert_array_equal(out["image"][k], reader.image[window].astype(np.float32))
        np.testing.assert_array_equal(out["variance"][k], reader.variance[window])
        np.testing.assert_array_equal(out["mask"][k], reader.mask[window])
    assert out["image"].dtype.isnative and out["mask"].dtype.isnative
    assert out["inside"].all()
    np.testing.assert_allclose(cx, h + x - ix)
    assert np.all((cx >= h - 0.5) & (cx < h + 0.5))


def test_padding_beyond_edges_is_no_data():
    reader = ArrayReader()
    x = np.array([0.2, 89.4, 45.0, -0.4])
    y = np.array([60.0, 119.3, 0.0, -0.4])
    out, *_ = staged(reader, x, y, 11)
    h = 5
    # object 0 at column 0: 5 columns to its left are padding
    assert not out["inside"][0, :, :h].any() and out["inside"][0, :, h:].all()
    assert np.isnan(out["image"][0, :, :h]).all()
    assert np.all(out["mask"][0, :, :h] == 1 << NO_DATA)
    # corner object: only the upper-right quadrant is on the image
    assert out["inside"][3].sum() == (h + 1) ** 2
    np.testing.assert_array_equal(out["image"][3, h:, h:], reader.image[: h + 1, : h + 1])


def test_edge_windows_sliced_on_the_host_equal_those_gathered_on_a_device():
    """Windows crossing the image's edge are sliced and padded one by one on the host:
    the cutouts a device's gather_cutouts makes, bit for bit (NaN and NO_DATA padding,
    ``inside``), at every edge and corner and for a window wider than the image."""
    from forcedphot.kernels.cutouts import gather_cutouts

    reader = ArrayReader(height=40, width=30)
    x = np.array([0.2, 29.4, 15.0, 15.0, -0.4, 29.0, 0.0, 29.3, 14.6])
    y = np.array([20.0, 20.0, 0.0, 39.3, -0.4, 39.2, 39.4, 0.3, 19.5])
    for size in (11, 45):
        staged_here, *_ = staged(reader, x, y, size)
        ix, iy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
        gathered = gather_cutouts(reader.image, reader.variance, reader.mask, ix, iy, size, 1 << NO_DATA)
        for name in staged_here:
            np.testing.assert_array_equal(staged_here[name], getattr(gathered, name), err_msg=f"{name}, size {size}")
        assert not staged_here["inside"].all()


def test_batches_respect_the_memory_bound_and_read_bands():
    reader = ArrayReader(height=400, width=50)
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 49, 300), rng.uniform(0, 399, 300)
    size = 9
    per_batch = 20
    budget = per_batch * size * size * 93
    assert objects_per_batch(size, budget) == per_batch
    full, *_ = staged(reader, x, y, size)
    out, _, _, stacks = staged(ArrayReader(height=400, width=50), x, y, size, batch_bytes=budget)
    assert max(len(s.index) for s in stacks) <= per_batch
    assert sorted(np.concatenate([s.index for s in stacks]).tolist()) == list(range(300))
    np.testing.assert_array_equal(out["image"], full["image"])


def test_band_reads_cover_only_needed_rows():
    reader = ArrayReader(height=400, width=50)
    x, y = np.array([10.0, 20.0]), np.array([100.0, 103.0])
    staged(reader, x, y, 9)
    assert reader.reads == [(96, 108)]


def test_even_size_is_refused():
    with pytest.raises(ValueError, match="odd"):
        next(plan_windows(np.array([1.0]), np.array([1.0]), 10, batch_bytes=10**6))


class ViewReader(ArrayReader):
    """Returns what a memory-mapped FITS file gives: big-endian views, broadcast constants."""

    def read_rows(self, y_start, y_stop, needed=None):
        self.reads.append((y_start, y_stop))
        image = self.image.astype(">f4")[y_start:y_stop]
        variance = np.broadcast_to(np.float32(1.5), image.shape)
        mask = self.mask.astype(">i4")[y_start:y_stop]
        return image, variance, mask


def test_big_endian_views_and_broadcast_planes_are_converted():
    reader = ViewReader()
    x, y = np.array([3.0, 45.2, 88.9]), np.array([60.0, 60.4, 2.0])
    out, *_ = staged(reader, x, y, 9)
    expected, *_ = staged(ArrayReader(), x, y, 9)
    assert out["image"].dtype == np.float32 and out["image"].dtype.isnative
    np.testing.assert_array_equal(out["image"], expected["image"])
    np.testing.assert_array_equal(out["mask"], expected["mask"])
    np.testing.assert_array_equal(out["variance"][out["inside"]], 1.5)
    assert np.isnan(out["variance"][~out["inside"]]).all()


def test_in_place_batches_count_each_object_edge_windows_alike():
    """Windows read in place cost their object's bytes, those crossing the image's edge
    (padded in the kernel's own copy) no more; every object once, in batches of what the
    budget holds."""
    rng = np.random.default_rng(4)
    width, height, size, object_bytes = 200, 300, 11, 500
    x, y = rng.uniform(-2, width + 1, 400), rng.uniform(-2, height + 1, 400)
    batches = list(plan_windows(x, y, size, batch_bytes=40 * object_bytes + 10, in_place=object_bytes))
    assert sorted(np.concatenate([w.index for w in batches]).tolist()) == list(range(400))
    assert [len(w) for w in batches] == [40] * 10
    assert all(np.all(np.diff(w.iy) >= 0) for w in batches)  # in order of increasing row
    assert [len(w) for w in plan_windows(x, y, size, batch_bytes=object_bytes - 1, in_place=object_bytes)] == [1] * 400


def test_in_place_batches_hold_at_most_a_few_thousand_objects():
    """Between batches progress is reported and deadlines and cancellation are looked at: a
    batch read in place stays short however much memory it could have."""
    from forcedphot.photometry.cutouts import MAX_IN_PLACE_OBJECTS

    rng = np.random.default_rng(5)
    n = 2 * MAX_IN_PLACE_OBJECTS + 10
    x, y = rng.uniform(20, 980, n), rng.uniform(20, 980, n)
    lengths = [len(w) for w in plan_windows(x, y, 11, batch_bytes=2**40, in_place=100)]
    assert lengths == [MAX_IN_PLACE_OBJECTS, MAX_IN_PLACE_OBJECTS, 10]
