"""Overload against a server of a registered model: N requests of SIDExSIDE sent C at a time.

Usage: python benchmarks/serve_load.py [--model models:/srgan@champion] [--requests 16]
       [--concurrency 8] [--side 512] [--alpha A] [--singles 3] [--big 4000x3000]
       [--server srgan|mlflow] [--slots 1] [--queue 2] [--timeout 60] [--port 8123]
       python benchmarks/serve_load.py --register-random [--blocks 16 --channels 64] ...

Starts the server in its own process (`srgan serve`, or `mlflow models serve` with one worker
for the comparison), times --singles requests sent one at a time, then sends --requests
requests --concurrency at a time (each on its own connection, no retries) and reports how
many succeeded, how many were refused and how fast, the wall time, how many one-at-a-time
serving finishes in that time, and (srgan serve) the server's counters and peak RSS beside
its stated bound. --big WxH then sends one request of that size (with --alpha) and reports
its time and the peak RSS. Without an MLflow store of your own, --register-random logs a
random SRResNet/SRGAN pair of the given size through Tracker.log_generator (the finetune
stage's path: the srgan carries its SRResNet) into a temporary SQLite store and serves it;
speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, no install


def smooth(h: int, w: int) -> np.ndarray:
    """A photo-like test image (smooth bands): PNG-compressible like a photograph."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(np.sin(xx / (19 + 7 * c)) * np.cos(yy / 13) + 1) * 127.5
                     for c in range(3)], -1).astype(np.uint8)


def body(image: np.ndarray, alpha: float | None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    payload: dict[str, Any] = {"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(buffer.getvalue()).decode("ascii")]]}}
    if alpha is not None:
        payload["params"] = {"alpha": alpha}
    return json.dumps(payload).encode()


def post(port: int, data: bytes, timeout: float) -> tuple[int, dict[str, str], bytes, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request("POST", "/invocations", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        out = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, out, time.perf_counter() - start
    except (OSError, http.client.HTTPException) as err:
        return 0, {"error": str(err)}, b"", time.perf_counter() - start
    finally:
        conn.close()


def stats(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
            return json.loads(r.read())
    except OSError:
        return None


def register_random(store: Path, blocks: int, channels: int) -> str:
    """A random SRResNet/SRGAN pair, the srgan registered carrying the SRResNet."""
    import torch

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    os.chdir(store)
    from srcore import tracking
    from srcore.models.srresnet import SRResNet

    torch.manual_seed(0)
    srresnet, srgan = (SRResNet(blocks, channels, 4, global_skip=True).eval()
                       for _ in range(2))
    with tracking.stage_run("serve-load", "finetune") as tracker:
        version = tracker.log_generator(srgan, "srgan", register=True, blend_base=srresnet,
                                        serve_alpha=1.0)
    return f"models:/srgan/{version}"


def start_server(args: argparse.Namespace, log: Any) -> subprocess.Popen[bytes]:
    if args.server == "mlflow":
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(args.port), "-w", "1"]
    else:
        cmd = [sys.executable, "-m", "srcore.cli", "serve", "--model", args.model,
               "--port", str(args.port), "--slots", str(args.slots), "--queue",
               str(args.queue), "--timeout", str(args.timeout)]
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/ping", timeout=2):
                return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.5)
    stop(proc)
    sys.exit(f"the server did not start; see {log.name}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run(args: argparse.Namespace, log: Any) -> None:
    proc = start_server(args, log)
    try:
        data = body(smooth(args.side, args.side), args.alpha)
        singles = [post(args.port, data, args.timeout + 30) for _ in range(args.singles)]
        bad = [s for s in singles if s[0] != 200]
        if bad:
            sys.exit(f"a single request failed: {bad[0][0]} {bad[0][2][:300]!r}")
        one = statistics.median(s[3] for s in singles[1:] or singles)
        print(f"one at a time: {one:.2f} s per {args.side}x{args.side} request "
              f"(median of {len(singles[1:] or singles)} after a warm-up)")
        before = stats(args.port)
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda _: post(args.port, data, args.timeout + 30),
                                    range(args.requests)))
        wall = time.perf_counter() - start
        codes: dict[int, list[float]] = {}
        for status, _, _, seconds in results:
            codes.setdefault(status, []).append(seconds)
        ok = len(codes.get(200, []))
        print(f"{args.requests} requests, {args.concurrency} at a time, in {wall:.1f} s: "
              + ", ".join(f"{len(t)} x {code or 'no answer'} ({min(t):.2f}-{max(t):.2f} s)"
                          for code, t in sorted(codes.items())))
        print(f"succeeded {ok}; one-at-a-time serving finishes {int(wall / one)} in the same "
              f"{wall:.1f} s")
        refused = [r for r in results if r[0] == 503]
        if refused:
            print(f"refusals: Retry-After {sorted({r[1].get('retry-after') for r in refused})}"
                  f" s, answered in at most {max(r[3] for r in refused) * 1000:.0f} ms")
        after = stats(args.port)
        if after and before:
            print("server: " + ", ".join(f"{k} {after[k] - before[k]}" for k in
                  ("completed", "refused", "cancelled", "timed_out", "client_gone", "failed"))
                  + f"; in_flight {after['in_flight']}; peak RSS "
                  f"{after['peak_rss_bytes'] / 2**30:.2f} GiB, stated bound "
                  f"{after['memory_bound_bytes'] / 2**30:.2f} GiB")
        if args.big:
            w, h = (int(v) for v in args.big.lower().split("x"))
            big = body(smooth(h, w), args.alpha)
            status, _, out, seconds = post(args.port, big, args.timeout + 60)
            size = None
            if status == 200:
                png = base64.b64decode(json.loads(out)["predictions"][0]["image"])
                Image.MAX_IMAGE_PIXELS = None  # our own answer: 192 MP for a 4000x3000 input
                with Image.open(io.BytesIO(png)) as im:
                    size = im.size
            now = stats(args.port)
            print(f"one {w}x{h} request (alpha {args.alpha}): {status} in {seconds:.0f} s, "
                  f"output {size}; body {len(big) / 2**20:.1f} MiB, answer "
                  f"{len(out) / 2**20:.0f} MiB"
                  + (f"; server peak RSS {now['peak_rss_bytes'] / 2**30:.2f} GiB of a stated "
                     f"bound {now['memory_bound_bytes'] / 2**30:.2f} GiB" if now else ""))
    finally:
        stop(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/srgan@champion")
    parser.add_argument("--register-random", action="store_true")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--server", choices=("srgan", "mlflow"), default="srgan")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--alpha", type=float, default=None)
    parser.add_argument("--singles", type=int, default=3)
    parser.add_argument("--big", default=None, metavar="WxH")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--queue", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="srgan-serve-load-") as tmp:
        if args.register_random:
            args.model = register_random(Path(tmp), args.blocks, args.channels)
        log_path = Path(tmp) / "server.log"
        print(f"{args.server} serving {args.model}; log {log_path}")
        with log_path.open("w") as log:
            try:
                run(args, log)
            finally:
                log.flush()
                lines = log_path.read_text().splitlines()
                said = [ln for ln in lines if "srgan serve" in ln or "srgan served" in ln]
                print("\n".join(said[:2]))


if __name__ == "__main__":
    main()
