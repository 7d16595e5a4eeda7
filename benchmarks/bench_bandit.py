"""Benchmark: the bandit service over HTTP on loopback (Ray Serve -> named actor).

Starts a local Ray (or joins RAY_ADDRESS), a bandit warm-started on a synthetic problem, and the
HTTP front on a free loopback port; then sends a bounded number of requests with 1, 4 and more
concurrent clients (one persistent HTTP connection each) and reports decisions per second and
p50/p99 latency; GET /healthz (a trivial actor call through the same proxy and replica) gives
the floor that Serve itself costs on this machine. A decision is answered only once the state
file holding it is written (the service's durability contract), so the numbers include that;
calls that arrive together share one write (group commit), and `--pending` fills the ledger of
pending decisions first, as a busy service's is, which makes each write larger. Target: p99 of
/decide under 20 ms with 1 client. Prints a table and writes JSON.

    python -m benchmarks.bench_bandit --requests 400 --out runs/bench_bandit
    python -m benchmarks.bench_bandit --pending 1000 --clients 1,4,32,128
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import secrets
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]

from simmerge_ray.bandit.calls import Call
from simmerge_ray.bandit.core import BanditCore
from simmerge_ray.bandit.encoder import IdentityEncoder
from simmerge_ray.bandit.lints import LinTS, LinTSConfig
from simmerge_ray.bandit.simulate import replay_data
from simmerge_ray.bandit.state import STATE_FILE
from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables
from simmerge_ray.io.atomic import atomic_write_text

TARGET_P99_MS = 20.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TOKEN = secrets.token_urlsafe(32)  # the write token of the benchmark's own service


def _request(conn: http.client.HTTPConnection, path: str, body: dict | None) -> dict:
    """POST `body` to `path` (with the write token), or GET it when there is no body."""
    if body is None:
        conn.request("GET", path)
    else:
        conn.request("POST", path, body=json.dumps(body),
                     headers={"content-type": "application/json", "authorization": f"Bearer {TOKEN}"})
    resp = conn.getresponse()
    payload = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"{path}: HTTP {resp.status}: {payload[:200]!r}")
    return json.loads(payload)


def _run(port: int, clients: int, per_client: int, make_request) -> dict:
    """`clients` threads each send `per_client` requests; latencies in ms, wall in s."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def worker(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        start.wait()
        for i in range(per_client):
            path, body = make_request(k, i)
            t0 = time.perf_counter()
            _request(conn, path, body)
            latencies[k].append((time.perf_counter() - t0) * 1e3)
        conn.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.concatenate([np.array(x) for x in latencies])
    return {
        "clients": clients,
        "requests": int(lat.size),
        "wall_s": wall,
        "per_s": lat.size / wall,
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "max_ms": float(lat.max()),
    }


def _time_core(core: BanditCore, x: np.ndarray, n: int) -> dict:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        core.decide(x[i % len(x)])
        lat.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    return {"clients": 1, "requests": n, "wall_s": wall, "per_s": n / wall,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(max(lat))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="requests per measurement (bounded)")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--features", type=int, default=32, help="raw feature width of the synthetic problem")
    parser.add_argument("--clients", default="1,4,32",
                        help="comma-separated counts of concurrent clients (1 among them: the target's row)")
    parser.add_argument("--pending", type=int, default=0,
                        help="pending decisions made before measuring (the ledger keeps up to 1,000)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "bench_bandit")
    args = parser.parse_args()
    try:
        client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        parser.error(f"--clients: expected comma-separated counts, got {args.clients!r}")
    if 1 not in client_counts or min(client_counts) < 1 or not 0 <= args.pending <= 1000:
        parser.error("--clients: counts of at least 1, one of them 1 (the target's row); --pending: 0 to 1000 "
                     "(the ledger's max_pending)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray
    from ray import serve

    from simmerge_ray.bandit.service import serve_bandit
    from simmerge_ray.ray_session import init_ray

    work = Path(tempfile.mkdtemp(prefix="bench-bandit-"))
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=12, n_features=args.features))
    features.write_parquet(work / "features.parquet")
    data = replay_data(labels, features)
    encoder = IdentityEncoder.fit(data.feature_names, data.x)
    bandit = LinTS(encoder.width, data.operators, LinTSConfig(seed=0))
    bandit.warm_start(encoder.encode(data.x), data.rewards)
    served = BanditCore.create(work / "state", encoder, bandit, feature_table=work / "features.parquet")
    served.run([Call("decide", (data.x[i % len(data.x)], None)) for i in range(args.pending)])
    keys = data.keys
    # The bandit's own cost per decision (math + state file), no HTTP, on a throwaway copy.
    core = BanditCore.create(work / "state-core", encoder, bandit)
    rows = [{"endpoint": "decide (in-process)", **_time_core(core, data.x, args.requests)}]

    init_ray()
    port = _free_port()
    actor = serve_bandit(work / "state", token=TOKEN, port=port, actor_name="simmerge-bandit-bench",
                         app_name="bandit-bench")
    decision_ids: list[str] = []
    try:
        def by_features(k: int, i: int) -> tuple[str, dict]:
            return "/decide", {"features": data.x[(k * 7919 + i) % len(keys)].tolist()}

        def by_names(k: int, i: int) -> tuple[str, dict]:
            task, a, b = keys[(k * 7919 + i) % len(keys)]
            return "/decide", {"a": a, "b": b, "task": task}

        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(args.warmup):
            _request(warm, *by_features(0, i))
        # The stack's floor: proxy -> replica -> actor with a trivial actor call.
        floor = _run(port, 1, args.requests, lambda k, i: ("/healthz", None))
        rows.append({"endpoint": "healthz (floor)", **floor})
        for label, make in (("decide (features)", by_features), ("decide (names)", by_names)):
            for clients in client_counts:
                res = _run(port, clients, max(1, args.requests // clients), make)
                rows.append({"endpoint": label, **res})
        # Feedback: fresh decisions, then their rewards (1 client). A new connection: the server
        # closes one left idle through the timed rows (keep-alive timeout).
        warm.close()
        warm = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(args.requests):
            decision_ids.append(_request(warm, *by_features(1, i))["decision_id"])
        warm.close()

        def feedback(k: int, i: int) -> tuple[str, dict]:
            return "/feedback", {"decision_id": decision_ids[i], "reward": 0.5}

        rows.append({"endpoint": "feedback", **_run(port, 1, args.requests, feedback)})
    finally:
        serve.shutdown()
        ray.kill(actor, no_restart=True)

    one = next(r for r in rows if r["endpoint"] == "decide (features)" and r["clients"] == 1)
    report = {
        "benchmark": "bandit HTTP service on loopback",
        "host": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
                 "ray": ray.__version__},
        "feature_width": args.features,
        "pending_before": args.pending,
        "state_file_bytes": (work / "state" / STATE_FILE).stat().st_size,
        "arms": list(data.operators),
        "rows": rows,
        "target": {"p99_ms_1_client": TARGET_P99_MS, "measured": one["p99_ms"],
                   "met": one["p99_ms"] < TARGET_P99_MS},
    }
    print(f"{'endpoint':<20}{'clients':>8}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for r in rows:
        print(f"{r['endpoint']:<20}{r['clients']:>8}{r['requests']:>10}{r['per_s']:>9.1f}"
              f"{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['max_ms']:>9.2f}")
    verdict = "met" if report["target"]["met"] else "NOT met"
    print(f"target p99 < {TARGET_P99_MS:.0f} ms with 1 client: {verdict} ({one['p99_ms']:.2f} ms); "
          f"load average {report['host']['load_avg_1m']:.1f} on {os.cpu_count()} CPUs")
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "bench_bandit.json", json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_bandit.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
