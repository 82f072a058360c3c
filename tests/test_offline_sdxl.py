"""Full-size SDXL built offline has the published architecture, the tiny model has its shape, and the FLOP
counts agree with counts made here another way.

The full-size pipeline lives on the meta device (shapes, no data), so its 3.5 B parameters cost no memory.
"""

from collections import Counter

import pytest
import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch.utils.flop_counter import FlopCounterMode

import helpers
from helpers import recording
from helpers.flops import efficiency, image_flops, measure_matmul_peak, peak_tflops, repeated_block_share
from helpers.offline import parameter_counts, sdxl_random_pipeline, tiny_pipeline

# The published SDXL base architecture (the text encoders with the full 49,408-token vocabulary).
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


@pytest.fixture(scope="module")
def sdxl_meta():
    return sdxl_random_pipeline("meta")


@pytest.fixture(scope="module")
def tiny_meta():
    pipe = tiny_pipeline()
    for part in (pipe.unet, pipe.vae):
        part.to("meta")
    return pipe


def meta_pipeline(request, model):
    return request.getfixturevalue({"tiny": "tiny_meta", "sdxl-random": "sdxl_meta"}[model])


@pytest.fixture(scope="module", params=["tiny", "sdxl-random"])
def pipe(request):
    return meta_pipeline(request, request.param)


@pytest.fixture(scope="module")
def sdxl_1024():
    return image_flops("sdxl-random", height=1024, width=1024, steps=30, guidance=5.0)


def unet_call(pipe, size, batch):
    """A call of the pipeline's UNet on zeros shaped like a `size` x `size` image's, as the pipeline makes them."""
    latent = size // pipe.vae_scale_factor
    with torch.device(pipe.unet.device):
        latents = torch.zeros(batch, pipe.unet.config.in_channels, latent, latent)
        text = torch.zeros(batch, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
        conditions = {"text_embeds": torch.zeros(batch, pipe.text_encoder_2.config.projection_dim),
                      "time_ids": torch.zeros(batch, 6)}
        timestep = torch.tensor(999.0)
    return lambda: pipe.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=conditions)


def layer_flops(module, args, kwargs, output):
    """2 FLOPs per multiply-add of a Linear or Conv2d, or of an attention's two products (Q @ K^T and P @ V)."""
    if isinstance(module, torch.nn.Linear):
        return 2 * output.numel() * module.in_features
    if isinstance(module, torch.nn.Conv2d):
        return 2 * output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    hidden = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states")
    queries = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]  # the VAE's is 4-D
    keys = queries if context is None else context.shape[1]
    return 2 * 2 * hidden.shape[0] * queries * keys * module.to_q.out_features


def flops_from_shapes(model, run):
    """FLOPs of `run()` summed layer by layer from the shapes that forward hooks see."""
    total = 0

    def add(module, args, kwargs, output):
        nonlocal total
        total += layer_flops(module, args, kwargs, output)

    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, Attention))]
    handles = [layer.register_forward_hook(add, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return total


def block_flops_one_by_one(unet, run):
    """FLOPs of `run()` inside the UNet's repeated blocks, each block call counted under its own FlopCounterMode."""
    total = 0
    blocks = [m for m in unet.modules() if type(m).__name__ in unet._repeated_blocks]

    def counted(forward):
        def run_counted(*args, **kwargs):
            nonlocal total
            with FlopCounterMode(display=False) as counter:
                output = forward(*args, **kwargs)
            total += counter.get_total_flops()
            return output
        return run_counted

    for block in blocks:
        block.forward = counted(block.forward)
    try:
        with torch.no_grad():
            run()
    finally:
        for block in blocks:
            del block.forward  # the instance attribute set above: the class's forward shows through again
    return total


def test_parameter_counts_match_sdxl_base(sdxl_meta):
    assert parameter_counts(sdxl_meta) == SDXL_PARAMETERS
    assert sdxl_meta.unet.device.type == "meta"


def test_image_flops_add_up(sdxl_1024):
    assert sdxl_1024["unet_batch"] == 2 and sdxl_1024["unet_calls"] == 30
    assert sdxl_1024["total"] == sdxl_1024["text_encoders"] + 30 * sdxl_1024["unet_per_call"] + sdxl_1024["vae_decode"]
    # The text encoders run once per image: a rounding error next to 30 UNet calls.
    assert 0 < sdxl_1024["text_encoders"] < 0.001 * sdxl_1024["total"]


def test_unet_and_vae_flops_are_the_sum_of_their_layers(sdxl_1024, sdxl_meta):
    assert sdxl_1024["unet_per_call"] == flops_from_shapes(sdxl_meta.unet, unet_call(sdxl_meta, 1024, batch=2))
    latents = torch.zeros(1, 4, 128, 128, device="meta")
    assert sdxl_1024["vae_decode"] == flops_from_shapes(sdxl_meta.vae, lambda: sdxl_meta.vae.decode(latents))


def test_flops_scale_with_steps_and_size(sdxl_1024):
    half = image_flops("sdxl-random", steps=15)
    assert half["unet"] == sdxl_1024["unet"] / 2
    assert half["vae_decode"] == sdxl_1024["vae_decode"]

    small = image_flops("sdxl-random", height=512, width=512)
    # A quarter of the pixels: convolutions and linear layers cost a quarter, attention (quadratic) a sixteenth.
    for part in ("unet", "vae_decode"):
        assert sdxl_1024[part] / 16 < small[part] < sdxl_1024[part] / 4
    assert small["text_encoders"] == sdxl_1024["text_encoders"]


def test_guidance_doubles_the_unet_batch():
    # The tiny model has SDXL's wiring, and counts in milliseconds.
    guided, unguided = (image_flops("tiny", height=128, width=128, guidance=g) for g in (5.0, 1.0))
    assert (guided["unet_batch"], unguided["unet_batch"]) == (2, 1)
    assert guided["unet_per_call"] == 2 * unguided["unet_per_call"]
    assert guided["text_encoders"] == unguided["text_encoders"]


def test_gpu_attention_kernels_count_like_the_math_path_on_meta():
    query = torch.empty(2, 10, 1024, 64, device="meta", dtype=torch.bfloat16)
    expected = 2 * (2 * 2 * 10 * 1024 * 1024 * 64)  # Q @ K^T and P @ V, 2 FLOPs per multiply-add
    kernels = {
        "math (meta)": lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query),
        "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(query, query, query),
        "efficient": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(query, query, query, None, False),
    }
    for name, kernel in kernels.items():
        with FlopCounterMode(display=False) as counter:
            kernel()
        assert counter.get_total_flops() == expected, name


def test_tiny_model_flops(sdxl_1024):
    counts = image_flops("tiny", height=128, width=128, steps=4)
    assert all(counts[part] > 0 for part in ("text_encoders", "unet_per_call", "vae_decode"))
    assert counts["total"] < 1e-4 * sdxl_1024["total"]


@pytest.mark.parametrize("model, size", [("tiny", 128), ("sdxl-random", 1024)])
def test_repeated_block_share_matches_the_blocks_counted_one_by_one(model, size, request):
    pipe = meta_pipeline(request, model)
    share = repeated_block_share(model, height=size, width=size)
    assert share["unet"] == image_flops(model, height=size, width=size, guidance=1.0)["unet_per_call"]
    assert share["repeated_blocks"] == block_flops_one_by_one(pipe.unet, unet_call(pipe, size, batch=1))
    assert share["inside"] == share["repeated_blocks"] / share["unet"]


@pytest.mark.parametrize("model, size", [("tiny", 128), ("sdxl-random", 1024)])
def test_widest_conv_shortcuts_are_the_up_blocks_1x1_convolutions(model, size, request):
    pipe = meta_pipeline(request, model)
    widths = pipe.unet.config.block_out_channels
    side = size // pipe.vae_scale_factor // 2 ** (len(widths) - 1)  # the widest level's latent side
    # The first up block joins the widest level's output to each of its own skips and to one of the level before.
    inputs = [2 * widths[-1]] * pipe.unet.config.layers_per_block + [widths[-1] + widths[-2]]
    expected = sum(2 * side * side * channels * widths[-1] for channels in inputs)
    share = repeated_block_share(model, height=size, width=size)
    assert share["widest_conv_shortcuts"] == expected
    assert share["widest_conv_shortcut_share"] == expected / share["unet"]


def test_most_of_sdxl_arithmetic_is_inside_the_repeated_blocks():
    assert repeated_block_share("sdxl-random")["inside"] > 0.5


def attention_depths(unet):
    """{width: set of transformer depths} over the UNet's attention blocks."""
    depths = {}
    for module in unet.modules():
        if isinstance(module, Transformer2DModel):
            depths.setdefault(module.in_channels, set()).add(len(module.transformer_blocks))
    return depths


def test_attention_runs_at_two_widths_with_different_depths(pipe):
    depths = attention_depths(pipe.unet)
    assert sorted(depths) == list(pipe.unet.config.block_out_channels[1:])
    (narrow,), (wide,) = (depths[width] for width in sorted(depths))
    assert narrow < wide


def test_attention_projections_are_linear(pipe):
    for module in pipe.unet.modules():
        if isinstance(module, Transformer2DModel):
            assert isinstance(module.proj_in, torch.nn.Linear) and isinstance(module.proj_out, torch.nn.Linear)


def test_resnets_change_width_through_a_1x1_conv_shortcut(pipe):
    resnets = [m for m in pipe.unet.modules() if isinstance(m, ResnetBlock2D)]
    shortcuts = [r.conv_shortcut for r in resnets if r.conv_shortcut is not None]
    assert shortcuts and all(s.kernel_size == (1, 1) for s in shortcuts)
    assert all((r.conv_shortcut is not None) == (r.in_channels != r.out_channels) for r in resnets)


def test_unet_takes_text_time_conditioning(pipe):
    config = pipe.unet.config
    assert config.addition_embed_type == "text_time"
    assert config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    pooled_text = pipe.text_encoder_2.config.projection_dim
    assert config.projection_class_embeddings_input_dim == pooled_text + 6 * config.addition_time_embed_dim
    assert pipe.unet.add_embedding.linear_1.in_features == config.projection_class_embeddings_input_dim


def test_repeated_blocks_come_at_two_widths_most_at_the_widest(pipe):
    unet = pipe.unet
    assert unet._repeated_blocks == ["BasicTransformerBlock"]
    widths = Counter(m.attn1.to_q.in_features for m in unet.modules() if type(m).__name__ in unet._repeated_blocks)
    narrow, wide = unet.config.block_out_channels[1:]
    assert set(widths) == {narrow, wide} and widths[wide] > widths[narrow]


@pytest.mark.parametrize("size", [72, 80, 96])
def test_tiny_makes_images_whose_latent_halves_unevenly(size):
    # 72 px: latent 9 -> 5 -> 3, and the up blocks upsample back to 5 and 9.
    image = helpers.generate(helpers.load_pipeline("tiny", verbose=False), helpers.Params(
        model="tiny", steps=1, height=size, width=size))
    assert image.size == (size, size)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="FLOPs are counted for"):
        image_flops("some/other-model")
    with pytest.raises(ValueError, match="FLOPs are counted for"):
        repeated_block_share("some/other-model")


def test_each_choice_of_regions_leaves_less_of_sdxl_eager():
    from helpers.flops import eager_share

    shares = [eager_share(regions=choice) for choice in helpers.regions.REGIONS]
    assert shares[0] == pytest.approx(1 - repeated_block_share()["inside"])  # diffusers' blocks: a quarter eager
    assert shares[0] > 0.25 > shares[1] > 0.03 > 0.001 > shares[2] > 0  # then the stem and the time embedding only


def test_a_folder_counts_as_the_architecture_its_configs_match(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    assert image_flops(str(tmp_path), 64, 64, steps=2) == image_flops("tiny", 64, 64, steps=2)
    config = tmp_path / "unet" / "config.json"
    config.write_text(config.read_text().replace('"layers_per_block": 1', '"layers_per_block": 3'))
    with pytest.raises(ValueError, match="folders of their architecture"):
        image_flops(str(tmp_path), 64, 64)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835), ("NVIDIA H200", 989),
    ("NVIDIA H200 NVL", 835), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312), ("NVIDIA L4", 121),
])
def test_datasheet_peak_by_device_name(name, peak):
    assert peak_tflops(name) == (peak, "datasheet dense bf16")


def test_t4_peak_is_fp16_and_unknown_devices_have_none():
    assert peak_tflops("Tesla T4") == (65, "datasheet dense fp16")
    for name in ("NVIDIA L40S", "NVIDIA GH200 480GB", "CPU x86_64 (2 threads)"):
        assert peak_tflops(name) is None, name


def test_efficiency():
    result = efficiency(median_s=2.0, flops_total=416e12, peak_tflops=989)
    assert result["tflops_per_s"] == pytest.approx(208.0)
    assert result["peak_fraction"] == pytest.approx(208.0 / 989)
    assert result["floor_s"] == pytest.approx(416 / 989)


def test_efficiency_without_a_known_peak_gives_only_the_rate():
    result = efficiency(2.0, 416e12, peak_tflops=None)
    assert result["tflops_per_s"] == pytest.approx(208)
    assert result["peak_fraction"] is None and result["floor_s"] is None


def test_records_name_the_peak_they_are_a_fraction_of(monkeypatch):
    params = helpers.Params(model="tiny", steps=4)
    monkeypatch.setattr(recording, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    on_h100 = recording.compute_efficiency(params, median_s=0.5)
    assert on_h100["peak_source"] == "datasheet dense bf16"
    assert on_h100["peak_fraction"] == pytest.approx(on_h100["tflops_per_s"] / 989)
    monkeypatch.setattr(recording, "device_name", lambda: "CPU x86_64 (2 threads)")
    on_cpu = recording.compute_efficiency(params, median_s=0.5)
    assert on_cpu["peak_source"] is None and on_cpu["peak_fraction"] is None and on_cpu["tflops_per_s"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="times a matmul with CUDA events")
def test_measured_matmul_peak_is_below_the_datasheet():
    tflops, _ = peak_tflops(torch.cuda.get_device_name()) or (None, None)
    measured = measure_matmul_peak(n=4096)
    assert measured > 0
    if tflops:
        assert measured < 1.05 * tflops
