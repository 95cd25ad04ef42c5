"""The model registry users act on: provenance tags, the champion/challenger gate, manual
promotion and the comparison table, against a real SQLite MLflow store."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from srcore import cli, config, tracking
from srcore.layout import Layout
from srcore.stages.evaluate import registry_gate
from tests.conftest import Register, model_version_tags, tiny_params_dict


def test_first_version_becomes_champion_and_carries_its_provenance(register: Register) -> None:
    v1 = register(metrics={"set14": {"psnr_y": 25.0, "ssim_y": 0.7, "ssim_daala_y": 0.71}})
    decision = tracking.gate("srresnet", v1, "set14", "psnr_y")
    assert decision.promoted and decision.champion == v1
    assert "first champion" in decision.reason
    assert tracking.aliases("srresnet") == {"champion": v1, "challenger": v1}

    tags = model_version_tags("srresnet", v1)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert tags["git_commit"] == head and tags["git_dirty"] in ("true", "false")
    assert tags["data_version"] == "d1.dir"
    params = json.loads(tags["params"])  # the full set as one tag, not one tag per key
    assert (params["model.blocks"], params["scale"], params["pretrain.lr"]) == ("1", "4", "0.0001")
    assert params["runtime.device"] == "cpu"
    assert not [k for k in tags if k.startswith("params.")]
    assert tags["metric.set14.psnr_y"] == "25.0" and tags["metric.set14.ssim_daala_y"] == "0.71"
    assert tags["gate_decision"] == "promoted"


def test_a_better_challenger_takes_the_champion_alias(register: Register) -> None:
    v1 = register(metrics={"set14": {"psnr_y": 25.0}})
    tracking.gate("srresnet", v1, "set14", "psnr_y")
    v2 = register(metrics={"set14": {"psnr_y": 25.3}})
    decision = tracking.gate("srresnet", v2, "set14", "psnr_y")
    assert decision.promoted and "25.3000 beats champion v1's 25.0000" in decision.reason
    assert tracking.aliases("srresnet") == {"champion": v2, "challenger": v2}
    # Re-running the gate on the champion (evaluate re-run) changes nothing.
    again = tracking.gate("srresnet", v2, "set14", "psnr_y")
    assert again.decision == "already_champion" and again.champion == v2


def test_a_worse_or_equal_challenger_leaves_the_champion_and_says_why(
        register: Register) -> None:
    # srgan's gate metric is configurable: here SSIM decides although PSNR improved.
    v1 = register("srgan", metrics={"set5": {"psnr_y": 24.0, "ssim_y": 0.80}})
    tracking.gate("srgan", v1, "set5", "ssim_y")
    v2 = register("srgan", metrics={"set5": {"psnr_y": 26.0, "ssim_y": 0.80}})
    decision = tracking.gate("srgan", v2, "set5", "ssim_y")
    assert not decision.promoted and decision.champion == v1
    assert tracking.aliases("srgan") == {"champion": v1, "challenger": v2}
    tags = model_version_tags("srgan", v2)
    assert tags["gate_decision"] == "champion_kept"
    assert tags["gate_reason"] == ("metric.set5.ssim_y 0.8000 does not beat champion v1's "
                                   "0.8000")
    assert str(decision).startswith(f"registry gate: srgan v{v2} is @challenger; "
                                    f"@champion stays v{v1} (metric.set5.ssim_y")


def test_srgan_gate_ranks_by_lower_niqe_within_the_psnr_budget_and_above_bicubic(
        register: Register) -> None:
    """The paper's trade: SRGAN may lose PSNR to SRResNet (within the budget, never below
    bicubic) and wins on NIQE, where lower is better."""
    ref = register("srresnet", metrics={"val": {"psnr_y": 28.0, "niqe": 6.8}})
    assert tracking.gate("srresnet", ref, "val", "psnr_y", bicubic_psnr=26.0).promoted
    rule = {"bicubic_psnr": 26.0, "psnr_budget_db": 1.0}

    v1 = register("srgan", metrics={"val": {"psnr_y": 27.5, "niqe": 6.0}})
    first = tracking.gate("srgan", v1, "val", "niqe", **rule)
    assert first.promoted and "first champion" in first.reason
    assert model_version_tags("srgan", v1)["gate_rule"] == (
        "metric.val.niqe (lower is better); psnr_y above bicubic's 26.00; "
        "psnr_y within 1 dB of @champion srresnet")

    v2 = register("srgan", metrics={"val": {"psnr_y": 27.2, "niqe": 5.5}})  # lower NIQE wins
    second = tracking.gate("srgan", v2, "val", "niqe", **rule)
    assert second.promoted and "metric.val.niqe 5.5000 beats champion" in second.reason

    v3 = register("srgan", metrics={"val": {"psnr_y": 28.5, "niqe": 5.9}})  # higher NIQE loses
    third = tracking.gate("srgan", v3, "val", "niqe", **rule)
    assert third.decision == "champion_kept" and third.champion == v2

    v4 = register("srgan", metrics={"val": {"psnr_y": 26.9, "niqe": 4.0}})  # too blurry a trade
    fourth = tracking.gate("srgan", v4, "val", "niqe", **rule)
    assert fourth.decision == "refused" and fourth.champion == v2
    assert fourth.reason == ("not promoted: metric.val.psnr_y 26.90 is more than 1 dB below "
                             f"srresnet v{ref}'s 28.00")

    v5 = register("srgan", metrics={"val": {"psnr_y": 25.9, "niqe": 3.0}})
    fifth = tracking.gate("srgan", v5, "val", "niqe", bicubic_psnr=26.0, psnr_budget_db=3.0)
    assert fifth.decision == "refused" and "not above bicubic's 26.00" in fifth.reason
    assert tracking.aliases("srgan") == {"champion": v2, "challenger": v5}


def test_psnr_budget_needs_a_measured_srresnet_champion(register: Register) -> None:
    v1 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 5.0}})
    decision = tracking.gate("srgan", v1, "val", "niqe", psnr_budget_db=3.0)
    assert decision.decision == "refused" and decision.champion == ""
    assert "no @champion srresnet with a metric.val.psnr_y tag" in decision.reason
    assert "there is no @champion" in str(decision)


def test_non_finite_numbers_never_reach_the_registry_or_a_run(register: Register) -> None:
    v1 = register()
    with pytest.raises(tracking.RegistryError, match=r"metric\.val\.niqe is nan"):
        tracking.tag_metrics("srresnet", v1, {"val": {"niqe": float("nan")}})
    assert "metric.val.niqe" not in model_version_tags("srresnet", v1)
    with tracking.stage_run("t", "pretrain") as tracker, \
            pytest.raises(tracking.NonFiniteMetric, match="'pretrain/loss_mse' is nan"):
        tracker.log_metrics({"pretrain/loss_mse": float("nan"), "pretrain/lr": 1e-4}, step=3)
    run = MlflowClient().get_run(tracker.run_id)
    assert run.data.metrics == {}  # nothing of that call was logged


def test_a_champion_measured_on_other_sets_is_not_replaced_blindly(register: Register) -> None:
    v1 = register(metrics={"sample_test": {"psnr_y": 30.0}})
    tracking.gate("srresnet", v1, "sample_test", "psnr_y")
    v2 = register(metrics={"set14": {"psnr_y": 20.0}})
    decision = tracking.gate("srresnet", v2, "set14", "psnr_y")
    assert not decision.promoted
    assert "has no metric.set14.psnr_y" in decision.reason
    assert f"srgan models promote srresnet {v2}" in decision.reason
    with pytest.raises(tracking.RegistryError, match="no metric.set5.psnr_y tag"):
        tracking.gate("srresnet", v2, "set5", "psnr_y")


def test_manual_promotion_overrides_the_gate_and_records_who_and_why(
        register: Register, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = register(metrics={"set14": {"psnr_y": 25.0}})
    tracking.gate("srresnet", v1, "set14", "psnr_y")
    v2 = register(metrics={"set14": {"psnr_y": 24.0}})
    tracking.gate("srresnet", v2, "set14", "psnr_y")
    assert cli.main(["models", "promote", "srresnet", v2, "--reason", "sharper faces"]) == 0
    assert f"srresnet v{v2} is now @champion (was v{v1})" in capsys.readouterr().out
    assert tracking.aliases("srresnet")["champion"] == v2
    tags = model_version_tags("srresnet", v2)
    assert tags["promoted_reason"] == "sharper faces" and tags["promoted_over"] == v1
    # The registry never shows the champion as "champion_kept" after a manual promotion.
    assert (tags["gate_decision"], tags["gate_reason"]) == ("manual",
                                                            "promoted by hand: sharper faces")
    assert tracking.gate_comparison("srresnet", v2, v1) == (
        f"metric.set14.psnr_y: v{v2} 24.0000 is worse than v{v1}'s 25.0000 (higher is better)")
    assert tags["promoted_by"] and tags["promoted_at"].endswith("Z")
    frame = tracking.compare(["srresnet"])
    assert frame.loc[frame.version == int(v2), "promoted_by"].item() == tags["promoted_by"]
    assert cli.main(["models", "promote", "srresnet", "9", "--reason", "x"]) == 2
    assert "has no version 9" in capsys.readouterr().err


def test_compare_lists_every_version_with_metrics_data_version_and_aliases(
        register: Register, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = register(data_version="old.dir", metrics={"set14": {"psnr_y": 25.0, "ssim_y": 0.7}})
    tracking.gate("srresnet", v1, "set14", "psnr_y")
    v2 = register(data_version="new.dir", metrics={"set14": {"psnr_y": 24.0, "ssim_y": 0.8}})
    tracking.gate("srresnet", v2, "set14", "psnr_y")
    frame = tracking.compare(["srresnet", "srgan"])
    assert list(frame["version"]) == [2, 1]  # newest first; srgan has none
    assert list(frame["aliases"]) == ["challenger", "champion"]
    assert list(frame["data_version"]) == ["new.dir", "old.dir"]
    assert list(frame["set14.psnr_y"]) == [24.0, 25.0]
    assert list(frame["set14.ssim_y"]) == [0.8, 0.7]
    assert list(frame["gate_decision"]) == ["champion_kept", "promoted"]
    assert frame["created (UTC)"].str.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d").all()
    assert cli.main(["models", "compare", "srresnet"]) == 0
    out = capsys.readouterr().out
    assert "set14.psnr_y" in out and "champion" in out and "new.dir" in out


def _weights(layout: Layout, name: str, version: str | None) -> None:
    """models/<name>.pt as training leaves it: the registered `version` (if any) carries its
    sha256, which is how the gate finds the version (the file holds no version number)."""
    path = layout.model(name)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(f"{name} weights, version {version}".encode())
    if version is not None:
        MlflowClient().set_model_version_tag(name, version, tracking.FILE_TAG,
                                             hashlib.sha256(path.read_bytes()).hexdigest())


def test_evaluate_gate_tags_the_versions_that_made_the_weights_files(
        register: Register, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = register()
    layout = Layout(tmp_path)
    _weights(layout, "srresnet", v1)
    _weights(layout, "srgan", None)  # made against another registry
    summary = {"sample_test": {"srresnet": {"psnr_y": 26.5, "ssim_y": 0.75,
                                            "ssim_daala_y": 0.77},
                               "srgan": {"psnr_y": 25.0, "ssim_y": 0.7, "ssim_daala_y": 0.7}}}
    params = config.parse(tiny_params_dict())
    decisions = registry_gate(params, layout, summary, "sample_test")
    assert [(d.name, d.version, d.decision) for d in decisions] == [("srresnet", v1,
                                                                     "promoted")]
    assert model_version_tags("srresnet", v1)["metric.sample_test.ssim_daala_y"] == "0.77"
    # models/srgan.pt is no version of this registry: reported, and the stage still succeeds.
    assert f"skipped srgan: {layout.model('srgan')} is no version registered in" in \
        capsys.readouterr().err


def test_evaluate_gates_srgan_on_validation_niqe_within_the_psnr_budget(
        register: Register, tmp_path: Path) -> None:
    """The evaluate stage's gate as params.yaml sets it: srgan by NIQE on the validation set,
    bounded by bicubic and by tracking.gate_psnr_budget_db below the SRResNet champion."""
    resnet, gan = register("srresnet"), register("srgan")
    layout = Layout(tmp_path)
    _weights(layout, "srresnet", resnet)
    _weights(layout, "srgan", gan)
    params = config.parse(tiny_params_dict())
    assert params.tracking.gate_metric_srgan == "niqe"
    budget = params.tracking.gate_psnr_budget_db
    summary = {"sample_val": {
        "bicubic": {"psnr_y": 24.0, "niqe": 7.6},
        "srresnet": {"psnr_y": 28.0, "ssim_y": 0.8, "niqe": 6.8},
        "srgan": {"psnr_y": 28.0 - budget - 0.1, "ssim_y": 0.7, "niqe": 5.0}}}
    decisions = registry_gate(params, layout, summary, "sample_val")
    assert [(d.name, d.decision) for d in decisions] == [("srresnet", "promoted"),
                                                        ("srgan", "refused")]
    assert f"more than {budget:g} dB below srresnet v{resnet}'s 28.00" in decisions[1].reason
    assert model_version_tags("srgan", gan)["gate_rule"].startswith(
        "metric.sample_val.niqe (lower is better)")

    summary["sample_val"]["srgan"]["psnr_y"] = 27.0  # a trade within the budget: promoted
    decisions = registry_gate(params, layout, summary, "sample_val")
    assert [(d.name, d.decision) for d in decisions] == [("srresnet", "already_champion"),
                                                        ("srgan", "promoted")]
    # The line evaluate prints names the metric, its direction and the PSNR budget.
    line = str(decisions[1])
    assert line.startswith(f"registry gate: srgan v{gan} is now @champion")
    assert ("[rule: metric.sample_val.niqe (lower is better); psnr_y above bicubic's 24.00; "
            f"psnr_y within {budget:g} dB of @champion srresnet]") in line


def test_compare_says_which_columns_are_lower_is_better_and_promote_compares(
        register: Register, capsys: pytest.CaptureFixture[str]) -> None:
    v1 = register("srgan", metrics={"val": {"psnr_y": 27.0, "niqe": 5.0}})
    tracking.gate("srgan", v1, "val", "niqe")
    v2 = register("srgan", metrics={"val": {"psnr_y": 27.5, "niqe": 5.8}})
    tracking.gate("srgan", v2, "val", "niqe")  # higher NIQE: kept as challenger
    assert cli.main(["models", "compare", "srgan"]) == 0
    out = capsys.readouterr().out
    assert "val.niqe" in out and "(lower is better: niqe;" in out
    assert cli.main(["models", "promote", "srgan", v2, "--reason", "sharper"]) == 0
    out = capsys.readouterr().out
    assert f"srgan v{v2} is now @champion (was v{v1})" in out
    assert (f"metric.val.niqe: v{v2} 5.8000 is worse than v{v1}'s 5.0000 (lower is better)"
            in out)
