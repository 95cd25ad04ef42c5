"""`srgan <stage>`: the one entry point that dvc.yaml and the Prefect flow both call.

Every user-fixable error (bad params, missing data or weights, corrupt images) ends in one line
naming the thing and the fix, and exit status 2; outputs of earlier runs stay as they were.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from srcore import config
from srcore.layout import Layout

PIPELINE_STAGES = ("download", "prepare", "pretrain", "finetune", "evaluate")


class UserError(Exception):
    """Raised for problems the user can fix; printed as one line without a traceback."""


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "fix your input", not "bug in srgan"."""
    from srcore.data.images import ImageError
    from srcore.data.prepare import MissingDataError
    from srcore.data.sources import SourceError
    from srcore.models.vgg import VGGWeightsMissing
    from srcore.train import CheckpointMismatch
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


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- stages


def cmd_download(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    from srcore import tracking, versioning
    from srcore.data.sources import materialize

    with tracking.stage_run(params.tracking.experiment, "download") as tracker:
        tracker.log_params({"data.sets": ",".join(s.name for s in params.data.all_sets)})
        for spec in params.data.all_sets:
            folder = materialize(spec, layout.data, retries=params.download.retries,
                                 timeout=params.download.timeout_s)
            tracker.log_metrics({f"images/{spec.name}": len(list(folder.iterdir()))})
        if args.no_dvc:
            return
        versioning.add_data(layout.root)
        tracker.set_tags({"data_version": versioning.data_version(layout.root)})
        print(f"data/ versioned in data.dvc ({versioning.data_version(layout.root)})")
        if versioning.has_remote(layout.root):
            pushed = versioning.push(layout.root)
            print(f"pushed {pushed} file(s) to the default DVC remote")
        else:
            print("no default DVC remote configured; skipped dvc push")


def cmd_check_data(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    from srcore.data.images import list_images
    from srcore.data.prepare import MissingDataError

    found = {}
    for spec in params.data.all_sets:
        folder = layout.data / spec.name
        if not folder.is_dir() or not list_images(folder):
            raise MissingDataError(
                f"{folder}: dataset '{spec.name}' is not in data/; run `srgan download` "
                "(or `dvc pull` when this clone's data.dvc has a reachable remote)"
            )
        found[spec.name] = len(list_images(folder))
    _write_json(layout.root / ".srgan" / "data-check.json", {"sets": sorted(found)})
    print("data/ holds " + ", ".join(f"{k} ({v} images)" for k, v in found.items()))


def cmd_prepare(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    from srcore import tracking
    from srcore.data.prepare import prepare

    with tracking.stage_run(params.tracking.experiment, "prepare") as tracker:
        counts = prepare(params, layout.data, layout.prepared)
        tracker.log_params({"scale": params.scale,
                            "prepare.gaussian_sigma": params.prepare.gaussian_sigma})
        tracker.log_metrics({f"pairs/{k}": v for k, v in counts.items()})
    print("prepared " + ", ".join(f"{k}: {v} pairs" for k, v in counts.items()))


def _train_stage(stage: str, params: config.Params, layout: Layout) -> None:
    """One training stage; under torchrun every process trains, rank 0 alone logs and writes.

    Other ranks get a tracker that does nothing: one MLflow run, one registered version, one
    set of files, however many processes train. They do not even import mlflow (seconds of
    CPU that the training processes share).
    """
    import contextlib

    from srcore import distributed, train, versioning

    if stage == "finetune":
        if not layout.model("srresnet").is_file():
            raise UserError(f"{layout.model('srresnet')}: missing; run `srgan pretrain` first")
        vgg = None
        if params.finetune.content_loss != "mse":
            from srcore.models.vgg import load_vgg19_state_dict

            vgg = load_vgg19_state_dict()  # fail before any work when weights are missing
    cfg = params.pretrain if stage == "pretrain" else params.finetune
    with distributed.session(params.runtime) as world:
        distributed.split_batch(f"{stage}.batch_size", cfg.batch_size, world)
        main = world.is_main
        resume_id = None
        if main:
            init_digest = (train.file_digest(layout.model("srresnet")) if stage == "finetune"
                           else None)
            ckpt = train.read_checkpoint(layout.checkpoints / f"{stage}.pt",
                                         train.fingerprint(params, stage), init_digest)
            resume_id = ckpt["run_id"] if ckpt else None
        runs: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(
            distributed.NullTracker())
        if main:
            from srcore import tracking

            runs = tracking.stage_run(params.tracking.experiment, stage, resume_id)
        with runs as tracker:
            tracker.log_params(config.as_flat_dict(params))
            tracker.log_params(distributed.run_params(world, cfg.batch_size))
            if stage == "pretrain":
                model, metrics = train.pretrain(params, layout, tracker)
                name = "srresnet"
            else:
                model, metrics = train.finetune(params, layout, tracker, vgg)
                name = "srgan"
            if not main:
                return
            data_version = versioning.data_version(layout.root)
            train.save_generator(model, layout.model(name), {"data_version": data_version})
            tags = {"data_version": data_version, "mlflow_run_id": tracker.run_id,
                    "global_skip": params.model.global_skip, "blocks": params.model.blocks,
                    "channels": params.model.channels, "scale": params.scale}
            version = tracker.log_generator(model, name, params.tracking.register_models, tags)
            tracker.log_metrics({f"{stage}/final_{k}": v for k, v in metrics.items()})
            _write_json(layout.metrics / f"{stage}.json",
                        {**{k: round(v, 6) for k, v in metrics.items()},
                         "registered_version": version})
        (layout.checkpoints / f"{stage}.pt").unlink(missing_ok=True)
    print(f"{stage}: wrote {layout.model(name)}"
          + (f", registered {name} version {version}" if version else ""))


def cmd_pretrain(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    _train_stage("pretrain", params, layout)


def cmd_finetune(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    _train_stage("finetune", params, layout)


def cmd_evaluate(params: config.Params, layout: Layout, args: argparse.Namespace) -> None:
    from srcore import evaluate, tracking, train

    gate_set = evaluate.gate_set(params)  # a bad tracking.gate_set fails before any work
    generators = {name: train.load_generator_file(layout.model(name))
                  for name in ("srresnet", "srgan")}
    with tracking.stage_run(params.tracking.experiment, "evaluate") as tracker:
        summary, grids = evaluate.evaluate(
            params, layout.prepared, generators, layout.metrics / "evaluate.json",
            layout.plots / "evaluate.csv", layout.reports)
        flat = {f"{s}/{m}/{k}": v for s, ms in summary.items()
                for m, vals in ms.items() for k, v in vals.items()}
        tracker.log_metrics(flat)
        for grid in grids:
            tracker.log_artifact(grid, "grids")
        tracker.log_artifact(layout.plots / "evaluate.csv")
        decisions = _registry_gate(params, layout, summary, gate_set)
        tracker.set_tags({f"gate.{d.name}": f"v{d.version} {d.decision}" for d in decisions})
    print(evaluate.table(summary))
    for decision in decisions:
        print(decision)


def _registry_gate(params: config.Params, layout: Layout, summary: dict[str, Any],
                   gate_set: str) -> list[Any]:
    """Tag the versions that made models/*.pt with their numbers, then run the promotion gate.

    The version numbers come from metrics/{pretrain,finetune}.json, written with the weights.
    A version this registry does not know (another MLFLOW_TRACKING_URI, a deleted mlflow.db)
    is reported and skipped: the benchmark itself stands and the stage does not fail.
    """
    from srcore import tracking

    decisions = []
    for stage, name in (("pretrain", "srresnet"), ("finetune", "srgan")):
        path = layout.metrics / f"{stage}.json"
        version = json.loads(path.read_text()).get("registered_version") if path.is_file() \
            else None
        if version is None:
            continue
        metric = "psnr_y" if name == "srresnet" else params.tracking.gate_metric_srgan
        try:
            tracking.tag_metrics(name, str(version), {
                s: methods[name] for s, methods in summary.items() if name in methods})
            decisions.append(tracking.gate(name, str(version), gate_set, metric))
        except tracking.RegistryError as err:
            print(f"registry gate: skipped {name}: {err}", file=sys.stderr)
    return decisions


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
    """Upscale images with a registered or saved generator; the exit status counts failures.

    Not a pipeline stage: it reads no params.yaml. Bad inputs are reported one by one and the
    rest still run; the status is min(failures, 100), so 0 means every image was written.
    """
    import torch

    from srcore import tracking, train, upscale

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: is a file; -o takes a folder for the upscaled images")
    if args.model.startswith(("models:/", "runs:/")):
        uri = tracking.tracking_uri()
        if uri == tracking.DEFAULT_URI and not Path("mlflow.db").is_file():
            raise UserError(f"{args.model}: no mlflow.db here; run from the project root, set "
                            "MLFLOW_TRACKING_URI, or pass --model models/srgan.pt")
        try:
            model = tracking.load_generator(args.model)
        except tracking.RegistryError as err:
            raise UserError(str(err)) from None
    else:
        model = train.load_generator_file(Path(args.model))
    try:
        device = train.resolve_device(args.device)
    except RuntimeError as err:
        raise UserError(f"--device cuda: {err}") from None
    model = model.to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    written, failures = upscale.upscale_files(
        model, args.inputs, out, tile=args.tile, overlap=args.overlap,
        fmt=args.format, max_pixels=args.max_pixels, device=device,
        memory_format=memory_format)
    total = len(written) + len(failures)
    print(f"srgan upscale: wrote {len(written)} of {total} image(s) to {args.output}"
          + (f"; {len(failures)} failed: " + ", ".join(f.source for f in failures)
             if failures else ""))
    return min(len(failures), 100)


def cmd_params_apply(args: argparse.Namespace) -> None:
    params = config.apply_overlay(Path(args.params), Path(args.overlay))
    print(f"{args.params}: applied {args.overlay} (scale {params.scale}, "
          f"content loss {params.finetune.content_loss})")


STAGE_COMMANDS: dict[str, Callable[[config.Params, Layout, argparse.Namespace], None]] = {
    "download": cmd_download,
    "check-data": cmd_check_data,
    "prepare": cmd_prepare,
    "pretrain": cmd_pretrain,
    "finetune": cmd_finetune,
    "evaluate": cmd_evaluate,
}

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
    for name in STAGE_COMMANDS:
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
    args = argparse.Namespace(command=stage, params=str(params_path), root=str(root),
                              no_dvc=False, **options)
    STAGE_COMMANDS[stage](config.load(params_path), Layout(Path(root).resolve()), args)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "upscale":
            return cmd_upscale(args)
        if args.command in ("params", "report", "models"):
            {"params": cmd_params_apply, "report": cmd_report, "models": cmd_models}[
                args.command](args)
            return 0
        params = config.load(args.params)
        STAGE_COMMANDS[args.command](params, Layout(Path(args.root).resolve()), args)
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
