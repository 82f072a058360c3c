"""The seven steps of the course, in the one order that the notebooks, the runner and the chart share."""

from dataclasses import dataclass


class StepUnavailable(RuntimeError):
    """A step can't run on this machine (a missing library, say); the runner records it and goes on."""


@dataclass(frozen=True)
class Step:
    id: str
    title: str
    notebook: str
    # Seconds for one 1024x1024, 30-step image on an 80 GB A100, from the PyTorch 2 SDXL tutorial
    # this course started from; None where the tutorial has no such step.
    a100_seed_s: float | None


STEPS = (
    Step("01", "fp32 baseline", "01_baseline.ipynb", 7.36),
    Step("02", "bfloat16", "02_bfloat16.ipynb", 4.63),
    Step("03", "SDPA", "03_sdpa.ipynb", 3.31),
    Step("04", "torch.compile", "04_torch_compile.ipynb", 2.54),
    Step("05", "fused QKV", "05_fused_qkv.ipynb", 2.52),
    Step("06", "int8 dynamic", "06_int8_dynamic.ipynb", 2.43),
    Step("07", "regional compile", "07_regional_compile.ipynb", None),
)
STEP_IDS = tuple(step.id for step in STEPS)


def get_step(key):
    """The step whose id ("04"), number (4), title ("torch.compile") or notebook name ("04_torch_compile",
    "torch_compile") is `key`."""
    text = str(key).strip().lower().removesuffix(".ipynb")
    for step in STEPS:
        notebook = step.notebook.lower().removesuffix(".ipynb")
        if text in (step.id, step.id.lstrip("0"), step.title.lower(), notebook, notebook.split("_", 1)[1]):
            return step
    known = ", ".join(f"{s.id} ({s.title})" for s in STEPS)
    raise ValueError(f"Unknown step {key!r}: choose one of {known}.")


def steps_through(step_id):
    """The steps from the first up to and including `step_id`."""
    last = STEP_IDS.index(get_step(step_id).id)
    return STEPS[: last + 1]
