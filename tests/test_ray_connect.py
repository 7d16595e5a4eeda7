"""A Ray address where no cluster answers: every Ray command waits a bounded time for it
(SIMMERGE_RAY_CONNECT_TIMEOUT_S, default 60 s) and then fails with one line naming the address,
instead of sitting in Ray's own connection retries for some 14 minutes; a head that is still
starting (its port opens a moment later) and a running one are joined as before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from simmerge_ray.errors import ConfigError
from simmerge_ray.io.synthetic import SyntheticSpec
from simmerge_ray.ray_session import CONNECT_TIMEOUT_ENV, wait_reachable
from merge_families import family_fixtures  # beside this file

REPO = Path(__file__).resolve().parents[1]
SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000, dtype="float32")

family, models = family_fixtures(SPEC, "ray-connect-models", n=2)


def _closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", CONNECT_TIMEOUT_ENV)}
    return {**env, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled", **extra}


@pytest.mark.parametrize("how", ["--address", "RAY_ADDRESS"])
def test_an_address_where_nothing_listens_is_one_line_soon(models: Path, tmp_path: Path, how: str) -> None:
    """`simmerge merge CONFIG --address 127.0.0.1:PORT` (nothing on PORT), and RAY_ADDRESS=nohost:1
    (a name that does not resolve): exit 2 after the bounded wait, one line naming the address and
    the variable that lengthens the wait; no output. The subprocess's own limit is generous."""
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(models / "m1"), "parameters": {"weight": 0.5}},
        {"model": str(models / "m2"), "parameters": {"weight": 0.5}}], "dtype": "float32"}))
    address = f"127.0.0.1:{_closed_port()}" if how == "--address" else "nohost:1"
    argv = [sys.executable, "-m", "simmerge_ray", "merge", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]
    env = _env(**{CONNECT_TIMEOUT_ENV: "3"})
    if how == "--address":
        argv += ["--address", address]
    else:
        env["RAY_ADDRESS"] = address
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    given = f"--address {address}" if how == "--address" else f"RAY_ADDRESS={address}"
    assert len(lines) == 1 and lines[0].startswith(f"simmerge merge: error: {given}: no Ray cluster reachable "
                                                   "there within 3 s"), res.stderr
    assert CONNECT_TIMEOUT_ENV in lines[0] and not (tmp_path / "out").exists()


def test_a_head_still_starting_is_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The port starts listening a moment after the command asks: it is waited for, no error."""
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "30")
    port = _closed_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def listen_later() -> None:
        time.sleep(1.5)
        server.bind(("", port))
        server.listen()

    opener = threading.Thread(target=listen_later)
    opener.start()
    try:
        wait_reachable(f"127.0.0.1:{port}", f"--address 127.0.0.1:{port}")
    finally:
        opener.join()
        server.close()


@pytest.mark.parametrize("value", ["soon", "-1", "inf"])
def test_a_bad_wait_is_one_line(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, value)
    with pytest.raises(ConfigError, match=f"{CONNECT_TIMEOUT_ENV}='{value}': not a number of seconds"):
        wait_reachable(f"127.0.0.1:{_closed_port()}", "--address x")


def test_a_running_cluster_is_joined_by_its_address(tmp_path: Path) -> None:
    """A local Ray of a process of its own; a command's init_ray joins it by HOST:PORT through the
    check and runs a task there."""
    child = ("import sys, ray; from simmerge_ray.ray_session import init_ray; init_ray(sys.argv[1]); "
             "print('joined', ray.get(ray.remote(lambda: 7).remote()))")
    head = ("import subprocess, sys, ray; ray.init(num_cpus=1, include_dashboard=False); "
            "addr = ray.get_runtime_context().gcs_address; "
            f"r = subprocess.run([sys.executable, '-c', {child!r}, addr], capture_output=True, text=True, timeout=120); "
            "print(r.stdout, r.stderr[-2000:]); ray.shutdown(); sys.exit(r.returncode)")
    res = subprocess.run([sys.executable, "-c", head], env=_env(), capture_output=True, text=True, timeout=200,
                         cwd=tmp_path)
    assert res.returncode == 0 and "joined 7" in res.stdout, res.stdout + res.stderr


def test_a_port_that_answers_as_a_web_server_is_one_line_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """RAY_ADDRESS=HEAD:8265 (the dashboard's port, without http://) reached a server that is no
    GCS: Ray retried it for minutes, printing C++ warnings. Its first reply says what it is."""
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "60")
    server = HTTPServer(("", 0), SimpleHTTPRequestHandler)  # Ray reads 127.0.0.1 as this node's IP
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        t = time.perf_counter()
        with pytest.raises(ConfigError) as e:
            wait_reachable(f"127.0.0.1:{port}", f"RAY_ADDRESS=127.0.0.1:{port}")
        assert time.perf_counter() - t < 15
    finally:
        server.shutdown()
        server.server_close()
    assert str(e.value).startswith(f"RAY_ADDRESS=127.0.0.1:{port}: "), e.value
    assert f":{port} answers, but not as a Ray cluster's GCS (it replied '" in str(e.value), e.value
    assert str(e.value).endswith("the dashboard and `ray job submit` use port 8265); give the head's GCS HOST:PORT "
                                 "(6379 by default)")


def test_the_sessions_gcs_passes_the_check(ray_cluster) -> None:
    """A real GCS answers the probe as a gRPC server does: it is joined, not refused."""
    import ray

    t = time.perf_counter()
    wait_reachable(ray.get_runtime_context().gcs_address, "--address x")
    assert time.perf_counter() - t < 5


def test_a_ray_client_address_where_nothing_listens_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray://HOST:PORT is waited for as HOST:PORT is (it was left to Ray Client: a traceback after
    30 s), and the line names the Ray Client port rather than the GCS's."""
    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "0")
    port = _closed_port()
    with pytest.raises(ConfigError) as e:
        wait_reachable(f"ray://127.0.0.1:{port}", f"RAY_ADDRESS=ray://127.0.0.1:{port}")
    assert str(e.value) == (f"RAY_ADDRESS=ray://127.0.0.1:{port}: no Ray cluster reachable there within 0 s "
                            "(connection refused: nothing listens on that port); give ray://HOST:PORT of the head's "
                            f"Ray Client server (10001 by default), start the cluster, or wait longer with "
                            f"{CONNECT_TIMEOUT_ENV}=SECONDS")


@pytest.mark.slow
def test_a_ray_client_port_that_never_answers_is_one_line(models: Path, tmp_path: Path) -> None:
    """A port that takes the connection and says nothing (no Ray Client server behind it): Ray
    Client gives up after its own retries (about 40 s) with a ConnectionError, which was a
    traceback; now one line, and Ray's warning saying the same is not printed."""
    cfg = tmp_path / "linear.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(models / "m1"), "parameters": {"weight": 0.5}},
        {"model": str(models / "m2"), "parameters": {"weight": 0.5}}], "dtype": "float32"}))
    with socket.socket() as silent:
        silent.bind(("", 0))
        silent.listen()
        address = f"ray://127.0.0.1:{silent.getsockname()[1]}"
        res = subprocess.run([sys.executable, "-m", "simmerge_ray", "merge", str(cfg), "--out", str(tmp_path / "out"),
                              "--quiet", "--address", address], env=_env(), capture_output=True, text=True,
                             timeout=180, cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        f"simmerge merge: error: --address {address}: Ray Client could not connect (ray client connection timeout); "
        "give ray://HOST:PORT of the head's Ray Client server (10001 by default)"], res.stderr
    assert not (tmp_path / "out").exists()


def test_a_ray_client_address_behind_a_proxy_or_a_tls_front_is_left_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """grpc reaches ray:// through https_proxy (this machine's own connection cannot), and a TLS
    front (RAY_USE_TLS, an ingress) may answer plain bytes in HTTP/1: neither is refused here."""
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    monkeypatch.setenv(CONNECT_TIMEOUT_ENV, "0")
    closed = f"ray://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("https_proxy", "http://proxy.invalid:3128")
    wait_reachable(closed, f"RAY_ADDRESS={closed}")  # no error: left to Ray Client and its proxy
    monkeypatch.delenv("https_proxy")
    with pytest.raises(ConfigError):
        wait_reachable(closed, f"RAY_ADDRESS={closed}")
    server = HTTPServer(("", 0), SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    web = f"ray://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(ConfigError, match="answers, but not as a Ray cluster's Ray Client server"):
            wait_reachable(web, f"RAY_ADDRESS={web}")
        monkeypatch.setenv("RAY_USE_TLS", "1")
        wait_reachable(web, f"RAY_ADDRESS={web}")  # it accepts connections: that is all a TLS front shows here
    finally:
        server.shutdown()
        server.server_close()
