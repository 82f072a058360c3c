"""What each notebook writes inline must leave the pipeline exactly as `helpers.build` does."""

import pytest
import torch
from conftest import notebook_cells

import helpers
from helpers.params import Params

PARAMETERS = {f.upper(): v for f, v in Params(model="tiny", steps=2, height=64, width=64).to_dict().items()}
DEFAULT_FLAGS = torch._inductor.config.save_config()


def pipeline_from_notebook(step):
    """Run the notebook's parameter and `ladder` cells (setup, earlier steps, its own change): no image made."""
    namespace = dict(PARAMETERS)
    for source in notebook_cells(step.notebook, "ladder"):
        exec(compile(source, step.notebook, "exec"), namespace)
    return namespace["pipe"]


@pytest.mark.parametrize("step", helpers.STEPS, ids=lambda s: s.notebook)
def test_notebook_code_equals_helper(step):
    torch._inductor.config.load_config(DEFAULT_FLAGS)
    from_notebook = helpers.describe(pipeline_from_notebook(step))
    torch._inductor.config.load_config(DEFAULT_FLAGS)
    from_helper = helpers.describe(helpers.build("tiny", through=step.id, verbose=False))
    assert from_notebook == from_helper


def test_each_step_changes_what_it_says():
    states = {s.id: helpers.describe(helpers.build("tiny", through=s.id, verbose=False)) for s in helpers.STEPS}
    assert states["01"]["dtypes"]["unet"] == "torch.float32"
    assert states["01"]["attention"] == {"unet": ["AttnProcessor"], "vae": ["AttnProcessor"]}
    assert states["02"]["dtypes"]["unet"] == "torch.bfloat16"
    assert states["02"]["attention"]["unet"] == ["AttnProcessor"]
    assert states["03"]["attention"] == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    assert states["03"]["compiled"] == {}
    assert states["04"]["channels_last"]
    assert states["04"]["compiled"]["vae.decode"] and states["04"]["compiled"]["unet"]["max_autotune"]
    assert states["04"]["inductor_flags"] == {
        "conv_1x1_as_mm": True, "coordinate_descent_tuning": True, "epilogue_fusion": False,
        "coordinate_descent_check_all_directions": True,
    }
    assert states["05"]["attention"]["unet"] == ["FusedAttnProcessor2_0"]
    assert not states["05"]["quantized_layers"]
    assert states["06"]["quantized_layers"] and states["06"]["pointwise_convs"] == 0
    assert "unet" not in states["07"]["compiled"] and states["07"]["compiled"]["repeated_blocks"] > 0


def test_int8_filter_skips_text_time_and_unfused_layers():
    pipe = helpers.build("tiny", through="06", compile=False, verbose=False)
    names = helpers.quantized_layers(pipe.unet)
    assert any(name.endswith("attn1.to_qkv") for name in names)
    assert any(name.endswith("ff.net.0.proj") for name in names)
    assert not [n for n in names if "attn2.to_k" in n or "attn2.to_v" in n or "time_emb" in n or "add_embedding" in n]
    assert not [n for n in names if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v"))]
    # Only the widest level: nothing of the first, 32-channel level of the tiny UNet.
    assert not [n for n in names if n.startswith(("down_blocks.0", "up_blocks.1"))]


def test_steps_run_twice_are_harmless(capsys):
    pipe = helpers.build("tiny", through="06", compile=False, verbose=False)
    before = helpers.describe(pipe)
    helpers.quantize_int8(pipe)
    helpers.fuse_qkv(pipe)
    assert helpers.describe(pipe) == before
    out = capsys.readouterr().out
    assert "already quantized" in out and "already fused" in out
    helpers.compile_pipeline(pipe)
    compiled = helpers.describe(pipe)
    helpers.compile_pipeline(pipe)
    helpers.compile_regions(pipe)
    assert helpers.describe(pipe) == compiled
    assert capsys.readouterr().out.count("already compiled") == 2


def test_missing_torchao_is_one_sentence_and_only_stops_step_06(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # what an absent package looks like to import
    with pytest.raises(helpers.StepUnavailable) as error:
        helpers.require_torchao()
    message = str(error.value)
    assert "torchao is missing" in message and "pip install torchao" in message and "\n" not in message
    with pytest.raises(helpers.StepUnavailable):
        helpers.build("tiny", through="06", compile=False, verbose=False)
    assert helpers.describe(helpers.build("tiny", through="05", verbose=False))["fused_qkv"]


@pytest.mark.parametrize("step_id, marker", [("05", "fuse_qkv_projections()"), ("06", "quantize_(")])
def test_notebook_step_cell_run_twice_changes_nothing(step_id, marker):
    step = helpers.get_step(step_id)
    namespace = dict(PARAMETERS)
    cells = notebook_cells(step.notebook, "ladder")
    for source in cells:
        exec(compile(source, step.notebook, "exec"), namespace)
    once = helpers.describe(namespace["pipe"])
    (step_cell,) = [source for source in cells if marker in source]
    exec(compile(step_cell, step.notebook, "exec"), namespace)
    assert helpers.describe(namespace["pipe"]) == once
