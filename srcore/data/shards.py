"""Training sets as a few large shards plus an index: the prepared format that streams.

A prepared training set is prepared/train/<set>/ holding

    index.json            format, scale, shard files and one record per image
    shards/shard-NNNNN.bin raw uint8 pixels: each image's HR (modcropped) then its LR, C-order
    manifest.json         the files and their sha256 (srcore.data.manifest), as for every set

A record is [name, shard, offset, height, width, channels] (HR size; LR is height/scale x
width/scale; grey stays one channel and is expanded to RGB when read). A crop reads, with one
`os.pread`, only the rows it covers: memory does not grow with the number of images, and no
image is ever decoded during training (decoding and the MATLAB bicubic happen once, here).

Whole images are stored, not fixed-size sub-images: crops are then drawn exactly as from the
decoded images before (same candidates, same weights, same random numbers, the same batches
bit for bit), the LR is the degradation of the whole image (no border effects at sub-image
edges), and nothing is stored twice (BasicSR's overlapping 480x480 sub-images hold a DIV2K
image's pixels about twice). The README's "Prepared format" section has the measurements.

Writing (`write_set`) is streaming and resumable: images are planned into shards by their
header sizes (no decoding), degraded by a pool of processes (every core), and appended to the
current shard in order; a finished shard is renamed into a work folder with a small JSON
sidecar, so a killed prepare redoes only the shard it was in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from srcore.data.degrade import bicubic_lr, modcrop
from srcore.data.images import ImageError, list_images_tree, load_image
from srcore.data.manifest import ManifestError, pixel_digest
from srcore.layout import write_atomic

INDEX = "index.json"
FORMAT = "srgan-shards/1"
SHARDS = "shards"


class ShardFormatError(ManifestError):
    """A prepared training set that is not (or no longer) what `srgan prepare` wrote."""


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Record:
    name: str
    shard: int
    offset: int
    height: int  # HR
    width: int
    channels: int


class ShardSet:
    """One prepared training set, read crop by crop from its shards (no image in memory).

    The index is held as one int64 table (shard, offset, height, width, channels per image)
    and the list of names: ~60 bytes per image, so even 350k images cost ~20 MB.
    File descriptors are opened lazily per process, so a DataLoader worker (forked or
    spawned) opens its own; `pread` keeps no file position, so they are never shared state.
    """

    def __init__(self, folder: Path, scale: int | None = None) -> None:
        self.folder = folder
        index_path = folder / INDEX
        try:
            index = json.loads(index_path.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(index.get("format"))
            self.scale = int(index["scale"])
            self.shard_files = [folder / rel for rel in index["shards"]]
            records = index["records"]
            self.names: list[str] = [str(r[0]) for r in records]
            self.table = np.array([r[1:6] for r in records], dtype=np.int64).reshape(-1, 5)
            del index, records
        except FileNotFoundError:
            raise ShardFormatError(f"{index_path}: missing; {folder} is not a prepared training "
                                   "set in the shard format: run `srgan prepare --split train` "
                                   "(or `dvc repro`)") from None
        except (ValueError, KeyError, TypeError, IndexError):
            raise ShardFormatError(f"{index_path}: not an index written by this version of "
                                   "`srgan prepare`; run `srgan prepare --split train` "
                                   "(or `dvc repro`)") from None
        if scale is not None and scale != self.scale:
            raise ImageError(f"{folder}: prepared for scale {self.scale}, not {scale}; "
                             "run `srgan prepare --split train` (or `dvc repro`)")
        shard, offset, h, w, c = self.table.T
        ends = offset + h * w * c + (h // self.scale) * (w // self.scale) * c
        expected = np.zeros(len(self.shard_files), np.int64)
        np.maximum.at(expected, shard, ends)
        for path, size in zip(self.shard_files, expected.tolist(), strict=True):
            actual = path.stat().st_size if path.is_file() else -1
            if actual != size:
                raise ShardFormatError(f"{path}: {'missing' if actual < 0 else 'truncated'} "
                                       f"({actual} bytes, {size} expected); run `srgan prepare "
                                       "--split train` (or `dvc checkout`)")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.names)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors are not ours
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shard_files[shard], os.O_RDONLY)
        return fd

    def record(self, k: int) -> Record:
        return Record(self.names[k], *(int(v) for v in self.table[k]))

    @property
    def records(self) -> list[Record]:
        """Every image's record (for tests and tools; training reads the table)."""
        return [self.record(k) for k in range(len(self))]

    def lr_sizes(self) -> np.ndarray:
        """(height, width) in LR pixels of every image, as an N x 2 array."""
        return self.table[:, 2:4] // self.scale

    def _rows(self, k: int, hr: bool, y: int, rows: int) -> np.ndarray:
        """Rows y .. y+rows of image k's HR (or LR), as stored (HxWxC, C = 1 or 3)."""
        shard, offset, height, width, channels = (int(v) for v in self.table[k])
        s = self.scale
        w = width if hr else width // s
        start = offset + (0 if hr else height * width * channels)
        row = w * channels
        data = os.pread(self._fd(shard), rows * row, start + y * row)
        if len(data) != rows * row:
            raise ShardFormatError(f"{self.shard_files[shard]}: shorter than its index says; "
                                   "run `srgan prepare --split train`")
        return np.frombuffer(data, np.uint8).reshape(rows, w, channels)

    def hr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        """The HR crop over LR pixels (y, x) .. (y+c, x+c), RGB."""
        s = self.scale
        return _rgb(self._rows(k, True, y * s, c * s)[:, x * s:(x + c) * s])

    def lr_crop(self, k: int, y: int, x: int, c: int) -> np.ndarray:
        return _rgb(self._rows(k, False, y, c)[:, x:x + c])

    def image(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Image k's whole (HR, LR), as stored: for tests and tools, never for training."""
        height = int(self.table[k, 2])
        return (self._rows(k, True, 0, height).copy(),
                self._rows(k, False, 0, height // self.scale).copy())


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def is_shard_set(folder: Path) -> bool:
    """A training set in the shard format (its index is written last, so it is complete)."""
    return (folder / INDEX).is_file()


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class Planned:
    path: Path
    name: str  # relative to the set folder, posix
    height: int  # HR after modcrop
    width: int
    channels: int


def _channels(mode: str) -> int:
    """What load_image makes of a mode: grey stays one channel, everything else is RGB."""
    grey = mode in ("L", "LA", "La", "1", "I") or mode.startswith("I;16")
    return 1 if grey else 3


def header(path: Path) -> tuple[int, int, int]:
    """(height, width, channels) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return h, w, _channels(im.mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageError(f"{path}: cannot be read as an image ({err}); replace or remove the "
                         "file, or re-fetch the data (srgan download / dvc pull)") from None


def plan(files: Sequence[Path], root: Path, scale: int, min_hr_side: int,
         shard_bytes: int, progress: bool = False) -> tuple[list[list[Planned]], list[Planned]]:
    """Shards (lists of images, in path order, each holding at most `shard_bytes` unless one
    image alone is larger) and the images skipped as smaller than `min_hr_side` HR pixels.
    Reads only the headers (~0.3 ms an image; a bar for large sets)."""
    shards: list[list[Planned]] = [[]]
    skipped: list[Planned] = []
    used = 0
    for path in tqdm(files, desc="plan shards", unit="img", leave=False,
                     disable=not progress or len(files) < 5000):
        h, w, c = header(path)
        item = Planned(path, path.relative_to(root).as_posix(), h - h % scale, w - w % scale, c)
        if min(item.height, item.width) < max(min_hr_side, scale):
            skipped.append(item)
            continue
        size = item.height * item.width * c * (1 + 1 / scale**2)
        if shards[-1] and used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(item)
        used += size
    return [s for s in shards if s], skipped


def degrade(path: Path, scale: int, sigma: float | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(HR, LR, pixel digest) of one image: modcrop, then the MATLAB bicubic. Runs in the
    pool's processes."""
    image = load_image(path)
    hr = modcrop(image, scale)
    return hr, bicubic_lr(hr, scale, sigma), pixel_digest(image)


def _work_key(files: Sequence[Path], info: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def _finished(work: Path, i: int) -> dict[str, Any] | None:
    """The sidecar of shard i when the shard was finished (renamed in) by an earlier run."""
    try:
        done = json.loads((work / f"{_shard_name(i)}.json").read_text())
    except (OSError, ValueError):
        return None
    return done if (work / _shard_name(i)).is_file() else None


def _commit_shard(work: Path, i: int, records: list[list[Any]], digests: dict[str, str]) -> None:
    """Make shard i finished: its .tmp renamed in, then its sidecar (the marker) renamed in."""
    os.replace(work / f".{_shard_name(i)}.tmp", work / _shard_name(i))
    write_atomic(work / f"{_shard_name(i)}.json",
                 json.dumps({"records": records, "digests": digests}))


#: Below this many HR bytes to degrade, one process is quicker than starting a pool (~0.5 s
#: per spawned process; the MATLAB bicubic does ~35 MB of HR pixels a second per core).
SMALL_WORK = 32 * 2**20


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty (another set's attempt) or already gone
        folder.rmdir()


def _follow_parent(parent: int) -> None:
    """Pool initializer: exit when the prepare that started this process is gone (a kill -9
    of it would otherwise leave its pool waiting forever)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def workers() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _results(items: list[Planned], scale: int, sigma: float | None,
             pool: ProcessPoolExecutor | None,
             ahead: int) -> Iterator[tuple[np.ndarray, np.ndarray, str]]:
    """degrade() of each item, in order; at most `ahead` in flight (bounded memory)."""
    if pool is None:
        for item in items:
            yield degrade(item.path, scale, sigma)
        return
    pending: deque[Future[tuple[np.ndarray, np.ndarray, str]]] = deque()
    todo = iter(items)
    for item in todo:
        pending.append(pool.submit(degrade, item.path, scale, sigma))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(pool.submit(degrade, nxt.path, scale, sigma))
        yield result


def write_set(src: Path, out: Path, work_root: Path, *, scale: int, sigma: float | None,
              min_hr_side: int, shard_mb: float, name: str = "", processes: int | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None,
              ) -> tuple[int, list[Planned], dict[Path, str]]:
    """Write the set of images under `src` (any depth) as shards + index into `out` (a new
    folder), resuming the finished shards of an identical earlier attempt kept in
    `work_root/<name>-<key>/`. Returns (images stored, images skipped, pixel digest per
    stored path). The work folder is removed once `out` is complete.

    `processes`: how many processes degrade images; None = every core, once there is more
    work than starting them costs (SMALL_WORK bytes of HR pixels)."""
    log = log or (lambda message: print(message, file=sys.stderr))
    name = name or src.name
    files = list_images_tree(src)
    info = {"format": FORMAT, "scale": scale, "sigma": sigma, "min_hr_side": min_hr_side,
            "shard_mb": shard_mb}
    work = _work_folder(work_root, name, _work_key(files, info))
    shards, skipped = plan(files, src, scale, min_hr_side, int(shard_mb * 2**20), progress)
    if skipped:
        log(f"prepare {name}: skipped {len(skipped)} of {len(files)} images smaller than "
            f"prepare.min_hr_side = {min_hr_side} px (first: {skipped[0].path})")
    if not shards:
        raise ImageError(f"{src}: no image has both sides of at least {min_hr_side} px "
                         "(prepare.min_hr_side); lower it or add larger images")
    done = {i: d for i in range(len(shards)) if (d := _finished(work, i)) is not None}
    if done:
        log(f"prepare {name}: resuming; {len(done)} of {len(shards)} shards were finished "
            "before")
    todo = [i for i in range(len(shards)) if i not in done]
    n_workers = _worker_count(processes, [shards[i] for i in todo])
    bar = tqdm(total=sum(map(len, shards)), initial=sum(len(shards[i]) for i in done),
               desc=f"prepare {name}", unit="img", dynamic_ncols=True, smoothing=0.05,
               disable=not progress)
    pool = (ProcessPoolExecutor(n_workers, mp_context=get_context("spawn"),
                                initializer=_follow_parent, initargs=(os.getpid(),))
            if n_workers > 1 else None)
    try:
        for i in todo:
            done[i] = _write_shard(work, i, shards[i], scale, sigma, pool, n_workers, bar)
    except BaseException:  # an error or Ctrl-C: the finished shards wait for the next run
        for tmp in work.glob(".*.tmp"):
            tmp.unlink()
        if not done:
            shutil.rmtree(work, ignore_errors=True)
            _remove_if_empty(work_root)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        bar.close()
    stored, digests = _assemble(out, work, shards, done, scale)
    shutil.rmtree(work, ignore_errors=True)
    _remove_if_empty(work_root)
    return stored, skipped, digests


def _work_folder(work_root: Path, name: str, key: str) -> Path:
    """This attempt's folder; attempts with other inputs or params can never be resumed."""
    work = work_root / f"{name}-{key}"
    if work_root.is_dir():
        for stale in work_root.glob(f"{name}-*"):
            if stale != work:
                shutil.rmtree(stale, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def _worker_count(processes: int | None, todo: list[list[Planned]]) -> int:
    """Processes to degrade with: one below SMALL_WORK, since starting them costs more."""
    if processes is None:
        work_bytes = sum(item.height * item.width * item.channels
                         for shard in todo for item in shard)
        processes = workers() if work_bytes > SMALL_WORK else 1
    return max(1, min(processes, sum(map(len, todo))))


def _write_shard(work: Path, i: int, shard: list[Planned], scale: int, sigma: float | None,
                 pool: ProcessPoolExecutor | None, n_workers: int, bar: Any) -> dict[str, Any]:
    """Shard `i`: HR then LR bytes of each image, fsynced, then committed with its records."""
    records: list[list[Any]] = []
    digests: dict[str, str] = {}
    offset = 0
    tmp = work / f".{_shard_name(i)}.tmp"
    with tmp.open("wb") as fh:
        results = _results(shard, scale, sigma, pool, 2 * n_workers)
        for item, (hr, lr, digest) in zip(shard, results, strict=True):
            channels = 1 if hr.ndim == 2 else 3
            if hr.shape[:2] != (item.height, item.width) or channels != item.channels:
                raise ImageError(f"{item.path}: decodes to {hr.shape}, not the "
                                 f"{item.height}x{item.width}x{item.channels} its "
                                 "header announced; replace the file")
            fh.write(np.ascontiguousarray(hr).tobytes())
            fh.write(np.ascontiguousarray(lr).tobytes())
            records.append([item.name, i, offset, item.height, item.width, channels])
            digests[item.name] = digest
            offset += hr.nbytes + lr.nbytes
            bar.update(1)
        fh.flush()
        os.fsync(fh.fileno())
    _commit_shard(work, i, records, digests)
    return {"records": records, "digests": digests}


def _assemble(out: Path, work: Path, shards: list[list[Planned]], done: dict[int, Any],
              scale: int) -> tuple[int, dict[Path, str]]:
    """Move the finished shards into `out` and write the index last, so an index means a
    complete set. Returns (images stored, pixel digest per source path)."""
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    all_records: list[list[Any]] = []
    all_digests: dict[Path, str] = {}
    by_name = {item.name: item.path for shard in shards for item in shard}
    for i in range(len(shards)):
        os.replace(work / _shard_name(i), out / SHARDS / _shard_name(i))
        all_records.extend(done[i]["records"])
        all_digests.update({by_name[n]: d for n, d in done[i]["digests"].items()})
    index = {"format": FORMAT, "scale": scale,
             "shards": [f"{SHARDS}/{_shard_name(i)}" for i in range(len(shards))],
             "records": all_records}
    (out / INDEX).write_text(json.dumps(index, separators=(",", ":")) + "\n")
    return len(all_records), all_digests
