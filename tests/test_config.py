"""params.yaml validation: every bad key stops before any work with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from srcore import config
from tests.conftest import REPO, tiny_params_dict, write_params


def test_checked_in_params_and_overlays_are_valid() -> None:
    params = config.load(REPO / "params.yaml")
    assert params.scale == 4
    assert params.finetune.content_loss == "mse"  # the default runs offline
    for overlay in sorted((REPO / "configs").glob("*.yaml")):
        merged = config.deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()),
                                   yaml.safe_load(overlay.read_text()))
        config.parse(merged, str(overlay))


def test_paper_overlay_selects_the_papers_recipe() -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = config.parse(config.deep_merge(
        base, yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())))
    assert paper.finetune.content_loss == "vgg54"
    assert paper.model.global_skip is False
    assert (paper.model.blocks, paper.model.channels) == (16, 64)
    assert paper.pretrain.lr == 1e-4 and paper.pretrain.iterations == 10**6
    assert paper.finetune.lr == 1e-4 and paper.finetune.lr_second_half == 1e-5
    assert paper.finetune.adv_weight == 1e-3 and paper.finetune.d_steps == 1


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda p: p["pretrain"].pop("lr"), "key 'pretrain.lr' is missing"),
        (lambda p: p["pretrain"].update(lr=-1e-4), "key 'pretrain.lr' is invalid"),
        (lambda p: p.update(scale=5), "key 'scale' is invalid"),
        (lambda p: p["model"].update(blokcs=3), "key 'model.blokcs' is not a known key"),
        (lambda p: p["model"].update(blocks="many"), "key 'model.blocks' is invalid"),
        (lambda p: p["finetune"].update(content_loss="vgg99"),
         "key 'finetune.content_loss' is invalid"),
        (lambda p: p["pretrain"].update(hr_crop=30), "not a multiple of scale"),
    ],
)
def test_bad_params_name_the_key(tmp_path: Path, mutate, expected: str) -> None:
    params = tiny_params_dict()
    mutate(params)
    path = write_params(tmp_path / "params.yaml", params)
    with pytest.raises(config.ConfigError, match=expected.replace(".", r"\.")) as err:
        config.load(path)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("seed: [1,\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


def test_apply_overlay_merges_validates_and_keeps_comments(tmp_path: Path) -> None:
    params = write_params(tmp_path / "params.yaml", tiny_params_dict())
    text = params.read_text()
    params.write_text("# my comment\n" + text.replace("seed: 0", "seed: 0  # the seed"))
    overlay = tmp_path / "o.yaml"
    overlay.write_text("finetune: {content_loss: vgg22}\nmodel: {global_skip: false}\n")
    merged = config.apply_overlay(params, overlay)
    assert merged.finetune.content_loss == "vgg22"
    assert merged.finetune.adv_weight == 1e-3  # untouched siblings survive
    assert "# my comment" in params.read_text() and "# the seed" in params.read_text()
    assert config.load(params).model.global_skip is False

    before = params.read_text()
    overlay.write_text("model: {blocks: 0}\n")
    with pytest.raises(config.ConfigError, match="model.blocks"):
        config.apply_overlay(params, overlay)
    assert params.read_text() == before  # a refused overlay leaves params.yaml as it was


def test_dataset_specs_accept_names_and_urls() -> None:
    params = config.parse(tiny_params_dict(
        data={"train": ["sample_train"], "val": ["sample_val"],
              "test": ["sample_test", {"name": "set5", "url": "/x/Set5/HR"}]}))
    assert [s.name for s in params.data.all_sets] == [
        "sample_train", "sample_val", "sample_test", "set5"]
    assert [s.name for s in params.data.scored_sets] == ["sample_val", "sample_test", "set5"]
    assert params.data.split_of("set5") == "test"
    assert params.data.test[1].url == "/x/Set5/HR"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"train": ["a"], "val": ["a"], "test": ["b"]},
         "'a' is named in both data.train and data.val"),
        ({"train": ["a"], "val": ["v"], "test": ["v"]},
         "'v' is named in both data.val and data.test"),
        ({"train": ["a"], "val": ["v"], "test": ["a"]},
         "'a' is named in both data.train and data.test"),
        ({"train": ["a", "a"], "val": ["v"], "test": ["b"]}, "'a' is named twice in data.train"),
        ({"train": ["a"], "val": [], "test": ["b"]}, "key 'data.val' is invalid"),
    ],
)
def test_a_set_belongs_to_one_of_train_val_and_test(data: dict, expected: str) -> None:
    with pytest.raises(config.ConfigError, match=expected.replace(".", r"\.")) as err:
        config.parse(tiny_params_dict(data=data))
    assert "\n" not in str(err.value)


def test_finetune_crops_must_fit_the_discriminator() -> None:
    raw = tiny_params_dict()
    raw["finetune"]["hr_crop"] = 40  # a multiple of the scale, not of 16
    with pytest.raises(config.ConfigError, match=r"finetune\.hr_crop.*multiple of 16"):
        config.parse(raw)


def test_paper_overlay_validates_only_on_validation_and_reports_the_benchmarks() -> None:
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    paper = config.parse(config.deep_merge(
        base, yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())))
    assert [s.name for s in paper.data.val] == ["div2k_valid"]
    assert [s.name for s in paper.data.test] == ["set5", "set14", "bsd100"]
    assert paper.tracking.gate_set == "div2k_valid"


def test_srgan_params_apply_takes_the_paper_overlay(tmp_path: Path) -> None:
    """The documented command: `srgan params apply configs/paper.yaml` on the checked-in
    params.yaml gives a valid recipe, the paper's, validated the same way every stage loads it."""
    from srcore import cli

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    assert cli.main(["--params", str(params), "--root", str(tmp_path), "params", "apply",
                     str(REPO / "configs" / "paper.yaml")]) == 0
    paper = config.load(params)
    assert paper.finetune.content_loss == "vgg54" and paper.pretrain.iterations == 10**6
    assert [s.name for s in paper.data.val] == ["div2k_valid"]
    assert "# srgan-pipeline parameters" in params.read_text()  # comments kept
