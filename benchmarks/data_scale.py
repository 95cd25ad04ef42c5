"""Training at data scale (issue 18): prepare, DVC and 50 pretrain steps on 100 and 1,000
synthetic DIV2K-size images, and the streaming loader against the in-memory one on the
embedded sample set. Not a test: it takes minutes and ~11 GB of disk under --work.

    python benchmarks/data_scale.py --work /tmp/srgan-scale [--counts 100 1000] [--steps 50]

Prints, for each count: prepare wall and CPU time (CPU / wall = cores used), shard bytes, the
training process's peak RSS and steps/s, `dvc commit`, `dvc status` and `dvc push` times;
then on sample_train steps/s with shards and with the decoded images in memory (the loader
before issue 18; the same batches, so the same weights); then the format comparison
(whole-image records read with pread vs BasicSR-style 480x480 PNG sub-images vs memmap).
The training runs are the pretrain stage's train() (quick profile's model, batch and crop)
without MLflow, in a child process each, so ru_maxrss is that process's peak.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


# ------------------------------------------------------------------ synthetic DIV2K-size data


def synth_image(seed: int) -> Image.Image:
    """A 2040 x ~1356 textured photo stand-in: smooth colour fields, edges and grain, so
    crops are neither flat nor pure noise (min_crop_std behaves as on photos)."""
    rng = np.random.default_rng(seed)
    h = int(1356 + rng.integers(-96, 97)) // 4 * 4 + int(rng.integers(0, 4))
    w = 2040
    coarse = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    mid = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    detail = np.asarray(Image.fromarray(mid).resize((w, h), Image.NEAREST), np.int16)
    out = (np.asarray(img, np.int16) * 3 + detail) // 4
    out += rng.integers(-6, 7, (h, 1, 1), dtype=np.int16)  # row banding
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def _write_synth(args: tuple[int, str]) -> None:
    seed, path = args
    synth_image(seed).save(path, quality=92)


def make_sources(folder: Path, count: int) -> None:
    """count JPEGs in a two-level class-folder tree (as ImageNet), made on every core."""
    todo = []
    for i in range(count):
        path = folder / f"class{i % 10:02d}" / f"img{i:05d}.jpg"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            todo.append((i, str(path)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        list(pool.map(_write_synth, todo, chunksize=8))


def link_subset(src: Path, dst: Path, count: int) -> None:
    files = sorted(src.rglob("*.jpg"))[:count]
    for f in files:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            os.link(f, target)


# ----------------------------------------------------------------------------- child runs


def _params(train: str, val: str, steps: int) -> dict[str, Any]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"] = {"train": [{"name": train, "url": f"data/{train}"}],
                   "val": [{"name": val, "url": f"data/{val}"}],
                   "test": [{"name": "synth_test", "url": "data/synth_test"}]}  # never read
    raw["pretrain"].update(iterations=steps, log_every=10, val_every=steps,
                           checkpoint_every=steps)
    raw["runtime"]["device"] = "cpu"
    return raw


def run_child(args: list[str]) -> tuple[dict[str, Any], float, float, float]:
    """(its JSON line, wall s, CPU s of it and its children, peak RSS MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE,
                            cwd=REPO)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status:
        raise SystemExit(f"child {args[0]} failed ({status})")
    last = out.decode().strip().splitlines()[-1]
    return (json.loads(last), wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024)


def child_prepare(root: Path, split: str) -> None:
    from srcore import config
    from srcore.stages.prepare import prepare

    params = config.parse(yaml.safe_load((root / "params.yaml").read_text()))
    skipped: dict[str, int] = {}
    counts = prepare(params, root / "data", root / "prepared", [split], skipped)
    print(json.dumps({"counts": counts, "skipped": skipped}))


def child_train(root: Path, memory: bool, weights: Path | None) -> None:
    import torch

    from srcore import config
    from srcore.data.datasets import Pair, open_train_set, verify_prepared
    from srcore.layout import Layout
    from srcore.stages import pretrain
    from srcore.training import loop
    from srcore.training.distributed import NullTracker

    params = config.parse(yaml.safe_load((root / "params.yaml").read_text()))
    layout = Layout(root)
    shutil.rmtree(layout.checkpoints, ignore_errors=True)
    t0 = time.perf_counter()
    verify_prepared(layout.prepared, params.data, ("train", "val"))
    verify_s = time.perf_counter() - t0
    validation = [0.0]  # the last step validates: not the loader's time, left out of steps/s
    real_validate = loop._validate_and_log

    def timed_validate(*args: Any, **kw: Any) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return real_validate(*args, **kw)
        finally:
            validation[0] += time.perf_counter() - start

    loop._validate_and_log = timed_validate  # type: ignore[assignment]
    if memory:  # the loader before issue 18: every training image decoded into memory
        def decoded(params: Any, layout: Layout) -> list[Pair]:
            pairs = []
            for spec in params.data.train:
                shards = open_train_set(layout.prepared_split("train"), spec.name, 4)
                for k, name in enumerate(shards.names):
                    hr, lr = shards.image(k)
                    pairs.append(Pair(name, hr, lr))
            return pairs

        loop.train_images = decoded  # type: ignore[assignment]
    model, metrics = pretrain.train(params, layout, NullTracker())
    if weights is not None:
        torch.save(model.state_dict(), weights)
    seconds = metrics["seconds"] - validation[0]
    print(json.dumps({"verify_s": verify_s, "seconds": seconds, "validation_s": validation[0],
                      "steps_per_s": params.pretrain.iterations / seconds}))


# ---------------------------------------------------------------------------------- parts


def project(root: Path, data: Path, train: str, steps: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to(data)
    (root / "params.yaml").write_text(yaml.safe_dump(_params(train, "synth_val", steps)))
    return root


def dvc_times(root: Path, remote: Path) -> dict[str, float]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}

    def dvc(*args: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, env=env,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - start

    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    dvc("init", "-q")
    dvc("config", "cache.type", "hardlink,copy")  # no second copy of the shards on disk
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"prepare": {
        "cmd": "srgan prepare --split train", "outs": ["prepared/train"]}}}))
    times = {"commit": dvc("commit", "-f", "-q", "prepare")}
    times["status"] = dvc("status", "-q")
    times["status_again"] = dvc("status", "-q")
    dvc("remote", "add", "-d", "local", str(remote))
    times["push"] = dvc("push", "-q")
    times["push_again"] = dvc("push", "-q")
    shutil.rmtree(remote, ignore_errors=True)
    return times


def formats(src: Path, n: int = 8, crops: int = 300) -> dict[str, float]:
    """Per image on disk and per 96x96 crop read: whole-image raw records (pread, this
    format), BasicSR's 480x480/240-step PNG sub-images (level 1, as its LMDB), memmap."""
    from srcore.data.degrade import bicubic_lr, modcrop
    from srcore.data.images import load_image

    rng = np.random.default_rng(0)
    raw, png_bytes, png_decode, pread_s, mmap_rss = 0, 0, [], [], []
    files = sorted(src.rglob("*.jpg"))[:n]
    n = len(files)
    tmp = src.parent / "formats.bin"
    for f in files:
        hr = modcrop(load_image(f), 4)
        lr = bicubic_lr(hr, 4)
        raw += hr.nbytes + lr.nbytes
        h, w = hr.shape[:2]
        subs = [(y, x) for y in range(0, h - 480 + 1, 240) for x in range(0, w - 480 + 1, 240)]
        encoded = []
        for y, x in subs:
            for a in (hr[y:y + 480, x:x + 480], lr[y // 4:(y + 480) // 4, x // 4:(x + 480) // 4]):
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, format="PNG", compress_level=1)
                encoded.append(buf.getvalue())
        png_bytes += sum(map(len, encoded))
        for _ in range(crops // n):  # one crop = decode one HR and one LR sub-image
            k = int(rng.integers(0, len(subs)))
            start = time.perf_counter()
            for b in encoded[2 * k:2 * k + 2]:
                np.asarray(Image.open(io.BytesIO(b)))
            png_decode.append(time.perf_counter() - start)
        tmp.write_bytes(hr.tobytes() + lr.tobytes())
        fd = os.open(tmp, os.O_RDONLY)
        row = w * 3
        for _ in range(crops // n):
            y, x = int(rng.integers(0, h - 96)), int(rng.integers(0, w - 96))
            start = time.perf_counter()
            buf = os.pread(fd, 96 * row, y * row)
            np.frombuffer(buf, np.uint8).reshape(96, w, 3)[:, x:x + 96].copy()
            lrow = (w // 4) * 3
            os.pread(fd, 24 * lrow, hr.nbytes + (y // 4) * lrow)
            pread_s.append(time.perf_counter() - start)
        os.close(fd)
        mm = np.memmap(tmp, np.uint8, "r", shape=hr.shape)
        before = _rss_mib()
        for _ in range(crops // n):
            y, x = int(rng.integers(0, h - 96)), int(rng.integers(0, w - 96))
            mm[y:y + 96, x:x + 96].copy()
        mmap_rss.append(_rss_mib() - before)
        del mm
    tmp.unlink()
    return {"raw_mib_per_image": raw / n / MIB, "png_sub_mib_per_image": png_bytes / n / MIB,
            "pread_us_per_crop": statistics.median(pread_s) * 1e6,
            "png_sub_us_per_crop": statistics.median(png_decode) * 1e6,
            "memmap_rss_mib_per_image_after_crops": statistics.mean(mmap_rss)}


def loader_rates(root: Path, raw: dict[str, Any], batches: int = 300,
                 rounds: int = 3) -> dict[str, float]:
    """Median ms per batch of the quick profile's loader (batch, crop, min_crop_std,
    sampling) reading the shards vs the same images decoded in memory, interleaved."""
    from srcore.data.datasets import Pair, RandomCropBatches, open_train_set

    shards = open_train_set(root / "prepared" / "train", "sample_train", 4)
    pairs = [Pair(name, *shards.image(k)) for k, name in enumerate(shards.names)]
    cfg = raw["pretrain"]
    sources: dict[str, Any] = {"shards": shards, "memory": pairs}
    times: dict[str, list[float]] = {k: [] for k in sources}
    for r in range(rounds):
        for kind, images in sources.items():
            data = RandomCropBatches(images, cfg["batch_size"], cfg["hr_crop"], 4, 0, True,
                                     cfg["sampling"], min_std=cfg["min_crop_std"])
            start = time.perf_counter()
            for i in range(r * batches, (r + 1) * batches):
                data[i]
            times[kind].append((time.perf_counter() - start) / batches * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _du(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / MIB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3,
                        help="training runs per count and per loader on the sample set")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["scale", "dvc", "sample", "formats"])
    parser.add_argument("--keep", action="store_true", help="keep --work afterwards")
    args = parser.parse_args()
    work = args.work.resolve()
    data = work / "data"
    report: dict[str, Any] = {}
    from srcore.config import DatasetSpec
    from srcore.data.sources import materialize

    t0 = time.perf_counter()
    make_sources(data / f"synth{max(args.counts)}", max(args.counts))
    for count in args.counts:
        link_subset(data / f"synth{max(args.counts)}", data / f"synth{count}", count)
    val = data / "synth_val"
    if not val.is_dir():
        val.mkdir(parents=True)
        for i in range(2):
            synth_image(10**6 + i).crop((0, 0, 800, 600)).save(val / f"v{i}.png")
    print(f"sources: {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    for count in args.counts if "scale" not in args.skip else []:
        root = project(work / f"proj{count}", data, f"synth{count}", args.steps)
        shutil.rmtree(root / "prepared", ignore_errors=True)
        run_child(["_prepare", str(root), "val"])
        out, wall, cpu, _ = run_child(["_prepare", str(root), "train"])
        row: dict[str, Any] = {"images": out["counts"], "skipped": out["skipped"],
                               "prepare_wall_s": wall, "prepare_cpu_s": cpu,
                               "prepare_cpu_per_wall": cpu / wall,
                               "shard_mib": _du(root / "prepared" / "train"),
                               "shards": len(list((root / "prepared" / "train").rglob("*.bin")))}
        runs = [run_child(["_train", str(root)]) for _ in range(args.repeats)]
        row.update(train_peak_rss_mib=[r[3] for r in runs],
                   train_steps_per_s=[r[0]["steps_per_s"] for r in runs],
                   verify_s=[r[0]["verify_s"] for r in runs])
        if count == min(args.counts):  # the loader before issue 18, for comparison
            row["in_memory_loader_peak_rss_mib"] = run_child(["_train", str(root),
                                                              "--memory"])[3]
        if "dvc" not in args.skip:
            row["dvc_s"] = dvc_times(root, work / f"remote{count}")
        report[f"synth{count}"] = row
        print(json.dumps({f"synth{count}": row}, indent=1), file=sys.stderr)

    if "sample" not in args.skip:
        sample = work / "sample"
        for name in ("sample_train", "sample_val"):
            if not (sample / "data" / name).is_dir():
                materialize(DatasetSpec(name=name), sample / "data", retries=0, timeout=1,
                            log=lambda _: None)
        raw = _params("sample_train", "sample_val", args.steps)
        raw["data"] = {"train": ["sample_train"], "val": ["sample_val"], "test": ["sample_test"]}
        (sample / "params.yaml").write_text(yaml.safe_dump(raw))
        if not (sample / "prepared" / "train").is_dir():
            run_child(["_prepare", str(sample), "val"])
            run_child(["_prepare", str(sample), "train"])
        rates: dict[str, list[float]] = {"shards": [], "memory": []}
        rss: dict[str, float] = {}
        for i in range(args.repeats):
            for kind in ("shards", "memory"):
                out, _, _, peak = run_child(["_train", str(sample), *(["--memory"] if kind ==
                                             "memory" else []), "--weights",
                                             str(work / f"{kind}{i}.pt")])
                rates[kind].append(out["steps_per_s"])
                rss[kind] = max(rss.get(kind, 0.0), peak)
        import torch

        a = torch.load(work / "shards0.pt", weights_only=True)
        b = torch.load(work / "memory0.pt", weights_only=True)
        same = all(torch.equal(a[k], b[k]) for k in a)
        med = {k: statistics.median(v) for k, v in rates.items()}
        loader = loader_rates(sample, raw)
        report["sample_train"] = {"steps_per_s": rates, "median": med,
                                  "shards_over_memory": med["shards"] / med["memory"],
                                  "peak_rss_mib": rss, "same_weights": same,
                                  "loader_ms_per_batch": loader}
        print(json.dumps({"sample_train": report["sample_train"]}, indent=1), file=sys.stderr)

    if "formats" not in args.skip:
        report["formats"] = formats(data / f"synth{max(args.counts)}")
        print(json.dumps({"formats": report["formats"]}, indent=1), file=sys.stderr)
    print(json.dumps(report, indent=1))
    with open("/proc/loadavg") as fh:
        print(f"load average at the end: {fh.read().split()[:3]}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_prepare":
        child_prepare(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "_train":
        rest = sys.argv[3:]
        child_train(Path(sys.argv[2]), "--memory" in rest,
                    Path(rest[rest.index("--weights") + 1]) if "--weights" in rest else None)
    else:
        sys.exit(main())
