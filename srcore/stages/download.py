"""`srgan download`: every configured dataset's HR images in data/<name>/, versioned by DVC.

data/ holds only raw downloads; `dvc add data` pins them in data.dvc, so a commit names the
data its models were trained on, and the default DVC remote (when there is one) keeps a copy.
Not a dvc.yaml stage: dvc.yaml starts from data/ (its guard stage is check-data).
"""

from __future__ import annotations

from srcore import tracking, versioning
from srcore.config import Params
from srcore.data.sources import materialize
from srcore.layout import Layout


def run(params: Params, layout: Layout, *, no_dvc: bool = False) -> None:
    """Fetch (resume, retry, verify, extract) each set, then `dvc add data` and push."""
    # 1. params: which sets, and how hard to try
    sets = params.data.all_sets
    retries, timeout = params.download.retries, params.download.timeout_s
    # 2. inputs: the sets' URLs (or the embedded sample); nothing on disk
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
        tracker.set_tags({"data_version": versioning.data_version(layout.root)})
        print(f"data/ versioned in data.dvc ({versioning.data_version(layout.root)})")
        if versioning.has_remote(layout.root):
            pushed = versioning.push(layout.root)
            print(f"pushed {pushed} file(s) to the default DVC remote")
        else:
            print("no default DVC remote configured; skipped dvc push")
