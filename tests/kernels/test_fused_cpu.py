"""The fused CPU kernel (numba) holds to the array-API kernels on the same inputs: every
result to 1e-10 relative (sums taken in another order), every flag and count identical.
The inputs cover the edge cases: objects at and beyond the stack's edge, NaN and masked
pixels inside apertures and annuli, PSF widths that leave an annulus empty or with one
pixel, bad-fit mask bits, undefined flag planes, integer-valued images (ties in the
quartiles)."""

from types import SimpleNamespace

import numpy as np
import pytest

from forcedphot.kernels.cutouts import Cutouts
from forcedphot.kernels.fused_cpu import _quantile_positions, _quartiles
from forcedphot.kernels.psf_stamps import gaussian_stamps
from forcedphot.photometry.backend import select_backend
from forcedphot.photometry.config import MeasurementConfig
from forcedphot.photometry.cutouts import Windows
from forcedphot.photometry.psf_models import GaussianPsf
from forcedphot.photometry.runner import KernelRunner, Scope

K = 47
PLANES = {"BAD": 0, "SAT": 1, "INTRP": 2, "CR": 3, "EDGE": 4, "NO_DATA": 8, "SUSPECT": 7}  # DETECTED-like bits 5, 6 unused


class StampPsf(GaussianPsf):
    """A Gaussian PSF whose stamps are those the test gives (its sigma is the test's too)."""

    def __init__(self, stamps: np.ndarray):
        super().__init__(3.5, stamp_size=stamps.shape[1])
        self._given = stamps

    def stamps(self, x, y, xp, put=None):
        return self._given


def inputs(rng, n: int, integer_pixels: bool):
    image = rng.normal(100.0, 5.0, (n, K, K))
    if integer_pixels:
        image = np.round(image)
    image = image.astype(np.float32)
    variance = rng.uniform(20, 30, (n, K, K)).astype(np.float32)
    mask = np.zeros((n, K, K), np.int32)
    for bit in (0, 1, 2, 3, 4, 7, 8):
        mask |= ((rng.random((n, K, K)) < 0.004) << bit).astype(np.int32)
    image[rng.random((n, K, K)) < 0.003] = np.nan
    variance[rng.random((n, K, K)) < 0.002] = np.inf
    inside = np.ones((n, K, K), bool)
    cut = rng.integers(0, 4, n)  # a quarter of the objects near each edge of the image
    depth = rng.integers(1, K // 2 + 3, n)
    for i in range(n):
        if cut[i] == 1:
            inside[i, :, :depth[i]] = False
        elif cut[i] == 2:
            inside[i, K - depth[i]:, :] = False
    image[~inside] = np.nan
    variance[~inside] = np.nan
    mask[~inside] = 1 << 8
    cx = K // 2 + rng.uniform(-0.5, 0.5, n)
    cy = K // 2 + rng.uniform(-0.5, 0.5, n)
    far = rng.random(n) < 0.1
    cx[far] += rng.uniform(-30, 30, far.sum())  # circles beyond the stack
    sigma = rng.uniform(0.9, 2.8, n)
    sigma[:4] = (0.001, 0.001, 0.05, 0.07)  # annuli with no pixel, and with a few
    # centred on a pixel, radii 7 and 15 px: pixels lie exactly on both rims (afw's rule: in,
    # but for those straight above and below the centre)
    cx[4:8] = cy[4:8] = K // 2
    sigma[4:8] = 1.0
    stamps = gaussian_stamps(cx - np.floor(cx + 0.5) + 10, cy - np.floor(cy + 0.5) + 10, sigma, 21)
    return Cutouts(image, variance, mask, inside), cx, cy, sigma, stamps


def run(kernels: str, cutouts, cx, cy, sigma, stamps, bad_mask_planes=(), scope=Scope.ALL):
    config = MeasurementConfig(backend="numpy", cpu_kernels=kernels, bad_mask_planes=bad_mask_planes)
    runner = KernelRunner(select_backend("numpy"), SimpleNamespace(mask_planes=PLANES), StampPsf(stamps), config)
    n = len(cx)
    windows = Windows(index=np.arange(n), ix=np.full(n, K // 2), iy=np.full(n, K // 2), cx=cx, cy=cy, size=K)
    return runner.run([runner.inputs(windows, cutouts, cx, cy, sigma)], scope)[0]


@pytest.mark.parametrize("scope", [Scope.PSF, Scope.BACKGROUND])
def test_a_narrower_scope_equals_the_array_api_one_and_the_same_parts_of_every_measurement(scope):
    """The PSF fit alone, or with the local background (a direct image): what is measured
    holds to the array-API kernels, and equals (bit for bit) the same results of a call
    measuring everything; what is not measured is not returned."""
    rng = np.random.default_rng(3)
    cutouts, cx, cy, sigma, stamps = inputs(rng, 300, False)
    for kernels in ("fused", "array-api"):
        part, every = run(kernels, cutouts, cx, cy, sigma, stamps, scope=scope), run(kernels, cutouts, cx, cy, sigma, stamps)
        assert part.apertures is None and part.pixel_flags is None
        assert (part.background is None) == (scope is Scope.PSF)
        for got, want in zip(leaves(part), leaves(every._replace(apertures=None, pixel_flags=None, background=None if scope is Scope.PSF else every.background))):
            np.testing.assert_array_equal(got, want)
    fused, reference = (run(kernels, cutouts, cx, cy, sigma, stamps, scope=scope) for kernels in ("fused", "array-api"))
    for got, want in zip(leaves(fused), leaves(reference)):
        np.testing.assert_allclose(np.asarray(got, float), np.asarray(want, float), rtol=1e-10, atol=1e-9, equal_nan=True)


def leaves(results):
    out = []
    for group in results:
        if group is not None:
            out.extend(group)
    return out


@pytest.mark.parametrize("integer_pixels", [False, True])
@pytest.mark.parametrize("bad_mask_planes", [(), ("BAD", "CR")])
@pytest.mark.parametrize("n", [600, 120])  # spread over threads, and on the calling thread
def test_fused_equals_the_array_api_kernels(integer_pixels, bad_mask_planes, n):
    rng = np.random.default_rng(7 + integer_pixels)
    cutouts, cx, cy, sigma, stamps = inputs(rng, n, integer_pixels)
    fused = run("fused", cutouts, cx, cy, sigma, stamps, bad_mask_planes)
    reference = run("array-api", cutouts, cx, cy, sigma, stamps, bad_mask_planes)
    names = ["psf." + f for f in fused.psf._fields] + ["ap." + f for f in fused.apertures._fields] + \
            ["bg." + f for f in fused.background._fields] + ["flags." + f for f in fused.pixel_flags._fields]
    for name, got, want in zip(names, leaves(fused), leaves(reference)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape and got.dtype.kind == want.dtype.kind, name
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-9, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
    # the cases the inputs were made for are there
    assert (reference.background.n_pixels == 0).sum() >= 2 and reference.apertures.truncated.any(axis=1).mean() > 0.2
    assert reference.psf.flag_edge.sum() > n / 12 and np.isnan(reference.psf.inst_flux).sum() > 5
    assert reference.pixel_flags.any.any(axis=0).all() and reference.pixel_flags.center_all.any()


def test_quartiles_by_buckets_and_selection_agree_with_a_sort():
    """Exact order statistics whatever the values: noise, ties, all equal, ordered, two
    values only, integers, and outliers that stretch or skew the sampled range (so that
    wanted positions fall below or above it), on both sides of the sampling threshold."""
    rng = np.random.default_rng(1)
    for n in (*range(1, 12), 23, 24, 25, 26, 101, 127, 128, 129, 1000, 1001, 1600):
        outliers = rng.normal(size=n)
        outliers[: n // 3] = 1e30
        skewed = rng.normal(size=n)
        skewed[::2] = rng.normal(50.0, 1e-3, len(skewed[::2]))
        for values in (rng.normal(size=n), np.round(rng.normal(size=n)), np.zeros(n), np.arange(n)[::-1].astype(float),
                       rng.integers(0, 2, n).astype(float), rng.integers(0, 40, n).astype(float), outliers, skewed,
                       rng.normal(size=n).astype(np.float32), np.sort(rng.normal(size=n))):
            ordered = np.sort(values)
            wanted = []
            for f in (0.25, 0.5, 0.75):
                lo, hi, _ = _quantile_positions(n, f)
                wanted += [ordered[lo], ordered[hi]]
            out = np.empty(6)
            given = values.copy()
            _quartiles(given, n, out, np.empty((3, n), values.dtype))
            assert out.tolist() == wanted, (n, values)
            np.testing.assert_array_equal(given, values)  # left as they were


@pytest.mark.parametrize("n", [150, 20])  # spread over threads, and on the calling thread
def test_windows_read_in_place_from_a_band_in_either_byte_order_equal_staged_ones(n):
    """A band of a file's rows is read in place however its bytes lie (big-endian, as FITS
    stores them, or native; a missing variance's broadcast constant converted), windows
    crossing any edge of the image padded as they are read: each window's results equal
    those of the same windows staged as cutouts, bit for bit."""
    from forcedphot.photometry.cutouts import Band

    rng = np.random.default_rng(11)
    height, width, h = 140, 300, K // 2
    image = rng.normal(100.0, 5.0, (height, width)).astype(np.float32)
    image[rng.random(image.shape) < 0.003] = np.nan
    variance = rng.uniform(20, 30, (height, width)).astype(np.float32)
    mask = np.zeros((height, width), np.int32)
    for bit in (0, 1, 3, 8, 30):  # bits in every byte of the word
        mask |= ((rng.random(image.shape) < 0.01) << bit).astype(np.int32)
    x, y = rng.uniform(-3, width + 2, n), rng.uniform(h, height - h - 1, n)
    x[:2] = (2.0, width - 1.5)  # and these windows cross the left and right edges,
    x[2:6], y[2:6] = (50.0, 120.0, 1.3, width - 0.6), (1.0, height - 1.5, 3.2, height - 4.0)  # the top, the bottom, corners
    ix, iy = np.floor(x + 0.5).astype(np.int64), np.floor(y + 0.5).astype(np.int64)
    windows = Windows(index=np.arange(n), ix=ix, iy=iy, cx=h + x - ix, cy=h + y - iy, size=K)
    sigma = rng.uniform(1.2, 2.2, n)
    stamps = gaussian_stamps(windows.cx - h + 10, windows.cy - h + 10, sigma, 21)
    config = MeasurementConfig(backend="numpy")
    runner = KernelRunner(select_backend("numpy"), SimpleNamespace(mask_planes=PLANES), StampPsf(stamps), config)

    def measured(pixels):
        return leaves(runner.run([runner.inputs(windows, pixels, x, y, sigma)], Scope.ALL)[0])

    bands = {
        "native": Band(image, variance, mask, row0=0, height=height, no_data_bit=8),
        "big-endian": Band(image.astype(">f4"), variance.astype(">f4"), mask.astype(">i4"), row0=0, height=height, no_data_bit=8),
        "constant variance": Band(image.astype(">f4"), np.broadcast_to(np.float32(25.0), image.shape), mask.astype(">i4"),
                                  row0=0, height=height, no_data_bit=8),
    }
    assert (~bands["native"].interior(windows)).sum() >= 6 and bands["native"].interior(windows).sum() > n / 2
    for name, band in bands.items():
        staged = measured(band.cutouts(windows))
        for got, want in zip(measured(band), staged):
            np.testing.assert_array_equal(got, want, err_msg=name)
    for got, want in zip(measured(bands["big-endian"]), measured(bands["native"])):
        np.testing.assert_array_equal(got, want)


def test_warm_up_loads_every_variant_a_measurement_uses():
    """Windows read in place come from read-only bands (memory maps, cached planes): numba
    specialises the kernel for them, and loading a variant at first use holds the
    interpreter (a job's heartbeat waits), so warm_up loads those too."""
    from forcedphot.kernels import fused_cpu

    fused_cpu.warm_up()
    assert {"readonly array" in str(signature[0]) for signature in fused_cpu._measure.signatures} == {True, False}
    assert {"readonly array" in str(signature[0]) for signature in fused_cpu._stage.signatures} == {True, False}


@pytest.mark.parametrize("count", [2, 3])
def test_a_call_spread_over_threads_equals_one_thread(count):
    """A call of many objects runs in consecutive runs, one a thread: the results are those
    of one thread, bit for bit and in order, and a forked child (where the parent's
    threads are not) spreads its calls too."""
    import multiprocessing

    from forcedphot.kernels import fused_cpu

    rng = np.random.default_rng(5)
    n = 2 * fused_cpu.PARALLEL_MIN_OBJECTS + 7
    cutouts, cx, cy, sigma, stamps = inputs(rng, n, False)
    parameters = fused_cpu.FusedParameters(np.array([3.0, 6.0]), 0, 1, np.array([0, 3, fused_cpu.NO_PLANE], np.int64), 3.0, 7.0, 15.0, 3, 3.0)
    args = (*cutouts, stamps, cx, cy, sigma, parameters)
    try:
        fused_cpu.set_threads(1)
        alone = fused_cpu.measure_stack(*args)
        fused_cpu.set_threads(count)
        spread = fused_cpu.measure_stack(*args)
        with multiprocessing.get_context("fork").Pool(1) as pool:
            in_child = pool.apply(fused_cpu.measure_stack, args)
    finally:
        fused_cpu.set_threads(None)
    for one, many, child in zip(alone, spread, in_child):
        np.testing.assert_array_equal(many, one)
        np.testing.assert_array_equal(child, one)
    with pytest.raises(ValueError, match="at least 1"):
        fused_cpu.set_threads(0)


def test_a_spread_call_does_not_wait_for_busy_helpers():
    """While every helper thread is busy (another caller's long run), a spread call does
    its runs on its own thread instead of queueing behind them."""
    import threading

    from forcedphot.kernels import fused_cpu

    release = threading.Event()
    try:
        fused_cpu.set_threads(2)
        busy = fused_cpu._helpers(1).submit(release.wait, 60)
        done = []
        caller = threading.Thread(target=lambda: done.append(fused_cpu.spread(lambda lo, hi: (lo, hi), 10, 1)))
        caller.start()
        caller.join(10)
        assert done == [[(0, 5), (5, 10)]], "the call waited for the busy helper"
    finally:
        release.set()
        fused_cpu.set_threads(None)
    assert busy.result(10)


def test_alongside_ends_every_call_before_an_error_is_raised():
    """A call that fails does not leave the others running: their work ends first, then the
    first error (in the calls' order) is raised; without errors the results are in order."""
    import threading
    import time

    from forcedphot.kernels import fused_cpu

    ended = []

    def slow():
        time.sleep(0.2)
        ended.append(threading.current_thread().name)
        return "slow"

    def fails():
        raise KeyError("first")

    try:
        fused_cpu.set_threads(2)
        assert fused_cpu.alongside([lambda: 1, lambda: 2, lambda: 3]) == [1, 2, 3]
        with pytest.raises(KeyError, match="first"):
            fused_cpu.alongside([fails, slow, lambda: (_ for _ in ()).throw(ValueError("second"))])
        assert len(ended) == 1
    finally:
        fused_cpu.set_threads(None)


@pytest.mark.parametrize("stacked", [False, True])
def test_gaussian_stamps_made_in_the_kernel_equal_those_made_before_it(stacked):
    """A Gaussian PSF's stamps are made by the fused kernel one object at a time (one width,
    or one per object for the epochs of a light curve): every result equals, bit for bit,
    that of the same stamps made first and handed over; and it holds to the array-API
    kernels. Stamps and a recipe together, or neither, are refused."""
    from forcedphot.kernels.fused_cpu import FusedParameters, measure_windows
    from forcedphot.kernels.psf_stamps_cpu import normalised_gaussian_stamps
    from forcedphot.photometry.psf_models import StackedPsf, gaussian_recipe

    rng = np.random.default_rng(12)
    n = 200
    cutouts, cx, cy, sigma, _ = inputs(rng, n, False)
    psf = StackedPsf([GaussianPsf(3.1, 19), GaussianPsf(4.4, 19)], [120, 80]) if stacked else GaussianPsf(3.5, 19)
    x, y = 1000.0 + cx - K // 2, 2000.0 + cy - K // 2  # local positions whose windows these are
    recipe = gaussian_recipe(psf, x, y)
    assert recipe is not None and len(set(recipe[2])) == (2 if stacked else 1)
    given = StampPsf(normalised_gaussian_stamps(*recipe, 19))
    config = MeasurementConfig(backend="numpy")
    windows = Windows(index=np.arange(n), ix=np.full(n, K // 2), iy=np.full(n, K // 2), cx=cx, cy=cy, size=K)
    results = {}
    for name, model, kernels in (("made", psf, "fused"), ("given", given, "fused"), ("array-api", psf, "array-api")):
        runner = KernelRunner(select_backend("numpy"), SimpleNamespace(mask_planes=PLANES), model,
                              config.model_copy(update={"cpu_kernels": kernels}))
        results[name] = leaves(runner.run([runner.inputs(windows, cutouts, x, y, sigma)], Scope.ALL)[0])
    for made, handed, reference in zip(results["made"], results["given"], results["array-api"]):
        np.testing.assert_array_equal(made, handed)
        np.testing.assert_allclose(np.asarray(made, float), np.asarray(reference, float), rtol=1e-10, atol=1e-9, equal_nan=True)
    parameters = FusedParameters(np.array([3.0]), 0, 0, np.array([0], np.int64), 3.0, 7.0, 15.0, 3, 3.0)
    nothing = np.zeros((0, 0), np.float32)
    call = (nothing, nothing, np.zeros((0, 0), np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64), *cutouts, np.arange(n))
    for stamps, made in ((np.zeros((0, 19, 19)), None), (given.stamps(x, y, np), recipe)):
        with pytest.raises(ValueError, match="either"):
            measure_windows(*call, stamps, cx, cy, sigma, parameters, gaussian=made)
