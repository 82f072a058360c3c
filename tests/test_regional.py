"""Regional compilation meets transformer blocks of two widths, as in SDXL (640 and 1280; 32 and 64 in the tiny model).

`compile_repeated_blocks` compiles every BasicTransformerBlock with the same code, so Dynamo caches one graph per
set of input shapes. A counting backend stands in for Inductor: it records each graph and runs it uncompiled.
"""

import pytest
import torch

import helpers

# 64 px: latent 8, attention at 4x4 (width 32) and 2x2 (width 64) tokens.
PARAMS = helpers.Params(model="tiny", steps=1, height=64, width=64)


def graphs_compiled(dynamic):
    """The graphs Dynamo hands the backend while one image runs through regionally compiled blocks."""
    torch._dynamo.reset()
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pipe = helpers.load_pipeline("tiny", verbose=False)
    pipe.unet.compile_repeated_blocks(backend=record, fullgraph=True, dynamic=dynamic)
    helpers.generate(pipe, PARAMS)
    return graphs


def hidden_states_shape(graph_module):
    """The shape of the block's input (batch, tokens, width), with torch.SymInt where a size is symbolic."""
    (node,) = [n for n in graph_module.graph.find_nodes(op="placeholder") if n.name == "l_hidden_states_"]
    return tuple(node.meta["example_value"].shape)


def is_symbolic(size):
    return isinstance(size, torch.SymInt)


def symbolic_sizes(graph_module):
    """The graph's symbolic sizes: inputs that are sizes themselves, and sizes of its input tensors."""
    values = [node.meta["example_value"] for node in graph_module.graph.find_nodes(op="placeholder")]
    sizes = [size for value in values for size in (value.shape if isinstance(value, torch.Tensor) else [value])]
    return [size for size in sizes if is_symbolic(size)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    yield
    torch._dynamo.reset()


def test_default_dynamic_recompiles_the_second_width_with_symbolic_token_counts():
    first, second = graphs_compiled(dynamic=None)
    assert not symbolic_sizes(first) and symbolic_sizes(second)
    batch, tokens, width = hidden_states_shape(second)
    # The new shape made Dynamo mark the sizes that changed dynamic ("automatic dynamic"), but the width comes
    # from the weights, whose shapes stay static: it is specialized to 64 all the same.
    assert is_symbolic(tokens) and not is_symbolic(batch) and width == 64


def test_static_shapes_compile_each_width_once():
    graphs = graphs_compiled(dynamic=False)
    assert not any(symbolic_sizes(graph) for graph in graphs)
    shapes = [hidden_states_shape(graph) for graph in graphs]
    assert shapes == [(2, 16, 32), (2, 4, 64)]  # batch 2: the prompt and the negative one


def test_dynamic_true_still_needs_one_graph_per_width():
    graphs = graphs_compiled(dynamic=True)
    shapes = [hidden_states_shape(graph) for graph in graphs]
    assert [width for _, _, width in shapes] == [32, 64]
    assert all(is_symbolic(batch) and is_symbolic(tokens) for batch, tokens, _ in shapes)


def cached_graphs():
    """Dynamo's cache entries on the code that every BasicTransformerBlock shares."""
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(BasicTransformerBlock.forward.__code__))


def test_release_leaves_no_compiled_code_of_a_dead_pipeline(capsys):
    pipe = helpers.load_pipeline("tiny", verbose=False)
    pipe.unet.compile_repeated_blocks(backend="eager", fullgraph=True, dynamic=False)
    helpers.generate(pipe, PARAMS)
    assert cached_graphs() == 2  # one per width, cached on the class's code: the pipeline's death doesn't drop them
    del pipe
    assert helpers.release() == 0
    assert cached_graphs() == 0
    assert capsys.readouterr().out.startswith("Released: no pipeline left alive")


def test_regions_that_fail_under_cuda_graphs_are_compiled_again_without_them(monkeypatch, capsys):
    # A stand-in for pytorch/pytorch#152887, which only a GPU shows: the UNet's first call raises its error.
    from helpers import regions

    pipe = helpers.load_pipeline("tiny", verbose=False)
    pipe.unet.compile_repeated_blocks(mode="max-autotune", fullgraph=True, dynamic=False)
    assert helpers.pipeline_state(pipe)["compiled"]["repeated_blocks"]["mode_options"]["triton.cudagraphs"]
    forward, compile_blocks, recompiled = pipe.unet.forward, pipe.unet.compile_repeated_blocks, []

    def fails_once(*args, **kwargs):
        monkeypatch.setattr(pipe.unet, "forward", forward)
        raise RuntimeError("Error: accessing tensor output of CUDAGraphs that has been overwritten by a subsequent "
                           "run. Stack trace: ...")

    def compile_cheaply(**options):  # what the fallback asks for, compiled by a backend that compiles nothing
        recompiled.append(options)
        compile_blocks(backend="eager", fullgraph=options["fullgraph"], dynamic=options["dynamic"])

    monkeypatch.setattr(pipe.unet, "forward", fails_once)
    monkeypatch.setattr(pipe.unet, "compile_repeated_blocks", compile_cheaply)
    monkeypatch.setattr(regions, "cudagraph_fallbacks", [])
    assert helpers.generate(pipe, PARAMS).size == (64, 64)
    assert recompiled == [{"mode": "max-autotune-no-cudagraphs", "fullgraph": True, "dynamic": False}]
    (said,) = regions.cudagraph_fallbacks
    assert said in capsys.readouterr().out and "#152887" in said and "\n" not in said
    with pytest.raises(RuntimeError, match="something else"):  # any other error is raised as it is
        regions.call_with_cudagraph_fallback(pipe, lambda: (_ for _ in ()).throw(RuntimeError("something else")))


@pytest.mark.slow
def test_a_new_pipeline_stays_within_the_recompile_limit_only_after_release(request):
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from helpers.regions import recompile_limit_hits

    limit = torch._dynamo.config.patch(recompile_limit=2)  # what two widths fill, as 8 fills in a notebook
    limit.__enter__()
    request.addfinalizer(lambda: limit.__exit__(None, None, None))
    larger = helpers.Params(model="tiny", steps=1, height=96, width=96)

    def compiled_pipeline():
        pipe = helpers.load_pipeline("tiny", verbose=False)
        pipe.unet.compile_repeated_blocks(backend="eager", fullgraph=True, dynamic=False)
        return pipe

    first = compiled_pipeline()
    helpers.generate(first, PARAMS)
    del first
    hits = recompile_limit_hits()
    second = compiled_pipeline()
    with pytest.raises(FailOnRecompileLimitHit):  # the dead pipeline's two graphs still fill the limit
        helpers.generate(second, larger)
    assert recompile_limit_hits() == hits + 1  # read from Dynamo's own counters
    del second
    helpers.release()
    helpers.generate(compiled_pipeline(), larger)
    assert recompile_limit_hits() == hits + 1 and cached_graphs() == 2


@pytest.mark.slow
@pytest.mark.parametrize("regions", list(helpers.regions.REGIONS))
def test_each_choice_of_regions_compiles_what_it_names_and_runs_nothing_eagerly(regions, monkeypatch, capsys):
    from helpers.regions import REGIONS, recompile_limit_hits, region_versions

    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    pipe = helpers.load_pipeline("tiny", verbose=False)
    compile_blocks = pipe.unet.compile_repeated_blocks
    monkeypatch.setattr(pipe.unet, "compile_repeated_blocks",  # what compile_regions asks for, with the recorder
                        lambda mode, **options: compile_blocks(backend=record, **options))
    with torch._dynamo.config.patch(recompile_limit=8):  # torch's default, raised by compile_regions where needed
        helpers.compile_regions(pipe, mode="default", regions=regions)
        del pipe.vae.decode  # the decoder uncompiled: this test is about the UNet's regions
        hits = recompile_limit_hits()
        helpers.generate(pipe, PARAMS)
        # fullgraph=True: no break; no recompile-limit hit: no region ran eagerly; a graph per distinct shape, more
        # where an input comes in the other memory layout, all within the limit
        assert recompile_limit_hits() == hits
        assert sum(region_versions(pipe.unet).values()) <= len(graphs) <= torch._dynamo.config.recompile_limit
    compiled = {type(m).__name__ for m in pipe.unet.modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled == set(REGIONS[regions])
    raised = "recompile_limit raised from 8 to 20" in capsys.readouterr().out
    assert raised == (regions != "blocks")  # the tiny model's resnets see 10 shapes, its blocks 2


def test_the_compiler_reset_is_tried_once_more_where_torch_changed_its_backends_during_it(monkeypatch):
    """torch's race (helpers.memory.reset_compiler says when it happens): the second try resets; another error is
    raised as it is."""
    from helpers import memory

    calls = []

    def reset():
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")

    monkeypatch.setattr(torch.compiler, "reset", reset)
    memory.reset_compiler()
    assert calls == [0, 1]
    monkeypatch.setattr(torch.compiler, "reset", lambda: (_ for _ in ()).throw(RuntimeError("something else")))
    with pytest.raises(RuntimeError, match="something else"):
        memory.reset_compiler()
