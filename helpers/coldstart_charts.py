"""Appendix 08's charts and tables: compile modes, ways to start, and regional compilation's choices of regions
against the full compile."""

from .coldstart import PHASES, WAY_NAMES, compile_description, steady_sentence


def draw_compile_modes(records, path=None):
    """Each compile mode's first call (compile and run) beside its steady seconds per image, in two panels."""
    from matplotlib.figure import Figure

    modes = [r["compile_mode"] for r in records]
    figure = Figure(figsize=(10, 0.6 * len(records) + 1.6), layout="constrained")
    first, steady = figure.subplots(1, 2, sharey=True)
    for axis, key, title in ((first, "first_call_s", "first call: compile + one image (s)"),
                             (steady, "median_s", "steady: seconds per image (median, IQR)")):
        values = [r[key] for r in records]
        errors = [r["iqr_s"] / 2 for r in records] if key == "median_s" else None
        bars = axis.barh(modes, values, xerr=errors, color="#4c72b0" if key == "median_s" else "#dd8452")
        axis.bar_label(bars, labels=[f"{v:.3f}" if key == "median_s" else f"{v:.1f}" for v in values], padding=3)
        axis.set_title(title)
        axis.margins(x=0.25)
    first.invert_yaxis()
    figure.suptitle(f"Compile modes on {records[0]['device']}, {records[0]['params']['model']}")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def draw_starts(records, path=None):
    """Each way of starting as one stacked bar: import, load, load cache or package, first call."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 0.7 * len(records) + 2), layout="constrained")
    axis = figure.subplots()
    labels = [f"{WAY_NAMES[r['way']]}\n({compile_description(r)})" for r in records]
    left = [0.0] * len(records)
    for key, label in PHASES:
        values = [r[key] for r in records]
        axis.barh(labels, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values)]
    for y, r in enumerate(records):
        axis.text(left[y], y, f" {r['to_first_image_s']:.1f} s\n then {steady_sentence(r)}", va="center", fontsize=8)
    axis.invert_yaxis()
    axis.margins(x=0.45)
    axis.set_xlabel("seconds from a new Python process to its first image")
    figure.legend(loc="outside lower center", ncol=len(PHASES))
    axis.set_title(f"Starting the step-04 pipeline on {records[0]['device']}, {records[0]['params']['model']}")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def regions_table(arms, params):
    """One line per arm ({name: start record}, the full compile first where there is one): graphs its first call
    compiled, the first call, the steady median (IQR), the share of the UNet's FLOPs it leaves eager here and in SDXL
    at 1024x1024, its image against notebook 01's baseline (where one was recorded with these parameters) and
    recompile-limit hits; then each arm's ratios to the full compile."""
    from .flops import eager_share
    from .images import image_size, quality
    from .recording import baseline_image

    height, width = image_size(params)
    baseline = baseline_image(params)
    lines = [f"{'':28}{'graphs':>7}{'first call':>12}{'steady (IQR)':>20}{'eager FLOPs':>13}{'SDXL 1024':>11}"
             f"{'SSIM vs 01':>12}{'limit hits':>12}"]
    for name, record in arms.items():
        regions = record.get("regions")
        here = eager_share(params.model, height, width, regions=regions) if regions else 0.0
        sdxl = eager_share("sdxl-random", 1024, 1024, regions=regions) if regions else 0.0
        score = record.get("ssim")  # kept by scripts/compare_regions.py, whose arms' images may be gone
        if score is None and baseline is not None:
            score = quality(_image(record), baseline)["ssim"]
        ssim = f"{score:.3f}" if score is not None else "no 01"
        steady = f"{record['median_s']:.3f} s ({record['iqr_s']:.3f})"
        lines.append(f"{name:28}{record['graphs']:>7}{record['first_call_s']:>10.1f} s{steady:>20}"
                     f"{100 * here:>12.1f}%{100 * sdxl:>10.1f}%{ssim:>12}{record['recompile_limit_hits']:>12}")
    full = next(iter(arms.values()))
    for name, record in list(arms.items())[1:] if full["compile"] == "full" else []:  # ratios to a full compile
        lines.append(f"{name}: first call {record['first_call_s'] / full['first_call_s']:.2f}x the full compile's, "
                     f"steady {100 * (record['median_s'] / full['median_s'] - 1):+.1f}%")
    return "\n".join(lines)


def _image(record):
    from PIL import Image

    return Image.open(record["image"])


def draw_regions(arms, path=None):
    """First call against steady latency, one point per arm, the full compile marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axis = figure.add_subplot()
    for name, record in arms.items():
        full = record["compile"] == "full"
        axis.errorbar(record["first_call_s"], record["median_s"], yerr=record["iqr_s"] / 2, capsize=3,
                      marker="s" if full else "o", color="black" if full else None, label=name)
    axis.set_xlabel("first call: a cold compile and one image (s)")
    axis.set_ylabel("steady median per image (s), bars: IQR")
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    first = next(iter(arms.values()))
    params = first["params"]
    size = f"{params['height']}x{params['width']}" if params.get("height") and params.get("width") else "native size"
    axis.set_title(f"Regions against the full compile on {first['device']}, {params['model']} at {size}", fontsize=10)
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
