"""`srgan rate`: the blind rating page (FastAPI + Jinja2, both installed with Prefect/MLflow).

Pages (per rater, under their link /r/<token>): the calibration examples, then one image at a
time with five score buttons (keys 1-5 too), "change my last score" and "stop for now". Every
image is served as /img/<display id>, a random id made for that one showing: the URL, the
alt text, the page and the PNG say nothing about the method, and a repeated image gets a new
URL. Scores go to POST /api/score as {"token", "display", "score"}; the answer is
200 {"saved": true, "next": ...} or a 4xx {"error": ...} that changed nothing:

    400  not a JSON object with a string token and display
    403  unknown token, or an image shown to another rater
    404  unknown image id
    409  a display already scored (a replayed request) or a calibration image
    413  a body over the cap (refused from its Content-Length, or once the cap is passed)
    422  a score that is not an integer from 1 to 5

No mlflow here: a registered version (--model models:/NAME@ALIAS) is loaded through
srcore.upscale, which reaches the registry through srcore.tracking.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from srcore.data.manifest import sha256_file
from srcore.rating import protocol
from srcore.rating.store import MethodChanged, Refused, Store
from srcore.serving import BodyTooLarge, read_limited_body

#: Largest POST body: a score is ~150 bytes of JSON.
MAX_BODY_BYTES = 4096
LABELS = ((1, "bad"), (2, "poor"), (3, "fair"), (4, "good"), (5, "excellent"))
#: Headers on every answer: nothing cached (a display id is single-use), no referrer.
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff"}


@dataclass
class RatingSession:
    """What one `srgan rate` serves: the store, the encoded images and the plan's knobs."""

    store: Store
    catalog: protocol.Catalog
    repeat_fraction: float
    max_body_bytes: int = MAX_BODY_BYTES
    _plans: dict[str, list[protocol.Entry]] = field(default_factory=dict)

    def plan(self, token_sha256: str) -> list[protocol.Entry]:
        if token_sha256 not in self._plans:
            self._plans[token_sha256] = protocol.plan(token_sha256, self.catalog.rated,
                                                      self.repeat_fraction)
        return self._plans[token_sha256]


def _templates() -> Environment:
    return Environment(loader=PackageLoader("srcore.rating", "templates"),
                       autoescape=select_autoescape(["html"]))


def build_app(session: RatingSession) -> FastAPI:
    app = FastAPI(title="rating", docs_url=None, redoc_url=None, openapi_url=None)
    env = _templates()
    store = session.store

    def page(name: str, status: int = 200, **values: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**values), status_code=status,
                            headers=NO_STORE)

    def unknown_link() -> HTMLResponse:
        return page("message.html", 403, title="Unknown link",
                    message="This link is not valid. Use the link you were given.", link=None)

    def rate_page(token: str, rater_id: str, entry: protocol.Entry, position: int,
                  total: int, again: bool = False) -> HTMLResponse:
        key, repeat = entry
        display = store.new_display(rater_id, "rating", key, repeat)
        return page("rate.html", token=token, display=display, position=position,
                    total=total, labels=LABELS, again=again)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return page("message.html", 404, title="Image quality rating",
                    message="Open the personal link you were given.", link=None)

    @app.get("/r/{token}", response_class=HTMLResponse)
    def rater_page(token: str) -> HTMLResponse:
        rater = store.rater(token)
        if rater is None:
            return unknown_link()
        if not rater.calibrated:
            pairs = [(store.new_display(rater.rater_id, "calibration", low),
                      store.new_display(rater.rater_id, "calibration", high))
                     for low, high in session.catalog.calibration]
            return page("calibrate.html", token=token, pairs=pairs)
        entries = session.plan(rater.token_sha256)
        found = protocol.next_entry(entries, store.rated(rater.rater_id))
        if found is None:
            return page("message.html", title="All done, thank you",
                        message=f"You have scored all {len(entries)} images.",
                        link=f"/r/{token}/again", link_text="Change my last score")
        position, entry = found
        return rate_page(token, rater.rater_id, entry, position + 1, len(entries))

    @app.post("/r/{token}/calibrated")
    def calibrated(token: str) -> Response:
        rater = store.rater(token)
        if rater is None:
            return unknown_link()
        store.mark_calibrated(rater.rater_id)
        return RedirectResponse(f"/r/{token}", status_code=303, headers=NO_STORE)

    @app.get("/r/{token}/again", response_class=HTMLResponse)
    def again(token: str) -> Response:
        rater = store.rater(token)
        if rater is None:
            return unknown_link()
        last = store.last_rated(rater.rater_id)
        if last is None or not rater.calibrated:
            return RedirectResponse(f"/r/{token}", status_code=303, headers=NO_STORE)
        entries = session.plan(rater.token_sha256)
        position = entries.index(last) + 1 if last in entries else len(entries)
        return rate_page(token, rater.rater_id, last, position, len(entries), again=True)

    @app.get("/r/{token}/pause", response_class=HTMLResponse)
    def pause(token: str) -> HTMLResponse:
        rater = store.rater(token)
        if rater is None:
            return unknown_link()
        done, total = len(store.rated(rater.rater_id)), len(session.plan(rater.token_sha256))
        return page("message.html", title="Saved: come back any time",
                    message=f"Every score you gave is saved ({done} of {total}). Open your "
                            "link again to go on where you stopped.",
                    link=f"/r/{token}", link_text="Go on rating")

    @app.get("/img/{display_id}")
    def image(display_id: str) -> Response:
        shown = store.display(display_id)
        data = None if shown is None else session.catalog.images.get(shown.key)
        if data is None:
            return JSONResponse({"error": "unknown image id"}, status_code=404,
                                headers=NO_STORE)
        return Response(data, media_type="image/png", headers=NO_STORE)

    @app.post("/api/score")
    async def score(request: Request) -> JSONResponse:
        payload = await _score_request(request, session.max_body_bytes)
        if isinstance(payload, JSONResponse):
            return payload
        token = payload["token"]
        try:
            await run_in_threadpool(store.submit, token, payload["display"],
                                    payload["score"])
        except Refused as err:
            return _error(err.status, str(err))
        return JSONResponse({"saved": True, "next": f"/r/{token}"}, headers=NO_STORE)

    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=NO_STORE)


async def _score_request(request: Request, limit: int) -> dict[str, Any] | JSONResponse:
    """The body of POST /api/score as a dict, or the 4xx that refuses it. The size is checked
    from Content-Length before reading, and again while reading (a client may lie)."""
    try:
        body = await read_limited_body(request, limit, refuse_bad_length=True)
    except BodyTooLarge:
        return _error(413, f"the body is over the limit of {limit} bytes")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return _error(400, "the body is not JSON")
    if not isinstance(payload, dict) or not all(
            isinstance(payload.get(k), str) for k in ("token", "display")):
        return _error(400, "expected a JSON object with string 'token' and 'display' "
                           "and an integer 'score'")
    if "score" not in payload:
        return _error(422, "score is missing; it must be an integer from 1 to 5")
    return payload


# ---------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class RateOptions:
    """What `srgan rate` takes beyond params.yaml."""

    root: Path
    params_path: Path
    sets: Sequence[str] = ()
    models: Sequence[str] = ()
    raters: Sequence[str] = ()
    host: str = "127.0.0.1"
    port: int = 8100
    dvc: bool = True


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)




def load_session(params: Any, options: RateOptions) -> RatingSession:
    """Encode every version of every image of the chosen sets and the calibration pairs,
    and record in the store which weights made each method."""
    from srcore.stages import UserError

    try:
        return _load_session(params, options)
    except MethodChanged as err:
        raise UserError(str(err)) from None


def _load_session(params: Any, options: RateOptions) -> RatingSession:
    import torch

    from srcore.data.datasets import load_pairs
    from srcore.evaluate import bicubic_upscale
    from srcore.layout import Layout
    from srcore.rating import ratings_path
    from srcore.stages import UserError
    from srcore.training.checkpoints import load_generator_file
    from srcore.upscale import load_generators, upscale_image

    layout = Layout(options.root)
    scale = params.scale
    scored = {s.name: split for split in ("val", "test")
              for s in getattr(params.data, split)}
    sets = list(options.sets) or [s.name for s in params.data.test]
    for name in sets:
        if name not in scored:
            raise UserError(f"--set {name}: not a validation or test set of params.yaml "
                            f"({', '.join(scored)}); training images are never rated")
    store = Store(ratings_path(layout.root))
    generators: dict[str, Any] = {}
    for name in ("srresnet", "srgan"):
        path = layout.model(name)
        if not path.is_file():
            raise UserError(f"{path}: missing; run `srgan pretrain` and `srgan finetune` "
                            "(or `dvc repro`) first")
        generators[name] = load_generator_file(path)
        digest = sha256_file(path)
        version = _registered_version(name, digest)
        store.record_method(name, str(path.relative_to(layout.root)), digest,
                            name if version else None, version)
    for uri in options.models:
        name, version = _resolve(uri)
        method = f"{name}-v{version}"  # the alias moves; the version is what was rated
        generators[method] = load_generators(f"models:/{name}/{version}").generator
        store.record_method(method, f"models:/{name}/{version}", f"models:/{name}/{version}",
                            name, version)
    for method in ("nearest", "bicubic", "hr"):
        store.record_method(method, {"nearest": "nearest-neighbour x" + str(scale),
                                     "bicubic": "MATLAB bicubic x" + str(scale),
                                     "hr": "the original"}[method])
    tile, overlap = params.evaluate.tile, params.evaluate.tile_overlap

    def upscaler(model: Any) -> protocol.Upscaler:
        def run(lr: Any) -> Any:
            with torch.inference_mode():
                return upscale_image(model, lr, scale, tile, overlap)
        return run

    def pairs_of(names: Sequence[str]) -> list[protocol.ImagePair]:
        return [protocol.ImagePair(n, p.name, p.hr, p.lr)
                for n in names for p in load_pairs(layout.prepared, n, scale)]

    calibration = protocol.calibration_choice(
        pairs_of([s.name for s in params.data.val]), params.rating.calibration_images)
    _say(f"srgan rate: encoding {len(sets)} set(s) x {len(generators) + 3} versions ...")
    catalog = protocol.build_catalog(
        pairs_of(sets), calibration, scale,
        {m: upscaler(g) for m, g in generators.items()},
        lambda lr: bicubic_upscale(lr, scale))
    if not catalog.rated:
        raise UserError(f"--set {' '.join(sets)}: no image left to rate (the calibration "
                        "images are never rated); rate another set")
    return RatingSession(store, catalog, params.rating.repeat_fraction)


def _registered_version(name: str, digest: str) -> str | None:
    """The registered version whose weights file has this sha256, when a registry is there
    to ask."""
    from srcore import tracking

    if tracking.local_store_missing():
        return None
    return tracking.version_of_digest(name, digest)


def _resolve(uri: str) -> tuple[str, str]:
    from srcore import tracking
    from srcore.stages import UserError

    try:
        return tracking.resolve_version(uri)
    except tracking.RegistryError as err:
        raise UserError(str(err)) from None


def link_host(host: str) -> str:
    """The host name a rater's link uses: the machine's name for a wildcard address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if address.is_unspecified:
        return socket.gethostname()
    return f"[{host}]" if address.version == 6 else host


def rate_command(params: Any, options: RateOptions) -> int:
    """Build the session, add the new raters (printing their links), serve until stopped,
    then fold the WAL in and version ratings/ with DVC (`dvc add ratings`, then push)."""
    import uvicorn

    from srcore.stages import UserError

    session = load_session(params, options)
    base = f"http://{link_host(options.host)}:{options.port}"
    for name in options.raters:
        try:
            token = session.store.add_rater(name)
        except ValueError as err:
            raise UserError(str(err)) from None
        print(f"{name}: {base}/r/{token}", flush=True)
    known = session.store.raters()
    if not known:
        raise UserError("no raters yet: pass --rater NAME (once per person) to make links")
    _say(f"srgan rate: {len(session.catalog.rated)} versions to rate per rater (+ "
         f"{params.rating.repeat_fraction:.0%} shown twice), "
         f"{len(session.catalog.calibration)} calibration pair(s); raters: "
         f"{', '.join(known)}; serving {base} (Ctrl-C to stop; every score is saved when "
         "given)")
    if not ipaddress.ip_address(socket.gethostbyname(options.host)).is_loopback:
        _say("srgan rate: listening beyond this machine: only the per-rater links open a page")
    uvicorn.run(build_app(session), host=options.host, port=options.port, log_level="warning")
    session.store.checkpoint()
    if options.dvc:
        from srcore import versioning

        pushed = versioning.add_ratings(options.root)
        _say("srgan rate: ratings versioned in ratings.dvc"
             + (f", {pushed} file(s) pushed" if pushed is not None else
                " (no DVC remote: not pushed)"))
    return 0
