"""Dataset registry and materialisation of a dataset into data/<name>/ (HR images only).

Each dataset becomes one flat folder of HR images under data/. Writes go to a temporary folder
beside data/ and are renamed into place, so a failed fetch leaves data/ as it was.

Downloads are cached per URL (see `download_cache_dir`) and trusted only once they proved
complete: every use re-checks the file against the size and sha256 recorded then, and a file
that fails is deleted and fetched again once. Relative local paths resolve against the project
root (the parent of data/), never the current directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image

from srcore.config import DatasetSpec
from srcore.data.images import IMAGE_SUFFIXES
from srcore.layout import write_atomic

#: The embedded `sample` source: photographs shipped inside scikit-image (skimage/data).
#: Fixed split, documented in the README and chosen before anything was scored. Validation
#: mirrors the test split's make-up (two colour photographs of everyday subjects and one grey
#: photograph), taken from the former training photos; no test photo moved. motorcycle_right
#: is left out: it is a near-copy of motorcycle_left and would leak one split into another.
SAMPLE_TRAIN = (
    "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg", "brick.png",
    "grass.png", "gravel.png", "moon.png",
)
SAMPLE_VAL = ("astronaut.png", "coffee.png", "coins.png")
SAMPLE_TEST = ("chelsea.png", "rocket.jpg", "camera.png")

#: Where downloaded archives are kept between runs (outside data/, which DVC versions).
CACHE_ENV = "SRGAN_DOWNLOAD_CACHE"

_EDSR_BENCHMARK = "https://cv.snu.ac.kr/research/EDSR/benchmark.tar"
_LAPSRN_TRAIN = "http://vllab.ucmerced.edu/wlai24/LapSRN/results/SR_training_datasets.zip"


@dataclass(frozen=True)
class Source:
    """A registry entry: where a dataset comes from and which files in it are the HR images.

    `layout` is a glob relative to the extracted archive; sha256 is None where no published
    digest is known (the download is then only checked for completeness).
    """

    name: str
    description: str
    urls: tuple[str, ...] = ()
    layout: str = "**/*"
    sha256: str | None = None
    embedded: tuple[str, ...] = field(default=())


REGISTRY: dict[str, Source] = {
    s.name: s
    for s in (
        Source("sample_train", "scikit-image sample photos, training split",
               embedded=SAMPLE_TRAIN),
        Source("sample_val", "scikit-image sample photos, validation split",
               embedded=SAMPLE_VAL),
        Source("sample_test", "scikit-image sample photos, held-out split", embedded=SAMPLE_TEST),
        Source("div2k_train", "DIV2K 800 training HR images (2K)",
               ("http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_train_HR.zip",),
               "DIV2K_train_HR/*.png"),
        Source("div2k_valid", "DIV2K 100 validation HR images (2K)",
               ("http://data.vision.ee.ethz.ch/cvl/DIV2K/DIV2K_valid_HR.zip",),
               "DIV2K_valid_HR/*.png"),
        Source("set5", "Set5 benchmark (HR)", (_EDSR_BENCHMARK,), "benchmark/Set5/HR/*.png"),
        Source("set14", "Set14 benchmark (HR)", (_EDSR_BENCHMARK,), "benchmark/Set14/HR/*.png"),
        Source("bsd100", "BSD100 (B100) benchmark (HR)", (_EDSR_BENCHMARK,),
               "benchmark/B100/HR/*.png"),
        Source("urban100", "Urban100 benchmark (HR)", (_EDSR_BENCHMARK,),
               "benchmark/Urban100/HR/*.png"),
        Source("t91", "T91 training images (Yang et al.)", (_LAPSRN_TRAIN,),
               "SR_training_datasets/T91/*"),
        Source("bsd200", "BSD200 training images", (_LAPSRN_TRAIN,),
               "SR_training_datasets/BSDS200/*"),
        Source("general100", "General100 training images (Dong et al.)", (_LAPSRN_TRAIN,),
               "SR_training_datasets/General100/*"),
    )
}


class SourceError(RuntimeError):
    """A dataset cannot be materialised; the message names the dataset and the fix."""


def resolve(spec: DatasetSpec) -> Source:
    """A spec with a URL is a generic source; otherwise it must name a registry entry."""
    if spec.url:
        return Source(spec.name, f"generic source {spec.url}", (spec.url,), "**/*", spec.sha256)
    try:
        return REGISTRY[spec.name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise SourceError(
            f"dataset '{spec.name}' is not in the registry ({known}); "
            "give it a url: (http(s)://, file:// or a local path)"
        ) from None


def _skimage_data_dir() -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data"


def _to_rgb_png(src: Path, dst: Path) -> None:
    with Image.open(src) as im:
        im.convert("RGB").save(dst, format="PNG")


def _write_embedded(source: Source, out: Path) -> None:
    data_dir = _skimage_data_dir()
    for filename in source.embedded:
        src = data_dir / filename
        if not src.is_file():
            raise SourceError(f"{src}: missing from the installed scikit-image")
        _to_rgb_png(src, out / (Path(filename).stem + ".png"))


def _local_path(url: str, project: Path) -> Path | None:
    """The file or folder a local source names (relative to `project`), or None for a URL."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(url).expanduser()
    else:
        return None
    return (project / path).resolve()


def download_cache_dir() -> Path:
    """~/.cache/srgan-pipeline/downloads, or $SRGAN_DOWNLOAD_CACHE: one folder per URL."""
    default = Path.home() / ".cache" / "srgan-pipeline" / "downloads"
    return Path(os.environ.get(CACHE_ENV, default))


#: Written beside a cached download once it proved complete; its absence means "not trusted".
_RECORD = "verified.json"
#: Written beside the extracted tree: the sha256 of the archive it came from.
_EXTRACTED_RECORD = "extracted.json"


class _BadDownload(Exception):
    """Internal: the cached or fresh file cannot be trusted (the message says why)."""


def _cache_entry(url: str) -> Path:
    """Keyed by the whole URL: two servers' `set.zip` are two entries. The readable prefix
    is only for people looking into the cache."""
    name = Path(unquote(urlparse(url).path)).name or "download"
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)[-80:].lstrip(".") or "download"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return download_cache_dir() / f"{name}-{key}" / name


def _read_json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_json(path: Path, payload: dict[str, object]) -> None:
    write_atomic(path, json.dumps(payload, sort_keys=True))


def _image_problem(path: Path) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except Image.DecompressionBombError:
        return None  # complete or not, `prepare` refuses it with its own hint
    except Exception as err:  # noqa: BLE001 - Pillow raises many types for a cut file
        return f"the downloaded file is not a readable image ({err})"
    return None


def _verified_sha256(file: Path, url: str, expected: str | None) -> str:
    """sha256 of `file` once it is known to be the whole of `url`'s answer; else _BadDownload.

    A file verified before is re-checked against the size and sha256 recorded then (cheap
    next to extracting, and it catches a file changed or cut on disk); a file never verified
    must match `expected` or, with no published digest, read to its end as an archive/image.
    """
    from srcore.data.download import sha256_file
    from srcore.data.extract import CorruptArchiveError, verify_archive

    record = _read_json(file.parent / _RECORD)
    size = file.stat().st_size
    known = record.get("url") == url and isinstance(record.get("sha256"), str)
    if known and record.get("size") != size:
        raise _BadDownload(f"it is {size} bytes, not the {record.get('size')} verified before")
    digest = sha256_file(file)
    if known and digest != record["sha256"]:
        raise _BadDownload("its content changed since it was verified")
    if expected is not None and digest != expected.strip().lower():
        raise _BadDownload(f"its sha256 is {digest}, not the expected {expected}")
    if not known and expected is None:
        if file.suffix.lower() in IMAGE_SUFFIXES:
            problem = _image_problem(file)
        else:
            try:
                verify_archive(file)
                problem = None
            except CorruptArchiveError as err:
                # extract.py names its argument; for the user it is the downloaded file.
                problem = str(err).replace(str(file), "the downloaded file")
        if problem is not None:
            raise _BadDownload(problem)
    if not known:
        _write_json(file.parent / _RECORD, {"url": url, "size": size, "sha256": digest})
    return digest


def _unsafe(dataset: str, where: str, err: Exception) -> SourceError:
    return SourceError(
        f"dataset '{dataset}' ({where}): {err}; the archive is unsafe: fix or remove the source"
    )


def _download_file(dataset: str, url: str, file: Path, retries: int, timeout: float) -> None:
    from srcore.data.download import DownloadError, download

    try:
        download(url, file, retries=retries, timeout=timeout)
    except DownloadError as err:
        fix = ("re-run when the host is reachable" if err.transient
               else "fix the dataset's url or remove it")
        # Same type (and transience), so an orchestrator still retries only what can work.
        raise DownloadError(f"dataset '{dataset}': {err}; {fix}",
                            transient=err.transient) from None


def _fetch_remote(
    dataset: str, source: Source, url: str, retries: int, timeout: float,
    log: Callable[[str], None],
) -> Path:
    """Download (or reuse) the archive or image at `url`; return it (image) or its tree."""
    expected = source.sha256
    if expected is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", expected.strip()):
        raise SourceError(f"dataset '{dataset}': sha256 {expected!r} is not 64 hex digits; "
                          "fix or remove it")
    from filelock import FileLock

    file = _cache_entry(url)
    entry = file.parent
    entry.mkdir(parents=True, exist_ok=True)
    # The cache is per user, shared by every project: one process at a time per entry.
    with FileLock(str(entry) + ".lock"):
        return _fetch_locked(dataset, url, expected, file, retries, timeout, log)


def _fetch_locked(
    dataset: str, url: str, expected: str | None, file: Path, retries: int, timeout: float,
    log: Callable[[str], None],
) -> Path:
    from srcore.data.extract import CorruptArchiveError, UnsafeArchiveError, extract_archive

    entry = file.parent
    for attempt in range(2):
        cached = file.is_file()
        if not cached:
            _download_file(dataset, url, file, retries, timeout)
        try:
            digest = _verified_sha256(file, url, expected)
            break
        except _BadDownload as err:
            problem = str(err)
        except UnsafeArchiveError as err:
            shutil.rmtree(entry, ignore_errors=True)
            raise _unsafe(dataset, url, err) from None
        shutil.rmtree(entry, ignore_errors=True)  # a bad file must never be trusted later
        if attempt:
            raise SourceError(
                f"dataset '{dataset}' ({url}): {problem}; fetched again, still bad: "
                "fix or remove the source"
            )
        entry.mkdir(parents=True)
        what = "the cached download" if cached else "the download"
        log(f"dataset '{dataset}': {what} of {url} is unusable ({problem}); "
            "deleted it, fetching it again")
    if file.suffix.lower() in IMAGE_SUFFIXES:
        return file
    extracted = entry / "extracted"
    stamp = entry / _EXTRACTED_RECORD
    if extracted.is_dir() and _read_json(stamp).get("sha256") == digest:
        return extracted
    stamp.unlink(missing_ok=True)  # never trust a tree whose archive changed
    try:
        extract_archive(file, extracted, overwrite=True)
    except UnsafeArchiveError as err:
        shutil.rmtree(entry, ignore_errors=True)
        raise _unsafe(dataset, url, err) from None
    except CorruptArchiveError as err:
        shutil.rmtree(entry, ignore_errors=True)
        raise SourceError(f"dataset '{dataset}' ({url}): {err}; deleted it, re-run to fetch "
                          "it again, or fix or remove the source") from None
    _write_json(stamp, {"sha256": digest})
    return extracted


def _extract_local(dataset: str, archive: Path, out: Path) -> None:
    from srcore.data.extract import CorruptArchiveError, UnsafeArchiveError, extract_archive

    try:
        extract_archive(archive, out)
    except UnsafeArchiveError as err:
        raise _unsafe(dataset, str(archive), err) from None
    except CorruptArchiveError as err:
        raise SourceError(
            f"dataset '{dataset}': {err}; its url: must name a folder of images, an image "
            f"({', '.join(IMAGE_SUFFIXES)}) or a complete zip/tar archive"
        ) from None


def _copy_images(root: Path, pattern: str, out: Path, label: str) -> int:
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.glob(pattern)
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SourceError(f"dataset '{label}': no images matching '{pattern}' under {root}")
    names: set[str] = set()
    for f in files:
        if f.name in names:
            raise SourceError(f"dataset '{label}': two images named {f.name} under {root}")
        names.add(f.name)
        shutil.copyfile(f, out / f.name)
    return len(files)


def materialize(
    spec: DatasetSpec,
    data_root: Path,
    *,
    retries: int,
    timeout: float,
    log: Callable[[str], None] = print,
) -> Path:
    """Write dataset `spec` to data_root/<name>/ atomically and return that folder.

    `data_root` is <project>/data; relative local paths in `spec.url` resolve against
    <project>.
    """
    source = resolve(spec)
    data_root.mkdir(parents=True, exist_ok=True)
    target = data_root / spec.name
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.", dir=data_root.parent))
    out = tmp / "images"
    out.mkdir()
    try:
        if source.embedded:
            _write_embedded(source, out)
        else:
            url = source.urls[0]
            # abspath, not resolve: a symlinked data/ must not move the project root.
            local = _local_path(url, Path(os.path.abspath(data_root)).parent)
            if local is None:
                root = _fetch_remote(spec.name, source, url, retries, timeout, log)
            elif not local.exists():
                raise SourceError(f"dataset '{spec.name}': {local} does not exist")
            elif local.is_file() and local.suffix.lower() not in IMAGE_SUFFIXES:
                root = tmp / "extracted"
                _extract_local(spec.name, local, root)
            else:
                root = local
            _copy_images(root, source.layout, out, spec.name)
        count = sum(1 for _ in out.iterdir())
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        log(f"{spec.name}: {count} images -> {target}")
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def source_key(spec: DatasetSpec, project: Path) -> dict[str, object]:
    """What materialising `spec` into data/ depends on, so an unchanged source need not be
    fetched, added to DVC and pushed again: the spec itself and, for the embedded sample and
    local files or folders, the sha256 of every file it would copy. A URL stands for its
    content: its download is cached per URL and reused once verified (see module doc)."""
    from srcore.data.download import sha256_file

    source = resolve(spec)
    key: dict[str, object] = {"spec": spec.model_dump(mode="json")}
    if source.embedded:
        data_dir = _skimage_data_dir()
        key["files"] = {name: sha256_file(data_dir / name) if (data_dir / name).is_file()
                        else None for name in source.embedded}
        return key
    local = _local_path(source.urls[0], project)
    if local is None:
        return key
    if local.is_dir():
        key["files"] = {str(p.relative_to(local)): sha256_file(p)
                        for p in sorted(local.glob(source.layout)) if p.is_file()}
    else:
        key["files"] = {local.name: sha256_file(local) if local.is_file() else None}
    return key
