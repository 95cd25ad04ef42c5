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
    from srcore.versioning import VersioningError

    errors: list[type[BaseException]] = [
        UserError, config.ConfigError, ImageError, MissingDataError, SourceError,
        VGGWeightsMissing, CheckpointMismatch, VersioningError, FileNotFoundError,
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

    print(report.report(Layout(Path(args.root).resolve()).metrics / "evaluate.json"))


def cmd_models(args: argparse.Namespace) -> None:
    from srcore import tracking

    uri = tracking.tracking_uri()
    if uri == tracking.DEFAULT_URI and not Path("mlflow.db").is_file():
        raise UserError("mlflow.db: not found here; run from the project root after a "
                        "training stage, or set MLFLOW_TRACKING_URI")
    try:
        if args.models_command == "compare":
            frame = tracking.compare([args.name] if args.name else ["srresnet", "srgan"])
            print(frame.to_string(index=False) if not frame.empty
                  else f"no registered versions in {uri}")
        else:
            previous = tracking.promote(args.name, args.version, args.reason)
            print(f"{args.name} v{args.version} is now @{tracking.CHAMPION}"
                  + (f" (was v{previous})" if previous else ""))
    except tracking.RegistryError as err:
        raise UserError(str(err)) from None


def cmd_upscale(args: argparse.Namespace) -> int:
    from srcore.upscale import upscale_command

    return upscale_command(
        args.inputs, args.output, model=args.model, tile=args.tile, overlap=args.overlap,
        fmt=args.format, max_pixels=args.max_pixels, device=args.device,
        channels_last=args.channels_last)


def cmd_params_apply(args: argparse.Namespace) -> None:
    params = config.apply_overlay(Path(args.params), Path(args.overlay))
    print(f"{args.params}: applied {args.overlay} (scale {params.scale}, "
          f"content loss {params.finetune.content_loss})")


HELP = {
    "download": "Fetch every configured dataset into data/<name>/ (HR images), then `dvc add "
                "data` and push to the default DVC remote.",
    "check-data": "Check that every configured dataset is in data/ (the first dvc.yaml stage, "
                  "so a fresh clone is told to run `srgan download` or `dvc pull`).",
    "prepare": "Crop HR images to a multiple of the scale and make their MATLAB-bicubic LR "
               "into prepared/<set>/{HR,LR}/.",
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(
            name, help=HELP[name], description=HELP[name],
            epilog="Reads params.yaml (or --params); outputs are written to a temporary name "
                   "and renamed, so an interrupted run never leaves half a file.")
        if name == "download":
            p.add_argument("--no-dvc", action="store_true",
                           help="only write data/, skip `dvc add` and push")
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
    _add_upscale_parser(sub)
    return parser


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


def run_stage(stage: str, params_path: str | Path = "params.yaml", root: str | Path = ".",
              **options: Any) -> None:
    """Run one stage in this process, raising on failure (the Prefect flow's download task)."""
    params = config.load(params_path)
    run_function(stage)(params, Layout(Path(root).resolve()), **options)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "upscale":
            return cmd_upscale(args)
        if args.command in ("params", "report", "models"):
            {"params": cmd_params_apply, "report": cmd_report, "models": cmd_models}[
                args.command](args)
            return 0
        options = {"no_dvc": args.no_dvc} if args.command == "download" else {}
        run_stage(args.command, args.params, args.root, **options)
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
