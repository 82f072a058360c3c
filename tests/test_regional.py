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
