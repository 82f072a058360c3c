import json
import subprocess
import sys

from conftest import ROOT


def test_profile_final_step_on_the_tiny_model(tmp_path):
    out, cache = tmp_path / "profile", tmp_path / "inductor"
    proc = subprocess.run(
        [sys.executable, "scripts/profile_final_step.py", "--model", "tiny", "--through", "03", "--height", "64",
         "--width", "64", "--steps", "2", "--warmup", "0", "--inductor-cache", str(cache), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    attention = summary["attention"]
    assert attention["processors"] == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    assert list(attention["backends"]) == ["flash attention for CPU"]
    assert attention["backends"]["flash attention for CPU"] > 0
    assert summary["inductor_cache"] == {
        "dir": str(cache.resolve()), "state": "nothing compiled", "graphs_from_cache": 0, "graphs_compiled": 0,
    }
    assert summary["flops"]["peak_fraction"] is None  # no matmul peak is known for a CPU
    assert "aten::" in (out / "top_kernels.txt").read_text()
    assert (out / "trace.json.gz").stat().st_size > 0
