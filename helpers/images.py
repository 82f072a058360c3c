"""Making, saving, comparing and showing the course's images."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .files import write_new
from .regions import call_with_cudagraph_fallback
from .sources import native_size


def image_size(params):
    """(height, width) for `params`, with None meaning the model's native size."""
    side = native_size(params.model)
    return params.height or side, params.width or side


def generate(pipe, params, prompt=None):
    """One image for `params`: same seed, same image, whatever the optimizations (up to their precision).

    Regions that fail under CUDA graphs are compiled again without them (`call_with_cudagraph_fallback`)."""
    height, width = image_size(params)
    return call_with_cudagraph_fallback(pipe, lambda: pipe(
        prompt=prompt or params.prompt,
        negative_prompt=params.negative_prompt or None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(params.seed),
    ).images[0])


def save_image(image, out_dir, step_id):
    """Save `image` as `<out_dir>/images/<step>.png`, or `<step>-2.png`, ... where another run took that name;
    returns the path relative to `out_dir`. Never writes over an image: each record keeps its own."""
    path = write_new(Path(out_dir) / "images", step_id, ".png", lambda f: image.save(f, format="PNG"))
    return f"images/{path.name}"


def quality(image, baseline):
    """PSNR (dB) and SSIM of `image` against `baseline`; identical images have PSNR None (infinite). SSIM as Wang et
    al. (2004) define it: an 11x11 Gaussian window of sigma 1.5, each colour channel scored, the scores averaged."""
    from pytorch_msssim import ssim

    ours = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255)
    theirs = torch.from_numpy(np.asarray(baseline.convert("RGB"), dtype=np.float64) / 255)
    if ours.shape != theirs.shape:
        return None
    difference = ours - theirs
    squared_error = float((difference**2).mean())
    psnr = None if squared_error == 0 else -10 * float(np.log10(squared_error))  # the pixels' range is 1
    score = float(ssim(ours.permute(2, 0, 1)[None], theirs.permute(2, 0, 1)[None], data_range=1.0))
    return {"psnr_db": psnr, "ssim": score, "max_abs_diff": float(difference.abs().max())}


def describe_quality(scores):
    if scores is None:
        return "no baseline image of the same size to compare with (run notebook 01 with the same parameters)"
    psnr = "identical" if scores["psnr_db"] is None else f"PSNR {scores['psnr_db']:.1f} dB"
    return f"{psnr}, SSIM {scores['ssim']:.3f} against the fp32 baseline"


def labelled(image, label, height=256):
    """`image` scaled to `height` pixels with `label` written under it."""
    scaled = image.resize((max(1, round(image.width * height / image.height)), height), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (scaled.width, height + 24), "white")
    canvas.paste(scaled, (0, 0))
    ImageDraw.Draw(canvas).text((4, height + 5), label, fill="black")
    return canvas


def grid(images, labels, height=256):
    """The images side by side, each with its label under it."""
    tiles = [labelled(image, label, height) for image, label in zip(images, labels)]
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 0))
        x += tile.width + 8
    return canvas


def side_by_side(image, baseline, label, baseline_label="01 fp32 baseline"):
    """`image` next to the baseline's (or alone, where there is no baseline yet)."""
    if baseline is None:
        return grid([image], [label])
    return grid([baseline, image], [baseline_label, label])
