"""`srgan <stage>`: the one entry point that dvc.yaml and the Prefect flow both call. It only
parses arguments and dispatches: stages to srcore.stages, `upscale` to srcore.upscale.

Every user-fixable error (bad params, missing data or weights, corrupt images) ends in one line
naming the thing and the fix, and exit status 2; outputs of earlier runs stay as they were.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srcore import config
from srcore.layout import Layout
from srcore.stages import STAGES, UserError, run_function


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "fix your input", not "bug in srgan"."""
    from srcore.data.images import ImageError
    from srcore.data.sources import SourceError
    from srcore.models.vgg import VGGWeightsMissing
    from srcore.stages.check_data import MissingDataError
    from srcore.training.checkpoints import CheckpointMismatch
    from srcore.training.guard import Diverged
    from srcore.versioning import VersioningError
    from srcore.workspace import WorkspaceBusy

    errors: list[type[BaseException]] = [
        UserError, config.ConfigError, ImageError, MissingDataError, SourceError,
        VGGWeightsMissing, CheckpointMismatch, VersioningError, FileNotFoundError,
        Diverged, WorkspaceBusy,
    ]
    try:
        from srcore.data.download import DownloadError
        from srcore.data.extract import UnsafeArchiveError

        errors += [DownloadError, UnsafeArchiveError]
    except ImportError:  # pragma: no cover - both ship with the package
        pass
    return tuple(errors)


# ------------------------------------------------------------- commands beside the stages


def cmd_report(args: argparse.Namespace) -> None:
    from srcore import report

    root = Path(args.root).resolve()
    print(report.report(Layout(root).metrics / "evaluate.json", ratings_root=root))


def cmd_models(args: argparse.Namespace) -> None:
    from srcore import tracking

    if tracking.local_store_missing():
        raise UserError("mlflow.db: not found here; run from the project root after a "
                        "training stage, or set MLFLOW_TRACKING_URI")
    try:
        if args.models_command == "compare":
            print(tracking.compare_text([args.name] if args.name else ["srresnet", "srgan"]))
        else:
            print(tracking.promote_text(args.name, args.version, args.reason))
    except tracking.RegistryError as err:
        raise UserError(str(err)) from None


def cmd_upscale(args: argparse.Namespace) -> int:
    from srcore.upscale import upscale_command

    return upscale_command(
        args.inputs, args.output, model=args.model, tile=args.tile, overlap=args.overlap,
        fmt=args.format, max_pixels=args.max_pixels, device=args.device,
        channels_last=args.channels_last, alpha=args.alpha, srresnet=args.srresnet,
        precision=args.precision)


def cmd_serve(args: argparse.Namespace) -> int:
    from srcore.server import ServerOptions, serve_command

    return serve_command(ServerOptions(
        model=args.model, srresnet=args.srresnet, host=args.host, port=args.port,
        slots=args.slots, queue=args.queue, timeout_s=args.timeout, tile=args.tile,
        overlap=args.overlap, max_pixels=args.max_pixels, max_body_bytes=args.max_body_bytes,
        device=args.device, precision=args.precision, channels_last=args.channels_last))


def cmd_rate(args: argparse.Namespace) -> int:
    from srcore.rating.app import RateOptions, rate_command

    root = Path(args.root).resolve()
    return rate_command(config.load(args.params), RateOptions(
        root=root, params_path=Path(args.params), sets=args.set, models=args.model,
        raters=args.rater, host=args.host, port=args.port, dvc=not args.no_dvc))


def cmd_mos(args: argparse.Namespace) -> None:
    from srcore.rating import mos

    root = Path(args.root).resolve()
    found = mos.compute(root)
    if found is None:
        raise UserError(f"{mos.ratings_path(root)}: no ratings yet; run `srgan rate` and "
                        "score some images (or `dvc pull ratings.dvc`)")
    summary, agreement, methods = found
    print(mos.table(summary, agreement))
    from srcore import tracking

    if tracking.local_store_missing():
        print("(not tagged in the registry: no mlflow.db here)", file=sys.stderr)
        return
    tagged = tracking.tag_mos(mos.versions_of(summary, methods))
    if tagged:
        print(f"tagged {', '.join(tagged)} with metric.<set>.mos "
              "(see `srgan models compare`)", file=sys.stderr)
    else:
        print(f"(not tagged: no rated method is a version registered in {tracking.tracking_uri()})",
              file=sys.stderr)


def cmd_study(args: argparse.Namespace) -> None:
    from srcore import studies

    study = studies.STUDIES[args.study_command]
    try:
        studies.run_study(Path(args.root).resolve(), study, args.values or study.values)
    except studies.StudyError as err:
        raise UserError(str(err)) from None


def cmd_params_apply(args: argparse.Namespace) -> None:
    # Under the workspace lock: params.yaml is an input of every stage of a running pipeline.
    with _workspace(args):
        params = config.apply_overlay(Path(args.params), Path(args.overlay))
    print(f"{args.params}: applied {args.overlay} (scale {params.scale}, "
          f"content loss {params.finetune.content_loss})")


HELP = {
    "download": "Fetch every configured dataset into data/<name>/ (HR images), then `dvc add "
                "data` and push to the default DVC remote.",
    "check-data": "Check that every configured dataset is in data/ (the first dvc.yaml stage, "
                  "so a fresh clone is told to run `srgan download` or `dvc pull`).",
    "hash-data": "Write .srgan/data-<split>.json (each split's sets and image hashes), what "
                 "each split's prepare depends on; refuses two sets that share an image.",
    "prepare": "Crop HR images to a multiple of the scale and make their MATLAB-bicubic LR: "
               "training sets as shards + index in prepared/train/<set>/ (every core, "
               "resumable), others as prepared/<split>/<set>/{HR,LR}/; a manifest.json per "
               "set.",
    "pretrain": "Train SRResNet with pixel MSE; writes models/srresnet.pt and "
                "metrics/pretrain.json, logs to MLflow and registers 'srresnet'. Resumes from "
                "checkpoints/pretrain.pt after an interruption.",
    "finetune": "Train SRGAN from SRResNet (content + adversarial loss); writes "
                "models/srgan.pt and metrics/finetune.json, registers 'srgan'. Resumable.",
    "evaluate": "PSNR-Y, Wang and daala SSIM-Y (border crop) of bicubic, SRResNet and SRGAN "
                "on every test set; writes metrics/evaluate.json, plots/evaluate.csv and "
                "reports/grid_*.png, tags the registered versions with their numbers and runs "
                "the @champion/@challenger gate.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srgan", description="SRGAN pipeline stages (each reads params.yaml).")
    parser.add_argument("--params", default="params.yaml",
                        help="params file (default: %(default)s)")
    parser.add_argument("--root", default=".", help="project root (default: current directory)")
    parser.add_argument("--lock-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="how long a stage (or `params apply`) waits for another srgan "
                             "run on the same root to finish (default: %(default)s, i.e. stop "
                             "at once)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(
            name, help=HELP[name], description=HELP[name],
            epilog="Reads params.yaml (or --params); outputs are written to a temporary name "
                   "and renamed, so an interrupted run never leaves half a file.")
        if name == "download":
            p.add_argument("--no-dvc", action="store_true",
                           help="only write data/, skip `dvc add` and push")
        if name == "prepare":
            p.add_argument("--split", choices=config.SPLITS, default=None,
                           help="make only prepared/SPLIT (dvc.yaml's prepare@SPLIT); "
                                "default: all of prepared/, swapped in whole")
    params_p = sub.add_parser("params", help="manage params.yaml (apply an overlay)")
    params_sub = params_p.add_subparsers(dest="params_command", required=True)
    apply_p = params_sub.add_parser(
        "apply", help="merge an overlay such as configs/paper.yaml into params.yaml")
    apply_p.add_argument("overlay")
    sub.add_parser("report", help="our benchmark beside the paper's Table 2 (PSNR-Y, daala "
                   "SSIM), from metrics/evaluate.json")
    models_p = sub.add_parser("models", help="the model registry: compare versions, promote")
    models_sub = models_p.add_subparsers(dest="models_command", required=True)
    compare_p = models_sub.add_parser(
        "compare", help="all versions side by side: metric tags, data version, aliases")
    compare_p.add_argument("name", nargs="?", choices=("srresnet", "srgan"),
                           help="one model (default: both)")
    promote_p = models_sub.add_parser(
        "promote", help="manual override: make VERSION the @champion of NAME")
    promote_p.add_argument("name", choices=("srresnet", "srgan"))
    promote_p.add_argument("version")
    promote_p.add_argument("--reason", required=True,
                           help="why (recorded on the version with who and when)")
    _add_study_parser(sub)
    _add_upscale_parser(sub)
    _add_rating_parsers(sub)
    return parser


def _add_rating_parsers(sub: Any) -> None:
    text = ("Serve the blind mean-opinion-score page (the paper's MOS test): each rater "
            "calibrates on validation images (nearest-neighbour shown as 1, HR as 5), then "
            "scores every version (nearest, bicubic, SRResNet, SRGAN, HR and each --model) of "
            "every image of the chosen sets from 1 to 5, one at a time, in an order shuffled "
            "per rater, without labels. Each --rater NAME gets a personal link (printed once). "
            "Every score is committed when given; on Ctrl-C ratings/ is versioned with DVC "
            "(`dvc add ratings`, pushed to the default remote).")
    p = sub.add_parser("rate", help="the blind mean-opinion-score page for human raters",
                       description=text)
    p.add_argument("--set", action="append", default=[], metavar="NAME",
                   help="a validation or test set to rate (repeatable; default: data.test)")
    p.add_argument("--model", action="append", default=[], metavar="URI",
                   help="also rate a registered version, models:/NAME@ALIAS or "
                        "models:/NAME/VERSION (repeatable)")
    p.add_argument("--rater", action="append", default=[], metavar="NAME",
                   help="add a rater and print their link (repeatable)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address; another than 127.0.0.1 lets colleagues in, each through "
                        "their own link (default: %(default)s)")
    p.add_argument("--port", type=_positive, default=8100, help="port (default: %(default)s)")
    p.add_argument("--no-dvc", action="store_true",
                   help="do not `dvc add ratings` and push when stopped")
    sub.add_parser("mos", help="mean opinion scores from ratings/ per set and method, with a "
                   "rater-clustered 95%% interval and test-retest agreement; tags the rated "
                   "registered versions (`srgan models compare` shows them)")


def _add_study_parser(sub: Any) -> None:
    study_p = sub.add_parser(
        "study", help="the paper's studies as DVC experiments (queued, run, tabulated)",
        description="Queue one `dvc exp run` per variant, run the queue, print the table and "
                    "write studies/<study>.{csv,png}. Needs the main job's dvc.lock and "
                    "data.dvc committed; a variant seen before comes from DVC's run cache.")
    study_sub = study_p.add_subparsers(dest="study_command", required=True)
    depth = study_sub.add_parser("depth", help="SRResNet (and SRGAN) PSNR-Y against the "
                                 "number of residual blocks B (model.blocks)")
    depth.add_argument("values", nargs="*", type=_positive, metavar="B",
                       help="the values of B (default: 2 4 8 16)")
    loss = study_sub.add_parser("content-loss", help="SRGAN with an MSE, VGG22 or VGG54 "
                                "content loss (finetune.content_loss); VGG needs the ImageNet "
                                "VGG19 weights, cached or fetchable")
    loss.add_argument("values", nargs="*", type=_content_loss, metavar="LOSS",
                      help="mse, vgg22 or vgg54 (default: all three)")


def _content_loss(text: str) -> str:
    if text not in ("mse", "vgg22", "vgg54"):
        raise argparse.ArgumentTypeError(f"must be mse, vgg22 or vgg54, got {text!r}")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_upscale_parser(sub: Any) -> None:
    from srcore.serving import (
        DEFAULT_MAX_PIXELS,
        DEFAULT_OVERLAP,
        DEFAULT_TILE,
        OUTPUT_FORMATS,
    )

    text = ("Upscale images x4 with a generator from the registry or a .pt file. Inputs are "
            "files, folders (their images) and globs; each output keeps its input's name. "
            "Alpha is upscaled bicubically, grey stays grey. A bad input is reported and "
            "skipped; the exit status is the number of failures (at most 100).")
    p = sub.add_parser("upscale", help="upscale any images with a trained generator",
                       description=text)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder or glob (PNG, JPEG, WebP, ...)")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="folder for the upscaled images (created if missing)")
    p.add_argument("--model", default="models:/srgan@champion",
                   help="models:/NAME@ALIAS or models:/NAME/VERSION from the MLflow registry "
                        "(MLFLOW_TRACKING_URI, else ./mlflow.db), or a .pt file such as "
                        "models/srgan.pt (default: %(default)s)")
    p.add_argument("--tile", type=_non_negative, default=DEFAULT_TILE,
                   help="tile side in input pixels, bounding memory; 0 = whole image "
                        "(default: %(default)s)")
    p.add_argument("--overlap", type=_non_negative, default=None,
                   help=f"context per tile side in input pixels (default: {DEFAULT_OVERLAP}, "
                        "or the model's receptive radius when smaller; the radius, 40 for 16 "
                        "blocks, makes tiles bit-exact; 16 leaves a few pixels per megapixel "
                        "one grey level off, for 26%% less work at tile 256)")
    p.add_argument("--format", choices=sorted(OUTPUT_FORMATS), default="png",
                   help="output format (default: %(default)s)")
    p.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help="refuse inputs with more pixels than this (default: %(default)s = "
                        "4096x4096)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the generator (default: %(default)s)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default: on)")
    p.add_argument("--alpha", type=_unit_interval, default=None,
                   help="point between SRResNet (0) and SRGAN (1): every weight blended as "
                        "(1-a) SRResNet + a SRGAN (default: the model as it is)")
    p.add_argument("--srresnet", default=None, metavar="PATH",
                   help="with a .pt --model and --alpha: the SRResNet it was fine-tuned from "
                        "(default: srresnet.pt beside it; a registered srgan carries its own)")
    _add_precision(p)
    _add_serve_parser(sub)


def _add_precision(p: argparse.ArgumentParser) -> None:
    from srcore.serving import PRECISIONS  # srcore.precision's, without importing torch

    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto = bf16 where the hardware runs it natively (2.5-3x faster on "
                        "an AVX512-BF16 CPU; README), else fp32; fp32 is bit-exact "
                        "(default: auto)")


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _add_serve_parser(sub: Any) -> None:
    from srcore.serving import (
        DEFAULT_MAX_BODY_BYTES,
        DEFAULT_MAX_PIXELS,
        DEFAULT_QUEUE,
        DEFAULT_SLOTS,
        DEFAULT_TILE,
        DEFAULT_TIMEOUT_S,
    )

    text = ("Serve a generator over HTTP with MLflow's scoring protocol (POST /invocations "
            "with dataframe_split / dataframe_records / inputs and a base64 'image' column; "
            "params alpha and tile; GET /ping, /health, /version, /stats). A fixed number of "
            "compute slots and a short queue: beyond them a request is refused at once with "
            "503 and Retry-After; a request whose client left or whose --timeout passed stops "
            "at the next tile.")
    p = sub.add_parser("serve", help="serve a generator over HTTP, refusing overload at once",
                       description=text)
    p.add_argument("--model", default="models:/srgan@champion",
                   help="models:/NAME@ALIAS, models:/NAME/VERSION or a .pt file "
                        "(default: %(default)s)")
    p.add_argument("--srresnet", default=None, metavar="PATH",
                   help="with a .pt --model: the SRResNet for alpha blends (default: "
                        "srresnet.pt beside it, when there)")
    p.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    p.add_argument("--port", type=_positive, default=8000, help="port (default: %(default)s)")
    p.add_argument("--slots", type=_positive, default=DEFAULT_SLOTS,
                   help="requests computed at once (default: %(default)s; one forward already "
                        "uses every core)")
    p.add_argument("--queue", type=_non_negative, default=DEFAULT_QUEUE,
                   help="admitted requests that may wait for a slot (default: %(default)s)")
    p.add_argument("--timeout", type=_positive_float, default=DEFAULT_TIMEOUT_S,
                   help="seconds from arrival until a request is answered 504 and its work "
                        "stops (default: %(default)s)")
    p.add_argument("--tile", type=_positive, default=DEFAULT_TILE,
                   help="largest tile side in input pixels; bounds memory per slot, and a "
                        "request's params.tile may only lower it (default: %(default)s)")
    p.add_argument("--overlap", type=_non_negative, default=None,
                   help="context per tile side (default: as srgan upscale)")
    p.add_argument("--max-pixels", type=_positive, default=DEFAULT_MAX_PIXELS,
                   help="most input pixels per request, all its images together "
                        "(default: %(default)s = 4096x4096)")
    p.add_argument("--max-body-bytes", type=_positive, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (default: %(default)s)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run the generator (default: %(default)s)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format (default: on)")
    _add_precision(p)


def run_stage(stage: str, params_path: str | Path = "params.yaml", root: str | Path = ".",
              **options: Any) -> None:
    """Run one stage in this process, raising on failure (the Prefect flow's download task;
    the flow has already checked the params and holds the workspace lock)."""
    params = config.load(params_path)
    run_function(stage)(params, Layout(Path(root).resolve()), **options)


#: What a stage run by hand says when another run holds the workspace.
WAIT_HINT = "pass --lock-timeout SECONDS to wait"


def _workspace(args: argparse.Namespace) -> Any:
    """The workspace lock and MLflow store of `--root`. Under torchrun only rank 0 locks: the
    other ranks write nothing, and N processes must not wait for each other."""
    import contextlib

    from srcore.workspace import tracking_store, workspace_lock

    root = Path(args.root).resolve()
    stack = contextlib.ExitStack()
    if not int(os.environ.get("RANK", "0")):
        stack.enter_context(workspace_lock(root, args.lock_timeout, WAIT_HINT))
    stack.enter_context(tracking_store(root))
    return stack


def run_by_hand(args: argparse.Namespace, **options: Any) -> None:
    """`srgan <stage>` from a shell, DVC or torchrun: everything params.yaml and the registry
    can tell is checked first (srcore.preflight), then the stage runs under the workspace
    lock, so it never interleaves with a scheduled run (whose own stages, started through
    DVC, inherit its lock)."""
    from srcore import preflight

    params = config.load(args.params)
    root = Path(args.root).resolve()
    preflight.check(params, args.params, root, [args.command])
    with _workspace(args):
        run_function(args.command)(params, Layout(root), **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "upscale":
            return cmd_upscale(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "rate":
            return cmd_rate(args)
        if args.command in ("params", "report", "models", "study", "mos"):
            {"params": cmd_params_apply, "report": cmd_report, "models": cmd_models,
             "study": cmd_study, "mos": cmd_mos}[args.command](args)
            return 0
        options = ({"no_dvc": args.no_dvc} if args.command == "download"
                   else {"split": args.split} if args.command == "prepare" else {})
        run_by_hand(args, **options)
    except _user_errors() as err:
        print(f"srgan {args.command}: error: {err}", file=sys.stderr)
        _record_failure(args, str(err))
        return 2
    except KeyboardInterrupt:
        print(f"srgan {args.command}: interrupted; re-run to resume", file=sys.stderr)
        _record_failure(args, "interrupted")
        return 130
    except Exception as err:
        _record_failure(args, f"unexpected {type(err).__name__}: {err}")
        raise
    _record_failure(args, None)
    return 0


def failure_path(root: Path, command: str) -> Path:
    """Where a stage leaves its last error, so an orchestrator running it through DVC (which
    only reports an exit status) can say why it failed."""
    return root / ".srgan" / "errors" / f"{command}.txt"


def _record_failure(args: argparse.Namespace, message: str | None) -> None:
    if int(os.environ.get("RANK", "0")):
        return  # under torchrun only rank 0 reports, as it alone writes outputs
    path = failure_path(Path(args.root).resolve(), args.command)
    try:
        if message is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(message + "\n")
    except OSError:
        pass  # reporting must never mask the stage's own outcome


if __name__ == "__main__":
    sys.exit(main())
