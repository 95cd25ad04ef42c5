"""`srgan download`: every configured dataset's HR images in data/<name>/, versioned by DVC.

data/ holds only raw downloads; `dvc add data` pins them in data.dvc, so a commit names the
data its models were trained on, and the default DVC remote (when there is one) keeps a copy.
Not a dvc.yaml stage: dvc.yaml starts from data/ (its guard stage is check-data).

A run whose sources are all as they were at the last download, with data/ and data.dvc as
that download left them, does nothing: no fetch, no `dvc add`, no push and no MLflow run
(.srgan/sources.json records what was materialised), so a nightly run with nothing new is
quiet and writes nothing.
"""

from __future__ import annotations

import json
from typing import Any

from srcore import versioning
from srcore.config import Params
from srcore.data.manifest import raw_files
from srcore.data.sources import materialize, source_key
from srcore.layout import Layout, write_json

#: params.yaml keys whose values change this stage's result (not a dvc.yaml stage).
PARAMS = ("data.train", "data.val", "data.test")


def run(params: Params, layout: Layout, *, no_dvc: bool = False) -> None:
    """Fetch (resume, retry, verify, extract) each set, then `dvc add data` and push; or
    nothing at all when every source is unchanged since the last download."""
    # 1. params: which sets, and how hard to try
    sets = params.data.all_sets
    retries, timeout = params.download.retries, params.download.timeout_s
    # 2. inputs: the sets' sources (URLs, local paths, the embedded sample), what the last
    #    download recorded, data/ and data.dvc
    keys = {spec.name: source_key(spec, layout.root) for spec in sets}
    if not no_dvc and unchanged(layout, keys):
        print(f"data/ unchanged: every source is as at the last download (data.dvc "
              f"{versioning.data_version(layout.root)}); nothing fetched, added or pushed")
        return
    from srcore import tracking

    with tracking.stage_run(params.tracking.experiment, "download") as tracker:
        tracker.log_params({"data.sets": ",".join(s.name for s in sets)})
        # 3. work + 4. outputs: data/<name>/ per set, its image count in MLflow
        for spec in sets:
            folder = materialize(spec, layout.data, retries=retries, timeout=timeout)
            tracker.log_metrics({f"images/{spec.name}": len(list(folder.iterdir()))})
        if no_dvc:
            return
        # 4. outputs: data.dvc (the data version, also tagged on the run), the remote's copy
        versioning.add_data(layout.root)
        version = versioning.data_version(layout.root)
        tracker.set_tags({"data_version": version})
        print(f"data/ versioned in data.dvc ({version})")
        if versioning.has_remote(layout.root):
            pushed = versioning.push(layout.root)
            print(f"pushed {pushed} file(s) to the default DVC remote")
        else:
            print("no default DVC remote configured; skipped dvc push")
        # 4. outputs: .srgan/sources.json, last, so a failed add or push is redone next time
        write_json(layout.sources_record, {
            "data_version": version,
            "sets": {name: {"source": key, "files": raw_files(layout.data / name)}
                     for name, key in keys.items()}})


def unchanged(layout: Layout, keys: dict[str, dict[str, Any]]) -> bool:
    """Whether the last download recorded these very sources, and data/<set> and data.dvc
    are still what it left (a set edited or deleted in data/ is downloaded again)."""
    try:
        record = json.loads(layout.sources_record.read_text())
    except (OSError, ValueError):
        return False
    version = versioning.data_version(layout.root)
    if not isinstance(record, dict) or version is None or record.get("data_version") != version:
        return False
    recorded = record.get("sets") or {}
    for name, key in keys.items():
        entry = recorded.get(name)
        folder = layout.data / name
        if not isinstance(entry, dict) or entry.get("source") != key or not folder.is_dir():
            return False
        if entry.get("files") != raw_files(folder):
            return False
    return True
