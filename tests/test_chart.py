"""The chart draws what the records say: medians as bar heights, labelled gaps, the seed's A100 bars, one legend
entry per device, steps in the order of STEPS."""

import statistics

import pytest
from matplotlib.image import imread

from helpers.chart import CHART_FILE, TUTORIAL_LABEL, chart_from_dir, draw_chart
from helpers.results import append_record
from helpers.steps import STEPS

H100 = "NVIDIA H100 80GB HBM3"
CPU = "CPU x86_64 (2 threads)"
H100_MEDIANS = {"01": 5.12, "02": 2.91, "03": 2.33, "04": 1.64, "05": 1.58, "06": 1.71, "07": 1.62}
CPU_MEDIANS = {"01": 0.84, "02": 0.61, "03": 0.48, "04": 0.39, "05": 0.37}  # 06 runs out of memory, 07 never ran


def record(step, device, median_s, *, model="stabilityai/stable-diffusion-xl-base-1.0", size=1024, steps=30,
           status="ok", first_call_s=None, peak_memory_gb=None):
    """A results.json record as the notebooks write it (only the fields the chart reads, and a few more)."""
    title = next(s.title for s in STEPS if s.id == step)
    samples = [median_s * factor for factor in (0.99, 1.0, 1.0, 1.01, 1.02)] if median_s is not None else []
    measured = status == "ok"
    # Quality is scored against the step-01 image, so 01 itself has none.
    quality = {"psnr_db": 38.5 - int(step), "ssim": 0.99 - 0.01 * int(step)} if measured and step != "01" else None
    return {
        "step": step,
        "title": title,
        "status": status,
        "model": model,
        "height": size,
        "width": size,
        "median_s": statistics.median(samples) if measured else None,
        "iqr_s": 0.01 * median_s if measured else None,
        "min_s": min(samples) if measured else None,
        "max_s": max(samples) if measured else None,
        "samples_s": samples if measured else [],
        "first_call_s": first_call_s if measured else None,
        "peak_memory_gb": peak_memory_gb if measured else None,
        "device": device,
        "dtype": "float32" if step == "01" else "bfloat16",
        "params": {"model": model, "prompt": "Astronaut in a jungle", "steps": steps, "height": size, "width": size,
                   "guidance": 5.0, "seed": 0, "warmup": 1, "runs": 5, "compile_mode": "max-autotune"},
        "image": f"images/{step}.png" if measured else None,
        "quality": quality,
        "note": None,
    }


def workshop_records():
    """An H100 running SDXL (every step) and a CPU running the tiny model (06 out of memory, 07 missing)."""
    compiled = {"04", "05", "06", "07"}
    records = [
        record(step, H100, median, first_call_s=95.0 if step in compiled else 1.3 * median,
               peak_memory_gb=18.4 if step == "01" else 10.2)
        for step, median in H100_MEDIANS.items()
    ]
    records += [
        record(step, CPU, median, model="tiny", size=128, steps=4, first_call_s=30.0 if step in compiled else median)
        for step, median in CPU_MEDIANS.items()
    ]
    records.append(record("06", CPU, None, model="tiny", size=128, steps=4, status="out_of_memory"))
    return records


def axes_titled(fig, start):
    (ax,) = [ax for ax in fig.axes if ax.get_title(loc="left").startswith(start)]
    return ax


def bars_named(ax, start):
    (bars,) = [c for c in ax.containers if c.get_label().startswith(start)]
    return bars


@pytest.fixture(scope="module")
def chart(tmp_path_factory):
    """The workshop's chart, drawn and saved once: saving a PNG is the slow part."""
    path = tmp_path_factory.mktemp("chart") / "chart.png"
    return draw_chart(workshop_records(), path), path


def test_writes_a_readable_png(chart):
    _, path = chart
    pixels = imread(path)
    assert pixels.shape[0] > 800 and pixels.shape[1] > 1000
    assert pixels.std() > 0.05  # not a blank canvas
    assert not list(path.parent.glob("*.tmp"))


def test_latency_bars_are_the_medians_and_say_so(chart):
    fig, _ = chart
    latency = axes_titled(fig, "Latency")
    for device, medians in ((H100, H100_MEDIANS), (CPU, CPU_MEDIANS)):
        bars = bars_named(latency, device)
        assert [bar.get_height() for bar in bars] == pytest.approx(list(medians.values()))
        texts = [text.get_text() for text in latency.texts if text.get_text()]
        for median in medians.values():
            assert any(text.startswith(f"{median:.2f} s ±") for text in texts), median


def test_bars_sit_over_their_own_step(chart):
    fig, _ = chart
    latency = axes_titled(fig, "Latency")
    positions = [bar.get_x() + bar.get_width() / 2 for bar in bars_named(latency, H100)]
    assert [round(x) for x in positions] == list(range(len(STEPS)))
    cpu_positions = [round(bar.get_x() + bar.get_width() / 2) for bar in bars_named(latency, CPU)]
    assert cpu_positions == [0, 1, 2, 3, 4]


def test_steps_are_in_the_course_order_on_every_panel(chart):
    fig, _ = chart
    for ax in fig.axes:
        labels = [label.get_text() for label in ax.get_xticklabels()]
        assert labels == [f"{step.id}\n{step.title}" for step in STEPS]


def test_out_of_memory_step_is_a_labelled_gap(chart):
    fig, _ = chart
    latency = axes_titled(fig, "Latency")
    gaps = [text for text in latency.texts if text.get_text() == "OOM"]
    assert len(gaps) == 1
    assert round(gaps[0].get_position()[0]) == 5  # step 06
    assert len(bars_named(latency, CPU)) == len(CPU_MEDIANS)


def test_tutorial_a100_bars_carry_the_tutorial_numbers(chart):
    fig, _ = chart
    bars = bars_named(axes_titled(fig, "Latency"), TUTORIAL_LABEL)
    seeds = [step.tutorial_a100_s for step in STEPS if step.tutorial_a100_s is not None]
    assert [bar.get_height() for bar in bars] == pytest.approx(seeds)
    assert all(bar.get_hatch() for bar in bars)


def test_tutorial_a100_latency_is_left_out_where_no_group_ran_the_tutorials_workload():
    fig = draw_chart([r for r in workshop_records() if r["device"] == CPU])
    assert not [c for c in axes_titled(fig, "Latency").containers if c.get_label() == TUTORIAL_LABEL]
    assert len(bars_named(axes_titled(fig, "Speedup"), TUTORIAL_LABEL)) == 6


def test_speedup_is_against_step_01_of_the_same_device(chart):
    fig, _ = chart
    bars = bars_named(axes_titled(fig, "Speedup"), CPU)
    assert [bar.get_height() for bar in bars] == pytest.approx([CPU_MEDIANS["01"] / m for m in CPU_MEDIANS.values()])


def test_legend_names_each_device_with_model_and_dtype(chart):
    fig, _ = chart
    (legend,) = fig.legends
    texts = [text.get_text() for text in legend.get_texts()]
    assert any(t.startswith(H100) and "stable-diffusion-xl" in t and "float32/bfloat16" in t for t in texts)
    assert any(t.startswith(CPU) and "tiny" in t and "128x128, 4 steps" in t for t in texts)
    assert TUTORIAL_LABEL in texts


def title(fig):
    (legend,) = fig.legends
    return legend.get_title().get_text()


def test_title_names_size_and_steps_when_all_groups_share_them():
    assert title(draw_chart([r for r in workshop_records() if r["device"] == H100])) == (
        "Latency per step: 1024x1024, 30 steps"
    )
    assert "differ" in title(draw_chart(workshop_records()))


def test_memory_panel_says_not_applicable_on_cpu():
    fig = draw_chart([r for r in workshop_records() if r["device"] == CPU])
    memory = axes_titled(fig, "Peak GPU memory")
    assert not memory.patches
    assert any("n/a on CPU" in text.get_text() for text in memory.texts)


def test_no_measured_step_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no measured step"):
        draw_chart([])
    with pytest.raises(ValueError, match="no measured step"):
        draw_chart([record("01", H100, None, status="out_of_memory")])
    with pytest.raises(ValueError, match="no measured step"):  # the newest try of 01 ran out of memory
        draw_chart([record("01", H100, 5.0), record("01", H100, None, status="out_of_memory")])
    with pytest.raises(ValueError, match="results.json"):
        chart_from_dir(tmp_path)


def test_chart_from_dir_saves_beside_the_results(tmp_path):
    for r in workshop_records():
        append_record(tmp_path, r)
    path = chart_from_dir(tmp_path)
    assert path == tmp_path / CHART_FILE
    assert imread(path).shape[0] > 800


def test_a_noisy_step_is_marked_on_its_bar():
    records = [record(step, H100, median) for step, median in H100_MEDIANS.items()]
    records[4]["noisy"] = True  # step 05 measured while something else used the machine
    latency = axes_titled(draw_chart(records), "Latency")
    marked = [text.get_text() for text in latency.texts if "NOISY" in text.get_text()]
    assert len(marked) == 1 and marked[0].startswith(f"{H100_MEDIANS['05']:.2f} s")


def test_records_it_cant_draw_are_left_out_with_a_line_each(capsys):
    records = [record(step, H100, median) for step, median in H100_MEDIANS.items()]
    records[1] = {k: v for k, v in records[1].items() if k != "device"}
    records[2]["median_s"] = 0
    latency = axes_titled(draw_chart(records), "Latency")
    assert len(bars_named(latency, H100)) == len(H100_MEDIANS) - 2
    assert capsys.readouterr().out.splitlines() == [
        "Skipped record 2 (step 02) of these records: device is null, not a name.",
        "Skipped record 3 (step 03) of these records: median_s is 0, not a positive number.",
    ]
