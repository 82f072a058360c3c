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
    from_notebook = helpers.pipeline_state(pipeline_from_notebook(step))
    torch._inductor.config.load_config(DEFAULT_FLAGS)
    from_helper = helpers.pipeline_state(helpers.build("tiny", through=step.id, verbose=False))
    assert from_notebook == from_helper


@pytest.fixture(scope="module")
def states():
    """pipeline_state() of `build(through=N)` for every step, built once for the checks below."""
    torch._inductor.config.load_config(DEFAULT_FLAGS)
    return {s.id: helpers.pipeline_state(helpers.build("tiny", through=s.id, verbose=False)) for s in helpers.STEPS}


def check_01(state):
    assert state["dtypes"]["unet"] == "torch.float32"
    assert state["attention"] == {"unet": ["AttnProcessor"], "vae": ["AttnProcessor"]}


def check_02(state):
    assert state["dtypes"]["unet"] == str(helpers.low_precision_dtype(verbose=False))
    assert state["attention"]["unet"] == ["AttnProcessor"]


def check_03(state):
    assert state["attention"] == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    assert state["compiled"] == {}


def check_04(state):
    assert state["channels_last"]
    for part in ("unet", "vae.decode"):
        assert state["compiled"][part]["fullgraph"] and state["compiled"][part]["mode_options"]["max_autotune"]
    assert state["inductor_flags"] == helpers.ladder.INDUCTOR_FLAGS


def check_05(state):
    assert state["attention"]["unet"] == ["FusedAttnProcessor2_0"]
    assert state["attention"]["vae"] == ["FusedAttnProcessor2_0"]
    assert state["unfused_leftovers"] == []  # freed, not kept for unfusing
    assert not state["quantized_layers"]


def check_06(state):
    assert state["quantized_layers"]


def check_07(state):
    assert "unet" not in state["compiled"]
    blocks = state["compiled"]["repeated_blocks"]
    assert blocks["count"] > 0 and blocks["fullgraph"]
    assert blocks["dynamic"] is False  # static: one compile per block width, no automatic dynamic
    assert state["compiled"]["vae.decode"]["dynamic"] is False


@pytest.mark.parametrize("step", helpers.STEPS, ids=lambda s: f"{s.id}-{s.title}")
def test_each_step_changes_what_it_says(states, step):
    globals()[f"check_{step.id}"](states[step.id])


def test_int8_filter_takes_wide_linear_layers_and_nothing_fed_by_text_or_time():
    pipe = helpers.build("tiny", through="06", compile=False, verbose=False)
    names = helpers.quantized_layers(pipe.unet)
    widest = pipe.unet.config.block_out_channels[-1]
    assert any(name.endswith("attn1.to_qkv") for name in names)
    assert any(name.endswith("ff.net.0.proj") for name in names)
    assert not [n for n in names if "attn2.to_k" in n or "attn2.to_v" in n or "time_emb" in n or "add_embedding" in n]
    assert not [n for n in names if "conv_shortcut" in n]  # left as convolutions: see int8_filter
    for name in names:
        layer = pipe.unet.get_submodule(name)
        assert min(layer.in_features, layer.out_features) >= widest, name
    # Every layer the rule allows was taken: the filter leaves out nothing by accident.
    rule = helpers.int8_filter(pipe.unet)
    assert not [n for n, m in pipe.unet.named_modules() if rule(m, n)]


def test_int8_keeps_the_processs_fp32_matmul_precision(monkeypatch):
    """torchao 0.17 and older switched fp32 matmuls to TF32 when its config set Inductor flags; the course tells it
    not to. The old behaviour is put back here to show that it can no longer reach the process."""
    import torchao.quantization.utils as torchao_utils

    def old_setter():
        torch.set_float32_matmul_precision("high")

    monkeypatch.setattr(torchao_utils, "recommended_inductor_config_setter", old_setter)
    before = torch.get_float32_matmul_precision()
    try:
        pipeline_from_notebook(helpers.get_step("06"))
        helpers.build("tiny", through="06", compile=False, verbose=False)
        assert torch.get_float32_matmul_precision() == before
    finally:
        torch.set_float32_matmul_precision(before)


def test_fusion_frees_the_projections_it_replaced():
    pipe = helpers.build("tiny", through="04", compile=False, verbose=False)
    before = sum(p.numel() for p in pipe.unet.parameters())
    pipe.fuse_qkv_projections()
    kept = helpers.ladder.unfused_leftovers(pipe.unet)
    kept_parameters = sum(p.numel() for n in kept for p in pipe.unet.get_submodule(n).parameters())
    assert kept and sum(p.numel() for p in pipe.unet.parameters()) == before + kept_parameters
    freed = helpers.drop_unfused_projections(pipe)
    assert freed >= kept_parameters  # the VAE's attention too
    assert sum(p.numel() for p in pipe.unet.parameters()) == before


def test_steps_run_twice_are_harmless(capsys):
    pipe = helpers.build("tiny", through="06", compile=False, verbose=False)
    before = helpers.pipeline_state(pipe)
    helpers.quantize_int8(pipe)
    helpers.fuse_qkv(pipe)
    assert helpers.pipeline_state(pipe) == before
    out = capsys.readouterr().out
    assert "already quantized" in out and "already fused" in out
    helpers.compile_pipeline(pipe)
    compiled = helpers.pipeline_state(pipe)
    helpers.compile_pipeline(pipe)
    helpers.compile_regions(pipe)
    assert helpers.pipeline_state(pipe) == compiled
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
    assert helpers.pipeline_state(helpers.build("tiny", through="05", verbose=False))["fused_qkv"]


@pytest.mark.parametrize("step_id, marker", [("04", "torch.compile(pipe.unet"), ("05", "fuse_qkv_projections"),
                                             ("06", "quantize_(")])
def test_a_notebooks_change_cell_run_twice_changes_nothing(step_id, marker):
    step = helpers.get_step(step_id)
    namespace = dict(PARAMETERS)
    cells = notebook_cells(step.notebook, "ladder")
    for source in cells:
        exec(compile(source, step.notebook, "exec"), namespace)
    once = helpers.pipeline_state(namespace["pipe"])
    (step_cell,) = [source for source in cells if marker in source]
    exec(compile(step_cell, step.notebook, "exec"), namespace)
    assert helpers.pipeline_state(namespace["pipe"]) == once
