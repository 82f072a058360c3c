"""The parameters every notebook and the runner share, checked before any model loads.

`Params` is their one source: its fields and defaults are the notebooks' parameters cell (a test holds them equal),
the runner's command-line options (made from the fields and their help) and what the notebooks record.
"""

import math
from dataclasses import asdict, dataclass, field, fields

DEFAULT_PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
DEFAULT_COMPILE_MODE = "max-autotune"  # the course's mode: every compiling function and parameter defaults to it
MAX_SIDE = 4096
MAX_SEED = 2**64 - 1  # torch's generators take a 64-bit seed


def _option(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Params:
    model: str = _option("auto", "auto, tiny, sdxl-random, a hub id or a local folder")
    prompt: str = _option(DEFAULT_PROMPT, "what the image shows")
    negative_prompt: str = _option("", "what it should not show")
    steps: int = _option(30, "denoising steps per image")
    height: int | None = _option(None, "pixels; None: the model's native size (1024 for SDXL, 128 for tiny)")
    width: int | None = _option(None, "pixels; None: the model's native size")
    guidance: float = _option(5.0, "classifier-free guidance scale")
    seed: int = _option(0, "random seed of the starting noise")
    warmup: int = _option(1, "untimed calls after the first one")
    runs: int = _option(5, "timed calls")
    out_dir: str = _option("../outputs", "folder for images and results.json")
    compile_mode: str = _option(DEFAULT_COMPILE_MODE, "torch.compile mode of the compiled steps")
    compile_cache: str | None = _option(
        None, "a file made by `python -m helpers warm`: its compile artifacts are loaded before the first compile"
    )

    def __post_init__(self):
        for message in problems(self):
            raise ValueError(message)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_cell(cls, namespace):
        """Params from a notebook's parameters cell: the upper-case name of each field (`STEPS` for `steps`)."""
        return cls(**{f.name: namespace[f.name.upper()] for f in fields(cls) if f.name.upper() in namespace})


def cell_names(params=None):
    """{NAME: value} as a notebook's parameters cell writes them (the defaults, without `params`)."""
    return {name.upper(): value for name, value in (params or Params()).to_dict().items()}


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _not_utf8(params):
    """A sentence for each text parameter holding bytes that aren't UTF-8 (from a terminal in another encoding)."""
    found = []
    for name, value in params.to_dict().items():
        try:
            if isinstance(value, str):
                value.encode("utf-8")
        except UnicodeEncodeError:
            shown = value.encode("utf-8", errors="replace").decode("utf-8")
            found.append(f"{name} holds bytes that are not UTF-8 text ({shown!r}): type it again in a UTF-8 terminal.")
    return found


def problems(params):
    """One sentence for each parameter that can't work, in the order the fields are declared."""
    found = _not_utf8(params)
    if not isinstance(params.model, str) or not params.model.strip():
        found.append("model must be 'auto', 'tiny', 'sdxl-random', a hub id or a local folder.")
    if not isinstance(params.prompt, str) or not params.prompt.strip():
        found.append("prompt is empty: describe the image you want, e.g. " + repr(DEFAULT_PROMPT) + ".")
    if not isinstance(params.negative_prompt, str):
        found.append("negative_prompt must be text (use '' for none).")
    if not _is_int(params.steps) or not 1 <= params.steps <= 1000:
        found.append(f"steps must be a whole number from 1 to 1000, got {params.steps!r}.")
    for name in ("height", "width"):
        value = getattr(params, name)
        if value is None:
            continue
        if not _is_int(value) or value % 8 or not 64 <= value <= MAX_SIDE:
            found.append(
                f"{name} must be a multiple of 8 from 64 to {MAX_SIDE} (the VAE works on 8x8 pixel patches), "
                f"got {value!r}."
            )
    if not _is_number(params.guidance) or params.guidance < 0:
        found.append(f"guidance must be a finite number of 0 or more (SDXL's usual is 5.0), got {params.guidance!r}.")
    if not _is_int(params.seed) or not 0 <= params.seed <= MAX_SEED:
        found.append(f"seed must be a whole number from 0 to {MAX_SEED} (a 64-bit seed), got {params.seed!r}.")
    if not _is_int(params.warmup) or params.warmup < 0:
        found.append(f"warmup must be a whole number of 0 or more, got {params.warmup!r}.")
    if not _is_int(params.runs) or params.runs < 1:
        found.append(f"runs must be a whole number of 1 or more, got {params.runs!r}.")
    if params.compile_mode not in COMPILE_MODES:
        found.append(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {params.compile_mode!r}.")
    if params.compile_cache is not None and (not isinstance(params.compile_cache, str)
                                             or not params.compile_cache.strip()):
        found.append("compile_cache must be the path of a file made by `python -m helpers warm`, or None, "
                     f"got {params.compile_cache!r}.")
    return found
