"""`srgan serve`: the generator over HTTP, keeping its goodput under overload.

It speaks MLflow's scoring protocol (POST /invocations with `dataframe_split`,
`dataframe_records`, `inputs` or `instances`, a base64 `image` column and `params` `alpha` and
`tile`; GET /ping, /health, /version), so a client of `mlflow models serve` works unchanged.
What `mlflow models serve` lacks, and why this exists: measured with one worker, 16 requests
of 512x512 sent 8 at a time all timed out (0 of 16) and the server kept computing the
abandoned ones. Here

* a fixed number of compute slots (default 1: one forward already uses every core) and a
  short bounded queue admit requests; beyond them a request is answered 503 at once, with a
  Retry-After estimated from recent service times, instead of waiting past its client;
* every admitted request carries a cancel flag, checked before each tile: it is set when the
  client disconnects or the request's deadline (--timeout, from arrival) passes (answered
  504), so no work continues for a request nobody waits for;
* memory is bounded by the slots x the tile (a request's `tile` may only lower --tile) plus
  each admitted request's own images; `memory_bound` states the bound, /stats the peak.

No mlflow here: a registered model is loaded through srcore/tracking.py (srcore.upscale).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from srcore.serving import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_QUEUE,
    DEFAULT_SLOTS,
    DEFAULT_TILE,
    DEFAULT_TIMEOUT_S,
    IMAGE_COLUMN,
    BodyTooLarge,
    read_limited_body,
)

#: How often a waiting handler looks at its client and its deadline.
POLL_S = 0.05
#: Retry-After before any request has been timed (seconds).
FIRST_RETRY_AFTER_S = 1
#: Service times the Retry-After estimate is the median of.
RECENT = 16
#: Per slot, memory the runtime takes beyond the buffers `memory_bound` counts: the worker
#: thread's malloc arena and oneDNN's cached kernels for the other tile shapes.
RUNTIME_SLACK = 64 * 2**20


@dataclass(frozen=True)
class ServerOptions:
    """What `srgan serve` takes (defaults in srcore/serving.py)."""

    model: str = "models:/srgan@champion"
    srresnet: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = DEFAULT_SLOTS
    queue: int = DEFAULT_QUEUE
    timeout_s: float = DEFAULT_TIMEOUT_S
    tile: int = DEFAULT_TILE
    overlap: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True


class Rejected(Exception):
    """A request answered with an error status; `code` is MLflow's error_code."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


# ------------------------------------------------------------------- admission and counters


@dataclass(eq=False)  # identity: the admission's set holds jobs
class Job:
    """One admitted request: its deadline and the cancel flag its tiles check."""

    deadline: float
    cancel: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    started: bool = False

    def stop(self, reason: str) -> None:
        if not self.cancel.is_set():
            self.reason = reason
            self.cancel.set()


class Admission:
    """`slots` requests compute, up to `queue` more wait; the rest are refused at once.

    Counters (what /stats shows) live here too, under the same lock, so they are consistent
    with the admission decisions: received, completed, refused, failed, timed_out,
    client_gone, cancelled (work stopped for a request nobody waits for), tiles computed.
    """

    def __init__(self, slots: int, queue: int) -> None:
        self.slots, self.queue = slots, queue
        self._lock = threading.Lock()
        self.running = 0
        self.waiting = 0
        self.counts = dict.fromkeys(("received", "completed", "refused", "failed",
                                     "timed_out", "client_gone", "cancelled", "tiles"), 0)
        self._service: deque[float] = deque(maxlen=RECENT)
        self._jobs: set[Job] = set()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counts[key] += n

    def admit(self, job: Job) -> bool:
        with self._lock:
            self.counts["received"] += 1
            if self.running + self.waiting >= self.slots + self.queue:
                self.counts["refused"] += 1
                return False
            self._jobs.add(job)
            self.waiting += 1
            return True

    def start(self, job: Job) -> None:
        with self._lock:
            self.waiting -= 1
            self.running += 1
            job.started = True

    def leave(self, job: Job, service_s: float | None = None) -> None:
        """The job is over (done, failed, cancelled, or never handed to a slot)."""
        with self._lock:
            if job not in self._jobs:
                return
            self._jobs.discard(job)
            if job.started:
                self.running -= 1
            else:
                self.waiting -= 1
            if service_s is not None:
                self._service.append(service_s)

    def stop_all(self, reason: str) -> None:
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.stop(reason)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for one more request: the work admitted ahead
        of it, at the median recent service time, spread over the slots."""
        with self._lock:
            if not self._service:
                return FIRST_RETRY_AFTER_S
            median = statistics.median(self._service)
            ahead = self.running + self.waiting
        return max(1, math.ceil(median * ahead / self.slots))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            median = statistics.median(self._service) if self._service else None
            return {**self.counts, "running": self.running, "waiting": self.waiting,
                    "in_flight": self.running + self.waiting, "slots": self.slots,
                    "queue": self.queue,
                    "service_s_median": None if median is None else round(median, 4)}


# ----------------------------------------------------------------------------- the engine


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far: VmHWM on Linux, which starts afresh at
    exec (ru_maxrss does not: it carries the high-water mark of the process that forked us,
    e.g. a test runner), else ru_maxrss."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class Engine:
    """The generators, where and how they run, and the work of one request in a slot."""

    def __init__(self, options: ServerOptions) -> None:
        import torch

        from srcore.precision import resolve
        from srcore.training.runtime import resolve_device
        from srcore.upscale import (
            GeneratorSet,
            default_overlap,
            for_inference,
            load_generators,
            model_scale,
        )

        self.options = options
        self.device = resolve_device(options.device)
        self.memory_format = (torch.channels_last if options.channels_last
                              else torch.contiguous_format)
        loaded = load_generators(options.model, options.srresnet, "if_present")
        place = {"device": self.device, "memory_format": self.memory_format}
        self.precision = resolve(options.precision, self.device)
        self.generators = GeneratorSet(
            loaded.generator.to(**place),
            None if loaded.srresnet is None else loaded.srresnet.to(**place),
            source=loaded.source, default_alpha=loaded.default_alpha,
            prepare=lambda network: for_inference(network, self.precision,
                                                  self.memory_format))
        self.overlap = (default_overlap(loaded.generator) if options.overlap is None
                        else options.overlap)
        self.scale = model_scale(loaded.generator)
        self.source = loaded.source
        self._warm_up()
        self.baseline_rss = peak_rss_bytes()

    def _warm_up(self) -> None:
        """One forward of the largest window a tile runs (--tile plus the overlap on both
        sides): oneDNN/cuDNN choose their kernels before the first request, and the peak RSS
        taken after it (the baseline of `memory_bound`) holds one tile's activations as they
        really are. Costs one tile's compute at start (about 2 s for the paper's generator
        on 2 cores)."""
        import numpy as np

        from srcore.upscale import upscale_image

        side = self.options.tile + 2 * self.overlap
        lr = np.zeros((side, side, 3), np.uint8)
        upscale_image(self.generators.at(None), lr, self.scale, 0, self.overlap, self.device,
                      self.memory_format, precision=self.precision)

    def memory_bound(self) -> int:
        """Peak RSS this server stays under: the baseline (runtime, model and one tile's
        activations, measured after `_warm_up`), one more tile per further slot
        (srcore.upscale.tile_bytes), per slot the largest request's images (image_bytes: a
        request's images together hold at most --max-pixels) and RUNTIME_SLACK (allocator
        arenas, kernel caches), plus, per admitted request, its body (twice while it is
        joined) and the JSON string parsed from it."""
        from srcore.upscale import image_bytes, tile_bytes

        slots = self.options.slots
        per_slot = (image_bytes(self.options.max_pixels, self.scale, encoded_in_memory=True)
                    + RUNTIME_SLACK)
        per_admitted = 3 * self.options.max_body_bytes  # chunks + joined body, then the str
        return (self.baseline_rss
                + (slots - 1) * tile_bytes(self.generators.srgan, self.options.tile,
                                           self.overlap)
                + slots * per_slot + (slots + self.options.queue) * per_admitted)

    def run(self, job: Job, admission: Admission, images: list[Any], alpha: float | None,
            tile: int) -> list[bytes]:
        """A request's images, one after the other, in this worker thread; raises Cancelled
        at the first tile after its flag is set. Pixels are budgeted over the whole request:
        together its images may hold at most --max-pixels."""
        from srcore.serving import decode_base64, upscale_to_png_base64
        from srcore.upscale import Cancelled

        def before_tile() -> None:
            if job.cancel.is_set():
                raise Cancelled(job.reason)
            admission.count("tiles")

        if job.cancel.is_set():  # the client left, or the deadline passed, while it waited
            raise Cancelled(job.reason)
        model = self.generators.at(alpha)
        budget = self.options.max_pixels
        hint = (f"the images of one request may hold {self.options.max_pixels:,} pixels "
                "together; send fewer or smaller images (srgan serve --max-pixels)")
        out = []
        for i, text in enumerate(images):
            picture = decode_base64(text, f"{IMAGE_COLUMN}[{i}]", budget, hint)
            budget -= picture.pixels.shape[0] * picture.pixels.shape[1]
            out.append(upscale_to_png_base64(
                model, picture, tile, self.overlap, str(self.device), self.memory_format,
                precision=self.precision, before_tile=before_tile))
            del picture
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": self.source, "device": str(self.device),
                "precision": self.precision.describe(),
                "default_alpha": self.generators.default_alpha,
                "alphas": "0..1" if self.generators.srresnet is not None else "1 only",
                "tile": self.options.tile, "overlap": self.overlap,
                "max_pixels": self.options.max_pixels, "timeout_s": self.options.timeout_s,
                "slots": self.options.slots, "queue": self.options.queue,
                "memory_bound_bytes": self.memory_bound()}


# --------------------------------------------------------------------------- the protocol


def parse_request(body: bytes) -> tuple[list[Any], dict[str, Any]]:
    """The images and params of an MLflow scoring request; Rejected (400) for anything else.

    Accepts what `mlflow models serve` accepts for a one-column string model:
    dataframe_split {columns, data}, dataframe_records [{image}], and inputs / instances as
    {image: [..]}, [{image}] or [..]."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise Rejected(400, "BAD_REQUEST", f"the body is not JSON ({err})") from None
    if not isinstance(payload, dict):
        raise Rejected(400, "BAD_REQUEST", "the body must be a JSON object")
    formats = [k for k in ("dataframe_split", "dataframe_records", "inputs", "instances")
               if k in payload]
    if len(formats) != 1:
        raise Rejected(400, "BAD_REQUEST",
                       "the body must hold exactly one of dataframe_split, dataframe_records, "
                       f"inputs or instances (and optionally params); got {sorted(payload)}")
    data = payload[formats[0]]
    images = _split(data) if formats[0] == "dataframe_split" else _records(data)
    if not images:
        raise Rejected(400, "INVALID_PARAMETER_VALUE", "the request holds no images")
    params = payload.get("params")
    if params is not None and not isinstance(params, dict):
        raise Rejected(400, "INVALID_PARAMETER_VALUE", "params must be a JSON object")
    return images, params or {}


def _split(data: Any) -> list[Any]:
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise Rejected(400, "BAD_REQUEST", "dataframe_split must be {\"columns\": [...], "
                       "\"data\": [[...], ...]}")
    columns = data.get("columns", [IMAGE_COLUMN])
    if not isinstance(columns, list) or IMAGE_COLUMN not in columns:
        raise Rejected(400, "INVALID_PARAMETER_VALUE",
                       f"expected a column {IMAGE_COLUMN!r} of base64 images, got columns "
                       f"{columns!r}")
    at = columns.index(IMAGE_COLUMN)
    rows = data["data"]
    if not all(isinstance(r, list) and len(r) == len(columns) for r in rows):
        raise Rejected(400, "BAD_REQUEST", f"each row of dataframe_split.data must hold "
                       f"{len(columns)} value(s), one per column")
    return [r[at] for r in rows]


def _records(data: Any) -> list[Any]:
    if isinstance(data, dict) and IMAGE_COLUMN in data:
        value = data[IMAGE_COLUMN]
        return value if isinstance(value, list) else [value]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        if not all(IMAGE_COLUMN in r for r in data):
            raise Rejected(400, "INVALID_PARAMETER_VALUE",
                           f"every record needs an {IMAGE_COLUMN!r} field of base64 image")
        return [r[IMAGE_COLUMN] for r in data]
    if isinstance(data, list) and all(isinstance(r, str) for r in data):
        return list(data)
    raise Rejected(400, "INVALID_PARAMETER_VALUE",
                   f'expected records with an "{IMAGE_COLUMN}" field, {{"{IMAGE_COLUMN}": '
                   '[...]} or a list of base64 strings')


def predictions_body(images: list[bytes]) -> Iterator[bytes]:
    """MLflow's answer for a DataFrame output, {"predictions": [{"image": ...}, ...]}, as
    pieces: the base64 of a large PNG is sent as it is, never copied into one string."""
    yield b'{"predictions": ['
    for i, image in enumerate(images):
        yield (b", " if i else b"") + b'{"' + IMAGE_COLUMN.encode() + b'": "'
        yield image
        yield b'"}'
    yield b"]}"


# -------------------------------------------------------------------------------- the app


class _Scoring:
    """POST /invocations: admission, parsing, one slot's compute, and the error mapping."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        self.admission = Admission(options.slots, options.queue)
        self.executor = ThreadPoolExecutor(max_workers=options.slots,
                                           thread_name_prefix="srgan-slot")

    def close(self) -> None:
        self.admission.stop_all("server shutting down")
        self.executor.shutdown(wait=True, cancel_futures=False)

    async def __call__(self, request: Request) -> Response:
        job = Job(deadline=time.monotonic() + self.options.timeout_s)
        if not self.admission.admit(job):
            wait = self.admission.retry_after()
            state = self.admission.snapshot()
            return _error(Rejected(
                503, "TEMPORARILY_UNAVAILABLE",
                f"busy: {state['running']} computing, {state['waiting']} waiting (srgan serve "
                f"--slots {self.options.slots} --queue {self.options.queue}); retry after "
                f"{wait} s", {"Retry-After": str(wait)}))
        handed_over = [False]
        try:
            return await self._score(request, job, handed_over)
        except Exception as err:  # noqa: BLE001 - every failure is one clear answer
            return self._failure(err)
        finally:
            if not handed_over[0]:
                self.admission.leave(job)

    async def _score(self, request: Request, job: Job, handed_over: list[bool]) -> Response:
        from srcore.serving import request_params

        content_type = request.headers.get("content-type", "application/json")
        if not content_type.startswith("application/json"):
            raise Rejected(415, "BAD_REQUEST", f"Content-Type {content_type!r}: send "
                           "application/json")
        body = await self._read_body(request)
        images, params = parse_request(body)
        del body
        try:
            alpha, tile = request_params(params)
        except ValueError as err:
            raise Rejected(400, "INVALID_PARAMETER_VALUE", str(err)) from None
        tile = self.options.tile if tile == 0 else min(tile, self.options.tile)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._compute, job, images, alpha, tile)
        future.add_done_callback(_retrieve)  # a stopped job's Cancelled is expected
        handed_over[0] = True
        del images
        result = await self._wait_for(request, job, future)
        if result is None:
            return Response(status_code=499)  # nobody reads it
        self.admission.count("completed")
        return StreamingResponse(predictions_body(result), media_type="application/json")

    def _failure(self, err: Exception) -> Response:
        from srcore.data.images import ImageError
        from srcore.upscale import Cancelled, MissingSRResNet, NonFiniteOutput

        if isinstance(err, ClientDisconnect):
            self.admission.count("client_gone")
            return Response(status_code=499)
        if not (isinstance(err, Rejected) and err.status == 504):
            self.admission.count("failed")
        if isinstance(err, Rejected):
            return _error(err)
        if isinstance(err, (ImageError, MissingSRResNet)):
            return _error(Rejected(400, "INVALID_PARAMETER_VALUE", str(err)))
        if isinstance(err, NonFiniteOutput):
            return _error(Rejected(500, "INTERNAL_ERROR", f"{self.engine.source}: {err}"))
        if isinstance(err, Cancelled):  # stopped for shutdown
            return _error(Rejected(503, "TEMPORARILY_UNAVAILABLE", "the server is stopping"))
        # out of memory, a bug: one line, not a crash
        return _error(Rejected(500, "INTERNAL_ERROR", f"{type(err).__name__}: {err}"))

    def _compute(self, job: Job, images: list[Any], alpha: float | None,
                 tile: int) -> list[bytes]:
        from srcore.upscale import Cancelled

        self.admission.start(job)
        began = time.monotonic()
        done = False
        try:
            out = self.engine.run(job, self.admission, images, alpha, tile)
            done = True
            return out
        except Cancelled:
            self.admission.count("cancelled")
            raise
        finally:
            self.admission.leave(job, time.monotonic() - began if done else None)

    async def _read_body(self, request: Request) -> bytes:
        try:
            return await read_limited_body(request, self.options.max_body_bytes)
        except BodyTooLarge as err:
            raise Rejected(413, "REQUEST_LIMIT_EXCEEDED",
                           _too_big(err.size, self.options)) from None

    async def _wait_for(self, request: Request, job: Job, future: asyncio.Future[Any]) -> Any:
        """The result, or Rejected(504) at the deadline, or None when the client left; in
        both cases the job's flag is set, so its slot stops at the next tile."""
        while True:
            await asyncio.wait({future}, timeout=POLL_S)
            if future.done():
                return future.result()
            if await request.is_disconnected():
                job.stop("the client disconnected")
                self.admission.count("client_gone")
                return None
            if time.monotonic() >= job.deadline:
                job.stop("the deadline passed")
                self.admission.count("timed_out")
                raise Rejected(504, "DEADLINE_EXCEEDED",
                               f"not done within {self.options.timeout_s:g} s (srgan serve "
                               "--timeout); its work was stopped")


def _error(err: Rejected) -> Response:
    return JSONResponse({"error_code": err.code, "message": str(err)},
                        status_code=err.status, headers=err.headers)


def build_app(engine: Engine, options: ServerOptions) -> Any:
    """The FastAPI app over one Engine: admission, the scoring protocol, the counters."""
    scoring = _Scoring(engine, options)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        scoring.close()

    app = FastAPI(title="srgan serve", lifespan=lifespan)
    app.state.admission = scoring.admission
    app.add_api_route("/invocations", scoring, methods=["POST"])

    @app.get("/ping")
    async def ping() -> Response:
        return PlainTextResponse("\n")

    @app.get("/health")
    async def health() -> Response:
        return JSONResponse({"status": "ok", **engine.describe()})

    @app.get("/version")
    async def version() -> Response:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as package_version

        try:
            ours = package_version("srgan-pipeline")
        except PackageNotFoundError:
            ours = "unknown"
        return JSONResponse({"srgan-pipeline": ours, "model": engine.source,
                             "precision": engine.precision.describe()})

    @app.get("/stats")
    async def stats() -> Response:
        return JSONResponse({**scoring.admission.snapshot(), "peak_rss_bytes": peak_rss_bytes(),
                             "memory_bound_bytes": engine.memory_bound(),
                             "blends_made": engine.generators.blends_made})

    return app


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _too_big(size: int, options: ServerOptions) -> str:
    return (f"the body is {size:,} bytes, over the limit of {options.max_body_bytes:,} (srgan "
            "serve --max-body-bytes); send fewer or smaller images")


# ---------------------------------------------------------------------------- the command


def serve_command(options: ServerOptions) -> int:
    """`srgan serve`: load (one clear line for a bad model), say what runs, then serve until
    SIGINT/SIGTERM. Returns the exit status."""
    import uvicorn

    from srcore.models.interpolate import IncompatibleGenerators
    from srcore.stages import UserError
    from srcore.upscale import MissingSRResNet, NonFiniteOutput

    try:
        engine = Engine(options)
    except NonFiniteOutput as err:  # the warm-up forward already overflowed
        raise UserError(f"{options.model}: {err}") from None
    except (IncompatibleGenerators, MissingSRResNet) as err:
        raise UserError(str(err)) from None
    except RuntimeError as err:
        if options.device == "cuda":
            raise UserError(f"--device cuda: {err}") from None
        raise
    info = engine.describe()
    print(f"srgan serve: {info['model']} on {info['device']}, {info['precision']}; default "
          f"alpha {info['default_alpha']:g} (alphas {info['alphas']}); {options.slots} slot(s) "
          f"+ {options.queue} queued, tile {options.tile}, timeout {options.timeout_s:g} s; "
          f"peak memory bound {info['memory_bound_bytes'] / 2**30:.2f} GiB; "
          f"http://{options.host}:{options.port}/invocations", file=sys.stderr, flush=True)
    app = build_app(engine, options)
    uvicorn.run(app, host=options.host, port=options.port, log_level="warning",
                access_log=False, timeout_graceful_shutdown=5)
    return 0
