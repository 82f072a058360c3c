"""The course's one chart: each step's latency with its spread, beside its speedup, image quality, peak GPU
memory and first-call (compile) time, steps always in the order of `STEPS`. Each (device, model) in the results
is a group of bars of its own, so a workshop can put its attendees' GPUs side by side, and the tutorial's
A100 numbers stand beside them as grey hatched bars. A step that ran out of memory or failed leaves a labelled
gap instead of a bar. The figure is a plain `matplotlib.figure.Figure`: no pyplot state, no rcParams touched.
"""

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from .files import READ_ONLY_ERRNOS, OutputError, write_atomically
from .results import RESULTS_FILE, latest_records, load_records, usable_records
from .steps import STEPS

CHART_FILE = "latency_per_step.png"
TUTORIAL_WORKLOAD = "1024x1024, 30 steps"
TUTORIAL_LABEL = f"A100 (tutorial, {TUTORIAL_WORKLOAD})"
TUTORIAL_STYLE = {"facecolor": "lightgrey", "edgecolor": "dimgrey", "hatch": "//"}
GAP_LABELS = {"out_of_memory": "OOM", "failed": "failed", "stopped": "stopped", "skipped": "skipped"}
LABEL_SIZE = 7.5


def _seconds(value):
    """Seconds with as many decimals as their size deserves: 0.043, 2.54, 45.2, 312."""
    decimals = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 0.1 else 3
    return f"{value:.{decimals}f}"


def _is_measured(record):
    return record.get("status") == "ok" and record.get("median_s") is not None


def _workload(record):
    """'1024x1024, 30 steps': the image size that ran and the denoising steps."""
    return f"{record['width']}x{record['height']}, {record['params'].get('steps')} steps"


def _groups(records):
    """The newest record of each step, as {step id: record}, for each (device, model) in order of appearance."""
    groups = {}
    for record in latest_records(records):
        groups.setdefault((record["device"], record["model"]), {})[record["step"]] = record
    return list(groups.values())


def _group_label(by_step, with_workload):
    first = next(iter(by_step.values()))
    # The dtype changes along the ladder (float32 for 01, bfloat16 after), so a group names each of its own.
    dtypes = "/".join(dict.fromkeys(str(r.get("dtype")) for r in by_step.values()))
    label = f"{first['device']} · {first['model']} · {dtypes}"
    if with_workload:
        label += " · " + "; ".join(dict.fromkeys(_workload(r) for r in by_step.values()))
    return label


def _values(by_step, value_of):
    """{step id: value} for this group's measured steps where `value_of(record)` is not None."""
    values = {step: value_of(r) for step, r in by_step.items() if _is_measured(r)}
    return {step: value for step, value in values.items() if value is not None}


def _gap(record, step_id, missing_text):
    """What to write where a group has no bar for a step, and in which colour; None where it never ran."""
    if record is None:
        return None
    if record.get("status") in GAP_LABELS:
        return GAP_LABELS[record["status"]], "tab:red"
    return missing_text(step_id), "grey"


def _draw_bars(ax, groups, values, text_of, tutorial=None, log=False, errors=None, missing_text=lambda step: "n/a"):
    """Grouped bars at each step: one slot per group, and a last one for `tutorial` ({step id: value}) if given.

    `values` and `errors` hold a {step id: value} per group; `text_of(value, record)` labels a bar. Where a group
    has a record but no bar, its status (OOM, failed) or `missing_text(step id)` is written instead.
    """
    slots = len(groups) + (tutorial is not None)
    width = 0.8 / slots
    rotation = 90 if slots > 1 else 0
    heights_drawn = []
    for slot, (by_step, group_values) in enumerate(zip(groups, values)):
        offset = (slot - (slots - 1) / 2) * width
        steps = [(x, step.id) for x, step in enumerate(STEPS) if step.id in group_values]
        heights = [group_values[step] for _, step in steps]
        yerr = [errors[slot][step] for _, step in steps] if errors else None
        bars = ax.bar([x + offset for x, _ in steps], heights, width, yerr=yerr, capsize=2, color=f"C{slot}",
                      label=_group_label(by_step, with_workload=True))
        ax.bar_label(bars, [text_of(group_values[step], by_step[step]) for _, step in steps], padding=3,
                     fontsize=LABEL_SIZE, rotation=rotation)
        # bar_label writes above the error bar's cap, so the room above must count the whisker too
        heights_drawn += [h + e for h, e in zip(heights, yerr or [0] * len(heights))]
        for x, step in enumerate(STEPS):
            gap = None if step.id in group_values else _gap(by_step.get(step.id), step.id, missing_text)
            if gap:
                ax.text(x + offset, 0.03, gap[0], transform=ax.get_xaxis_transform(), rotation=90, ha="center",
                        va="bottom", fontsize=LABEL_SIZE + 1, fontweight="bold", color=gap[1])
    if tutorial is not None:
        offset = (slots - 1) / 2 * width
        steps = [(x, step.id) for x, step in enumerate(STEPS) if step.id in tutorial]
        heights = [tutorial[step] for _, step in steps]
        bars = ax.bar([x + offset for x, _ in steps], heights, width, label=TUTORIAL_LABEL, **TUTORIAL_STYLE)
        ax.bar_label(bars, [text_of(h, None) for h in heights], padding=3, fontsize=LABEL_SIZE, rotation=rotation)
        heights_drawn += heights
    _leave_room_for_labels(ax, heights_drawn, log, rotated=rotation != 0)


def _leave_room_for_labels(ax, heights, log, rotated):
    if not heights:
        return
    share = 0.3 if rotated else 0.12  # of the axis height, kept free above the tallest bar for its label
    if log:
        ax.set_yscale("log")
        low, high = min(heights) / 2, max(heights)
        ax.set_ylim(low, high * (high / low) ** (share / (1 - share)))
    else:
        ax.set_ylim(0, max(heights) / (1 - share))


def _step_axis(ax, title, ylabel):
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel(ylabel)
    ax.set_xticks(range(len(STEPS)), [f"{step.id}\n{step.title}" for step in STEPS], fontsize=8)
    ax.set_xlim(-0.5, len(STEPS) - 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _say_empty(ax, text):
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="dimgrey")
    ax.set_yticks([])


def _tutorial_seconds():
    return {step.id: step.tutorial_a100_s for step in STEPS if step.tutorial_a100_s is not None}


def _latency_label(record):
    text = f"{_seconds(record['median_s'])} s"
    if record.get("iqr_s"):
        # The whisker spans the IQR around the median, so ± is half of it.
        text += f" ±{_seconds(record['iqr_s'] / 2)}"
    if record.get("peak_fraction"):
        text += f" · {100 * record['peak_fraction']:.0f}% peak"
    if record.get("noisy"):
        text += " · NOISY"  # the IQR is over 10% of the median: something else may have used the machine
    return text


def _latency_panel(ax, groups):
    runs = sorted({len(r.get("samples_s") or []) for g in groups for r in g.values() if _is_measured(r)})
    title = f"Latency: median of {'/'.join(map(str, runs)) if runs[0] else 'the timed'} runs, whiskers span the IQR"
    medians = [_values(g, lambda r: r["median_s"]) for g in groups]
    # The tutorial's seconds are for its workload only: beside a tiny model on a CPU they would mislead.
    like_tutorial = any(_workload(r) == TUTORIAL_WORKLOAD for g in groups for r in g.values())
    tutorial = _tutorial_seconds() if like_tutorial else None
    seconds = [s for m in medians for s in m.values()] + list((tutorial or {}).values())
    # One slow group (a CPU, a small GPU) would flatten the other groups' bars on a linear axis.
    log = max(seconds) / min(seconds) > 20
    if log:
        title += ", log scale"
    if not like_tutorial:
        title += f"; the tutorial's A100 ran {TUTORIAL_WORKLOAD}, so it is only in the speedups"
    _step_axis(ax, title + " (lower is better)", "seconds")
    _draw_bars(
        ax, groups, medians, lambda s, r: _latency_label(r) if r else f"{_seconds(s)} s", tutorial=tutorial, log=log,
        errors=[_values(g, lambda r: (r.get("iqr_s") or 0) / 2) for g in groups],
    )


def _speedups(by_step):
    """Step 01's median over each step's median, for this group; empty without a measured step 01."""
    baseline = by_step.get("01")
    if baseline is None or not _is_measured(baseline):
        return {}
    return _values(by_step, lambda r: baseline["median_s"] / r["median_s"])


def _speedup_panel(ax, groups):
    _step_axis(ax, "Speedup over step 01 on the same device and model (higher is better)", "x faster")
    tutorial_s = _tutorial_seconds()
    tutorial = {step: tutorial_s["01"] / seconds for step, seconds in tutorial_s.items()}
    _draw_bars(ax, groups, [_speedups(g) for g in groups], lambda x, r: f"{x:.2f}x", tutorial=tutorial)
    ax.axhline(1, color="black", linewidth=0.8)


def _quality_label(record):
    quality = record["quality"]
    psnr = quality.get("psnr_db")
    return f"{quality['ssim']:.3f}" + ("" if psnr is None else f" ({psnr:.0f} dB)")


def _quality_panel(ax, groups):
    _step_axis(ax, "Image quality: SSIM (PSNR) against the step-01 image, 1 = identical", "SSIM")
    ssims = [_values(g, lambda r: (r.get("quality") or {}).get("ssim")) for g in groups]
    if not any(ssims):
        _say_empty(ax, "no quality scores: no step had a step-01 image to compare with")
        return
    _draw_bars(ax, groups, ssims, lambda v, r: _quality_label(r),
               missing_text=lambda step: "reference" if step == "01" else "n/a")
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1])


def _memory_panel(ax, groups):
    _step_axis(ax, "Peak GPU memory (lower is better)", "GB")
    memory = [_values(g, lambda r: r.get("peak_memory_gb")) for g in groups]
    if not any(memory):
        _say_empty(ax, "n/a on CPU: no GPU memory was measured")
        return
    _draw_bars(ax, groups, memory, lambda gb, r: f"{gb:.1f} GB")


def _first_call_panel(ax, groups):
    _step_axis(ax, "First call: compile and warm-up, log scale (lower is better)", "seconds")
    first_calls = [_values(g, lambda r: r.get("first_call_s")) for g in groups]
    if not any(first_calls):
        _say_empty(ax, "no first-call times in these records")
        return
    _draw_bars(ax, groups, first_calls, lambda s, r: f"{_seconds(s)} s", log=True)


def _legend(fig, groups):
    workloads = list(dict.fromkeys(_workload(r) for g in groups for r in g.values()))
    if len(workloads) == 1:
        title = f"Latency per step: {workloads[0]}"
    else:
        title = "Latency per step: image size and steps differ between groups (see below)"
    handles = [
        Patch(color=f"C{slot}", label=_group_label(g, with_workload=len(workloads) > 1))
        for slot, g in enumerate(groups)
    ]
    handles.append(Patch(label=TUTORIAL_LABEL, **TUTORIAL_STYLE))
    # The title heads the legend: constrained layout would lay a separate suptitle over an outside legend.
    fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 2), fontsize=9, frameon=False,
               title=title, title_fontproperties={"size": 14, "weight": "bold"})


def _require_measurement(records, where):
    if not any(_is_measured(r) for r in latest_records(records)):
        raise ValueError(f"There is no measured step in {where} to chart: run notebook 01 (or the runner) first.")


def _save_atomically(fig, path):
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"))


def draw_chart(records, path=None):
    """The chart of `records` (the newest of each device, model and step) as a Figure, saved as PNG at `path`.

    A record it can't draw (a hand-merged one without a device, say) is left out with a line saying why."""
    records = usable_records(records)
    _require_measurement(records, "these records")
    groups = _groups(records)
    fig = Figure(figsize=(15, 14), layout="constrained")
    grid = fig.add_gridspec(3, 2, height_ratios=(1.4, 1, 1))
    _latency_panel(fig.add_subplot(grid[0, :]), groups)
    _quality_panel(fig.add_subplot(grid[1, 0]), groups)
    _speedup_panel(fig.add_subplot(grid[1, 1]), groups)
    _memory_panel(fig.add_subplot(grid[2, 0]), groups)
    _first_call_panel(fig.add_subplot(grid[2, 1]), groups)
    _legend(fig, groups)
    if path is not None:
        _save_atomically(fig, Path(path))
    return fig


def chart_from_dir(out_dir):
    """Draw the records of `<out_dir>/results.json` and save them as `<out_dir>/latency_per_step.png`.

    Where `out_dir` can only be read, the chart goes to the current folder as `<folder name>-latency_per_step.png`,
    and a line says so."""
    out_dir = Path(out_dir)
    records = load_records(out_dir)
    _require_measurement(records, str(out_dir / RESULTS_FILE))
    fig = draw_chart(records)
    path = out_dir / CHART_FILE
    try:
        _save_atomically(fig, path)
    except OutputError as error:
        if error.errno not in READ_ONLY_ERRNOS:
            raise
        path = Path.cwd() / f"{out_dir.resolve().name}-{CHART_FILE}"
        _save_atomically(fig, path)
        print(f"{out_dir} can only be read, so the chart went to the current folder.")
    return path
