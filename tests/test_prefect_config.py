"""prefect.toml: `prefect server start` in the project root starts without an ERROR traceback.

Prefect 3 reads prefect.toml from the working directory. Without it the server's startup
telemetry, unable to reach its host offline, logged "ERROR ... Failed to send telemetry" (and
raced the first run's writes on SQLite: "database is locked").
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.conftest import BIN, REPO, free_port, stop_process, wait_for_http


def test_prefect_server_start_in_the_project_root_logs_no_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_SERVER_ANALYTICS")}  # only prefect.toml says it
    env.update(PREFECT_HOME=str(tmp_path / "home"), PREFECT_UI_ENABLED="false",
               PREFECT_LOGGING_LEVEL="INFO")
    env.pop("PREFECT_API_URL", None)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(port), "--no-ui"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_http(f"http://127.0.0.1:{port}/api/health", proc, log, 90)
            time.sleep(3)  # the telemetry error came within 0.3 s of the first healthy answer
        finally:
            stop_process(proc)
    text = log.read_text()
    assert "ERROR" not in text and "Traceback" not in text, text
    assert "prefect config set PREFECT_API_URL" in text  # it did start and say where
