"""MOS where users compare models: the evaluate run and the model-version tags (`srgan models
compare`), the srgan gate's MOS rule and its NIQE fallback, `srgan mos`, `srgan report` beside
the paper's MOS, and ratings/ versioned with DVC. Real SQLite MLflow and DVC repositories."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from srcore import cli, report, tracking, versioning
from srcore.layout import Layout
from srcore.rating import mos
from srcore.rating.store import Key, Store
from srcore.stages.evaluate import log_mos
from tests.conftest import Register, model_version_tags


def _rate(store: Store, rater: str, set_name: str, method: str, scores: list[int]) -> None:
    token = store.add_rater(rater) if rater not in store.raters() else None
    assert token is not None
    r = store.rater(token)
    for i, score in enumerate(scores):
        store.submit(token, store.new_display(r.rater_id, "rating",  # type: ignore[union-attr]
                                              Key(set_name, f"img{i}", method)), score)


def test_the_srgan_gate_judges_by_mos_only_when_every_compared_version_has_enough_ratings(
        register: Register) -> None:
    v1 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 5.0, "mos": 3.1,
                                   "mos_ratings": 40}})
    first = tracking.gate("srgan", v1, "val", "niqe", min_ratings=30)
    assert first.promoted and str(first).endswith(
        "[rule: metric.val.mos (higher is better)] [MOS: v1 each have >= 30 ratings on val]")
    assert model_version_tags("srgan", v1)["gate_mos"] == "MOS: v1 each have >= 30 ratings on val"
    # v2 has a worse NIQE but a better MOS, and both have enough ratings: MOS decides.
    v2 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 6.0, "mos": 3.5,
                                   "mos_ratings": 30}})
    second = tracking.gate("srgan", v2, "val", "niqe", min_ratings=30)
    assert second.promoted and "metric.val.mos 3.5000 beats champion v1's 3.1000" in \
        second.reason
    assert model_version_tags("srgan", v2)["gate_metric"] == "metric.val.mos"
    # v3: a better NIQE, too few ratings: NIQE decides, and the decision line says why.
    v3 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 4.0, "mos": 4.9,
                                   "mos_ratings": 29}})
    third = tracking.gate("srgan", v3, "val", "niqe", min_ratings=30)
    line = str(third)
    assert third.promoted and "metric.val.niqe 4.0000 beats champion v2's 6.0000" in line
    assert line.endswith("[rule: metric.val.niqe (lower is better)] [MOS not used, fell back "
                         "to niqe: v3 has 29 of the 30 ratings on val it needs "
                         "(tracking.gate_min_ratings)]")
    # v4 has plenty of ratings, but the champion v3 has too few: NIQE again.
    v4 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 4.5, "mos": 5.0,
                                   "mos_ratings": 99}})
    fourth = tracking.gate("srgan", v4, "val", "niqe", min_ratings=30)
    assert fourth.decision == "champion_kept"
    assert fourth.mos_note.endswith("v3 has 29 of the 30 ratings on val it needs "
                                    "(tracking.gate_min_ratings)")
    assert "v4 has" not in fourth.mos_note
    # Without min_ratings (srresnet's gate), the line is as before.
    assert "MOS" not in str(tracking.gate("srgan", v4, "val", "niqe"))


def test_mos_reaches_the_evaluate_run_and_the_rated_versions_and_compare_shows_it(
        register: Register, tmp_path: Path) -> None:
    version = register("srgan")
    store = Store(mos.ratings_path(tmp_path))
    store.record_method("srgan", "models/srgan.pt", "abc", "srgan", version)
    store.record_method("bicubic", "MATLAB bicubic x4")
    _rate(store, "alice", "val", "srgan", [4, 5, 4])
    _rate(store, "bob", "val", "srgan", [3, 4, 3])
    _rate(store, "carol", "val", "bicubic", [2])  # one rater: no interval, never logged
    with tracking.stage_run("t", "evaluate") as tracker:
        table = log_mos(Layout(tmp_path), tracker)
        run_id = tracker.run_id
    assert table is not None and "| val | srgan | 3.83 |" in table
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert metrics["val/srgan/mos"] == pytest.approx(23 / 6)
    assert metrics["val/srgan/mos_raters"] == 2 and metrics["val/srgan/mos_ratings"] == 6
    assert metrics["val/srgan/mos_ci_low"] < 23 / 6 < metrics["val/srgan/mos_ci_high"]
    assert metrics["val/bicubic/mos"] == 2 and "val/bicubic/mos_ci_low" not in metrics
    tags = model_version_tags("srgan", version)
    assert tags["metric.val.mos"] == str(round(23 / 6, 4)) and tags["metric.val.mos_ratings"] \
        == "6.0"
    text = tracking.compare_text(["srgan"])
    assert "val.mos" in text and "val.mos_ratings" in text and "3.8333" in text


def test_srgan_mos_prints_the_table_and_tags_the_rated_versions(
        register: Register, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["mos"]) == 2
    assert "no ratings yet; run `srgan rate`" in capsys.readouterr().err
    version = register("srgan")
    store = Store(mos.ratings_path(tmp_path))
    _rate(store, "bob", "te", "hr", [5])  # no registered version: nothing to tag
    assert cli.main(["mos"]) == 0
    assert "(not tagged: no rated method is a version registered in" in \
        capsys.readouterr().err
    store.record_method("srgan", "models/srgan.pt", "abc", "srgan", version)
    _rate(store, "alice", "te", "srgan", [5, 3])
    assert cli.main(["mos"]) == 0
    out = capsys.readouterr()
    assert "| te | srgan | 4.00 | - | 1 | 2 |" in out.out
    assert f"tagged srgan v{version}" in out.err
    assert model_version_tags("srgan", version)["metric.te.mos"] == "4.0"


def test_report_prints_our_mos_beside_the_papers(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics" / "evaluate.json"
    metrics.parent.mkdir()
    metrics.write_text(json.dumps({"Set5": {"srgan": {"psnr_y": 29.0}}}))
    assert "Mean opinion score" not in report.report(metrics, ratings_root=tmp_path)
    store = Store(mos.ratings_path(tmp_path))
    _rate(store, "alice", "Set5", "srgan", [4, 3])
    _rate(store, "bob", "Set5", "nearest", [1])
    text = report.report(metrics, ratings_root=tmp_path)
    assert "| Set5 | nearest | 1.00 | - | - | 1 | 1 | 1.28 |" in text
    assert "| Set5 | srgan | 3.50 | - | - | 1 | 2 | 3.58 |" in text
    assert "clustered by rater" in text


def test_ratings_are_versioned_and_pushed_with_dvc(project: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    subprocess.run(["dvc", "remote", "add", "-f", "-d", "local", str(remote)], cwd=project,
                   check=True, capture_output=True)
    store = Store(mos.ratings_path(project))
    _rate(store, "alice", "te", "hr", [5])
    store.checkpoint()  # the WAL folded in: the folder is the one SQLite file
    assert sorted(p.name for p in (project / "ratings").iterdir()) == ["ratings.sqlite"]
    assert versioning.add_ratings(project) == 2  # the file + the directory listing
    assert (project / "ratings.dvc").is_file()
    assert "/ratings" in (project / ".gitignore").read_text()
    assert len([p for p in remote.rglob("*") if p.is_file()]) == 2
    with pytest.raises(versioning.VersioningError, match="missing; nothing to version"):
        versioning.add_ratings(project, "no-such-folder")


def test_the_evaluate_stage_ends_with_the_mos_when_ratings_exist(
        mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from srcore import config
    from srcore.stages import run_function
    from tests.rating_project import make_project

    root = make_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    store = Store(mos.ratings_path(root))
    _rate(store, "alice", "te", "srgan", [4, 2])
    _rate(store, "bob", "te", "srgan", [5, 3])
    run_function("evaluate")(config.load(root / "params.yaml"), Layout(root))
    assert "Mean opinion score (ratings/, `srgan mos`)" in capsys.readouterr().out
    run = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("srgan-pipeline").experiment_id],
        "tags.stage = 'evaluate'")[0]
    assert run.data.metrics["te/srgan/mos"] == 3.5
    assert run.data.metrics["te/srgan/mos_raters"] == 2
    assert "te/srgan/psnr_y" in run.data.metrics  # beside the benchmark's numbers


def test_a_registered_version_is_rated_under_its_resolved_version(
        register: Register, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from srcore import config
    from srcore.rating.app import RateOptions, load_session
    from srcore.stages import UserError
    from tests.rating_project import make_project

    root = make_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    version = register("srgan")
    tracking.promote("srgan", version, "for the test")
    params = config.load(root / "params.yaml")
    session = load_session(params, RateOptions(root, root / "params.yaml",
                                               models=["models:/srgan@champion"]))
    method = f"srgan-v{version}"
    assert sorted({k.method for k in session.catalog.rated}) == sorted(
        ["nearest", "bicubic", "srresnet", "srgan", "hr", method])
    assert session.store.methods()[method] == {
        "source": f"models:/srgan/{version}", "weights_sha256": f"models:/srgan/{version}",
        "model_name": "srgan", "model_version": version}
    with pytest.raises(UserError, match="no alias @nope"):
        load_session(params, RateOptions(root, root / "params.yaml",
                                         models=["models:/srgan@nope"]))
    with pytest.raises(UserError, match="--set tr: not a validation or test set"):
        load_session(params, RateOptions(root, root / "params.yaml", sets=["tr"]))
