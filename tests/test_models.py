import os
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline

import helpers.machine as machine
import helpers.memory as memory
import helpers.models as models
import helpers.offline as offline
from helpers import Params, generate, load_pipeline
from helpers.errors import GpuMemoryBusy, ModelUnavailable
from helpers.memory import gpu_memory_held_by_others
from helpers.models import float16_vae, low_precision_dtype
from helpers.sources import check_model, download, resolve_model

TINY_PARAMS = Params(model="tiny", steps=2, height=64, width=64)
GPU_UUID = "8a6f2b1c-0d3e-4f5a-9b8c-7d6e5f4a3b2c"


def fake_nvidia_smi(monkeypatch, names=(), apps=()):
    """nvidia-smi as if installed: `names` for --query-gpu, `apps` (pid, GPU uuid) for --query-compute-apps."""
    monkeypatch.setattr(machine.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def run(args, **kwargs):
        assert args[0] == "nvidia-smi" and kwargs.get("timeout")
        if args[1] == "--query-gpu=name":
            lines = names
        else:
            lines = [f"{pid}, GPU-{uuid}" for pid, uuid in apps]
        return subprocess.CompletedProcess(args, 0, stdout="".join(f"{line}\n" for line in lines))

    monkeypatch.setattr(machine.subprocess, "run", run)


def simulate_gpu(monkeypatch, free, total, reserved=0, name="NVIDIA L4", bf16=True):
    """torch.cuda as on a GPU of `total` bytes with `free` bytes free, of which this process reserved `reserved`."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free), int(total)))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: int(reserved))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(uuid=GPU_UUID))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)


def test_auto_is_tiny_without_a_gpu_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert resolve_model("auto") == "tiny"
    line = capsys.readouterr().out.strip()
    assert line.startswith("Model: tiny (no GPU") and "\n" not in line


def test_auto_refuses_a_gpu_that_this_torch_cannot_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake_nvidia_smi(monkeypatch, names=["NVIDIA L4"])
    with pytest.raises(ModelUnavailable) as error:
        resolve_model("auto")
    message = str(error.value)
    assert message.startswith("nvidia-smi sees a GPU (NVIDIA L4) but this torch ") and "\n" not in message
    assert "install a CUDA build of torch" in message and "model='tiny'" in message
    assert resolve_model("tiny") == "tiny"  # asked for by name, the CPU model stays allowed


@pytest.mark.parametrize("failure", [subprocess.TimeoutExpired("nvidia-smi", 10), OSError("exec format error")])
def test_a_failing_nvidia_smi_means_no_gpu(monkeypatch, failure):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine.shutil, "which", lambda name: "/usr/bin/nvidia-smi")

    def run(*args, **kwargs):
        raise failure

    monkeypatch.setattr(machine.subprocess, "run", run)
    assert resolve_model("auto", verbose=False) == "tiny"


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


def test_memory_held_by_others_leaves_out_this_process(monkeypatch):
    simulate_gpu(monkeypatch, free=4e9, total=24e9, reserved=1.3e9)
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    held = gpu_memory_held_by_others("cuda")
    # used 20 GB, less 1.3 GB this process reserved and its CUDA context
    assert held.others == pytest.approx(20e9 - 1.3e9 - memory.CUDA_CONTEXT_BYTES) and held.total == 24e9
    assert held.pids == []


def test_nvidia_smi_names_the_other_processes_on_this_gpu(monkeypatch):
    simulate_gpu(monkeypatch, free=4e9, total=24e9)
    apps = [(os.getpid(), GPU_UUID), (1234, GPU_UUID), (999, "0f0f0f0f-other-gpu"), ("[N/A]", GPU_UUID)]
    fake_nvidia_smi(monkeypatch, apps=apps)
    assert gpu_memory_held_by_others("cuda").pids == [1234]
    # Inside a container nvidia-smi may list host pids, this process's not among them: then it names no one.
    fake_nvidia_smi(monkeypatch, apps=apps[1:])
    assert gpu_memory_held_by_others("cuda").pids == []


def test_a_gpu_busy_with_another_kernel_refuses_the_pipeline_in_one_sentence(monkeypatch):
    simulate_gpu(monkeypatch, free=5.3e9, total=24e9)
    fake_nvidia_smi(monkeypatch, apps=[(os.getpid(), GPU_UUID), (1234, GPU_UUID)])
    with pytest.raises(GpuMemoryBusy) as error:  # raised before anything is built on the (simulated) GPU
        load_pipeline("sdxl-random", dtype=torch.bfloat16, device="cuda", verbose=False)
    message = str(error.value)
    assert message.startswith(
        "Another process holds 18.2 GB of this GPU's 24.0 GB (pid 1234: probably another notebook's kernel), and "
        "this pipeline needs about 9.4 GB: shut that notebook down with Kernel > Shut Down Kernel"
    )
    assert "\n" not in message and isinstance(error.value, ModelUnavailable)


def test_others_that_leave_room_get_one_line_and_a_little_gets_none(monkeypatch, capsys):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    simulate_gpu(monkeypatch, free=75e9, total=80e9)
    memory.check_gpu_memory(models.pipeline_bytes("sdxl-random", torch.bfloat16), "cuda")
    line = capsys.readouterr().out.strip()
    assert line == (
        "GPU memory: other processes hold 4.5 GB of this GPU's 80.0 GB (probably another notebook's kernel); this "
        "pipeline needs about 9.4 GB, which fits beside."
    )
    simulate_gpu(monkeypatch, free=79e9, total=80e9)
    memory.check_gpu_memory(models.pipeline_bytes("sdxl-random", torch.bfloat16), "cuda")
    assert capsys.readouterr().out == ""


def test_a_pipeline_larger_than_the_gpu_is_not_blamed_on_others(monkeypatch):
    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    simulate_gpu(monkeypatch, free=12e9, total=16e9, name="Tesla T4")
    fp32_sdxl = models.pipeline_bytes("sdxl-random", torch.float32)  # 17 GB: too big for any T4
    memory.check_gpu_memory(fp32_sdxl, "cuda", verbose=False)


def test_parameter_counts_match_the_models():
    def parameters(pipe):
        return sum(p.numel() for name in models.PIPELINE_MODELS for p in getattr(pipe, name).parameters())

    assert models.parameter_count("sdxl-random") == parameters(offline.sdxl_random_pipeline(device="meta"))
    assert models.parameter_count("stabilityai/stable-diffusion-xl-base-1.0") == models.SDXL_PARAMETERS
    assert models.parameter_count("tiny") == parameters(load_pipeline("tiny", verbose=False))


def spy_from_pretrained(monkeypatch):
    """The keyword arguments of every StableDiffusionXLPipeline.from_pretrained call, in order."""
    calls, original = [], StableDiffusionXLPipeline.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_pretrained", classmethod(spy))
    return calls


def test_tiny_is_sdxl_shaped_and_deterministic():
    first, second = load_pipeline("tiny", verbose=False), load_pipeline("tiny", verbose=False)
    assert type(first).__name__ == "StableDiffusionXLPipeline"
    assert first.unet.config.addition_embed_type == "text_time"
    assert len(first.vae.config.block_out_channels) == 4  # 8x down-sampling, as SDXL's VAE
    assert first.tokenizer.model_max_length == 77 and first.tokenizer_2.pad_token == "!"
    for a, b in zip(first.unet.parameters(), second.unet.parameters()):
        assert torch.equal(a, b)
    image = generate(first, TINY_PARAMS)
    assert image.size == (64, 64)
    assert np.array_equal(np.asarray(image), np.asarray(generate(second, TINY_PARAMS)))


def test_folder_round_trip_loads_safetensors_identically(tmp_path, monkeypatch):
    tiny = load_pipeline("tiny", verbose=False)
    tiny.save_pretrained(tmp_path)
    assert list(tmp_path.glob("unet/*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    assert check_model(str(tmp_path)) == str(tmp_path)
    # diffusers refuses variant="fp16" where there are no fp16 files, so it is asked for only where there are
    with pytest.raises(ValueError, match="variant"):
        StableDiffusionXLPipeline.from_pretrained(tmp_path, variant="fp16", use_safetensors=True)
    calls = spy_from_pretrained(monkeypatch)
    loaded = load_pipeline(str(tmp_path), verbose=False)
    assert calls[-1]["variant"] is None
    for a, b in zip(tiny.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    before, after = (np.asarray(generate(p, TINY_PARAMS), dtype=int) for p in (tiny, loaded))
    # Same weights bit for bit; the reloaded text encoder's pooled output differs in the last float bit.
    assert np.abs(before - after).max() <= 2
    assert models.parameter_count(str(tmp_path)) == models.parameter_count("tiny")


def test_folder_with_fp16_files_loads_those(tmp_path, monkeypatch):
    tiny = load_pipeline("tiny", verbose=False)
    tiny.save_pretrained(tmp_path, variant="fp16")
    assert list(tmp_path.glob("unet/*.fp16.safetensors"))
    calls = spy_from_pretrained(monkeypatch)
    loaded = load_pipeline(str(tmp_path), verbose=False)
    assert calls[-1]["variant"] == "fp16"
    for a, b in zip(tiny.unet.parameters(), loaded.unet.parameters()):
        assert torch.equal(a, b)
    assert models.parameter_count(str(tmp_path)) == models.parameter_count("tiny")  # each weight counted once


def test_folder_with_only_pickle_weights_is_refused(tmp_path):
    tiny = load_pipeline("tiny", verbose=False)
    tiny.save_pretrained(tmp_path, safe_serialization=False)
    # transformers always writes safetensors; the UNet and VAE are left as pickles only
    assert list(tmp_path.glob("unet/*.bin")) and not list(tmp_path.glob("unet/*.safetensors"))
    with pytest.raises(ModelUnavailable, match="Could not load") as error:
        load_pipeline(str(tmp_path), verbose=False)
    assert "'tiny'" in str(error.value) and "\n" not in str(error.value)


def test_unreachable_hub_id_is_one_sentence(offline_hub):
    for fetch in (download, lambda model: load_pipeline(model, verbose=False)):
        with pytest.raises(ModelUnavailable) as error:
            fetch("stabilityai/stable-diffusion-xl-base-1.0")
        message = str(error.value)
        assert message.startswith("Could not load 'stabilityai/stable-diffusion-xl-base-1.0' (")
        assert "'sdxl-random'" in message and "\n" not in message


def test_download_returns_a_folder_at_once_and_nothing_for_models_built_in_code(tmp_path):
    load_pipeline("tiny", verbose=False).save_pretrained(tmp_path)
    assert download(str(tmp_path)) == tmp_path
    assert download("tiny") is None and download("sdxl-random") is None


def test_download_asks_for_fp16_files_and_takes_the_default_ones_where_there_are_none(monkeypatch, capsys):
    calls = []

    def fake_download(cls, model, **kwargs):
        calls.append(kwargs)
        if kwargs.get("variant") == "fp16":  # diffusers' refusal, word for word
            raise ValueError(
                "You are trying to load model files of the `variant=fp16`, but no such modeling files are available. "
            )
        return "/cache/someone/sdxl-finetune"

    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(fake_download))
    assert download("someone/sdxl-finetune") == models.Path("/cache/someone/sdxl-finetune")
    assert calls == [{"variant": "fp16", "use_safetensors": True}, {"use_safetensors": True}]
    assert capsys.readouterr().out == "someone/sdxl-finetune has no fp16 files: downloading its default ones.\n"


def test_float16_vae_decisions(monkeypatch):
    sdxl = "stabilityai/stable-diffusion-xl-base-1.0"
    simulate_gpu(monkeypatch, free=15e9, total=16e9, name="Tesla T4", bf16=False)
    assert float16_vae(sdxl, torch.float16, "cuda") == "fp16-fix"
    assert float16_vae(sdxl, torch.float32, "cuda") == "fp16-fix"  # the baseline too: same VAE at every step
    assert float16_vae("sdxl-random", torch.float16, "cuda") == "float16"
    assert float16_vae("someone/sdxl-finetune", torch.float16, "cuda") == "float32"
    assert float16_vae("someone/sdxl-finetune", torch.float32, "cuda") is None
    simulate_gpu(monkeypatch, free=75e9, total=80e9, name="NVIDIA A100", bf16=True)
    assert float16_vae(sdxl, torch.bfloat16, "cuda") is None and float16_vae(sdxl, torch.float32, "cuda") is None


def spy_vae_casts(pipe):
    """The dtypes the pipeline casts its VAE to while it runs."""
    casts, original = [], pipe.vae.to

    def to(*args, **kwargs):
        casts.append(kwargs.get("dtype", args[0] if args else None))
        return original(*args, **kwargs)

    pipe.vae.to = to
    return casts


def test_tiny_in_float16_decodes_without_casting_its_vae(capsys):
    pipe = load_pipeline("tiny", dtype=torch.float16, device="cpu", verbose=False)
    casts = spy_vae_casts(pipe)
    generate(pipe, TINY_PARAMS)
    assert casts == [] and pipe.vae.dtype == torch.float16 and not pipe.vae.config.force_upcast
    pipe.vae.register_to_config(force_upcast=True)  # diffusers' default: fp32 and back, for every image
    generate(pipe, TINY_PARAMS)
    assert casts == [torch.float32, torch.float16]
    load_pipeline("tiny", dtype=torch.float16, device="cpu")
    assert "VAE: float16 without a cast to fp32 per image" in capsys.readouterr().out


def test_a_folder_in_float16_keeps_its_vae_in_fp32(tmp_path, capsys):
    load_pipeline("tiny", verbose=False).save_pretrained(tmp_path)
    pipe = load_pipeline(str(tmp_path), dtype=torch.float16, device="cpu")
    assert "VAE: kept in fp32 for good" in capsys.readouterr().out
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    casts = spy_vae_casts(pipe)
    image = np.asarray(generate(pipe, TINY_PARAMS))  # fp16 latents into the fp32 decoder: no dtype mismatch
    assert casts == [] and pipe.vae.dtype == torch.float32 and image.std() > 0


def test_the_real_sdxl_in_float16_gets_the_fp16_safe_vae(tmp_path, monkeypatch, capsys):
    sdxl, fixed = tmp_path / "sdxl", tmp_path / "vae-fp16-fix"
    load_pipeline("tiny", verbose=False).save_pretrained(sdxl)
    offline.tiny_pipeline(seed=1).vae.save_pretrained(fixed)  # stands in for madebyollin's
    monkeypatch.setattr(models, "SDXL_HUB_ID", str(sdxl))
    monkeypatch.setattr(models, "FP16_SAFE_VAE", str(fixed))
    pipe = load_pipeline(str(sdxl), dtype=torch.float16, device="cpu")
    assert f"VAE: {fixed}" in capsys.readouterr().out
    expected = AutoencoderKL.from_pretrained(fixed)
    for a, b in zip(pipe.vae.parameters(), expected.parameters()):
        assert torch.equal(a, b.to(torch.float16))
    assert not pipe.vae.config.force_upcast
    casts = spy_vae_casts(pipe)
    generate(pipe, TINY_PARAMS)
    assert casts == [] and pipe.vae.dtype == torch.float16


def test_an_unreachable_fp16_safe_vae_is_one_sentence(offline_hub):
    with pytest.raises(ModelUnavailable) as error:
        models.fp16_safe_vae(torch.float16)
    message = str(error.value)
    assert message.startswith(f"Could not load {models.FP16_SAFE_VAE!r}, the VAE that decodes SDXL in float16")
    assert "\n" not in message


def test_sdxl_random_is_built_in_the_dtype_it_runs_in_and_the_load_check_counts_that(monkeypatch):
    built = []
    build = offline.sdxl_random_pipeline

    def on_meta(device="cpu", seed=0, dtype=torch.float32):  # shapes and dtypes without 7 GB of memory
        pipe = build(device="meta", seed=seed, dtype=dtype)
        built.append(pipe)
        return pipe

    monkeypatch.setattr(offline, "sdxl_random_pipeline", on_meta)
    load_pipeline("sdxl-random", dtype=torch.bfloat16, device="meta", verbose=False)
    (pipe,) = built
    weights = [p for name in models.PIPELINE_MODELS for p in getattr(pipe, name).parameters()]
    assert {p.dtype for p in weights} == {torch.bfloat16}
    activations = models.ACTIVATION_BYTES[2] * (models.native_size("sdxl-random") / 1024) ** 2
    estimate = models.pipeline_bytes("sdxl-random", torch.bfloat16) - activations
    assert estimate == sum(p.numel() * p.element_size() for p in weights)
