import numpy as np
import pytest
import torch

import helpers.models as models
from helpers import Params, generate, load_pipeline
from helpers.models import ModelUnavailable, check_model, low_precision_dtype, resolve_model


def test_auto_is_tiny_without_a_gpu_and_says_why(capsys):
    assert not torch.cuda.is_available()
    assert resolve_model("auto") == "tiny"
    line = capsys.readouterr().out.strip()
    assert line.startswith("Model: tiny (no GPU") and "\n" not in line


def test_auto_is_the_real_sdxl_on_a_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert resolve_model("auto") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "H100" in capsys.readouterr().out


def test_gpu_without_bf16_gets_fp16_and_is_told(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert low_precision_dtype("cuda") == torch.float16
    out = capsys.readouterr().out
    assert "float16" in out and "Tesla T4 has no native bfloat16" in out


def test_gpu_with_bf16_gets_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100")
    assert low_precision_dtype("cuda", verbose=False) == torch.bfloat16


def test_tiny_is_sdxl_shaped_and_deterministic():
    first, second = load_pipeline("tiny", verbose=False), load_pipeline("tiny", verbose=False)
    assert type(first).__name__ == "StableDiffusionXLPipeline"
    assert first.unet.config.addition_embed_type == "text_time"
    assert len(first.vae.config.block_out_channels) == 4  # 8x down-sampling, as SDXL's VAE
    assert first.tokenizer.model_max_length == 77 and first.tokenizer_2.pad_token == "!"
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
    params = Params(model="tiny", steps=2, height=64, width=64)
    image = generate(first, params)
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(generate(second, params)))


def test_folder_round_trip_loads_safetensors_identically(tmp_path):
    tiny = load_pipeline("tiny", verbose=False)
    tiny.save_pretrained(tmp_path)
    assert list(tmp_path.glob("unet/*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    assert check_model(str(tmp_path)) == str(tmp_path)
    loaded = load_pipeline(str(tmp_path), verbose=False)
    for a, b in zip(tiny.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    params = Params(model="tiny", steps=2, height=64, width=64)
    before, after = (np.asarray(generate(p, params), dtype=int) for p in (tiny, loaded))
    # Same weights bit for bit; the reloaded text encoder's pooled output differs in the last float bit.
    assert np.abs(before - after).max() <= 2


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    tiny = load_pipeline("tiny", verbose=False)
    tiny.save_pretrained(tmp_path, safe_serialization=False)
    # transformers always writes safetensors; the UNet and VAE are left as pickles only
    assert list(tmp_path.glob("unet/*.bin")) and not list(tmp_path.glob("unet/*.safetensors"))
    with pytest.raises(ModelUnavailable, match="Could not load") as error:
        load_pipeline(str(tmp_path), verbose=False)
    assert "'tiny'" in str(error.value) and "\n" not in str(error.value)


def test_unreachable_hub_id_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as error:
        models.load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", verbose=False)
    message = str(error.value)
    assert "'sdxl-random'" in message and "\n" not in message
