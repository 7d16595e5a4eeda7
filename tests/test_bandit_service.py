"""The bandit service for real: named Ray actor + Ray Serve on loopback, spoken to over HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from cluster_processes import free_ports  # beside this file (the tests folder is on sys.path)

from simmerge_ray.bandit.core import BanditCore
from simmerge_ray.bandit.encoder import IdentityEncoder
from simmerge_ray.bandit.limits import MAX_BODY_BYTES
from simmerge_ray.bandit.lints import LinTS, LinTSConfig
from simmerge_ray.bandit.simulate import replay_data
from simmerge_ray.bandit.state import STATE_FILE, read_state
from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables

ACTOR = "simmerge-bandit-test"
NAMESPACE = "simmerge-test"
TOKEN = "test-token-0123456789abcdef"


class Client:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def call(self, method: str, path: str, body: Any = None, raw: bytes | None = None,
             token: str | None = TOKEN, content_type: str = "application/json") -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = {"content-type": content_type}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stats(self) -> dict[str, Any]:
        status, body = self.call("GET", "/stats")
        assert status == 200
        return body


@pytest.fixture(scope="module")
def service(ray_cluster, tmp_path_factory):
    from simmerge_ray.bandit.service import serve_bandit, stop_serving

    root = tmp_path_factory.mktemp("bandit-svc")
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=4, tasks=("code", "math"), n_features=4))
    features.write_parquet(root / "features.parquet")
    data = replay_data(labels, features)
    offline = data.x.copy()
    offline[0, 0] = np.nan  # the first feature is undefined for one offline pair: it may be null
    encoder = IdentityEncoder.fit(data.feature_names, offline)
    bandit = LinTS(encoder.width, data.operators, LinTSConfig(seed=0))
    bandit.warm_start(encoder.encode(offline), data.rewards)
    state = root / "state"
    BanditCore.create(state, encoder, bandit, feature_table=root / "features.parquet")
    (port,) = free_ports(1)
    actor = serve_bandit(state, token=TOKEN, port=port, actor_name=ACTOR, namespace=NAMESPACE,
                         app_name="bandit-test")
    yield {"client": Client(port), "actor": actor, "state": state, "root": root, "x": data.x, "offline": offline,
           "names": data.feature_names,
           "operators": list(data.operators), "port": port}
    stop_serving(actor)  # as `simmerge serve` stops: Serve, then the actor (the session's Ray stays)


def test_decide_feedback_round_trip(service):
    client, x = service["client"], service["x"]
    before = client.stats()
    status, d = client.call("POST", "/decide", {"features": x[0].tolist()})
    assert status == 200
    assert set(d["scores"]) == set(service["operators"])
    assert d["operator"] == max(d["scores"], key=d["scores"].get)
    status, fb = client.call("POST", "/feedback", {"decision_id": d["decision_id"], "reward": 0.625})
    assert (status, fb["status"], fb["operator"]) == (200, "counted", d["operator"])
    after = client.stats()
    assert after["decisions"] == before["decisions"] + 1
    assert after["feedback"] == before["feedback"] + 1
    plays = {a["name"]: a["plays"] for a in after["arms"]}
    assert plays[d["operator"]] == {a["name"]: a["plays"] for a in before["arms"]}[d["operator"]] + 1
    # By names (resolved through the feature table), restricted to one operator.
    status, named = client.call("POST", "/decide", {"a": "m1", "b": "m3", "task": "math", "arms": ["ties"]})
    assert status == 200 and named["pair"] == {"a": "m1", "b": "m3", "task": "math"}
    assert named["operator"] == "ties"
    assert client.call("GET", "/healthz") == (200, {"status": "ok", "arms": service["operators"],
                                                    "decisions": after["decisions"] + 1})
    # A null feature is one undefined for this pair (as in the feature table), imputed with the
    # offline mean: the posterior means are those of a request that sends the mean itself.
    status, gap = client.call("POST", "/decide", {"features": [None, *x[0].tolist()[1:]]})
    _, at_mean = client.call("POST", "/decide", {"features": [float(np.nanmean(service["offline"][:, 0])),
                                                              *x[0].tolist()[1:]]})
    assert status == 200 and gap["expected"] == pytest.approx(at_mean["expected"], rel=1e-12)
    assert gap["imputed"] == [service["names"][0]] and at_mean["imputed"] == []  # said, never silent
    # A feature defined for every offline pair (and not measured on the joining model's task) is
    # never missing for a real pair: its null is the client's mistake, named.
    status, err = client.call("POST", "/decide", {"features": [x[0, 0], None, *x[0].tolist()[2:]]})
    assert status == 422 and f"features: {service['names'][1]!r} is missing (null)" in err["detail"]


def test_feedback_is_idempotent(service):
    client, x = service["client"], service["x"]
    _, d = client.call("POST", "/decide", {"features": x[1].tolist()})
    before = client.stats()
    replies = [client.call("POST", "/feedback", {"decision_id": d["decision_id"], "reward": r})
               for r in (0.5, 0.5, 0.9)]
    assert [(s, b["status"], b["reward"]) for s, b in replies] == [
        (200, "counted", 0.5), (200, "duplicate", 0.5), (200, "duplicate", 0.5)]
    after = client.stats()
    assert after["feedback"] == before["feedback"] + 1
    assert after["duplicates"] == before["duplicates"] + 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "needle"),
    [
        ("POST", "/decide", b'{"features": [1, 2', 422, "JSON decode error"),
        # more digits than Python converts: was a bare "There was an error parsing the body"
        ("POST", "/feedback", b'{"decision_id": "x", "reward": ' + b"1" * 5000 + b"}", 400,
         "body: a number has more than 4300 digits"),
        ("POST", "/feedback", b'{"decision_id": "x", "reward": 1e999}', 422, "finite number"),
        ("POST", "/decide", {"features": [1.0, 2.0]}, 422, "expected width 4"),
        ("POST", "/decide", b'{"features": [NaN, 0, 0, 0]}', 422, "finite number"),
        ("POST", "/decide", {"features": [None, None, None, None]}, 422, "every value is missing"),
        ("POST", "/decide", {"a": "m1", "b": "m2"}, 422, "all of 'a', 'b' and 'task'"),
        ("POST", "/decide", {"features": [0, 0, 0, 0], "task": "code"}, 422, "not both"),
        ("POST", "/decide", {"a": "gpt5", "b": "m2", "task": "code"}, 404, "unknown model 'gpt5'"),
        ("POST", "/decide", {"a": "m1", "b": "m2", "task": "law"}, 404, "unknown task 'law'"),
        ("POST", "/decide", {"features": [0, 0, 0, 0], "arms": ["magic"]}, 404, "unknown arm 'magic'"),
        ("POST", "/feedback", b'{"decision_id": "x", "reward": NaN}', 422, "finite number"),
        ("POST", "/feedback", {"decision_id": "nope", "reward": 0.1}, 404, "unknown decision id 'nope'"),
        ("POST", "/feedback", {"decision_id": "nope", "reward": 0.1, "extra": 1}, 422, "Extra inputs"),
        ("POST", "/feedback", b"[1, 2]", 422, "valid dictionary"),
        ("POST", "/feedback", {"decision_id": "x", "reward": True}, 422, "valid number"),  # not read as 1.0
        ("POST", "/feedback", {"decision_id": "x", "reward": "7.5"}, 422, "valid number"),
        ("POST", "/decide", {"features": [True, 0, 0, 0]}, 422, "valid number"),
        ("POST", "/arms", {"name": "x", "prior_var": True}, 422, "valid number"),
        ("POST", "/arms", {"name": "linear"}, 409, "'linear' already exists"),
        ("POST", "/arms", {"name": "bad name!"}, 422, "pattern"),
        ("POST", "/arms", {"name": "x", "prior": "optimistic"}, 422, "'pooled' or 'zero'"),
        # were a 400 "There was an error parsing the body", or "no arms to choose from"
        ("POST", "/feedback", b'{"decision_id": "\xff", "reward": 0.1}', 422, "body: not UTF-8 text"),
        ("POST", "/decide", b"[" * 100_000 + b"]" * 100_000, 422, "body: JSON nested deeper than Python parses"),
        ("POST", "/decide", {"features": [0, 0, 0, 0], "arms": []}, 422, "arms: List should have at least 1 item"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_message(service, method, path, body, status, needle):
    raw = body if isinstance(body, bytes) else None
    got, reply = service["client"].call(method, path, None if raw else body, raw=raw)
    assert got == status
    assert needle in json.dumps(reply["detail"])


def test_a_json_body_sent_as_text_says_so(service):
    """FastAPI reads only a body declared JSON as JSON: valid JSON sent as text/plain was answered
    "body: Input should be a valid dictionary", naming nothing of the cause."""
    status, reply = service["client"].call("POST", "/feedback", {"decision_id": "x", "reward": 0.1},
                                            content_type="text/plain")
    assert (status, reply["detail"]) == (422, "body: not sent as JSON (Content-Type text/plain; send application/json)")


def test_add_arm_then_it_is_sampled(service):
    client, x = service["client"], service["x"]
    status, reply = client.call("POST", "/arms", {"name": "task_arithmetic", "prior": "pooled"})
    assert status == 200 and reply["arms"][-1] == "task_arithmetic"
    _, d = client.call("POST", "/decide", {"features": x[2].tolist()})
    assert "task_arithmetic" in d["scores"]
    assert client.stats()["arms"][-1] == {"name": "task_arithmetic", "plays": 0, "mean_reward": None,
                                          "data_weight": 0.0, "prior_var": 1.0}


def test_state_survives_an_actor_kill_and_resumes_exactly(service, ray_cluster):
    client, x = service["client"], service["x"]
    _, d = client.call("POST", "/decide", {"features": x[3].tolist()})
    before = client.stats()
    pid_before = _actor_pid(service["actor"])
    ray_cluster.kill(service["actor"], no_restart=False)
    # Feedback for a decision made before the kill counts after the restart.
    status, fb = client.call("POST", "/feedback", {"decision_id": d["decision_id"], "reward": 0.8})
    assert (status, fb["status"]) == (200, "counted")
    after = client.stats()
    assert after["decisions"] == before["decisions"]
    assert after["feedback"] == before["feedback"] + 1
    assert after["pending"] == before["pending"] - 1
    assert _actor_pid(service["actor"]) != pid_before  # it really was a new process
    # The restarted actor continues exactly: the next draw equals one made from a copy of the
    # state on disk (posteriors and generator state included).
    copy = service["root"] / "state-copy"
    shutil.copytree(service["state"], copy)
    expected = BanditCore(copy).decide(x[4])
    _, got = client.call("POST", "/decide", {"features": x[4].tolist()})
    assert got["scores"] == expected["scores"] and got["operator"] == expected["operator"]


def _actor_pid(actor) -> int:
    import os

    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


def test_concurrent_clients(service):
    client, x = service["client"], service["x"]
    before = client.stats()

    def worker(k: int) -> list[str]:
        ids = []
        for i in range(6):
            status, d = client.call("POST", "/decide", {"features": x[(k * 6 + i) % len(x)].tolist()})
            assert status == 200
            status, fb = client.call("POST", "/feedback", {"decision_id": d["decision_id"], "reward": 0.1 * i})
            assert (status, fb["status"]) == (200, "counted")
            ids.append(d["decision_id"])
        return ids

    with ThreadPoolExecutor(4) as pool:
        ids = [i for chunk in pool.map(worker, range(4)) for i in chunk]
    assert len(set(ids)) == 24
    after = client.stats()
    assert after["decisions"] - before["decisions"] == 24
    assert after["feedback"] - before["feedback"] == 24
    assert sum(a["plays"] for a in after["arms"]) - sum(a["plays"] for a in before["arms"]) == 24
    assert np.isclose(
        sum(a["mean_reward"] * a["plays"] for a in after["arms"] if a["plays"])
        - sum(a["mean_reward"] * a["plays"] for a in before["arms"] if a["plays"]),
        4 * sum(0.1 * i for i in range(6)),
    )


def test_calls_in_flight_together_are_each_answered_and_saved(service):
    """Many calls sent to the actor at once (answered in batches, one save each): every decision
    gets its own sequence number, every reward counts once, a refused call fails alone, and what
    the callers were told is what a process loading the folder reads."""
    import ray

    actor, x = service["actor"], service["x"]
    before = ray.get(actor.stats.remote())
    decided = ray.get([actor.decide.remote(x[i % len(x)].tolist(), None, True) for i in range(48)])
    assert sorted(d["seq"] for d in decided) == list(range(before["decisions"], before["decisions"] + 48))
    rewards = [actor.feedback.remote(d["decision_id"], 0.25) for d in decided]
    unknown = actor.feedback.remote("no-such-id", 0.5)
    assert [r["status"] for r in ray.get(rewards)] == ["counted"] * 48
    # An async actor runs a caller's calls in the order they reach its loop, not always the order
    # they were sent (Ray): a repeat is sent once the first answers are in.
    assert ray.get(actor.feedback.remote(decided[0]["decision_id"], 0.9))["status"] == "duplicate"
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown decision id 'no-such-id'"):
        ray.get(unknown)
    saved = BanditCore(service["state"]).stats()
    assert saved == ray.get(actor.stats.remote())
    assert (saved["decisions"] - before["decisions"], saved["feedback"] - before["feedback"],
            saved["duplicates"] - before["duplicates"]) == (48, 48, 1)


def test_actor_refuses_a_bad_folder_and_a_name_clash(service, tmp_path):
    from simmerge_ray.bandit.actor import start_bandit_actor
    from simmerge_ray.errors import CheckpointError, ConfigError

    with pytest.raises(CheckpointError, match="no bandit state here") as bad:
        start_bandit_actor(tmp_path, name="simmerge-bandit-empty", namespace=NAMESPACE)
    assert str(tmp_path) in str(bad.value) and "\n" not in str(bad.value), "one line naming the folder, no Ray traceback"
    import ray

    deadline = time.monotonic() + 30  # the actor that could serve nothing is gone, not left running
    while time.monotonic() < deadline:
        try:
            ray.get_actor("simmerge-bandit-empty", namespace=NAMESPACE)
        except ValueError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the bandit actor over an empty folder is still registered")
    with pytest.raises(ConfigError, match="already serves"):
        start_bandit_actor(service["root"] / "elsewhere", name=ACTOR, namespace=NAMESPACE)


def test_actor_over_a_bad_folder_serves_once_it_is_repaired(service, tmp_path):
    """Plain class, no Ray: the constructor never raises; each call loads the folder again, so a
    restarted actor whose folder was unreadable serves again once it is repaired."""
    from simmerge_ray.bandit.actor import BanditActor
    from simmerge_ray.errors import CheckpointError

    folder = tmp_path / "state"
    actor = BanditActor(str(folder))
    with pytest.raises(CheckpointError, match="no bandit state here"):
        asyncio.run(actor.stats())
    shutil.copytree(service["state"], folder)
    assert asyncio.run(actor.describe())["state_dir"] == str(folder)


# ----- hostile input (issue 21): bounds, body size, token; the saved state untouched and finite
def _saved(service) -> bytes:
    return (service["state"] / STATE_FILE).read_bytes()


def _assert_state_finite(service) -> None:
    _, arrays = read_state(service["state"])  # refuses a non-finite state itself; check anyway
    assert all(np.all(np.isfinite(a)) for a in arrays.values() if a.dtype.kind == "f")


def _one_line(reply: dict, start: str) -> None:
    detail = reply["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail.startswith(start), detail


@pytest.mark.parametrize(("path", "body", "message"), [
    ("/feedback", {"reward": 1e308}, "reward: Input should be less than or equal to 10"),
    ("/feedback", {"reward": -1e308}, "reward: Input should be greater than or equal to -10"),
    ("/feedback", {"reward": 10.5}, "reward: Input should be less than or equal to 10"),
    ("/decide", {"features": [1e308, 1e308, 1e308, 1e308]}, "features[0]: Input should be less than or equal to"),
    ("/decide", {"features": [0.0, 0.0, 0.0, -2e6]}, "features[3]: Input should be greater than or equal to"),
    ("/arms", {"name": "fragile", "prior_var": 1e-320}, "prior_var: Input should be greater than or equal to"),
])
def test_values_outside_the_declared_bounds_are_refused(service, path, body, message):
    client, x = service["client"], service["x"]
    status, d = client.call("POST", "/decide", {"features": x[5].tolist()})
    assert status == 200
    if path == "/feedback":
        body = {"decision_id": d["decision_id"], **body}
    before, stats = _saved(service), client.stats()
    status, reply = client.call("POST", path, body)
    assert status == 422
    _one_line(reply, message)
    assert _saved(service) == before and client.stats() == stats
    _assert_state_finite(service)
    # The bandit still learns and answers with numbers (the 1e308 reward once made it all NaN).
    status, fb = client.call("POST", "/feedback", {"decision_id": d["decision_id"], "reward": 0.3})
    assert (status, fb["status"]) == (200, "counted")
    _, nxt = client.call("POST", "/decide", {"features": x[6].tolist()})
    assert all(np.isfinite(v) for v in [*nxt["scores"].values(), *nxt["expected"].values()])
    _assert_state_finite(service)


def _post_raw(port: int, path: str, body: bytes | list[bytes]) -> tuple[int, dict]:
    """POST a body of bytes (with Content-Length) or of chunks (chunked, no length)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
    try:
        conn.request("POST", path, body=iter(body) if isinstance(body, list) else body, headers=headers,
                     encode_chunked=isinstance(body, list))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered before reading all of it: the answer is still there to read
    resp = conn.getresponse()
    try:
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_a_body_over_the_limit_is_refused_with_413(service):
    client, x = service["client"], service["x"]
    status, d = client.call("POST", "/decide", {"features": x[7].tolist()})
    before, stats = _saved(service), client.stats()
    # The 54 MB feedback, with its Content-Length; then 2 MiB chunked, without one.
    big = json.dumps({"decision_id": d["decision_id"], "reward": 0.5, "pad": "x" * (54 * 2**20)}).encode()
    chunk = b" " * (64 * 2**10)
    for path, body in (("/feedback", big), ("/decide", big),
                       ("/feedback", [b'{"decision_id": "x", "reward": 0.1', *[chunk] * 32, b"}"])):
        status, reply = _post_raw(service["port"], path, body)
        assert status == 413
        _one_line(reply, f"body: larger than the limit of {MAX_BODY_BYTES} bytes")
    assert _saved(service) == before and client.stats() == stats
    # Just under the limit is parsed as usual (and refused for its extra field, not its size).
    status, reply = _post_raw(service["port"], "/decide", json.dumps(
        {"features": x[0].tolist(), "pad": "x" * (MAX_BODY_BYTES - 200)}).encode())
    assert status == 422 and "pad: Extra inputs are not permitted" in reply["detail"]


@pytest.mark.parametrize(("path", "body"), [
    ("/feedback", {"decision_id": "any", "reward": 0.5}),
    ("/feedback", {"decision_id": "any", "reward": 1e308}),  # 401 comes before the body's 422
    ("/arms", {"name": "intruder"}),
])
def test_writes_need_the_token(service, path, body):
    client, x = service["client"], service["x"]
    _, d = client.call("POST", "/decide", {"features": x[8].tolist()}, token=None)  # decisions stay open
    if path == "/feedback":
        body = {**body, "decision_id": d["decision_id"]}
    before, stats = _saved(service), client.stats()
    for token in (None, "wrong-token-0123456789", TOKEN + "x", TOKEN[:-1], ""):
        status, reply = client.call("POST", path, body, token=token)
        assert status == 401, (token, reply)
        _one_line(reply, "authorization: ")
    # The right token in another scheme is still refused.
    req = urllib.request.Request(client.base + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", "authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 401 and err.value.headers["www-authenticate"] == "Bearer"
    assert _saved(service) == before and client.stats() == stats
    assert client.call("GET", "/stats", token=None)[0] == 200 and client.call("GET", "/healthz", token=None)[0] == 200
    status, _ = client.call("POST", path, body)  # with the token: served (or refused for the body)
    assert status == (422 if body.get("reward") == 1e308 else 200)


def test_a_decision_asked_for_with_the_token_is_kept_apart(service):
    """/decide stays open, but the token puts a decision in a pending budget that anonymous
    callers cannot expire; a wrong token is a 401, never a silent anonymous decision."""
    client, x = service["client"], service["x"]
    before = client.stats()
    assert client.call("POST", "/decide", {"features": x[3].tolist()}, token=None)[0] == 200
    assert client.call("POST", "/decide", {"features": x[3].tolist()})[0] == 200
    after = client.stats()
    assert (after["decisions"], after["pending_trusted"]) == (before["decisions"] + 2, before["pending_trusted"] + 1)
    status, reply = client.call("POST", "/decide", {"features": x[3].tolist()}, token="wrong-token-0123456789")
    assert status == 401 and client.stats()["decisions"] == after["decisions"]
    _one_line(reply, "authorization: wrong bandit token")


def test_the_rayservice_import_path_builds_a_guarded_app(service, ray_cluster, tmp_path):
    """cluster/rayservice-bandit.yaml deploys `simmerge_ray.bandit.service:app`: build it the same
    way (a detached actor of its own over a copy of the state) and check the token guards it."""
    from ray import serve

    from simmerge_ray.bandit.service import app

    state = tmp_path / "state"
    shutil.copytree(service["state"], state)
    token_file = tmp_path / "token"
    token_file.write_text("builder-token-0123456789\n")  # as a mounted Secret file may end
    name = "simmerge-bandit-built"
    serve.run(app({"state": str(state), "token_file": str(token_file), "actor_name": name,
                   "namespace": NAMESPACE}), name="bandit-built", route_prefix="/built")
    try:
        client = service["client"]
        assert client.call("GET", "/built/healthz")[1]["status"] == "ok"
        status, d = client.call("POST", "/built/decide", {"features": service["x"][0].tolist()}, token=None)
        assert status == 200
        body = {"decision_id": d["decision_id"], "reward": 0.5}
        assert client.call("POST", "/built/feedback", body)[0] == 401  # the main service's token
        status, fb = client.call("POST", "/built/feedback", body, token="builder-token-0123456789")
        assert (status, fb["status"]) == (200, "counted")
        assert BanditCore(state).stats()["feedback"] == BanditCore(service["state"]).stats()["feedback"] + 1
    finally:
        serve.delete("bandit-built")
        ray_cluster.kill(ray_cluster.get_actor(name, namespace=NAMESPACE), no_restart=True)
    with pytest.raises(ValueError, match="need 'state'"):
        app({"state_dir": str(state)})


def test_the_token_comes_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from simmerge_ray.bandit.auth import TOKEN_ENV, load_token
    from simmerge_ray.cli import main as cli_main
    from simmerge_ray.errors import ConfigError

    (tmp_path / "t").write_text("  file-token-0123456789\n")
    monkeypatch.setenv(TOKEN_ENV, "env-token-0123456789")
    assert load_token(tmp_path / "t") == "file-token-0123456789"  # the file wins
    assert load_token() == "env-token-0123456789"
    (tmp_path / "short").write_text("abc")
    with pytest.raises(ConfigError, match="short: the bandit token must have at least 16 characters"):
        load_token(tmp_path / "short")
    with pytest.raises(ConfigError, match="missing: cannot read the bandit token"):
        load_token(tmp_path / "missing")
    monkeypatch.delenv(TOKEN_ENV)
    # `simmerge serve` without a token: one line, exit 2, before Ray starts.
    state = tmp_path / "state"
    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=3, tasks=("code",), n_features=2))
    data = replay_data(labels, features)
    encoder = IdentityEncoder.fit(data.feature_names, data.x)
    BanditCore.create(state, encoder, LinTS(encoder.width, data.operators))
    assert cli_main(["serve", "--state", str(state), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no bandit token: pass --token-file FILE or set SIMMERGE_BANDIT_TOKEN" in err
