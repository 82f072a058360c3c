import types

import pytest

import helpers.timing as timing
from helpers.timing import Measurement, benchmark


def test_first_call_is_reported_apart_from_the_steady_samples(monkeypatch):
    """On a clock that only the calls move (a real one also counts the waits of a busy machine)."""
    now, durations = [0.0], iter([0.2, 0.5, 0.01, 0.03, 0.02])  # first call, warm-up, three timed calls

    def call():
        now[0] += next(durations)

    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    measurement = benchmark(call, warmup=1, runs=3, progress=False)
    assert measurement.first_call_s == pytest.approx(0.2)
    assert measurement.samples_s == pytest.approx([0.01, 0.03, 0.02])  # the warm-up call is not among them
    assert measurement.median_s == pytest.approx(0.02)


def test_output_is_the_last_calls_and_calls_are_counted():
    calls = []
    measurement = benchmark(lambda: calls.append(1) or len(calls), warmup=2, runs=4, progress=False)
    assert len(calls) == 1 + 2 + 4 and measurement.output == 7


def test_device_is_synchronised_around_every_timed_call(monkeypatch):
    events = []
    monkeypatch.setattr(timing, "synchronize", lambda device=None: events.append("sync"))
    benchmark(lambda: events.append("call"), warmup=1, runs=2, progress=False)
    # first call synced on both sides, the warm-up call not timed, each timed call synced on both sides
    assert events == ["sync", "call", "sync", "call", "sync", "call", "sync", "sync", "call", "sync"]


@pytest.mark.parametrize("runs, warmup", [(0, 1), (3, -1), (2.5, 1), (True, 1), ("3", 1), (3, 1.0), (3, False)])
def test_bad_counts_are_refused(runs, warmup):
    with pytest.raises(ValueError, match="must be a whole number of [01] or more, got") as error:
        benchmark(lambda: None, warmup=warmup, runs=runs, progress=False)
    assert "\n" not in str(error.value)


def _frames():
    yield 1


async def _image():
    return 1


async def _stream():
    yield 1


@pytest.mark.parametrize("fn", [_frames, _image, _stream], ids=["generator", "coroutine", "async generator"])
def test_a_function_that_only_makes_a_generator_or_coroutine_is_refused(fn):
    """Calling it does none of the work, so every sample would be about 0 s."""
    with pytest.raises(TypeError, match="is a generator or async function") as error:
        benchmark(fn, progress=False)
    assert "\n" not in str(error.value)


def test_something_that_cant_be_called_is_refused():
    with pytest.raises(TypeError, match="benchmark needs a function to call, got 3"):
        benchmark(3, progress=False)


def test_first_call_peak_memory_is_kept_apart_from_the_steady_peak(monkeypatch):
    """A GPU's allocator, stood in for: compiling (autotuning, CUDA-graph capture) needs more than a steady call."""
    allocator = {"peak_gb": 0.0}
    monkeypatch.setattr(timing, "reset_peak_memory", lambda: allocator.update(peak_gb=0.0))
    monkeypatch.setattr(timing, "peak_memory_gb", lambda: allocator["peak_gb"])
    needs_gb = iter([30.0, 12.0, 8.0, 8.0])

    def call():
        allocator["peak_gb"] = max(allocator["peak_gb"], next(needs_gb))

    measurement = benchmark(call, warmup=1, runs=2, progress=False)
    assert measurement.first_call_peak_memory_gb == 30.0
    assert measurement.peak_memory_gb == 8.0  # the warm-up's 12 GB is neither
    assert "8.00 GB steady, 30.00 GB in the first call" in str(measurement)


@pytest.mark.parametrize("samples, noisy", [([1.0, 1.01, 0.99, 1.0, 1.02], False), ([0.6, 1.0, 19.3, 0.7, 1.1], True)])
def test_a_wide_spread_is_flagged(samples, noisy):
    measurement = Measurement(samples_s=samples, first_call_s=2.0, warmup=1)
    assert measurement.noisy is noisy and measurement.to_dict()["noisy"] is noisy
    assert ("Noisy" in str(measurement)) is noisy


def test_one_sentence_writes_every_measurement():
    from helpers.sentences import measurement_sentence

    assert measurement_sentence(0.0844, 0.0021, runs=5, device="NVIDIA H100", first_call_s=12.3) == (
        "0.084 s median (IQR 0.002 s, 5 runs) on NVIDIA H100; first call 12.30 s")
    assert measurement_sentence(0.5, 0.01, per="image", note="not comparable") == (
        "0.500 s per image (IQR 0.010 s, not comparable)")
    measured = Measurement(samples_s=[1.0, 1.1, 1.2], first_call_s=3.0, warmup=1)
    assert str(measured).startswith(measurement_sentence(1.1, measured.iqr_s, runs=3, first_call_s=3.0))
