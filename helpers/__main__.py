"""Command line: `python -m helpers run ...` runs the whole series; `python -m helpers warm --out FILE` compiles the
compiled steps once into a file a room can share; `python -m helpers chart DIR` redraws the chart;
`python -m helpers clean` strips outputs from the course's notebooks before a commit."""

import argparse
import ast
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path

from .errors import ModelUnavailable
from .files import OutputError, write_atomically
from .kernels import interrupt_name_and_code
from .params import COMPILE_MODES, Params
from .runner import RunFailed, RunStopped, run_series
from .steps import WARMED_STEPS, select_steps


def _option_type(annotation):
    """str, int or float: what an option of this field's type parses (`int | None` takes an int)."""
    return next((t for t in typing.get_args(annotation) if t is not type(None)), annotation)


def add_params_options(parser, leave_out=("out_dir",)):
    """One option per field of Params (`--negative-prompt` for `negative_prompt`), its default and help from there.
    The output folder is `--out`."""
    for field in fields(Params):
        if field.name in leave_out:
            continue
        default = field.default
        parser.add_argument(
            "--" + field.name.replace("_", "-"), type=_option_type(field.type), default=default,
            choices=COMPILE_MODES if field.name == "compile_mode" else None,
            help=f"{field.metadata['help']} (default {default!r})",
        )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the notebooks in order and draw the chart")
    run.add_argument("--out", required=True, help="folder for executed notebooks, images, results.json, chart")
    add_params_options(run)
    run.add_argument("--only", default=None,
                     help="steps to run, e.g. 01,03, 04-07, or 08, 09, 01-09 for the appendices (default: 01-07)")
    run.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", type=_setting,
                     help="a parameter only some notebooks have, as a Python literal, e.g. "
                          "COMPILE_MODES='[\"default\"]' for 08 or BATCH_SIZES='[1, 2, 4, 8]' for 09")
    run.add_argument("--no-extras", action="store_true",
                     help="leave out the notebooks' optional sections (07: a second size and the dynamic arm)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--inductor-cache", default=None, metavar="DIR",
        help="share one Inductor cache folder between the notebooks: faster, but compile times are no longer cold",
    )

    warm = commands.add_parser(
        "warm", help="compile the compiled steps once and save their compile artifacts to one file for a room")
    warm.add_argument("--out", required=True, help="the file to write, e.g. compile-cache.zip")
    add_params_options(warm, leave_out=("out_dir", "compile_cache", "prompt", "negative_prompt", "steps", "seed",
                                        "warmup", "runs"))
    warm.add_argument("--only", default=WARMED_STEPS, help=f"the compiled steps to warm (default: {WARMED_STEPS})")
    warm.add_argument("--no-progress", action="store_true", help="no progress bars")

    chart = commands.add_parser("chart", help="redraw DIR/latency_per_step.png from DIR/results.json")
    chart.add_argument("out", help="a folder written by `run`")

    clean = commands.add_parser("clean", help="strip outputs and execution counts from notebooks (before a commit)")
    clean.add_argument("notebooks", nargs="*", help="notebook files (default: the course's notebooks/*.ipynb)")
    return parser.parse_args(argv)


def main(argv=None):
    """Run the command; every failure a user can meet ends in one line on stderr and a non-zero exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    _leave_out_the_iri_format_checker()
    try:
        return _main(args)
    finally:
        _remove_empty_default_inductor_cache()


def _leave_out_the_iri_format_checker():
    """The runner reads and writes notebooks with nbformat, which imports jsonschema, which imports rfc3987_syntax
    where it is installed (JupyterLab's dependencies install it) for its "iri" format check; that module builds 38
    Lark parsers as it is imported (python-jsonschema/jsonschema#1428). `python -c "import nbformat"` took 3.4
    CPU-seconds with it and 0.35 without, on a 2-core machine. Notebook schemas use no "format" keyword, so this
    process marks the module absent before anything imports jsonschema, which then registers no "iri" check."""
    sys.modules.setdefault("rfc3987_syntax", None)  # `import rfc3987_syntax` then raises ImportError


def _remove_empty_default_inductor_cache():
    """Remove the empty folder that importing torch's compiler makes in the temporary folder
    (`torchinductor_<user>`, Inductor's default cache) where this process left it empty: the runner compiles
    nothing itself, each notebook compiles with a cache of its own. A process that never imported the compiler
    (the runner's) made no folder, and importing it here would make one."""
    if "torch._inductor" not in sys.modules:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    try:
        os.rmdir(default_cache_dir())  # only an empty folder can be removed
    except OSError:
        pass


def _main(args):
    try:
        return _command(args)
    except (ValueError, ModelUnavailable, FileNotFoundError) as error:
        return _fail(error, 2)
    except (RunFailed, OutputError) as error:
        return _fail(error, 1)
    except OSError as error:  # one the course did not foresee: still one line, with the path it names
        return _fail(f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}", 1)
    except RunStopped as stopped:
        return _fail(stopped, stopped.exit_code, prefix="")
    except KeyboardInterrupt as interrupt:  # before or after the notebooks, where every write is atomic
        how, code = interrupt_name_and_code(interrupt)
        return _fail(f"Stopped ({how}); nothing already written was lost.", code, prefix="")


def _command(args):
    if args.command == "clean":
        from .runner import NOTEBOOKS_DIR

        paths = [Path(p) for p in args.notebooks] or sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
        cleaned = [path for path in paths if clean_notebook(path)]
        names = ", ".join(path.name for path in cleaned)
        print(f"Cleaned {names}." if cleaned else f"{len(paths)} notebooks: already clean.")
        return 0
    if args.command == "chart":
        from .chart import chart_from_dir

        print(f"Chart: {chart_from_dir(args.out)}")
        return 0
    if args.command == "warm":
        from .compile_cache import warm

        names = {f.name for f in fields(Params)} & vars(args).keys() - {"out_dir"}
        warm(Params(**{name: getattr(args, name) for name in names}), args.out, only=args.only,
             progress=not args.no_progress)
        return 0
    params = Params(**{f.name: getattr(args, f.name, None) for f in fields(Params)} | {"out_dir": args.out})
    select_steps(args.only)
    run_series(params, args.out, only=args.only, progress=not args.no_progress, inductor_cache=args.inductor_cache,
               extras=not args.no_extras, settings=dict(args.set))
    return 0


def clean_notebook(path):
    """Strip `path`'s outputs, execution counts and execution metadata, as the course keeps its notebooks in git;
    True where something was stripped (the file is then rewritten atomically), False where it was clean."""
    import nbformat

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} is not a notebook file: name .ipynb files, or none for the course's own.")
    notebook = nbformat.read(path, as_version=4)
    before = nbformat.writes(notebook)
    for cell in notebook.cells:
        for key in ("execution", "papermill"):
            cell.metadata.pop(key, None)
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    notebook.metadata.pop("papermill", None)
    after = nbformat.writes(notebook)
    if after == before:
        return False
    write_atomically(path, lambda f: f.write((after + "\n").encode()))
    return True


def _setting(text):
    """NAME=VALUE, VALUE a Python literal, for --set."""
    name, equals, value = text.partition("=")
    try:
        if not equals or not name.strip().isidentifier():
            raise ValueError
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE with VALUE a Python literal, such as "
                                         "BATCH_SIZES=[1,2,4]") from None


def _fail(error, code, prefix="error: "):
    print(f"{prefix}{error}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
