"""A tiny project for the rating tests: prepared val and test sets with manifests, two tiny
generator files and params.yaml; and `srgan rate` as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import free_port, make_images, stop_process, tiny_params_dict, write_params

#: Method names no page a rater sees may contain (as words, any case).
METHOD_WORDS = re.compile(r"\b(nearest|bicubic|srresnet|srgan|hr|sr|resnet|gan)\b", re.I)


def make_project(root: Path, val_images: int = 3, test_images: int = 2,
                 **params: Any) -> Path:
    """root/{params.yaml, prepared/val/va, prepared/test/te, models/{srresnet,srgan}.pt}.
    The val set has `val_images` images (the first rating.calibration_images calibrate)."""
    import torch

    from srcore.data.degrade import bicubic_lr
    from srcore.data.images import load_image, save_png
    from srcore.data.manifest import write_manifest
    from srcore.models.srresnet import SRResNet
    from srcore.training.checkpoints import save_generator

    root.mkdir(parents=True, exist_ok=True)
    for split, name, count, seed in (("val", "va", val_images, 2),
                                     ("test", "te", test_images, 1)):
        folder = root / "prepared" / split / name
        for path in make_images(root / "raw" / name, count, size=(32, 24), seed=seed):
            hr = load_image(path)
            save_png(hr, folder / "HR" / path.name)
            save_png(bicubic_lr(hr, 4), folder / "LR" / path.name)
        write_manifest(folder, {"set": name, "split": split, "scale": 4,
                                "gaussian_sigma": None})
    torch.manual_seed(0)
    for name in ("srresnet", "srgan"):
        save_generator(SRResNet(blocks=1, channels=8, scale=4, global_skip=True),
                       root / "models" / f"{name}.pt", {})
    sections = {"data": {"train": ["tr"], "val": ["va"], "test": ["te"]},
                "rating": {"calibration_images": 1, "repeat_fraction": 0.2}}
    sections.update(params)
    write_params(root / "params.yaml", tiny_params_dict(**sections))
    return root


@contextlib.contextmanager
def rating_server(root: Path, raters: list[str], *extra: str, timeout_s: float = 90,
                  dvc: bool = False) -> Iterator[tuple[str, dict[str, str], Any]]:
    """`srgan rate --no-dvc` (or with DVC) in `root` as a subprocess; yields (base URL,
    rater -> link, the process) and stops it afterwards (SIGTERM, SIGKILL if it lingers)."""
    port = free_port()
    args = [sys.executable, "-m", "srcore.cli", "rate", "--port", str(port),
            *([] if dvc else ["--no-dvc"]), *extra]
    for name in raters:
        args += ["--rater", name]
    log = root / f"rate-{port}.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    with log.open("w") as err:
        proc = subprocess.Popen(args, cwd=root, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=env)
    try:
        links: dict[str, str] = {}
        assert proc.stdout is not None
        for _ in raters:
            line = proc.stdout.readline()
            if not line:
                proc.wait(timeout=30)
                raise AssertionError(f"srgan rate exited {proc.returncode}:\n"
                                     f"{log.read_text()}")
            who, link = line.strip().split(": ", 1)
            links[who] = link
        base = f"http://127.0.0.1:{port}"
        _wait(base, proc, log, timeout_s)
        yield base, links, proc
    finally:
        stop_process(proc, timeout_s=10)


def _wait(base: str, proc: Any, log: Path, timeout_s: float) -> None:
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(base + "/", timeout=2)
        except urllib.error.HTTPError:
            return  # the index answers 404 "open your link": the server is up
        except OSError:
            pass
        else:
            return
        if proc.poll() is not None:
            raise AssertionError(f"srgan rate exited {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"srgan rate: no answer after {timeout_s} s:\n"
                                 f"{log.read_text()}")
        time.sleep(0.2)


def token_of(link: str) -> str:
    return link.rsplit("/r/", 1)[1]


def expected_png_pixels(png: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)))
