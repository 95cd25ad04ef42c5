"""benchmarks/cuda_check.py: the paper overlay's steps run and are measured on any device (here
the CPU, tiny sizes); on a GPU the same command gives the README's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_cuda_check_runs_the_paper_steps_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cuda_check.py"), "--device", "cpu",
         "--blocks", "1", "--channels", "8", "--crop", "32", "--batch", "2",
         "--d-channels", "8", "--iters", "2", "--warmup", "1", "--threads", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={"TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin",
             "SRGAN_VGG19_URL": ""})
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "content loss vgg54 (random VGG19 weights" in text  # the paper's loss, no download
    assert "global_skip=False" in text and "channels_last=True" in text
    assert "precision bf16" in text or "precision fp32" in text
    figures = json.loads(out.read_text())
    for stage in ("pretrain", "finetune"):
        row = next(line for line in text.splitlines() if line.startswith(stage))
        assert len(row.split()) == 5, row  # steps/s, patches/s, ms/step, peak MiB
        assert figures[stage]["steps_per_s"] > 0 and figures[stage]["peak_mib"] > 0
        assert figures[stage]["losses_finite"] is True
        assert figures[stage]["patches_per_s"] == figures[stage]["steps_per_s"] * 2
