"""Bad input is refused in one sentence, before any model loads."""

import papermill
import pytest
from conftest import notebook_cells

import helpers.__main__ as cli
import helpers.models
from helpers.params import Params, cell_names
from helpers.steps import STEPS


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("height", 100, "multiple of 8"),
        ("width", 8192, "multiple of 8 from 64 to 4096"),
        ("height", 0, "multiple of 8"),
        ("steps", 0, "steps must be"),
        ("steps", 2.5, "steps must be"),
        ("guidance", -1.0, "guidance must be"),
        ("guidance", float("nan"), "guidance must be a finite number"),
        ("guidance", float("inf"), "guidance must be a finite number"),
        ("prompt", "   ", "prompt is empty"),
        ("runs", 0, "runs must be"),
        ("warmup", -1, "warmup must be"),
        ("seed", -3, "seed must be"),
        ("seed", 2**64, "seed must be a whole number from 0 to 18446744073709551615"),
        ("prompt", "caf\udcc3 in a jungle", "prompt holds bytes that are not UTF-8"),
        ("compile_mode", "fastest", "compile_mode must be one of"),
    ],
)
def test_bad_parameter_is_one_sentence(field, value, words):
    with pytest.raises(ValueError) as error:
        Params(**{field: value})
    message = str(error.value)
    assert words in message and "\n" not in message and message.endswith(".")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--height", "100"], "height must be a multiple of 8"),
        (["--steps", "0"], "steps must be"),
        (["--guidance", "-2"], "guidance must be"),
        (["--prompt", ""], "prompt is empty"),
        (["--runs", "0"], "runs must be"),
        (["--only", "10"], "Unknown step '10'"),
        (["--only", "quantum"], "Unknown step 'quantum'"),
        (["--only", "3-1"], "The range '3-1' in --only runs backwards: write 01-03."),
        (["--only", ""], "--only is empty"),
        (["--guidance", "nan"], "guidance must be a finite number"),
        (["--seed", str(2**64)], "seed must be a whole number from 0 to"),
        (["--prompt", "caf\udcc3"], "prompt holds bytes that are not UTF-8 text"),  # a Latin-1 byte in a UTF-8 shell
        (["--model", "not a model"], "Unknown model 'not a model'"),
        (["--model", "no-such-org/no-such-model"], "Could not load 'no-such-org/no-such-model'"),
    ],
)
def test_runner_refuses_bad_input_before_loading(argv, words, tmp_path, monkeypatch, capsys, offline_hub):
    monkeypatch.setattr(helpers.models, "load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("a notebook ran"))
    assert cli.main(["run", "--model", "tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_folder_that_is_not_sdxl_is_named_with_the_offline_choices(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert cli.main(["run", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a diffusers SDXL folder" in err and "'tiny'" in err and "'sdxl-random'" in err


@pytest.mark.parametrize("index", ["[1, 2]", '"StableDiffusionXLPipeline"', "null"])
def test_a_model_index_that_is_not_an_object_is_one_sentence(tmp_path, capsys, index):
    (tmp_path / "model_index.json").write_text(index)
    assert cli.main(["run", "--model", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a diffusers SDXL folder" in err and err.count("\n") == 1 and "Traceback" not in err


def test_chart_of_an_empty_folder_says_what_to_do(tmp_path, capsys):
    assert cli.main(["chart", str(tmp_path)]) == 2
    assert "run notebook 01" in capsys.readouterr().err


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.notebook)
def test_each_notebooks_parameters_cell_holds_the_defaults_of_params(step):
    (cell,) = notebook_cells(step.notebook, "parameters")
    written = {}
    exec(cell, {}, written)
    expected = cell_names()
    for name in expected.keys() | written.keys():
        assert written.get(name) == expected.get(name), (
            f"{step.notebook}'s parameters cell has {name} = {written.get(name)!r}; Params says {expected.get(name)!r}"
        )
