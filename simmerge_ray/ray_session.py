"""Ray start-up shared by the commands, the pipeline and the benchmarks: it works by hand and
under `ray job submit`, and keeps Ray's own logs quiet unless verbose (`--verbose`)."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from simmerge_ray.mkl_vendor import worker_runtime_env

_verbose = False
# Set for Ray's processes unless --verbose (and unless the user set them): the C++ log level, and
# Tune's classic reporter (silent with verbose=0, where the new one still prints status boxes).
_QUIET_ENV = {"RAY_BACKEND_LOG_LEVEL": "fatal", "RAY_AIR_NEW_OUTPUT": "0"}
_set_here: set[str] = set()
# How long a command waits for the Ray cluster named by --address / RAY_ADDRESS (HOST:PORT) to
# accept a connection: a head still starting gets that long; nothing listening there is one line
# then, not Ray's own retries (about 40 s each, 20 of them: some 14 minutes).
CONNECT_TIMEOUT_ENV = "SIMMERGE_RAY_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 60.0
CLIENT_SCHEME = "ray://"  # Ray Client: the driver runs here, its work on the cluster through a proxy
_HOST_PORT = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:/\[\]]+)):(?P<port>[0-9]{1,5})")


def set_verbose(verbose: bool) -> None:
    """`--verbose`: keep Ray's INFO logs, its C++ error lines and Ray Data/Tune progress reports."""
    global _verbose
    _verbose = verbose


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join the cluster the job was submitted to (RAY_ADDRESS), or start a local Ray.

    Idempotent: a second call in the same process is a no-op. Unless `--verbose`, the console
    gets Ray's Python warnings and errors only: no INFO lines, no Tune status tables, and no C++
    log lines (such as Ray Data's harmless "constructor arguments in the object store and
    max_restarts > 0"); RAY_BACKEND_LOG_LEVEL=fatal also keeps the C++ logs of a local Ray's
    own processes out of its session log files. A variable the user set wins. A HOST:PORT
    address (or `auto`) that accepts no connection within SIMMERGE_RAY_CONNECT_TIMEOUT_S seconds
    (default 60: a head still starting gets that long) is one ConfigError line naming it, not
    Ray's own retries, which wait some 14 minutes (wait_reachable). Where this process's MKL
    dispatches by instruction set (mkl_vendor's library, or an Intel CPU), the workers of a
    cluster it joins load that library as they start (mkl_vendor.worker_runtime_env).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = logging.INFO
    for var, quiet in _QUIET_ENV.items():
        if not _verbose and var not in os.environ:
            os.environ[var] = quiet
            _set_here.add(var)
        elif _verbose and var in _set_here:  # a later verbose start in the same process
            os.environ.pop(var)
            _set_here.discard(var)
    if not _verbose:
        level = logging.WARNING
    given = f"--address {address}" if address else f"RAY_ADDRESS={os.environ.get('RAY_ADDRESS')}"
    address = address or os.environ.get("RAY_ADDRESS")
    on_sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if address:
        wait_reachable(address, given)
    with _without_cpp_info_lines(enabled=not _verbose), _sigterm_while_starting(on_sigterm):
        if address:
            try:
                with warnings.catch_warnings():  # its timeout, said again below in one line
                    warnings.filterwarnings("ignore", "Ray Client connection timed out", UserWarning)
                    ray.init(address=address, log_to_driver=True, logging_level=level,
                             runtime_env=worker_runtime_env())
            except ValueError as e:  # "Invalid address format: x", "Unable to parse port number ...": a traceback
                if not re.search(r"address|port", str(e)):
                    raise
                from simmerge_ray.errors import ConfigError

                why = " ".join(str(e).split())  # Ray's advice on an http:// address spans lines
                raise ConfigError(f"{given}: not a Ray address ({why}); give the head's HOST:PORT, ray://HOST:PORT "
                                  f"or auto") from None
            except ConnectionError as e:  # Ray Client: a port that took the connection but no session came
                if not address.startswith(CLIENT_SCHEME) or str(e) != "ray client connection timeout":
                    raise  # a server's own failure (auth, its init) says what it is
                from simmerge_ray.errors import ConfigError

                raise ConfigError(f"{given}: Ray Client could not connect ({' '.join(str(e).split())}); give "
                                  f"{CLIENT_SCHEME}HOST:PORT of the head's Ray Client server "
                                  f"(10001 by default)") from None
            if not _verbose:
                _drop_streamed_cpp_info_lines()
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=_verbose, logging_level=level)
    if not _verbose:
        for name in ("ray.tune", "ray.train", "ray.serve"):
            logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def _sigterm_while_starting(on_sigterm: object) -> Iterator[None]:
    """ray.init replaces the SIGTERM handler as it starts (its own exits with the signal's number,
    its node's with 1 after killing what it started) and its core worker's C++ failure handler
    takes SIGTERM over (a stack dump, exit 15): the command's own handler (`on_sigterm`, where it
    is callable) is put back once init ends, however it ends. A command killed during init ended
    with exit 15 or 1, no word, and Ray's processes left running: that exit unwinds instead, after
    shutting down what Ray started. (Ray 2.60's init exits with no other code.)"""
    unwinds = callable(on_sigterm)
    try:
        yield
    except SystemExit as e:
        if not unwinds or e.code not in (signal.SIGTERM, 1):
            raise
        signal.signal(signal.SIGTERM, on_sigterm)  # a second SIGTERM unwinds too
        shutdown_started_ray(130)  # init did not finish, but the node it started is shut down
        raise KeyboardInterrupt from None
    finally:
        if unwinds:
            signal.signal(signal.SIGTERM, on_sigterm)


SHUTDOWN_TIMEOUT_S = 30.0  # a local Ray stops in 1-3 s; under load, seen once hanging past 120 s


def shutdown_started_ray(exit_code: int) -> None:
    """ray.shutdown(), bounded, for a command that started or joined Ray itself (a no-op where
    nothing was started). Ray's C++ `shutdown_driver` was seen once hanging past 120 s after a
    SIGTERM under load: a command stopped with Ctrl-C or `kill`, its temporary outputs already
    gone, then sat there for minutes. Past SHUTDOWN_TIMEOUT_S the watchdog kills the processes
    this one started (a local Ray's node; none when joined to a cluster), says so in one line and
    exits with `exit_code`."""
    import ray

    run_bounded(ray.shutdown, SHUTDOWN_TIMEOUT_S, exit_code, "Ray did not shut down")


def run_bounded(fn: Callable[[], object], timeout_s: float, exit_code: int, what: str) -> None:
    """Call `fn()`; if it has not returned after `timeout_s`, kill this process's children, write
    `simmerge: WHAT within N s; stopped its processes` to stderr and exit with `exit_code`. That
    exit does not unwind (whatever could hang is what is being waited for): a `with` block the
    call sits in, such as a temporary output folder, is not cleaned up, and the next run of the
    command removes what it left."""
    import psutil

    done = threading.Event()

    def watchdog() -> None:
        if done.wait(timeout_s):
            return
        for child in psutil.Process().children(recursive=True):
            if done.is_set():  # returned meanwhile: its caller goes on
                return
            try:
                child.kill()
            except psutil.Error:
                pass
        if done.is_set():
            return
        sys.stdout.flush()
        print(f"simmerge: {what} within {timeout_s:g} s; stopped its processes", file=sys.stderr, flush=True)
        os._exit(exit_code)

    threading.Thread(target=watchdog, name="shutdown-watchdog", daemon=True).start()
    try:
        fn()
    finally:
        done.set()


def _connect_timeout() -> float:
    from simmerge_ray.errors import ConfigError

    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={text!r}: not a number of seconds (e.g. 60; 0 tries once)")
    return value


def _as_ray_reads_it(address: str) -> str:
    """The HOST:PORT ray.init connects to for `address`: `auto` read from this machine's record of
    its cluster, localhost as this node's IP (what the head's GCS listens on), a Ray Client
    address's own (ray://HOST:PORT); "" for what Ray itself refuses or resolves to no cluster (its
    error says so)."""
    if address.startswith(CLIENT_SCHEME):
        return address[len(CLIENT_SCHEME):]
    if "://" in address:
        return ""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address) or ""
    except Exception:  # a private helper: should it move or refuse the address, Ray's init reports it
        return address


def wait_reachable(address: str, given: str) -> None:
    """Wait until a Ray address (HOST:PORT, `auto`, or Ray Client's ray://HOST:PORT) accepts a TCP
    connection, retrying (the head, or its DNS name, may still be coming up) for
    SIMMERGE_RAY_CONNECT_TIMEOUT_S seconds (default 60); then a ConfigError of one line naming
    `given` (the flag or variable and the address). A port that answers as no gRPC server does
    (the dashboard's HTTP) is that one line at once: Ray would retry it for minutes (Ray Client
    gives up after 30 s with a traceback)."""
    from simmerge_ray.errors import ConfigError

    address = address.strip()
    target = _as_ray_reads_it(address)
    m = _HOST_PORT.fullmatch(target)
    if m is None or not 0 < int(m.group("port")) < 65536:
        return
    client = address.startswith(CLIENT_SCHEME)
    if client and any(os.environ.get(v) for v in _GRPC_PROXY_ENV):
        return  # grpc reaches it through the proxy, which this machine's own connection cannot
    where = "there" if client or _HOST_PORT.fullmatch(address) else f"at {target}"  # `auto`: the address it found
    server = "Ray Client server" if client else "GCS"
    want = (f"{CLIENT_SCHEME}HOST:PORT of the head's Ray Client server (10001 by default)" if client
            else "the head's GCS HOST:PORT (6379 by default)")
    host, port = m.group("v6") or m.group("host"), int(m.group("port"))
    limit = _connect_timeout()
    deadline = time.monotonic() + limit
    while True:
        try:
            wait = max(0.5, min(5.0, deadline - time.monotonic()))
            with socket.create_connection((host, port), timeout=wait) as sock:
                reply = None if _tls_on() else _not_grpc_reply(sock)  # TLS ingresses answer plain text in HTTP/1
            if reply is None:
                return
            raise ConfigError(f"{given}: {host}:{port} answers, but not as a Ray cluster's {server} (it replied "
                              f"{reply!r}; the dashboard and `ray job submit` use port 8265); give {want}")
        except socket.gaierror:
            why = f"cannot resolve {host!r}"
        except ConnectionRefusedError:
            why = "connection refused: nothing listens on that port"
        except OSError as e:
            why = f"cannot connect: {e.strerror or e}"
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConfigError(f"{given}: no Ray cluster reachable {where} within {limit:g} s ({why}); give "
                              f"{want}, start the cluster, or wait longer with {CONNECT_TIMEOUT_ENV}=SECONDS")
        time.sleep(min(1.0, left))


_GRPC_PROXY_ENV = ("grpc_proxy", "https_proxy", "http_proxy", "GRPC_PROXY", "HTTPS_PROXY", "HTTP_PROXY")


def _tls_on() -> bool:
    """Ray's RAY_USE_TLS: the port may be a TLS front (an ingress) whose reply to plain bytes is
    not a gRPC frame though the cluster is behind it."""
    return os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true", "yes")


# What an HTTP/2 client sends first (RFC 9113 3.4), then an empty SETTINGS frame. A gRPC server
# (Ray's GCS) answers with a SETTINGS frame of its own: a 9-byte header whose type byte is 4.
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def _not_grpc_reply(sock: socket.socket, timeout_s: float = 3.0) -> str | None:
    """The start of the reply of a server that is clearly no gRPC server (an HTTP/1 or other
    text protocol: Ray would retry it for minutes), else None. Silence, a closed connection or a
    TLS record (a cluster with TLS on) are not judged: Ray's own connection says what they are."""
    try:
        sock.settimeout(timeout_s)
        sock.sendall(_H2_PREFACE)
        data = sock.recv(64)
    except OSError:
        return None
    if len(data) < 4 or data[0] in (0x15, 0x16) or data[3] == 4:  # too short to judge, TLS, a SETTINGS frame
        return None
    return data[:40].decode("latin-1").split("\n")[0].strip() or repr(data[:16])


# A C++ log line at INFO: "[2026-11-30 08:44:05,770 I 15261 15261] logging.cc:303: ..."
_CPP_INFO = re.compile(rb"^\[[^\]]* I \d+ \d+\] ")


def _drop_streamed_cpp_info_lines() -> None:
    """On a cluster, leave the C++ INFO lines out of the worker logs Ray streams to this driver
    (each worker announces RAY_BACKEND_LOG_LEVEL at INFO as it applies it); every other line,
    warnings and errors included, is printed as before."""
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher

    with dispatcher._lock:
        printers = [(n, h) for n, h in dispatcher.handlers if n == "ray_print_logs"]
    for name, printer in printers:
        def kept(data: dict, printer=printer) -> None:
            lines = [ln for ln in data.get("lines", []) if not _CPP_INFO.match(ln.encode(errors="replace"))]
            if lines:
                printer({**data, "lines": lines})

        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, kept)


@contextmanager
def _without_cpp_info_lines(enabled: bool) -> Iterator[None]:
    """While Ray starts, hold this process's stderr (file descriptor 2) and pass on every line
    but the C++ INFO ones: the core worker announces at INFO the very log level
    RAY_BACKEND_LOG_LEVEL sets, before applying it. Processes Ray starts meanwhile inherit the
    held file as their stderr; their logs go to the session folder anyway."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [ln for ln in held.read().splitlines(keepends=True) if not _CPP_INFO.match(ln)]
            if kept:
                os.write(2, b"".join(kept))


def quiet_ray_data() -> None:
    """Ray Data's console logs: its warnings only, unless `--verbose`; the rest stays in the
    session's ray-data.log. Below warnings: execution plans, progress reports every 10 s. Above:
    the two ERROR lines it prints when a task fails, before the command raises that failure
    itself (one line for an error of ours, such as an actor's refused model). Call after `init_ray`."""
    if _verbose:
        return
    import ray.data  # noqa: F401  (importing it installs the "ray.data" handlers adjusted below)

    for handler in logging.getLogger("ray.data").handlers:
        if getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
            handler.setLevel(logging.WARNING)
            if _warnings_only not in handler.filters:
                handler.addFilter(_warnings_only)


def _warnings_only(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR
