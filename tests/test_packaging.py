import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_environment_yml_matches_pyproject():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert sorted(r for r in pip_section if r != "-e .") == sorted(declared)
    assert "-e ." in pip_section


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"# run the tests\n(.+)\n", readme).group(1).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert command in ci


@pytest.mark.slow
def test_importing_helpers_changes_no_torch_setting():
    import subprocess
    import sys

    probe = (
        "import torch; before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, "
        "torch.get_float32_matmul_precision(), torch._inductor.config.conv_1x1_as_mm, "
        "torch._inductor.config.epilogue_fusion, torch.get_num_threads()); import helpers; "
        "after = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32, "
        "torch.get_float32_matmul_precision(), torch._inductor.config.conv_1x1_as_mm, "
        "torch._inductor.config.epilogue_fusion, torch.get_num_threads()); print(before == after)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("True")


def test_the_command_line_starts_without_torch(tmp_path):
    """`python -m helpers` imports torch (and diffusers, and torch's compiler) only where a command builds or compiles
    a pipeline: a run's own process, which checks the model and starts a kernel for each notebook, and a refusal of bad
    input don't wait for it. Nor does it wait for jsonschema's "iri" format check, which nbformat never uses
    (helpers/__main__.py says why): here the `clean` command, which reads and writes a notebook with nbformat, and a
    run of the tiny model refused for a step that doesn't exist, after the runner's modules are imported."""
    import shutil
    import subprocess
    import sys

    notebook = shutil.copy(ROOT / "notebooks" / "01_baseline.ipynb", tmp_path)
    probe = (
        "import sys, helpers.__main__ as cli, helpers.runner; status = cli.main(['clean', sys.argv[1]]); "
        "refused = cli.main(['run', '--model', 'tiny', '--only', '99', '--out', sys.argv[2]]); import jsonschema; "
        "print(status, refused, [m for m in ('torch', 'diffusers') if m in sys.modules], "
        "'iri' in jsonschema.FormatChecker().checkers)"
    )
    out = subprocess.run([sys.executable, "-c", probe, notebook, tmp_path / "run"], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "0 2 [] False"


def test_code_is_linted():
    import subprocess
    import sys

    ruff = Path(sys.executable).parent / "ruff"  # installed with the test extra, beside this python
    result = subprocess.run([ruff, "check", "helpers", "tests", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_importing_helpers_is_quiet_but_only_about_known_warnings():
    import subprocess
    import sys

    from helpers.quiet import silenced_texts

    probe = (
        "import logging, helpers; "
        "logging.getLogger('transformers.utils.import_utils').warning('a warning the user must see')"
    )
    err = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stderr
    for text in silenced_texts():
        assert text not in err
    assert "a warning the user must see" in err


def test_diffusers_deprecated_hub_argument_is_silenced_and_nothing_else(offline_hub):
    """diffusers' `load_config` passes huggingface_hub a deprecated argument when a model is loaded from the hub on
    its own, as the fp16-safe VAE is (warned before any download, so offline too): heard without the course's
    filters, silenced with them."""
    import warnings

    from diffusers import AutoencoderKL

    from helpers.quiet import silence_known_warnings

    def warned(silenced):
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("always")
            if silenced:
                silence_known_warnings()
            with pytest.raises(OSError):  # offline, with an empty cache
                AutoencoderKL.load_config("madebyollin/sdxl-vae-fp16-fix")
            warnings.warn("a warning the user must see", stacklevel=1)
        return [str(w.message) for w in caught]

    assert any("`local_dir_use_symlinks` argument is deprecated" in message for message in warned(silenced=False))
    assert warned(silenced=True) == ["a warning the user must see"]
