"""What a new user's review found inconsistent between commands: outputs replaced without
--overwrite (fit, evaluate-selector), Ray commands without --address (plan-batch, serve), a server
path in the bandit service's HTTP errors, DeepSpeed's CPU notice in `zoo build`, and lines that
did not add up or say what comes next."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from input_checks import cli_status, one_line_error, tree_hash
from test_batch_inputs import _batch_argv, _batch_inputs
from test_fit_inputs import ZOO, _tables

from simmerge_ray.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def _earlier_output(out: Path) -> None:
    """A folder an earlier simmerge run wrote (its marker lists its files)."""
    from simmerge_ray.io.atomic import atomic_output_dir

    with atomic_output_dir(out) as tmp:
        (tmp / "selector_report.json").write_text("{}")


# ---- 1. fit and evaluate-selector refuse an earlier output without --overwrite -----------------

@pytest.mark.parametrize("command", ["fit", "evaluate-selector"])
def test_an_earlier_output_is_refused_without_overwrite(tmp_path: Path, capsys, no_ray, command: str) -> None:
    """They replaced it silently, where merge, plan, features and bandit-init refuse."""
    f, l = _tables(tmp_path)
    out = tmp_path / "out"
    _earlier_output(out)
    before = tree_hash(tmp_path)
    argv = [command, "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0",
            "--epochs", "2", "--calibration-folds", "0"]
    assert cli_status(argv) == 2
    one_line_error(capsys, f"simmerge {command}: error: {out}: output already exists (pass --overwrite to replace it)")
    assert tree_hash(tmp_path) == before


def test_evaluate_selector_replaces_its_earlier_output_with_overwrite(tmp_path: Path, capsys) -> None:
    f, l = _tables(tmp_path)
    out = tmp_path / "out"
    _earlier_output(out)
    argv = ["evaluate-selector", "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0",
            "--epochs", "2", "--calibration-folds", "0", "--folds", "2", "--overwrite"]
    assert cli_status(argv) == 0, capsys.readouterr().err
    assert json.loads((out / "selector_report.json").read_text())["held_out_pairs"]


def test_fit_with_overwrite_goes_past_the_output_check(tmp_path: Path, no_ray) -> None:
    f, l = _tables(tmp_path)
    out = tmp_path / "out"
    _earlier_output(out)
    with pytest.raises(AssertionError, match="started Ray"):  # the check passed: the fit starts Ray
        cli_status(["fit", "--features", str(f), "--labels", str(l), "--out", str(out), "--tune-samples", "0", "--overwrite"])


def test_the_pipelines_selector_stages_replace_their_own_folders(tmp_path: Path, monkeypatch) -> None:
    """The demo reruns a stage whose inputs changed into the run's own folder: no --overwrite."""
    from simmerge_ray.pipeline import selector
    from simmerge_ray.pipeline.runner import PipelineSettings, stages

    seen = []
    monkeypatch.setattr(selector, "evaluate", lambda s, **_: seen.append(s))
    monkeypatch.setattr(selector, "fit_many", lambda settings, **_: seen.extend(settings))
    by_name = {st.name: st for st in stages(PipelineSettings(ZOO, tmp_path / "run"), echo=lambda _: None)}
    by_name["selector_eval"].run()
    by_name["fit"].run()
    assert len(seen) == 3 and all(s.overwrite for s in seen)


# ---- 2. plan-batch and serve take --address, as the other Ray commands do --------------------------

def _bandit_state(root: Path) -> Path:
    from simmerge_ray.bandit.core import BanditCore
    from simmerge_ray.bandit.encoder import IdentityEncoder
    from simmerge_ray.bandit.lints import LinTS, LinTSConfig
    from simmerge_ray.bandit.simulate import replay_data
    from simmerge_ray.bandit.synthetic import SyntheticBanditSpec, synthetic_tables

    labels, features = synthetic_tables(SyntheticBanditSpec(n_models=4, tasks=("code", "math"), n_features=4))
    features.write_parquet(root / "features.parquet")
    data = replay_data(labels, features)
    encoder = IdentityEncoder.fit(data.feature_names, data.x)
    BanditCore.create(root / "state", encoder, LinTS(encoder.width, data.operators, LinTSConfig(seed=0)),
                      feature_table=root / "features.parquet")
    return root / "state"


def _argv(command: str, root: Path) -> list[str]:
    if command == "fit":
        f, l = _tables(root)
        return ["fit", "--features", str(f), "--labels", str(l), "--out", str(root / "sel"), "--tune-samples", "0"]
    if command == "plan-batch":
        inputs = _batch_inputs(root)
        (inputs["features"] / "gram_meta.json").write_text('{"fingerprints": {}}')  # no model measured: none stale
        return _batch_argv(inputs, root / "batch")
    from cluster_processes import free_ports

    return ["serve", "--state", str(_bandit_state(root)), "--port", str(free_ports(1)[0])]


@pytest.mark.parametrize("command", ["fit", "plan-batch", "serve"])
def test_a_bad_address_is_one_line_for_every_ray_command(tmp_path: Path, command: str) -> None:
    """plan-batch and serve had no --address (argparse's usage error); a malformed address was
    Ray's ValueError traceback for every command that has one. In a process of its own: Ray
    may already run in this one, where the address is not read."""
    argv = [*_argv(command, tmp_path), "--address", "nonsense"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), SIMMERGE_BANDIT_TOKEN="test-token-0123456789abcdef")
    # plan-batch's stand-in inputs hold no selector a plan could be searched with: its check of
    # them (before Ray) is left out here, as is no other step
    skip = "import simmerge_ray.planner.batch as b; b.build_step_model = lambda *a, **k: None; " \
        if command == "plan-batch" else ""
    code = f"import sys; {skip}from simmerge_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ": warning: " not in ln]  # fit's: few pairs
    assert lines == [f"simmerge {command}: error: --address nonsense: not a Ray address (Invalid address format: "
                     f"nonsense); give the head's HOST:PORT, ray://HOST:PORT or auto"], res.stderr


def test_an_http_address_is_one_line_too(tmp_path: Path) -> None:
    """RAY_ADDRESS=http://HEAD:8265 is what `ray job submit` users have set; Ray's advice on it
    spans three lines, which the error carried as they were."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_ADDRESS="http://127.0.0.1:8265")
    code = "import sys; from simmerge_ray.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, *_argv("fit", tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ": warning: " not in ln]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("simmerge fit: error: RAY_ADDRESS=http://127.0.0.1:8265: not a Ray address ("), lines
    assert "It looks like you set RAY_ADDRESS to an HTTP address" in lines[0] and "<head_node_ip>:6379" in lines[0]


# ---- 3. the service's HTTP errors name no server path ---------------------------------------------

def test_an_unknown_model_lists_the_known_ones_without_the_tables_path(tmp_path: Path) -> None:
    from simmerge_ray.bandit.errors import UnknownNameError
    from simmerge_ray.bandit.feature_table import FeatureTable

    models = [f"m{i:02d}" for i in range(25)]
    pairs = [(a, b) for a in models for b in models if a != b]
    path = tmp_path / "feats" / "features.parquet"
    path.parent.mkdir()
    pl.DataFrame({"a": [a for a, _ in pairs], "b": [b for _, b in pairs], "task": ["code"] * len(pairs),
                  "s_x": np.zeros(len(pairs))}).write_parquet(path)
    table = FeatureTable.load(path, ["s_x"])
    with pytest.raises(UnknownNameError) as e:
        table.lookup("gpt5", "m01", "code")
    assert str(e.value) == f"unknown model 'gpt5' (known models: {', '.join(models[:20])}, ... (5 more))"
    with pytest.raises(UnknownNameError) as e:
        table.lookup("m00", "m01", "law")
    assert str(e.value) == "unknown task 'law' (known tasks: code)"


def test_the_services_error_bodies_hold_no_server_path(tmp_path: Path) -> None:
    import ray

    from simmerge_ray.bandit import service
    from simmerge_ray.bandit.errors import NonFiniteStateError
    from simmerge_ray.errors import CheckpointError

    state = tmp_path / "srv" / "bandit" / "state.npz"
    for handler, exc in ((service._bandit_error, NonFiniteStateError(f"{state}: not saved, x is not finite")),
                         (service._state_unavailable, CheckpointError(f"{state}: unreadable bandit state")),
                         (service._actor_down, ray.exceptions.RayActorError())):
        with contextlib.redirect_stderr(io.StringIO()):  # the server's log keeps the whole message
            reply = asyncio.run(handler(None, exc))
        detail = json.loads(reply.body)["detail"]
        assert str(tmp_path) not in detail and "/srv/" not in detail and "\n" not in detail, detail
    assert json.loads(asyncio.run(service._bandit_error(None, NonFiniteStateError(f"{state}: not saved"))).body) == \
        {"detail": "state.npz: not saved"}


# ---- 4. zoo build: no DeepSpeed notice that it runs on the CPU -------------------------------------

def test_saving_a_checkpoint_prints_no_deepspeed_cpu_notice_and_keeps_its_other_warnings(tmp_path: Path) -> None:
    """save_pretrained imports DeepSpeed, which on a machine without a GPU logged "[WARNING]
    [real_accelerator.py:213] Setting accelerator to CPU" into every `zoo build`. A process of its
    own: DeepSpeed says it once per process, at its first look for an accelerator."""
    code = f"""
import logging
from pathlib import Path
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
from simmerge_ray.testbed.build import _save_checkpoint
from simmerge_ray.testbed.model_factory import make_config
from simmerge_ray.testbed.zoo_config import ZooConfig
from transformers import AutoModelForCausalLM

cfg = ZooConfig.load({str(ZOO)!r})
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({{"<eos>": 0, "<pad>": 1, "a": 2}},
                              unk_token="<eos>")), eos_token="<eos>", pad_token="<pad>")
state = AutoModelForCausalLM.from_config(make_config(cfg.architecture, len(tok), 0, 1)).state_dict()
_save_checkpoint(cfg, tok, state, Path({str(tmp_path / "ck")!r}))
import deepspeed  # noqa: F401  (imported by save_pretrained above)
logging.getLogger("DeepSpeed").warning("another DeepSpeed warning")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    both = res.stdout + res.stderr
    assert "Setting accelerator to CPU" not in both, both
    assert "another DeepSpeed warning" in both, both
    assert (tmp_path / "ck" / "model.safetensors").is_file()


# ---- 5.-7. lines that add up and say what comes next ------------------------------------------------

@pytest.fixture(scope="module")
def built(ray_cluster, tmp_path_factory) -> dict:
    """The tiny zoo, built by the command (its lines kept)."""
    root = tmp_path_factory.mktemp("consistency")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["zoo", "build", "--config", str(ZOO), "--out", str(root / "zoo")]) == 0
    return {"root": root, "catalog": root / "zoo" / "catalog.yaml", "lines": out.getvalue().splitlines()}


def test_zoo_build_ends_with_the_next_command(built: dict) -> None:
    assert built["lines"][-1] == f"next: simmerge features structural --catalog {built['catalog']} --out feats/"


def test_features_structural_names_the_next_stage_and_the_cache_it_reused(built: dict, capsys) -> None:
    from simmerge_ray.io.digest_cache import cache_root

    root, cat = built["root"], built["catalog"]
    assert cli_main(["features", "structural", "--catalog", str(cat), "--out", str(root / "f1")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == (f"next: simmerge features functional --catalog {cat} --out {root / 'f1'} (it writes "
                         "features.parquet, which fit, plan and bandit-init read)")
    # Paths with spaces are quoted, so the line pastes into a shell as it is (it split them).
    spaced = cat.parent / "my catalog.yaml"
    spaced.write_text(cat.read_text())
    assert cli_main(["features", "structural", "--catalog", str(spaced), "--out", str(root / "f 3")]) == 0
    command = capsys.readouterr().out.splitlines()[-1].removeprefix("next: ").split(" (it writes")[0]
    assert shlex.split(command) == ["simmerge", "features", "functional", "--catalog", str(spaced),
                                    "--out", str(root / "f 3")]
    # A fresh folder, its rows from the cache of this machine (not of --out): it says which. (The
    # first run may have found them there too: the tiny zoo is the other tests' zoo, bit for bit.)
    assert cli_main(["features", "structural", "--catalog", str(cat), "--out", str(root / "f2")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert f"row pairs from this machine's Gram cache ({cache_root() / 'structural'})" in first, first


def test_label_counts_the_models_scored_alone(built: dict, capsys) -> None:
    """"N plans" was 7 more than the 2-/3-/4-way counts after it: each expert and the base, alone."""
    assert cli_main(["label", "--catalog", str(built["catalog"]), "--out", str(built["root"] / "labels"),
                     "--subsets-3", "1", "--subsets-4", "0", "--max-plans", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    total = int(lines[0].split()[1])
    counts = lines[1]
    assert counts.startswith("label: 7 models alone; 2-way: "), counts
    parts = [int(p.split(": ")[1].split()[0]) for p in counts.removeprefix("label: 7 models alone; ").split("; ")
             if "none" not in p]
    assert 7 + sum(parts) == total, lines[:2]


# ---- 6. one style for the merge commands' lines ---------------------------------------------------

def test_time_estimates_have_one_format() -> None:
    from simmerge_ray.cli.merge import _seconds

    assert [_seconds(s) for s in (0.0, 0.04, 0.3, 9.94, 12.4)] == \
        ["under 0.1 s", "under 0.1 s", "about 0.3 s", "about 9.9 s", "about 12 s"]


def test_single_and_multi_document_merges_print_their_output_alike(tmp_path: Path, capsys) -> None:
    """A single merge printed "-> merged", a multi-document one "-> merged-2s/" (the flag as typed),
    and the single dry run's "about 0 s" was the multi-document one's "about 0.0 s"."""
    import yaml

    from simmerge_ray.io.synthetic import SyntheticSpec, make_family

    m = make_family(tmp_path / "models", SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4,
                                                        vocab_size=64, max_shard_bytes=20_000, dtype="float32"), n=3)
    doc = {"merge_method": "linear", "models": [{"model": str(m / "m1"), "parameters": {"weight": 0.5}},
                                                 {"model": str(m / "m2"), "parameters": {"weight": 0.5}}],
           "dtype": "float32"}
    single = tmp_path / "one.yaml"
    single.write_text(yaml.safe_dump(doc))
    multi = tmp_path / "two.yaml"
    multi.write_text(yaml.safe_dump_all([{"name": "first", **doc},
                                         {**doc, "models": [{"model": "first", "parameters": {"weight": 0.5}},
                                                            {"model": str(m / "m1"), "parameters": {"weight": 0.5}}]}]))
    ends = []
    for config, out in ((single, "merged/"), (multi, "merged-2s/")):
        assert cli_main(["merge", str(config), "--out", str(tmp_path / out), "--quiet"]) == 0
        ends.append(capsys.readouterr().out.splitlines()[0].rsplit(" -> ", 1)[1])
    assert ends == [str(tmp_path / "merged"), str(tmp_path / "merged-2s")]
    assert cli_main(["merge", str(single), "--out", str(tmp_path / "dry"), "--dry-run"]) == 0
    assert "estimated time: under 0.1 s at this project's measured rates" in capsys.readouterr().out
