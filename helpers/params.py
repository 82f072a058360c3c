"""The parameters every notebook and the runner share, checked before any model loads."""

from dataclasses import asdict, dataclass

DEFAULT_PROMPT = "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MAX_SIDE = 4096


@dataclass
class Params:
    model: str = "auto"
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    steps: int = 30
    height: int | None = None  # None: the model's native size (1024 for SDXL, 128 for the tiny model)
    width: int | None = None
    guidance: float = 5.0
    seed: int = 0
    warmup: int = 1
    runs: int = 5
    out_dir: str = "../outputs"
    compile_mode: str = "max-autotune"

    def __post_init__(self):
        for message in problems(self):
            raise ValueError(message)

    def to_dict(self):
        return asdict(self)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def problems(params):
    """One sentence for each parameter that can't work, in the order the fields are declared."""
    found = []
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
    if not isinstance(params.guidance, (int, float)) or isinstance(params.guidance, bool) or params.guidance < 0:
        found.append(f"guidance must be a number of 0 or more (SDXL's usual is 5.0), got {params.guidance!r}.")
    if not _is_int(params.seed) or params.seed < 0:
        found.append(f"seed must be a whole number of 0 or more, got {params.seed!r}.")
    if not _is_int(params.warmup) or params.warmup < 0:
        found.append(f"warmup must be a whole number of 0 or more, got {params.warmup!r}.")
    if not _is_int(params.runs) or params.runs < 1:
        found.append(f"runs must be a whole number of 1 or more, got {params.runs!r}.")
    if params.compile_mode not in COMPILE_MODES:
        found.append(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {params.compile_mode!r}.")
    return found
