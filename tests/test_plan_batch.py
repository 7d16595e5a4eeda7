"""Batch planning: one row per request, the same plans as single `simmerge plan` calls, error rows
for bad requests, reruns answered from the results cache, --execute-top merges the best plan."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from simmerge_ray.catalog import Catalog
from simmerge_ray.cli import main as simmerge
from simmerge_ray.errors import ConfigError
from simmerge_ray.io.checkpoint import Checkpoint
from simmerge_ray.planner.batch import BatchSettings, run_batch
from simmerge_ray.planner.plan import Plan
from simmerge_ray.planner.request import PlanRequest, build_step_model, plan_request
from benchmarks.synthetic_world import build_world
from input_checks import as_aux_selector  # beside this file


@pytest.fixture(scope="module")
def world(ray_cluster, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("plan-batch")
    w = build_world(root, n_models=8)
    # A catalog with one model more than the features know: its requests lack features.
    raw = yaml.safe_load(w.catalog.read_text())
    raw["models"].append({"name": "code-9", "path": "ckpt/code-0", "task": "code"})
    (root / "catalog-plus.yaml").write_text(yaml.safe_dump(raw))
    return w, root / "catalog-plus.yaml"


def valid_requests(models: list[str], tasks: tuple[str, ...], n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        task = rng.choice(tasks)
        expert = f"{task}-{rng.randint(0, 1)}"
        others = rng.sample([m for m in models if not m.startswith(task)], rng.randint(1, 3))
        req = {"request_id": f"r{i:03d}", "task": task, "models": [expert, *others],
               "max_way": rng.choice([2, 3, 3]) if len(others) > 2 else 4}
        if i % 7 == 0:
            req["required_expert"] = expert
        if i % 11 == 0:
            req.update(models=None, model_glob=f"{task}-[01]", max_way=2)
        out.append(req)
    return out


BAD = [
    ({"request_id": "bad-model", "task": "code", "models": ["code-0", "nope-1"]}, "no model named 'nope-1'"),
    ({"request_id": "bad-size", "task": "code", "models": ["code-0", "math-0"], "min_way": 4, "max_way": 2},
     "size range [min_way=4, max_way=2] is invalid"),
    ({"request_id": "bad-task", "task": "poetry", "models": ["code-0", "math-0"]}, "no task named 'poetry'"),
    ({"request_id": "no-features", "task": "code", "models": ["code-9", "math-0"]},
     "model 'code-9' has no Gram matrices"),
    ({"request_id": "bad-expert", "task": "math", "models": ["math-0", "code-0"], "required_expert": "math-1"},
     "required expert 'math-1' is not among the candidate models"),
    ({"request_id": "typo", "task": "code", "models": ["code-0", "rag-0"], "max_wya": 3},
     "max_wya: Extra inputs are not permitted"),
    ({"request_id": "bad/id", "task": "code", "models": ["code-0", "rag-0"]}, "request_id: String should match"),
    ({"request_id": "inf-weight", "task": "code", "models": ["code-0", "rag-0"], "retention_weight": float("inf")},
     "retention_weight: Input should be a finite number"),  # it crashed the whole batch
    ({"request_id": "dup", "task": "code", "models": ["code-0", "rag-0"]}, "request_id 'dup' appears 2 times"),
    ({"request_id": "dup", "task": "math", "models": ["math-0", "rag-0"]}, "request_id 'dup' appears 2 times"),
]


def test_batch_matches_single_plans_and_resumes(world, tmp_path: Path) -> None:
    w, catalog_plus = world
    good = valid_requests(w.models, w.tasks, 60)
    table = good + [r for r, _ in BAD]
    pl.DataFrame(table, infer_schema_length=None).write_parquet(tmp_path / "requests.parquet")
    settings = BatchSettings(requests=str(tmp_path / "requests.parquet"), selector=str(w.selector),
                             catalog=str(catalog_plus), features=str(w.features), out=str(tmp_path / "out"),
                             actors=2)
    first = run_batch(settings)
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert res.height == len(table) == first.requests
    assert sorted(res["request_id"].to_list()) == sorted(r["request_id"] for r in table)
    assert (first.ok, first.errors, first.cached) == (len(good), len(BAD), 0)
    assert first.invalid == 4  # bad-size, typo, bad/id, inf-weight never reach an actor
    assert first.planned == len(table) - 4
    by_id = {r["request_id"]: r for r in res.iter_rows(named=True)}
    for req, message in BAD:
        rows = res.filter(pl.col("request_id") == req["request_id"])
        assert rows["status"].to_list() == ["error"] * rows.height
        assert all(message in e for e in rows["error"].to_list()), (req, rows["error"].to_list())

    # Every plan equals the one the single-request function (what `simmerge plan` calls) makes.
    catalog = Catalog.load(catalog_plus)
    model = build_step_model(w.selector, w.features)
    for req in good:
        row = by_id[req["request_id"]]
        single = plan_request(PlanRequest.parse(req), catalog, model)
        best, runner = single.plans[0], single.plans[1]
        assert row["status"] == "ok" and row["error"] is None
        assert (row["models"], row["operators"]) == (best.models, best.operators)
        assert row["score"] == pytest.approx(best.score, rel=1e-9)
        assert row["step_utility"] == pytest.approx(best.step_utility, rel=1e-9)
        assert (row["runner_up_models"], row["runner_up_operators"]) == (runner.models, runner.operators)
        assert row["margin"] == pytest.approx(best.score - runner.score, rel=1e-6, abs=1e-12)
        assert row["margin"] >= 0 and row["plans_scored"] == single.scored
        assert row["flags"] == [f["kind"] for f in best.flags]
        plan = Plan.from_json((tmp_path / "out" / row["plan_dir"] / "plan.json").read_text())
        assert (plan.models, plan.operators) == (best.models, best.operators)
        assert len(list((tmp_path / "out" / row["plan_dir"]).glob("step-*.yaml"))) == best.k - 1
    assert len({(tuple(m), tuple(o)) for m, o in zip(res["models"].to_list(), res["operators"].to_list()) if m}) > 10

    # `simmerge plan` itself writes byte-identical plan files for a few requests.
    for req in (good[1], good[7], good[11]):
        out = tmp_path / "single" / req["request_id"]
        argv = ["plan", "--selector", str(w.selector), "--catalog", str(catalog_plus), "--features",
                str(w.features), "--task", req["task"], "--max-way", str(req["max_way"]), "--out", str(out)]
        models = req["models"] or [m for m in w.models if m.startswith(req["task"] + "-")]
        argv += ["--models", *models] + (["--required-expert", req["required_expert"]]
                                         if req.get("required_expert") else [])
        assert simmerge(argv) == 0
        batch_dir = tmp_path / "out" / by_id[req["request_id"]]["plan_dir"]
        for f in sorted(out.iterdir()):  # step files name their own folder's absolute path
            assert (f.read_text().replace(str(out.resolve()), "PLAN")
                    == (batch_dir / f.name).read_text().replace(str(batch_dir.resolve()), "PLAN")), f.name

    # Rerun: nothing is planned again; then one changed request is the only one replanned.
    again = run_batch(settings)
    assert again.planned == 0 and again.cached == len(table) - 4
    res2 = pl.read_parquet(tmp_path / "out" / "results.parquet")
    changed = [c for c in res.columns if c not in ("cached", "search_seconds") and not res2[c].equals(res[c])]
    assert changed == [] and res2["cached"].sum() == len(table) - 4
    good[5]["max_way"] = 2
    pl.DataFrame(good + [r for r, _ in BAD], infer_schema_length=None).write_parquet(tmp_path / "requests.parquet")
    third = run_batch(settings)
    assert third.planned == 1 and third.cached == len(table) - 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["planned"] == 1 and summary["requests"] == len(table)


def test_cli_jsonl_and_execute_top(world, tmp_path: Path) -> None:
    w, _ = world
    rows = [{"request_id": "a", "task": "code", "models": ["code-0", "math-0", "rag-0"], "max_way": 3},
            {"request_id": "b", "task": "rag", "models": ["rag-1", "chat-0"]},
            {"request_id": "c", "task": "math", "model_glob": "math-*"},
            {"request_id": "d", "task": "chat", "models": ["chat-0"]}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["plan-batch", "--requests", str(tmp_path / "req.jsonl"), "--selector", str(w.selector),
            "--catalog", str(w.catalog), "--features", str(w.features), "--out", str(tmp_path / "out"),
            "--actors", "1", "--execute-top", "1", "--merge-workers", "1"]
    assert simmerge(argv) == 0
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    assert res["request_id"].to_list() == ["a", "b", "c", "d"]
    assert res["status"].to_list() == ["ok", "ok", "ok", "error"]
    assert "cannot make a 2-way plan (min_way / --min-way 2" in res["error"][3]
    top = res.filter(pl.col("status") == "ok").sort("score", descending=True).row(0, named=True)
    merged = [r for r in res["merged"].to_list() if r]
    assert merged == [top["merged"]] and top["merged"].startswith(f"merged/{top['request_id']}-")
    ck = Checkpoint.open(tmp_path / "out" / top["merged"])
    assert set(ck.entries) == set(Checkpoint.open(Catalog.load(w.catalog).model("code-0").path).entries)
    # Bad inputs of the whole batch are one clear error, before any work.
    shutil.copytree(w.selector, tmp_path / "sel")
    (tmp_path / "sel" / "selector.safetensors").unlink()
    with pytest.raises(ConfigError, match="selector.safetensors: selector file not found"):
        run_batch(BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(tmp_path / "sel"),
                                catalog=str(w.catalog), features=str(w.features), out=str(tmp_path / "o2")))
    assert not (tmp_path / "o2").exists()  # it used to hold an empty cache/


def test_json_rows_are_read_one_at_a_time(world, tmp_path: Path) -> None:
    """A JSON row of an odd type, or a line that is not JSON, is that row's error, named by field or
    line; the rest of the batch is planned (a columnar JSON reader stopped at the first such row).
    A .json file may hold one array of the same objects."""
    w, _ = world
    good = [{"request_id": "a", "task": "code", "models": ["code-0", "math-0"]},
            {"request_id": "b", "task": "math", "models": ["math-1", "rag-0"]}]
    lines = [json.dumps(good[0]), json.dumps({"request_id": "odd", "task": "code", "models": "code-0"}), "",
             "{not json", "[1, 2]", json.dumps({"request_id": "num", "task": 7, "models": ["code-0", "rag-0"]}),
             json.dumps(good[1])]
    (tmp_path / "req.jsonl").write_text("\n".join(lines) + "\n")
    settings = BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(w.selector), catalog=str(w.catalog),
                             features=str(w.features), out=str(tmp_path / "out"), actors=1,
                             cache=str(tmp_path / "cache"))
    report = run_batch(settings)
    assert (report.requests, report.ok, report.errors, report.invalid) == (6, 2, 4, 4)
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    errors = res.filter(pl.col("status") == "error")["error"].to_list()
    assert sorted(errors) == sorted([
        "request num: task: Input should be a valid string",
        f"{tmp_path / 'req.jsonl'}: line 4: not valid JSON (Expecting property name enclosed in double quotes, column 2)",
        f"{tmp_path / 'req.jsonl'}: line 5: expected a JSON object, got list",
        "request odd: models: Input should be a valid list"])
    ok = res.filter(pl.col("status") == "ok").sort("request_id")
    assert ok["request_id"].to_list() == ["a", "b"]

    (tmp_path / "req.json").write_text(json.dumps(good + [3]))
    as_array = run_batch(BatchSettings(**{**settings.__dict__, "requests": str(tmp_path / "req.json"),
                                          "out": str(tmp_path / "out2")}))
    assert (as_array.ok, as_array.errors, as_array.cached) == (2, 1, 2)  # the same requests, keyed alike
    res2 = pl.read_parquet(tmp_path / "out2" / "results.parquet").sort("request_id")
    assert res2.filter(pl.col("status") == "ok")[["request_id", "models", "operators", "score"]].equals(
        ok[["request_id", "models", "operators", "score"]])
    assert res2.filter(pl.col("status") == "error")["error"].to_list() == [
        f"{tmp_path / 'req.json'}: item 3: expected a JSON object, got int"]


def test_a_model_changed_since_its_features_fails_only_its_requests(world, tmp_path: Path) -> None:
    """A catalog model that now points at another checkpoint is an error row on each request that
    could use it (named, as `simmerge plan` refuses it); the other requests are planned (the whole
    batch used to be refused)."""
    w, _ = world
    raw = yaml.safe_load(w.catalog.read_text())
    root = w.catalog.parent
    code1 = next(m["path"] for m in raw["models"] if m["name"] == "code-1")
    raw["models"] = [{**m, "path": str(root / (code1 if m["name"] == "math-0" else m["path"]))} for m in raw["models"]]
    raw["base"] = str(root / raw["base"]) if raw.get("base") else None
    raw["tasks"] = {t: {k: str(root / v) for k, v in spec.items()} for t, spec in raw["tasks"].items()}
    (tmp_path / "stale.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if v is not None}))
    rows = [{"request_id": "uses", "task": "code", "models": ["code-0", "math-0"]},
            {"request_id": "glob", "task": "math", "model_glob": "math-*"},
            {"request_id": "free", "task": "code", "models": ["code-0", "rag-0"]}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = run_batch(BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(w.selector),
                                     catalog=str(tmp_path / "stale.yaml"), features=str(w.features),
                                     out=str(tmp_path / "out"), actors=1))
    assert (report.ok, report.errors, report.planned) == (1, 2, 1)
    res = {r["request_id"]: r for r in pl.read_parquet(tmp_path / "out" / "results.parquet").iter_rows(named=True)}
    assert res["free"]["status"] == "ok"
    for rid in ("uses", "glob"):
        assert res[rid]["error"] == (f"request {rid}: {w.features / 'gram_meta.json'}: model 'math-0' ({root / code1}) "
                                     f"is not the checkpoint its features describe (they were measured from "
                                     f"{root / 'ckpt' / 'math-0'}); compute the features again (simmerge features "
                                     f"structural / functional) for this catalog")


def test_request_files_in_the_shapes_editors_and_tools_write(tmp_path: Path) -> None:
    """CRLF line ends, a byte-order mark, a raw U+2028 inside a string (JSON allows it; Python's
    splitlines breaks there), one pretty-printed object; a table without rows is refused."""
    from simmerge_ray.planner.request_table import read_requests

    row = {"request_id": "a", "task": "x\u2028y", "models": ["m1", "m2"]}
    path = tmp_path / "r.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(row, ensure_ascii=False) + "\r\n").encode() * 2)
    assert read_requests(str(path)) == [row, row]
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps(row, indent=2))
    assert read_requests(str(pretty)) == [row]
    for name, text in (("empty.jsonl", ""), ("blank.json", "\n\n"), ("none.json", "[]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=f"{name}: the request table has no rows"):
            read_requests(str(tmp_path / name))
    (tmp_path / "broken.json").write_text('[{"request_id": "a",')
    with pytest.raises(ConfigError, match=r"broken.json: not valid JSON \(line 1, column 21"):
        read_requests(str(tmp_path / "broken.json"))


def test_calibrated_batch_matches_calibrated_single_plans(world, tmp_path: Path) -> None:
    """--calibration ranks each request's 3-way plans on calibrated retentions, as `simmerge plan`
    does; sizes the file does not cover are error rows; a changed file replans everything."""
    import numpy as np

    from simmerge_ray.planner.calibrate import FEATURES, MultiwayCalibration, RetentionCalibrator

    w, _ = world
    aux = as_aux_selector(w.selector, tmp_path / "aux-selector")
    coef = np.zeros((len(FEATURES), 2))
    coef[FEATURES.index("expert_position"), 0] = 1.0
    coef[FEATURES.index("pred_others"), 1] = 0.5
    coef[FEATURES.index("intercept")] = [-0.9, -0.6]
    cal = MultiwayCalibration({3: RetentionCalibrator(coef)}, {3: 5}, {3: {"80": [0.1, 0.2]}},
                              {3: {"targets": 15, "bias": [-0.2, 0.05], "halfwidth": {"80": [0.3, 0.1]}}},
                              {"retention_weight": 1.0, "aux_weight": 0.0})  # picks measured under the default objective
    (tmp_path / "calibration.json").write_text(cal.to_json())
    reqs = [{"request_id": "a", "task": "code", "models": ["code-0", "math-0", "rag-0"], "min_way": 3, "max_way": 3},
            {"request_id": "b", "task": "math", "models": ["math-1", "chat-0", "code-1", "rag-1"], "min_way": 3,
             "max_way": 3, "aux_weight": 0.5},
            {"request_id": "c", "task": "rag", "models": ["rag-0", "chat-1"], "max_way": 2}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    settings = BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(w.selector), catalog=str(w.catalog),
                             features=str(w.features), out=str(tmp_path / "out"), aux_selector=str(aux),
                             calibration=str(tmp_path / "calibration.json"), actors=1)
    report = run_batch(settings)
    assert (report.ok, report.errors) == (2, 1)
    res = {r["request_id"]: r for r in pl.read_parquet(tmp_path / "out" / "results.parquet").iter_rows(named=True)}
    assert "covers plans of [3] models, not [2]" in res["c"]["error"]
    model = build_step_model(w.selector, w.features, aux)
    catalog = Catalog.load(w.catalog)
    for req in reqs[:2]:
        best = plan_request(PlanRequest.parse(req), catalog, model, calibration=cal).best
        row = res[req["request_id"]]
        assert (row["models"], row["operators"], row["weighting"]) == (best.models, best.operators, best.weighting)
        assert row["models"][-1] == row["expert"]  # this calibration: the expert keeps most when it joins last
        assert row["calibrated_expert_retention"] == pytest.approx(best.calibrated["expert_retention"])
        assert row["calibrated_others_retention"] == pytest.approx(best.calibrated["others_retention"])
        assert row["calibrated_score"] == pytest.approx(best.calibrated["score"])
        if req["request_id"] == "a":  # the calibration's objective: corrected for being the top plan
            assert row["top_plan_expert_retention"] == pytest.approx(best.calibrated["expert_retention"] - 0.2)
            assert row["top_plan_others_retention"] == pytest.approx(best.calibrated["others_retention"] + 0.05)
        else:  # another objective picks other plans: no correction
            assert row["top_plan_expert_retention"] is None and row["top_plan_others_retention"] is None
        # not merging is weighed on the predicted scale (shares of gaps kept): the calibrated one (changes
        # of accuracy) would need each other model's score with the expert alone, which no catalog holds
        ea = best.expert_alone
        assert ea["value"] == 1.0 and ea["best"] == pytest.approx(best.score) and ea["better"] == (best.score < 1.0)
        plan = json.loads((tmp_path / "out" / row["plan_dir"] / "plan.json").read_text())
        assert plan["calibrated"]["intervals"]["80"]["expert_retention"] == pytest.approx(
            [best.calibrated["expert_retention"] - 0.1, best.calibrated["expert_retention"] + 0.1])
    # the calibration is an input of every cached answer: a changed file plans everything again
    coef[FEATURES.index("expert_position"), 0] = -1.0
    (tmp_path / "calibration.json").write_text(MultiwayCalibration({3: RetentionCalibrator(coef)}, {3: 5}).to_json())
    again = run_batch(settings)
    assert again.planned == 3 and again.cached == 0
    flipped = pl.read_parquet(tmp_path / "out" / "results.parquet").filter(pl.col("request_id") == "a").row(0, named=True)
    assert flipped["models"][0] == flipped["expert"]
    # without an auxiliary selector the batch stops before any work, naming the flag
    with pytest.raises(ConfigError, match="--calibration needs --aux-selector"):
        run_batch(BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(w.selector), catalog=str(w.catalog),
                                features=str(w.features), out=str(tmp_path / "o2"),
                                calibration=str(tmp_path / "calibration.json")))
    assert not (tmp_path / "o2").exists()


def test_rerun_keeps_what_the_user_added_and_heals_broken_cache_entries(world, tmp_path: Path) -> None:
    """A rerun leaves a plan folder that is already its plan alone (a merge the user ran into it
    from its step file stays); a changed plan whose folder holds such a merge becomes an error
    row, nothing deleted; unusable cache entries are planned again and replaced."""
    w, _ = world
    rows = [{"request_id": "a", "task": "code", "models": ["code-0", "math-0", "rag-0"], "max_way": 3},
            {"request_id": "b", "task": "rag", "models": ["rag-1", "chat-0", "math-1"], "max_way": 3},
            {"request_id": "c", "task": "math", "models": ["math-0", "code-1"]},
            {"request_id": "d", "task": "chat", "models": ["chat-0", "code-0"]}]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    settings = BatchSettings(requests=str(tmp_path / "req.jsonl"), selector=str(w.selector), catalog=str(w.catalog),
                             features=str(w.features), out=str(tmp_path / "out"), actors=1, cache=str(cache))
    first = run_batch(settings)
    assert first.ok == 4 and first.planned == 4
    res = pl.read_parquet(tmp_path / "out" / "results.parquet")
    keys = dict(zip(res["request_id"].to_list(), res["key"].to_list()))
    user_merge = tmp_path / "out" / "plans" / "a" / "step-1"
    user_merge.mkdir()
    (user_merge / "model.safetensors").write_bytes(b"the user's merge")

    # Break four cache entries in four ways (a damaged alternatives.yaml was served as it was).
    (cache / keys["b"] / "row.json").write_bytes(b"\xff\xfe{")
    (cache / keys["c"] / "row.json").write_text("[1, 2]")
    (cache / keys["d"] / "plan.json").unlink()
    alternatives = (cache / keys["a"] / "alternatives.yaml").read_text()
    (cache / keys["a"] / "alternatives.yaml").write_text(alternatives[: len(alternatives) // 2])
    again = run_batch(settings)
    assert (again.ok, again.planned, again.cached) == (4, 4, 0)
    assert (user_merge / "model.safetensors").read_bytes() == b"the user's merge"
    for rid in "abcd":
        assert json.loads((cache / keys[rid] / "row.json").read_text())["status"] == "ok"
        assert (cache / keys[rid] / "plan.json").is_file()
    assert (cache / keys["a"] / "alternatives.yaml").read_text() == alternatives
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith(".")) == []
    third = run_batch(settings)
    assert (third.planned, third.cached) == (0, 4)

    # Request a is now another plan: its folder holds the user's merge, so it is not replaced.
    rows[0].update(models=["code-1", "chat-0"], max_way=2)
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fourth = run_batch(settings)
    res = pl.read_parquet(tmp_path / "out" / "results.parquet").filter(pl.col("request_id") == "a")
    assert fourth.errors == 1 and res["status"].to_list() == ["error"]
    assert "holds step-1/, which simmerge did not write there" in res["error"][0]
    assert (user_merge / "model.safetensors").read_bytes() == b"the user's merge"


def test_a_calibration_is_refused_with_selectors_it_was_not_fitted_on(world, tmp_path: Path) -> None:
    """A calibration maps one run's selectors' predictions to measured retentions; given with
    another run's selectors it printed calibrated retentions and intervals that meant nothing."""
    import numpy as np

    from simmerge_ray.planner.calibrate import FEATURES, MultiwayCalibration, RetentionCalibrator
    from simmerge_ray.planner.request import load_calibration
    from simmerge_ray.selector.encoder import selector_digest

    w, _ = world
    other = tmp_path / "other-selector"
    shutil.copytree(w.selector, other)
    weights = next(p for p in other.iterdir() if p.suffix == ".safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    cal = MultiwayCalibration({3: RetentionCalibrator(np.zeros((len(FEATURES), 2)))}, {3: 5},
                              selectors={"selector": selector_digest(w.selector), "aux_selector": selector_digest(w.selector)})
    path = tmp_path / "calibration.json"
    path.write_text(cal.to_json())
    assert load_calibration(str(path), str(w.selector), str(w.selector)).selectors == cal.selectors
    with pytest.raises(ConfigError, match=f"--calibration {path}: fitted on the predictions of another aux selector "
                                          f"than --aux-selector {other}"):
        load_calibration(str(path), str(other), str(w.selector))
