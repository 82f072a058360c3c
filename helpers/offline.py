"""SDXL-shaped pipelines built in code, for machines that cannot reach the model hub.

`tiny_pipeline()` is a 1.5 M-parameter SDXL (two CLIP text encoders, a three-level text-time UNet with attention
at two widths and two depths, a 4-level VAE, SDXL's Euler scheduler) with deterministic weights: it makes
noise-like images in a fraction of a second on a CPU, so every notebook can run anywhere. Its parameters:
`python -c "from helpers.offline import parameter_counts, tiny_pipeline; print(parameter_counts(tiny_pipeline()))"`

`sdxl_random_pipeline()` is the published SDXL-base architecture with random weights. Its FLOPs, and
so its latency, are those of the real model; its images are noise.
"""

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

START, END = "<|startoftext|>", "<|endoftext|>"

# The scheduler of stabilityai/stable-diffusion-xl-base-1.0 (scheduler/scheduler_config.json).
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    timestep_spacing="leading",
    steps_offset=1,
    interpolation_type="linear",
    use_karras_sigmas=False,
)

# The UNet of SDXL base: 2,567,463,684 parameters.
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 1280 (pooled text) + 6 * 256 (size and crop ids)
    norm_num_groups=32,
)

# The VAE of SDXL base: 83,653,863 parameters, 8x down-sampling.
SDXL_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.13025,
    force_upcast=True,
)

# CLIP ViT-L/14 and OpenCLIP ViT-bigG/14, the two text encoders of SDXL (123,060,480 and 694,659,840
# parameters with the real 49,408-token vocabulary; the generated tokenizer uses only the first few hundred).
SDXL_TEXT_ENCODER = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    projection_dim=768, hidden_act="quick_gelu",
)
SDXL_TEXT_ENCODER_2 = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    projection_dim=1280, hidden_act="gelu",
)

# SDXL's shape at 1.4 M parameters: three levels, attention at the two inner widths with different depths
# (SDXL: 2 and 10 transformer layers at 640 and 1280; here 1 and 2 at 32 and 64), linear proj_in/proj_out,
# conv_shortcut where a resnet changes width. One resnet per down level, not SDXL's two: a graph quick to compile.
# cross_attention_dim = 32 + 32 (both encoders' hidden states), projection input = 32 (pooled text) + 6 * 8 (time ids).
TINY_UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(1, 2, 4),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=8,
)
# SDXL's VAE shape at 57 k parameters: its four levels (8x down-sampling) and mid-block attention, with one resnet per
# decoder level (SDXL: three) and none in the encoder's down blocks (SDXL: two), so at one width (a block without
# resnets cannot change it). Every compile of the pipeline compiles the decoder: it is kept as small as that allows.
TINY_VAE = dict(SDXL_VAE, block_out_channels=(16, 16, 16, 16), layers_per_block=0, norm_num_groups=8, sample_size=128)
TINY_TEXT_ENCODER = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    projection_dim=32, hidden_act="quick_gelu",
)
TINY_TEXT_ENCODER_2 = dict(TINY_TEXT_ENCODER, hidden_act="gelu")

# A small English sample from which the tiny tokenizer learns its merges.
_CORPUS = (
    "an astronaut in a jungle, cold color palette, muted colors, detailed, 8k. a photo of a cat sitting on a "
    "red chair. a watercolor painting of a lighthouse at sunset. portrait of an old man, studio lighting, "
    "highly detailed. a city street at night in the rain, neon lights, cinematic. a bowl of fruit on a "
    "wooden table, still life, oil painting. mountains and a lake in the morning, photograph, landscape."
)


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes)}


def byte_level_bpe(corpus=_CORPUS, num_merges=200):
    """Learn a CLIP-style byte-level BPE vocabulary and merge list from `corpus`."""
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    byte_map = bytes_to_unicode()
    words = [[byte_map[b] for b in word.encode()] for word in corpus.lower().split()]
    words = [w[:-1] + [w[-1] + "</w>"] for w in words]
    merges = []
    for _ in range(num_merges):
        pairs = {}
        for w in words:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append("".join(best))
        words = [_merge(w, best) for w in words]
    vocab += [START, END]
    return {token: i for i, token in enumerate(vocab)}, merges


def _merge(word, pair):
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def tokenizers():
    """The two SDXL tokenizers: the second pads with "!" as SDXL's does."""
    vocab, merges = byte_level_bpe()
    common = dict(vocab=vocab, merges=merges, unk_token=END, bos_token=START, eos_token=END, model_max_length=77)
    return CLIPTokenizer(pad_token=END, **common), CLIPTokenizer(pad_token="!", **common)


def _text_config(tokenizer, **sizes):
    sizes.setdefault("vocab_size", len(tokenizer))
    return CLIPTextConfig(
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def assemble_pipeline(unet, vae, text_encoder, text_encoder_2, device="cpu"):
    """Assemble a StableDiffusionXLPipeline from configs, its models initialised on `device`."""
    tokenizer, tokenizer_2 = tokenizers()
    with torch.device(device):
        models = dict(
            vae=AutoencoderKL(**vae),
            text_encoder=CLIPTextModel(_text_config(tokenizer, **text_encoder)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, **text_encoder_2)),
            unet=UNet2DConditionModel(**unet),
        )
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER)
    return StableDiffusionXLPipeline(tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=scheduler, **models)


def tiny_pipeline(seed=0):
    """A 1.5 M-parameter SDXL-shaped pipeline with weights fixed by `seed`, built on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = assemble_pipeline(TINY_UNET, TINY_VAE, TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2)
    return pipe


def parameter_counts(pipe):
    """Parameters of each model of an SDXL pipeline."""
    return {name: getattr(pipe, name).num_parameters() for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def sdxl_random_pipeline(device="cpu", seed=0, dtype=torch.float32):
    """Full-size SDXL base with random weights, initialised directly on `device` ("meta" allocates nothing) and in
    `dtype`, so that a GPU never holds a float32 copy (13.9 GB) to cast. The weights depend on the seed and the dtype:
    they are noise either way."""
    device = torch.device(device)
    cuda_devices = [device] if device.type == "cuda" else []
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # what the modules create their parameters in
        try:
            return assemble_pipeline(SDXL_UNET, SDXL_VAE, SDXL_TEXT_ENCODER, SDXL_TEXT_ENCODER_2, device=device)
        finally:
            torch.set_default_dtype(default_dtype)
