"""Process plumbing shared by the tests that start Ray processes of their own (the job-submission
head, the two-node and the autoscaling clusters): free ports, killing by process group and PID,
finding what is left, stopping a driver, and the `ray start --head` that jobs are submitted to.
Not a test module."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
RAY = Path(sys.executable).parent / "ray"
EXCLUDES = [".venv", "runs", "out", ".git", ".cache", "**/__pycache__", ".pytest_cache", "*.egg-info"]


@contextlib.contextmanager
def startup_lock():
    """One Ray start at a time among this machine's test processes (the two xdist workers): a
    start picks free ports and Ray's processes bind them moments later, so two starts at once can
    end on one port (seen with both workers' first tests: a raylet reached another cluster's
    server, "Runtime Env Agent network error: ... on_read bad version", and jobs failed)."""
    with open(Path(tempfile.gettempdir()) / "simmerge-tests-ray-start.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _port_window() -> range:
    """Where this test process picks ports: above Ray's default worker ports (10002-19999, which a
    `ray start` refuses to see reused) and below the kernel's ephemeral range, so no socket that
    binds port 0 or connects out (Ray's workers, the other xdist worker's clients) can take a port
    between our pick and Ray's bind, which can be seconds later (CI saw the head's client server
    fail to bind its port 10 s after the pick); and a window per xdist worker, so the two workers
    never pick the same port."""
    low = 32768
    with contextlib.suppress(OSError, ValueError, IndexError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = 20000
    low = max(low, start + 4000)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    slot = int(worker) % 4 if worker.isdigit() else 0
    width = (low - start) // 4
    return range(start + slot * width, start + (slot + 1) * width)


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("", port))  # every interface: Ray binds the node's address, not only loopback
        except OSError:
            return False
    return True


def free_ports(n: int, exclude: tuple[int, ...] = ()) -> list[int]:
    """n distinct ports, free a moment ago, from this process's window (see `_port_window`),
    none of them in `exclude` (ports already promised to a process that has not bound them yet)."""
    window = _port_window()
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    ports: list[int] = []
    while len(ports) < n:
        port = rng.choice(window)
        if port not in ports and port not in exclude and _is_free(port):
            ports.append(port)
    return ports


def kill_group(pgid: int, stragglers: list[psutil.Process]) -> None:
    """SIGKILL a process group, then the given processes (workers that left it), by PID."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in stragglers:
        try:
            p.kill()
        except psutil.Error:
            pass


def digests(folder: Path) -> dict[str, str]:
    """Every file simmerge wrote for a model (not the hidden marker, which names its own run)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if not p.name.startswith(".")}


def processes_naming(work: Path) -> list[psutil.Process]:
    """Live processes whose command line names the run folder (raylets, GCS, agents, driver)."""
    found = []
    for p in psutil.process_iter():
        try:
            if str(work) in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def stop_driver(proc: subprocess.Popen, work: Path) -> None:
    """Interrupt a driver (it then stops its cluster and writes result.json), then kill its
    process group and every group it recorded in `work/pgids`, by id."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    pgids = [proc.pid]
    if (work / "pgids").exists():
        pgids += [int(line) for line in (work / "pgids").read_text().split()]
    for pgid in pgids:
        kill_group(pgid, [])
    proc.wait(timeout=30)


def reap(work: Path, wait_s: float = 20.0) -> list[psutil.Process]:
    """Wait up to `wait_s` for every process naming `work` to end, remove the folder, and return
    those still alive (a test asserts there are none)."""
    deadline = time.monotonic() + wait_s
    while processes_naming(work) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = processes_naming(work)
    shutil.rmtree(work, ignore_errors=True)
    return left


def connect(gcs_port: int, head_alive: Callable[[], None], timeout_s: float) -> None:
    """ray.init to a head started moments ago: its GCS accepts drivers a little after `ray start`
    forks it, so retry until `timeout_s`, checking the head is still alive between tries."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False)
            return
        except (ConnectionError, RuntimeError):
            head_alive()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class RayHead:
    """A `ray start --head` of our own: its own ports and temp dir, stopped through its process group.

    `ray start` runs in a new session, so it and every process it spawns (GCS, raylet, dashboard,
    job drivers, workers) share the process group whose id is its PID; teardown signals that
    group only, never processes found by name.
    """

    def __init__(self) -> None:
        with startup_lock():  # until its ports are bound and the jobs API answers
            self._start()

    def _start(self) -> None:
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: socket path limit
        gcs, self.dashboard_port, client, agent, env_agent, metrics = free_ports(6)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        # `python` in a job's entrypoint is this interpreter, as on a node whose image has it first.
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        cmd = [str(RAY), "start", "--head", f"--port={gcs}", f"--dashboard-port={self.dashboard_port}",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--temp-dir={self.temp_dir}",
               "--num-cpus=2", "--object-store-memory=200000000", f"--ray-client-server-port={client}",
               f"--dashboard-agent-listen-port={agent}", f"--runtime-env-agent-port={env_agent}",
               f"--metrics-export-port={metrics}", "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, env=self.env, start_new_session=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.pgid = proc.pid
        out, _ = proc.communicate(timeout=180)
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out}")
        self._wait_for_jobs_api()

    def _wait_for_jobs_api(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.address}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(1.0)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(RAY), *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def submit(self, submission_id: str, *entrypoint: str) -> None:
        runtime_env = json.dumps({"excludes": EXCLUDES})
        res = self.ray("job", "submit", "--address", self.address, "--submission-id", submission_id,
                       "--no-wait", "--working-dir", str(REPO), "--runtime-env-json", runtime_env,
                       "--", str(VENV_PYTHON), *entrypoint)
        assert res.returncode == 0, res.stdout + res.stderr

    def wait(self, submission_id: str, timeout: float = 300) -> str:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(self.address)
        deadline = time.monotonic() + timeout
        while (status := client.get_job_status(submission_id)) not in {
                JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, f"job {submission_id} still {status} after {timeout} s"
            time.sleep(2.0)
        return str(status.value)

    def logs(self, submission_id: str) -> str:
        res = self.ray("job", "logs", "--address", self.address, submission_id)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and _group_alive(self.pgid):
                time.sleep(0.5)
            if not _group_alive(self.pgid):
                break
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    """True while a live (non-zombie) process of the group exists."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
