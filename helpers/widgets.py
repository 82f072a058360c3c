"""Two notebook panels for trying the course by hand.

`playground(pipe, params, step)`: change the prompt, size, steps, guidance or seed, press Generate, and see the
image next to the fp32 baseline with its latency and spread. Once released (a notebook's last cell frees the GPU
for the next notebook), it builds the step's pipeline again on its next click.
`flags_panel(params)`: switch each optimization on or off, rebuild the pipeline, time it, and compare every
configuration tried in one table.

Both are objects holding `.widget` (what the notebook shows), their input widgets as attributes and the
method their button calls, so a test can drive them without a browser.
"""

import dataclasses
import html
import io

import ipywidgets as widgets
import torch

from .errors import ModelUnavailable
from .images import describe_quality, generate, image_size, quality, side_by_side
from .ladder import build, build_pipeline, torchao_problem
from .machine import device_name
from .memory import free_memory, reset_compiler
from .models import low_precision_dtype
from .params import COMPILE_MODES
from .recording import baseline_image
from .regions import DEFAULT_REGIONS, REGIONS
from .sentences import measurement_sentence
from .sources import native_size
from .steps import Settings, StepUnavailable, get_step
from .timing import benchmark

# The peak is the weights plus one denoising step's (or the VAE decode's) activations: the number of steps doesn't
# change it, a smaller image does.
OUT_OF_MEMORY_MESSAGE = "out of GPU memory: try a smaller height and width, or free other GPU work"
COMPILE_CHOICES = (("off", "off"), ("whole UNet + VAE decoder (step 04)", "full"), ("regional (step 07)", "regional"))


def show_image(image_widget, image):
    """Put `image` in the widget as PNG and unhide it (an empty one shows as a broken-image icon)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image_widget.value = buffer.getvalue()
    image_widget.width = str(image.width)  # its own size: a box would otherwise stretch it to the panel's width
    image_widget.layout.display = ""


def latency_sentence(measurement, device):
    """One line: the median with its spread, how many runs, where, and the first call on its own."""
    text = measurement_sentence(measurement.median_s, measurement.iqr_s, runs=len(measurement.samples_s),
                                device=device, first_call_s=measurement.first_call_s)
    if measurement.peak_memory_gb is not None:
        text += f"; peak GPU memory {measurement.peak_memory_gb:.2f} GB"
    return text


def red(text):
    return f'<span style="color:#b00020">{html.escape(text)}</span>'


def time_images(pipe, params, warmup, runs, status):
    """`benchmark` of one image for `params`; its own progress bar shows in the panel's output area."""
    status.value = f"timing: 1 first call, {warmup} warm-up, {runs} timed (the first call compiles, if compile is on)"
    return benchmark(lambda: generate(pipe, params), warmup=warmup, runs=runs, description="images")


def comparison(image, params, label):
    """The image beside the baseline's, and a sentence saying how close they are (or why there is none)."""
    baseline = baseline_image(params)
    if baseline is None:
        note = "No fp32 baseline for exactly these parameters (notebook 01 records its own): shown alone."
    else:
        scores = describe_quality(quality(image, baseline))
        note = f"Left: notebook 01's fp32 image for the same parameters; right: {label} ({scores})."
    return side_by_side(image, baseline, label), note


class Playground:
    """Inputs for the parameters that decide an image, a Generate button, and what the last click made."""

    def __init__(self, pipe, params, label="this pipeline", warmup=0, runs=3, step=None):
        self.pipe, self.params, self.label, self.step = pipe, params, label, step
        self.warmup, self.runs = warmup, runs
        height, width = image_size(params)
        self.prompt = widgets.Textarea(value=params.prompt, description="prompt", layout={"width": "95%"})
        self.negative_prompt = widgets.Text(
            value=params.negative_prompt, description="negative", layout={"width": "95%"}
        )
        # Plain int inputs, not bounded ones: a bad value reaches Params, which says what is wrong with it.
        self.steps = widgets.IntText(value=params.steps, description="steps")
        self.guidance = widgets.FloatText(value=params.guidance, description="guidance")
        self.seed = widgets.IntText(value=params.seed, description="seed")
        self.height = widgets.IntText(value=height, description="height")
        self.width = widgets.IntText(value=width, description="width")
        self.button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.status = widgets.Label()
        self.message = widgets.HTML()
        self.image = widgets.Image(format="png", layout={"max_width": "100%", "display": "none"})
        self.latency = widgets.HTML()
        self.baseline_note = widgets.Label()
        self.output = widgets.Output()
        self.last_measurement = None
        self.last_image = None
        self.button.on_click(self._clicked)
        self.widget = widgets.VBox([
            self.prompt,
            self.negative_prompt,
            widgets.HBox([self.steps, self.guidance, self.seed]),
            widgets.HBox([self.height, self.width]),
            widgets.HBox([self.button, self.status]),
            self.output,
            self.message,
            self.latency,
            self.image,
            self.baseline_note,
        ])
        # Stable hooks for the browser test (and for anyone styling the panel).
        self.widget.add_class("sdxl-playground")
        self.latency.add_class("sdxl-latency")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _clicked(self, _button):
        # Errors nobody planned for show as a traceback in the panel, not in JupyterLab's hidden log.
        with self.output:
            self.generate()

    def release_pipeline(self):
        """Let go of the pipeline, so that its memory can be freed; the next click builds the step's again."""
        self.pipe = None

    def pipeline(self):
        """The pipeline to time: the one given, or, once released, the step's rebuilt by `helpers.build`."""
        if self.pipe is None:
            if self.step is None:
                raise ValueError("This panel's pipeline was released: run the notebook's cells again to play.")
            self.status.value = f"building notebook {self.step}'s pipeline again (compiled steps compile again)"
            self.pipe = build(self.params.model, through=self.step, compile_mode=self.params.compile_mode,
                              verbose=False)
        return self.pipe

    def requested_params(self):
        """Params from the inputs; raises ValueError with one sentence when one can't work."""
        native = native_size(self.params.model)

        def side(value, original):
            # Keep None (the native size) when it is asked for, so the baseline recorded with None still matches.
            return None if original is None and value == native else value

        return dataclasses.replace(
            self.params,
            prompt=self.prompt.value,
            negative_prompt=self.negative_prompt.value,
            steps=self.steps.value,
            guidance=self.guidance.value,
            seed=self.seed.value,
            height=side(self.height.value, self.params.height),
            width=side(self.width.value, self.params.width),
        )

    def generate(self):
        """What the button does: check the inputs, time the image, show it beside the baseline."""
        try:
            params = self.requested_params()
        except ValueError as error:
            self.status.value = ""
            self.message.value = red(str(error))
            return
        self.message.value = ""
        self.button.disabled = True
        out_of_memory = False
        failure = None
        try:
            measurement = time_images(self.pipeline(), params, self.warmup, self.runs, self.status)
        except torch.cuda.OutOfMemoryError:
            out_of_memory = True
        except (ModelUnavailable, ValueError) as error:
            failure = str(error)
        finally:
            self.button.disabled = False
        if failure is not None:
            self.status.value = ""
            self.message.value = red(failure)
            return
        if out_of_memory:
            # Freed here, outside the except block, once the traceback no longer holds the activations.
            free_memory()
            self.status.value = ""
            self.message.value = red(OUT_OF_MEMORY_MESSAGE)
            return
        self.last_measurement, self.last_image = measurement, measurement.output
        shown, self.baseline_note.value = comparison(measurement.output, params, self.label)
        show_image(self.image, shown)
        self.latency.value = html.escape(latency_sentence(measurement, device_name(self.pipe.device)))
        self.status.value = "done"


def playground(pipe, params, step=None, label=None, warmup=0, runs=3):
    """A panel to change the image's parameters and time `pipe` on them: few runs, so a click is quick.

    `step` ("04") names the notebook's step: after `helpers.release(panel)` the panel rebuilds that step's pipeline.
    """
    label = label or (f"{step} {get_step(step).title}" if step else "this pipeline")
    return Playground(pipe, params, label=label, warmup=warmup, runs=runs, step=step and get_step(step).id)


def results_table(rows):
    """HTML table of every configuration tried, with its speed-up against the first one."""
    first_s = rows[0]["median_s"]
    headers = ("#", "configuration", "median", "IQR", "first call", "speed-up vs #1")
    lines = ["<tr>" + "".join(f"<th>{header}</th>" for header in headers) + "</tr>"]
    for number, row in enumerate(rows, 1):
        lines.append(
            f"<tr><td>{number}</td><td>{html.escape(row['configuration'])}</td><td>{row['median_s']:.3f} s</td>"
            f"<td>{row['iqr_s']:.3f} s</td><td>{row['first_call_s']:.2f} s</td>"
            f"<td>{first_s / row['median_s']:.2f}x</td></tr>"
        )
    style = "<style>.sdxl-table th, .sdxl-table td {padding: 2px 10px; text-align: left}</style>"
    return style + '<table class="sdxl-table">' + "".join(lines) + "</table>"


class FlagsPanel:
    """A toggle per optimization, a Rebuild button, and a table of every configuration tried."""

    def __init__(self, params, device=None):
        self.params, self.device = params, device
        low = str(low_precision_dtype(device, verbose=False)).removeprefix("torch.")
        self.dtype = widgets.Dropdown(options=[("float32", False), (f"{low} (low precision)", True)], value=True,
                                      description="dtype")
        self.sdpa = widgets.Checkbox(value=True, description="SDPA attention")
        self.fused_qkv = widgets.Checkbox(value=False, description="fused QKV")
        self.int8 = widgets.Checkbox(value=False, description="int8 dynamic")
        self.int8_note = widgets.Label(torchao_problem() or "")
        self.int8.disabled = bool(self.int8_note.value)
        self.compile = widgets.Dropdown(options=COMPILE_CHOICES, value="off", description="compile")
        self.compile_mode = widgets.Dropdown(options=COMPILE_MODES, value=params.compile_mode, description="mode",
                                             disabled=True)
        self.regions = widgets.Dropdown(options=list(REGIONS), value=DEFAULT_REGIONS, description="regions",
                                        disabled=True)  # what a regional compile compiles (notebook 08, part 3)
        self.button = widgets.Button(description="Rebuild and time", button_style="primary", icon="refresh")
        self.status = widgets.Label()
        self.message = widgets.HTML()
        self.output = widgets.Output()
        self.image = widgets.Image(format="png", layout={"max_width": "100%", "display": "none"})
        self.latency = widgets.HTML()
        self.baseline_note = widgets.Label()
        self.table = widgets.HTML()
        self.pipe = None
        self.rows = []
        self.last_measurement = None
        self.last_image = None
        self.sdpa.observe(self._sdpa_changed, "value")
        self.compile.observe(self._compile_changed, "value")
        self.button.on_click(self._clicked)
        self.widget = widgets.VBox([
            widgets.HBox([self.dtype, self.sdpa, self.fused_qkv]),
            widgets.HBox([self.int8, self.int8_note]),
            widgets.HBox([self.compile, self.compile_mode, self.regions]),
            widgets.HBox([self.button, self.status]),
            self.output,
            self.message,
            self.latency,
            self.image,
            self.baseline_note,
            self.table,
        ])
        self.widget.add_class("sdxl-flags")

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def _sdpa_changed(self, change):
        # diffusers' fused QKV always runs through SDPA: without SDPA the flag would be a lie.
        if not change["new"]:
            self.fused_qkv.value = False
        self.fused_qkv.disabled = not change["new"]

    def _compile_changed(self, change):
        self.compile_mode.disabled = change["new"] == "off"
        self.regions.disabled = change["new"] != "regional"

    def _clicked(self, _button):
        with self.output:
            self.rebuild()

    def settings(self):
        """The toggles as a Settings row, the same kind of row as each step's in `helpers.STEPS`."""
        return Settings(low_precision=self.dtype.value, sdpa=self.sdpa.value, fused_qkv=self.fused_qkv.value,
                        int8=self.int8.value, compile=self.compile.value)

    def configuration(self, settings):
        dtype = low_precision_dtype(self.device, verbose=False) if settings.low_precision else torch.float32
        text = f"{str(dtype).removeprefix('torch.')}, {settings.sentence()}"
        if settings.compile == "regional":
            return f"{text} ({self.compile_mode.value}, regions {self.regions.value})"
        return text + (f" ({self.compile_mode.value})" if settings.compile != "off" else "")

    def release_pipeline(self):
        """Drop the previous pipeline, its compiled code and its memory before the next one loads, so both never
        coexist and the dead pipeline's code counts no more toward Dynamo's recompile limit.

        `torch.compiler.reset()` forgets every compiled function of the process: a compiled pipeline of the
        notebook's own compiles again at its next call, from Inductor's cache on disk where it has the kernels.
        """
        self.pipe = None
        reset_compiler()
        free_memory()

    def rebuild(self):
        """What the button does: free the old pipeline, build one with the toggles' flags, time it, add a row."""
        self.message.value = ""
        self.button.disabled = True
        self.release_pipeline()
        failure = None
        try:
            settings = self.settings()
            configuration = self.configuration(settings)
            self.status.value = f"building: {configuration}"
            self.pipe = build_pipeline(self.params.model, settings, compile_mode=self.compile_mode.value,
                                       device=self.device, regions=self.regions.value)
            measurement = time_images(self.pipe, self.params, self.params.warmup, self.params.runs, self.status)
        except torch.cuda.OutOfMemoryError:
            failure = OUT_OF_MEMORY_MESSAGE
        except (ModelUnavailable, StepUnavailable, ValueError) as error:
            failure = str(error)
        finally:
            self.button.disabled = False
        if failure is not None:
            self.pipe = None
            free_memory()
            self.status.value = ""
            self.message.value = red(failure)
            return
        self.last_measurement, self.last_image = measurement, measurement.output
        self.rows.append({"settings": settings, "configuration": configuration, "median_s": measurement.median_s,
                          "iqr_s": measurement.iqr_s, "first_call_s": measurement.first_call_s})
        shown, self.baseline_note.value = comparison(measurement.output, self.params, f"#{len(self.rows)}")
        show_image(self.image, shown)
        self.latency.value = html.escape(latency_sentence(measurement, device_name(self.pipe.device)))
        self.table.value = results_table(self.rows)
        self.status.value = "done"


def flags_panel(params, device=None):
    """A panel to switch optimizations on and off one at a time and see what each is worth."""
    return FlagsPanel(params, device=device)
