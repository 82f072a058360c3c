"""The seven steps of the course: one table, in the one order that the notebooks, the builder, the flags panel,
the runner and the chart share."""

from dataclasses import dataclass

COMPILE_KINDS = ("off", "full", "regional")


class StepUnavailable(RuntimeError):
    """A step can't run on this machine (a missing library, say); the runner records it and goes on."""


@dataclass(frozen=True)
class Settings:
    """What a pipeline is built with: a row of the ladder, or what the flags panel ticks."""

    low_precision: bool  # bfloat16 (float16 on GPUs without it) instead of float32
    sdpa: bool  # scaled_dot_product_attention instead of matmul + softmax + matmul
    fused_qkv: bool  # one projection for q, k and v
    int8: bool  # torchao's dynamic int8 quantization of the UNet's wide linear layers
    compile: str  # "off", "full" (the UNet and the VAE decoder whole) or "regional" (the repeated blocks)

    def __post_init__(self):
        if self.compile not in COMPILE_KINDS:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_KINDS)}, got {self.compile!r}.")
        if self.fused_qkv and not self.sdpa:
            raise ValueError("fused QKV runs through SDPA (diffusers' FusedAttnProcessor2_0): switch SDPA on to fuse.")

    def sentence(self):
        """'bfloat16, SDPA, fused QKV, compiled full': the settings in a few words (`dtype` named by the caller)."""
        parts = ["SDPA" if self.sdpa else "plain attention"]
        parts += [name for name, on in (("fused QKV", self.fused_qkv), ("int8", self.int8)) if on]
        if self.compile != "off":
            parts.append(f"compiled {self.compile}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Step:
    id: str
    title: str
    notebook: str
    # Seconds for one 1024x1024, 30-step image on an 80 GB A100 in the PyTorch 2 SDXL tutorial this course started
    # from; None where the tutorial has no such step.
    tutorial_a100_s: float | None
    settings: Settings
    charted = True  # a bar of the chart: its records are the ladder's, also those of a failure
    module = "results"  # the helpers module whose `summary_of(out_dir, notebook)` is the runner's line for it


STEPS = (
    #    id    title               notebook                     A100 s            low    sdpa   fused  int8   compile
    Step("01", "fp32 baseline",    "01_baseline.ipynb",         7.36, Settings(False, False, False, False, "off")),
    Step("02", "bfloat16",         "02_bfloat16.ipynb",         4.63, Settings(True,  False, False, False, "off")),
    Step("03", "SDPA",             "03_sdpa.ipynb",             3.31, Settings(True,  True,  False, False, "off")),
    Step("04", "torch.compile",    "04_torch_compile.ipynb",    2.54, Settings(True,  True,  False, False, "full")),
    Step("05", "fused QKV",        "05_fused_qkv.ipynb",        2.52, Settings(True,  True,  True,  False, "full")),
    Step("06", "int8 dynamic",     "06_int8_dynamic.ipynb",     2.43, Settings(True,  True,  True,  True,  "full")),
    Step("07", "regional compile", "07_regional_compile.ipynb", None, Settings(True,  True,  True,  True,  "regional")),
)
STEP_IDS = tuple(step.id for step in STEPS)
COMPILED_STEPS = tuple(step.id for step in STEPS if step.settings.compile != "off")  # what a compile-cache file warms
WARMED_STEPS = "04-07"  # what `python -m helpers warm` compiles unless --only says otherwise


@dataclass(frozen=True)
class Appendix:
    """A notebook after the ladder: it measures the final pipelines further, and adds no step to the chart."""

    id: str
    title: str
    notebook: str
    module: str  # the helpers module whose `summary_of(out_dir, notebook)` is the runner's line for it
    charted = False  # its own records and charts; a failure is the runner's line only


# The appendices, which the runner runs when `--only` names them (08, 09 or a range such as 01-09).
APPENDICES = (
    Appendix("08", "cold start", "08_cold_start.ipynb", "coldstart"),
    Appendix("09", "throughput", "09_throughput.ipynb", "throughput"),
)


def _find(key, table):
    text = str(key).strip().lower().removesuffix(".ipynb")
    for step in table:
        notebook = step.notebook.lower().removesuffix(".ipynb")
        if text in (step.id, step.id.lstrip("0"), step.title.lower(), notebook, notebook.split("_", 1)[1]):
            return step
    known = ", ".join(f"{s.id} ({s.title})" for s in table)
    raise ValueError(f"Unknown step {key!r}: choose one of {known}.")


def get_step(key):
    """The step whose id ("04"), number (4), title ("torch.compile") or notebook name ("04_torch_compile",
    "torch_compile") is `key`."""
    return _find(key, STEPS)


def get_notebook(key):
    """A step of the ladder or an appendix the runner runs, named as `get_step` names steps."""
    return _find(key, STEPS + APPENDICES)


def select_steps(only):
    """The notebooks to run, in course order: the seven steps (`only` None), or those named in `only` ("01,03",
    "4-7", "08" or "01-09": the appendices run only when named)."""
    notebooks = STEPS + APPENDICES
    if only is None:
        return list(STEPS)
    if not str(only).strip():
        raise ValueError("--only is empty: name the steps to run, e.g. 01,03 or 04-07, or leave it out for 01-07.")
    wanted = set()
    for part in str(only).split(","):
        if "-" in part.strip("-"):
            first, last = (get_notebook(p).id for p in part.split("-", 1))
            if first > last:
                raise ValueError(f"The range {part.strip()!r} in --only runs backwards: write {last}-{first}.")
            wanted |= {s.id for s in notebooks if first <= s.id <= last}
        else:
            wanted.add(get_notebook(part).id)
    return [step for step in notebooks if step.id in wanted]
