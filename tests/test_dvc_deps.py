"""dvc.yaml against the code: each stage depends on exactly the srcore files its module
imports (recursively) and the params keys its module's PARAMS declares, and every params.yaml
key either changes some stage's result or is declared as changing none.

So a new import, a new key or a key read by one more stage cannot be forgotten in dvc.yaml,
and a key that changes nothing (logging cadence, worker count, URLs) never makes a stage stale.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from srcore import stages
from srcore.config import SPLITS
from tests.conftest import REPO

#: srcore modules that record results and make none: MLflow (runs, registry) and DVC.
#: A stage imports them to log or version what it made, so they are no dependency of it and
#: their imports are not followed.
RECORD_ONLY = ("srcore.tracking", "srcore.versioning")
#: dvc.yaml stage -> the srcore.stages module whose run() its `srgan` command calls.
DVC_STAGES = {name: module for name, module in stages.STAGES.items() if name != "download"}


def _dvc_yaml() -> dict[str, dict[str, object]]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _imported(tree: ast.AST, current: str) -> Iterator[str]:
    """Modules named by import statements anywhere in the file (functions too: they run when
    the stage runs), except under `if TYPE_CHECKING:` (they never run)."""
    def visit(node: ast.AST) -> Iterator[str]:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) \
                and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                yield from visit(child)
            return
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = current.split(".")[:-node.level]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:  # `from srcore import tracking` names a module
                yield f"{base}.{alias.name}" if _exists(f"{base}.{alias.name}") else base
        for child in ast.iter_child_nodes(node):
            yield from visit(child)

    yield from visit(tree)


def _source(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, module
    return Path(spec.origin)


def imports_of(module: str) -> set[str]:
    """Every srcore file `module` imports, recursively, itself included."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen or not name.startswith("srcore") or name in RECORD_ONLY:
            continue
        seen.add(name)
        todo.extend(_imported(ast.parse(_source(name).read_text()), name))
    return {str(_source(name).relative_to(REPO)) for name in seen}


def _leaf_keys(tree: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            keys |= _leaf_keys(value, dotted + ".")
        else:
            keys.add(dotted)
    return keys


def _cover(leaves: set[str], key: str) -> set[str]:
    """The leaf keys a listed key stands for (a list-valued key such as data.train, or a
    section, stands for everything under it)."""
    return {leaf for leaf in leaves if leaf == key or leaf.startswith(key + ".")}


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_code_deps_are_exactly_the_stages_imports(stage: str) -> None:
    declared = _dvc_yaml()[stage]
    if "foreach" in declared:
        declared = declared["do"]  # type: ignore[assignment]
    code = {d for d in declared["deps"] if str(d).startswith("srcore/")}  # type: ignore[index]
    derived = imports_of(f"srcore.stages.{DVC_STAGES[stage]}")
    assert sorted(derived - code) == [], f"dvc.yaml's {stage} misses these imports"
    assert sorted(code - derived) == [], f"dvc.yaml's {stage} lists files it does not import"


@pytest.mark.parametrize("stage", sorted(DVC_STAGES))
def test_params_are_exactly_the_stages_PARAMS(stage: str) -> None:
    declared = _dvc_yaml()[stage]
    if "foreach" in declared:
        declared = declared["do"]  # type: ignore[assignment]
    assert declared["params"] == list(stages.params_of(stage))  # type: ignore[index]


def test_every_key_changes_a_result_or_is_declared_to_change_none() -> None:
    leaves = _leaf_keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    used = {key for stage in stages.STAGES for key in stages.params_of(stage)}
    for key in [*used, *stages.NO_RESULT]:
        assert _cover(leaves, key), f"{key} is not a key of params.yaml"
    covered = set().union(*(_cover(leaves, k) for k in used))
    inert = set().union(*(_cover(leaves, k) for k in stages.NO_RESULT))
    assert sorted(covered & inert) == [], "declared both as changing a result and as not"
    assert sorted(leaves - covered - inert) == [], \
        "params.yaml keys in no stage's PARAMS and not in srcore.stages.NO_RESULT"


def test_what_changes_no_result_makes_no_training_stage_stale() -> None:
    dvc = _dvc_yaml()
    for stage in ("pretrain", "finetune"):
        listed = set(dvc[stage]["params"])  # type: ignore[index]
        assert not listed & {"pretrain.log_every", "pretrain.val_every",
                             "pretrain.checkpoint_every", "finetune.log_every",
                             "runtime.num_workers", "tracking.ui_url", "data.test"}
        deps = set(dvc[stage]["deps"])  # type: ignore[index]
        assert deps & {"prepared/train", "prepared/val"} == {"prepared/train", "prepared/val"}
        assert "prepared/test" not in deps and "data" not in deps
    assert dvc["prepare"]["foreach"] == list(SPLITS)


def test_the_derivation_sees_imports_inside_functions() -> None:
    # finetune imports the VGG module only when a VGG loss is asked for: still a dependency.
    assert "srcore/models/vgg.py" in imports_of("srcore.stages.finetune")
    assert "srcore/tracking.py" not in imports_of("srcore.stages.evaluate")
    assert imports_of("srcore.stages.check_data") == {
        "srcore/stages/check_data.py", "srcore/config.py", "srcore/data/images.py",
        "srcore/layout.py"}
