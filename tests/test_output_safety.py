"""Nothing lost: a command never deletes, replaces or writes into what it did not create.

Real checkpoints, real merges (in process: the output checks run before any merge engine),
real processes killed with SIGKILL, and a real read-only mount where the machine allows one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import ConfigError, OutputError
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.file_lock import exclusive_lock
from simmerge_ray.io.out_checks import LOCK_FILE, MARKER
from simmerge_ray.io.owner import OWNER_FILE, write_owner
from simmerge_ray.io.stage_files import stage_files
from simmerge_ray.io.synthetic import SyntheticSpec, make_checkpoint

from input_checks import tree_hash  # beside this file

SPEC = SyntheticSpec(architecture="llama", hidden_size=32, num_layers=2, num_heads=4, vocab_size=64,
                     max_shard_bytes=20_000)
SLERP = {"merge_method": "slerp", "base_model": "m1", "parameters": {"t": 0.5},
         "models": [{"model": "m1"}, {"model": "m2"}]}



@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    """models/{m1,m2} + an unrelated NOTES.txt, and a merge config beside them."""
    models = tmp_path / "models"
    for i in (1, 2):
        make_checkpoint(models / f"m{i}", dataclasses.replace(SPEC, seed=i))
    (models / "NOTES.txt").write_text("my notes")
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump({**SLERP, "models": [
        {"model": str(models / "m1")}, {"model": str(models / "m2")}], "base_model": str(models / "m1")}))
    return tmp_path


def _merge(ws: Path, out: str | Path, *extra: str) -> int:
    return cli_main(["merge", str(ws / "merge.yaml"), "--out", str(out), *extra])


@pytest.mark.parametrize("target, message", [
    ("models/m1", "the output is the input"),
    ("models", "the output holds the input"),
    ("models/m1/merged", "the output lies inside the input"),
])
def test_out_overlapping_an_input_is_refused(workspace: Path, capsys, target: str, message: str) -> None:
    before = tree_hash(workspace)
    assert _merge(workspace, workspace / target, "--overwrite") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert tree_hash(workspace) == before  # the models, their notes and nothing new


def test_overwrite_replaces_only_an_output_simmerge_wrote(workspace: Path, capsys) -> None:
    user = workspace / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = tree_hash(workspace)
    for flags in (("--overwrite",), ()):  # without the flag too: no hint to pass a flag that cannot work
        assert _merge(workspace, user, *flags) == 2
        assert f"not written by simmerge (no {MARKER})" in capsys.readouterr().err
    assert tree_hash(workspace) == before

    empty = workspace / "made-for-it"  # an empty folder made for the output is used as it is
    empty.mkdir()
    assert _merge(workspace, empty) == 0
    assert (empty / MARKER).is_file() and "config.json" in json.loads((empty / MARKER).read_text())["files"]
    shutil.rmtree(empty)

    out = workspace / "merged"
    assert _merge(workspace, out) == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "simmerge"
    assert marker["files"] == sorted(p.name for p in out.iterdir() if p.name != MARKER)
    assert "config.json" in marker["files"] and not (out / OWNER_FILE).exists()
    shard = next(f for f in marker["files"] if f.endswith(".safetensors"))
    (out / shard).write_bytes(b"stale")
    assert _merge(workspace, out, "--overwrite") == 0
    assert (out / shard).read_bytes() != b"stale"
    assert sorted(p.name for p in workspace.iterdir()) == ["merge.yaml", "merged", "mine", "models"]


@pytest.mark.parametrize("extra", ["my_eval.json", "adapter/", "sub/deeper/notes.txt"])
def test_overwrite_refuses_an_output_holding_files_simmerge_did_not_write(workspace: Path, capsys,
                                                                          extra: str) -> None:
    """A user's file added to an output (or a merge run into a plan folder) is never deleted
    with it: --overwrite names it and changes nothing."""
    out = workspace / "merged"
    assert _merge(workspace, out) == 0
    target = out / extra
    if extra.endswith("/"):
        target.mkdir()
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("mine")
    before = tree_hash(workspace)
    assert _merge(workspace, out, "--overwrite") == 2
    err = capsys.readouterr().err.strip()
    first = extra.split("/")[0] + "/" if "/" in extra else extra
    assert f"holds {first}, which simmerge did not write there" in err and len(err.splitlines()) == 1
    assert tree_hash(workspace) == before and target.exists()


def test_overwrite_keeps_an_older_output_whose_marker_lists_no_files(workspace: Path, caplog) -> None:
    """An older simmerge's marker says nothing of what it wrote, so what may be the user's
    cannot be told apart: the old folder is kept aside whole, and the log says where."""
    out = workspace / "merged"
    assert _merge(workspace, out) == 0
    (out / MARKER).write_text(json.dumps({"written_by": "simmerge"}))
    (out / "my_eval.json").write_text("mine")
    old = tree_hash(out)
    with caplog.at_level("WARNING"):
        assert _merge(workspace, out, "--overwrite") == 0
    kept = [p for p in workspace.iterdir() if p.name.startswith("merged.kept-")]
    assert len(kept) == 1 and tree_hash(kept[0]) == old
    assert f"the old folder is kept at {kept[0]}" in caplog.text
    assert "files" in json.loads((out / MARKER).read_text()) and not (out / "my_eval.json").exists()


def test_overwrite_passes_over_an_nfs_clients_file_of_a_removed_open_file(tmp_path: Path) -> None:
    """A bandit state saved over while another process still reads it leaves `.nfs` + 24 hex
    digits in the folder on NFS (the client removes it at the last close); it is not a user's file,
    so `bandit-init --overwrite` must not refuse the folder for it. Any other name still counts."""
    out = tmp_path / "state"
    with atomic_output_dir(out) as tmp:
        (tmp / "state.json").write_text("v1")
    (out / ".nfs00000000001234ab00000001").write_text("the old state.json")
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "state.json").write_text("v2")
    assert (out / "state.json").read_text() == "v2"
    (out / ".nfs-my-notes").write_text("mine")
    with pytest.raises(OutputError, match="holds .nfs-my-notes, which simmerge did not write there"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "state.json").write_text("v3")
    assert (out / ".nfs-my-notes").read_text() == "mine"


@pytest.mark.parametrize("name", [LOCK_FILE, OWNER_FILE])
def test_overwrite_keeps_a_users_file_under_a_reserved_name(tmp_path: Path, name: str) -> None:
    """The lock and owner-record names are never listed in the marker; a file under one of them
    that does not hold what simmerge writes there is a user's, and --overwrite keeps it. The
    bandit's own (empty) lock file does not block a replacement."""
    out = tmp_path / "state"
    with atomic_output_dir(out) as tmp:
        (tmp / "state.json").write_text("v1")
    with exclusive_lock(out / LOCK_FILE):
        pass
    with atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "state.json").write_text("v2")
    (out / name).write_text("my notes")
    with pytest.raises(OutputError, match=f"holds {name}, which simmerge did not write there"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "state.json").write_text("v3")
    assert (out / name).read_text() == "my notes" and (out / "state.json").read_text() == "v2"
    if name == OWNER_FILE:  # what a run killed between its rename and the record's removal leaves
        write_owner(out)
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "state.json").write_text("v3")
        assert (out / "state.json").read_text() == "v3"


def test_the_pipeline_refuses_a_run_folder_holding_outputs_it_did_not_begin(tmp_path: Path) -> None:
    """A zoo the user built at RUN/zoo was rebuilt from --zoo-config by `transfer`/`pipeline --out
    RUN`, without --overwrite. A stage's marker, written when it starts, is the run's claim: an
    interrupted stage resumes."""
    from simmerge_ray.errors import SimMergeError
    from simmerge_ray.pipeline import PipelineSettings, run
    from simmerge_ray.pipeline.layout import RunLayout
    from simmerge_ray.pipeline.runner import _check_foreign_outputs, stages

    zoo = tmp_path / "run" / "zoo"
    zoo.mkdir(parents=True)
    (zoo / "catalog.yaml").write_text("models: []  # the user's own zoo")
    settings = PipelineSettings(Path(__file__).resolve().parents[1] / "configs" / "zoo_tiny.yaml", tmp_path / "run")
    with pytest.raises(SimMergeError, match=rf"^{zoo}: already there, and no 'zoo' stage of this run folder wrote it"):
        run(settings, until="labels")
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == ["catalog.yaml", "zoo"]
    layout = RunLayout(tmp_path / "run")
    layout.marker("zoo").write_text(json.dumps({"key": None, "started": True}))  # a run killed mid-stage
    _check_foreign_outputs(stages(settings), layout)  # resumes
    # A missing or invalid zoo config: one line before the run folder exists (a traceback, or an
    # empty run folder left behind).
    (tmp_path / "bad.yaml").write_text("seed: 0\n")
    for config, message in ((tmp_path / "none.yaml", "zoo config not found"), (tmp_path / "bad.yaml", "base: Field required")):
        with pytest.raises(SimMergeError, match=rf"^{config}: {message}"):
            run(PipelineSettings(config, tmp_path / "run2"))
        assert not (tmp_path / "run2").exists()


def test_an_error_raised_in_a_ray_data_operator_reaches_the_user_as_itself(ray_cluster) -> None:
    """Ray Data wraps an operator's exception in a UserCodeException whose cause is lost on the way
    to the driver: a probe actor's one-line CheckpointError reached the user as 120 lines of Ray."""
    import ray

    from simmerge_ray.errors import CheckpointError, surfacing_remote_errors

    def refuse(batch: dict) -> dict:
        raise CheckpointError("/models/m: tensor 'w' is [2, 3], config.json says [3, 3]")

    batches = ray.data.range(4).map_batches(refuse).iter_batches()
    with pytest.raises(CheckpointError, match=r"^/models/m: tensor 'w' is \[2, 3\], config.json says \[3, 3\]$"):
        for _ in surfacing_remote_errors(batches):
            pass
    with pytest.raises(ray.exceptions.RayTaskError, match="ZeroDivisionError"):  # not ours: left as Ray raised it
        for _ in surfacing_remote_errors(ray.data.range(4).map_batches(lambda b: {"x": [1 / 0]}).iter_batches()):
            pass


def test_ray_data_s_own_error_lines_stay_off_the_console(ray_cluster) -> None:
    """Before the command's one line, Ray Data printed two ERROR lines of its own about the same
    failure (an actor's refused --nvme-path); its warnings still show, and its log file keeps all."""
    import logging
    import sys

    from simmerge_ray.ray_session import quiet_ray_data

    import ray.data  # noqa: F401  (installs Ray Data's own handlers)

    console = logging.StreamHandler(sys.stderr)  # one that writes where Ray Data's console handler does
    logging.getLogger("ray.data").addHandler(console)
    try:
        quiet_ray_data()
        quiet_ray_data()  # a second call adds no second filter
        shown = [record.levelno >= console.level and bool(console.filter(record)) for record in (
            logging.LogRecord("ray.data._internal.execution", lv, __file__, 1, "m", None, None)
            for lv in (logging.INFO, logging.WARNING, logging.ERROR))]
        assert shown == [False, True, False]
        assert len(console.filters) == 1
    finally:
        logging.getLogger("ray.data").removeHandler(console)


def test_a_failed_output_leaves_no_folders_it_created_above_it(tmp_path: Path) -> None:
    """`--out runs/x/y/out` of a merge that failed left runs/x/y/ behind, empty."""
    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match="the merge failed"):
        with atomic_output_dir(tmp_path / "runs" / "x" / "y" / "out") as tmp:
            (tmp / "model.safetensors").write_bytes(b"half")
            raise ValueError("the merge failed")
    assert list((tmp_path / "runs").iterdir()) == []  # runs/ was there before: it stays
    with atomic_output_dir(tmp_path / "runs" / "x" / "y" / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert (tmp_path / "runs" / "x" / "y" / "out" / "model.safetensors").read_bytes() == b"whole"


def test_out_dot_and_parents_of_the_current_folder_are_refused(workspace: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    here = workspace / "runs" / "today"
    here.mkdir(parents=True)
    (here / "log.txt").write_text("today's log")
    monkeypatch.chdir(here)
    before = tree_hash(workspace)
    for out in (".", "..", str(workspace / "runs")):
        assert _merge(workspace, out, "--overwrite") == 2
        assert "would replace the current folder" in capsys.readouterr().err
    assert tree_hash(workspace) == before
    assert sorted(p.name for p in workspace.iterdir()) == ["merge.yaml", "models", "runs"]  # no ..tmp-*


def test_out_under_a_file_is_one_line_exit_2(workspace: Path, capsys) -> None:
    (workspace / "afile").write_text("x")
    assert _merge(workspace, workspace / "afile" / "out") == 2
    err = capsys.readouterr().err
    assert f"{workspace / 'afile'} is a file" in err and len(err.strip().splitlines()) == 1
    assert (workspace / "afile").read_text() == "x"


def test_out_on_a_read_only_mount_is_one_line_exit_2(workspace: Path) -> None:
    """A real read-only bind mount in a private mount namespace (needs root and unshare)."""
    ro = workspace / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("x")
    simmerge = Path(sys.executable).with_name("simmerge")
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} || exit 99; "
              f"exec {simmerge} merge {workspace / 'merge.yaml'} --out {ro / 'out'}")
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1) to make a read-only mount")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    if res.returncode == 99:
        pytest.skip(f"cannot make a read-only mount here: {res.stderr.strip()}")
    assert res.returncode == 2, res.stderr
    assert "read-only file system or no permission" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(p.name for p in ro.iterdir()) == ["kept.txt"]


HOLD_OPEN = """
import sys, time
from pathlib import Path
from simmerge_ray.io.atomic import atomic_output_dir
from simmerge_ray.io.file_lock import exclusive_lock
with atomic_output_dir(Path(sys.argv[1])) as tmp:
    (tmp / "big.bin").write_bytes(b"x" * 1_000_000)
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_temp_folder_of_a_killed_run_is_cleaned_at_the_next_run(workspace: Path) -> None:
    out = workspace / "merged"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_OPEN, str(out)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.name.startswith(".merged.tmp-") and (tmp / "big.bin").exists()
    alive = workspace / ".merged.tmp-alive"  # a live owner (this process): must be kept
    alive.mkdir()
    write_owner(alive)
    unowned = workspace / ".merged.tmp-unowned"  # no owner record: not provably ours, kept
    unowned.mkdir()
    (unowned / "f").write_text("?")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert tmp.exists()  # SIGKILL ran no cleanup
    assert _merge(workspace, out) == 0
    assert not tmp.exists()
    assert alive.exists() and (unowned / "f").read_text() == "?"
    assert (out / "model.safetensors").exists()


def test_a_recycled_pid_is_not_mistaken_for_the_owner(tmp_path: Path) -> None:
    """The owner record holds the PID's start time: same PID, other start time = dead owner."""
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-recycled"
    stale.mkdir()
    write_owner(stale)
    record = json.loads((stale / OWNER_FILE).read_text())
    assert record["pid"] == os.getpid() and record["start"] is not None
    (stale / OWNER_FILE).write_text(json.dumps({**record, "start": str(int(record["start"]) - 1)}))
    with atomic_output_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not stale.exists() and (out / "x").read_text() == "1"


def test_failed_block_leaves_nothing_and_keeps_the_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "a").write_text("v2")
            raise RuntimeError("boom")
    assert (out / "a").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---- a folder shared by stages ------------------------------------------------------------

def test_stages_sharing_a_folder_never_touch_each_others_files(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    (feats / "probe_cache" / "k").mkdir(parents=True)
    (feats / "probe_cache" / "k" / "chunk-a-00000.safetensors").write_bytes(b"cached")
    (feats / "my_notes.txt").write_text("mine")
    with stage_files(feats, "functional", ("functional.parquet",), replace=True) as tmp:
        (tmp / "functional.parquet").write_text("f1")
    mine = ("structural.parquet", "gram.safetensors", ".simmerge-stage-structural.json")
    others = tree_hash(feats)
    for version in ("s1", "s2"):  # a rerun with --overwrite replaces only this stage's files
        with stage_files(feats, "structural", ("structural.parquet", "gram.safetensors"), replace=True) as tmp:
            (tmp / "structural.parquet").write_text(version)
            (tmp / "gram.safetensors").write_text(version)
    assert (feats / "structural.parquet").read_text() == "s2"
    assert {k: v for k, v in tree_hash(feats).items() if k not in mine} == others
    assert not [p for p in feats.iterdir() if ".tmp-" in p.name]


def test_a_stage_refuses_files_it_did_not_write(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "structural.parquet").write_text("the user's")
    with pytest.raises(OutputError, match=r"structural\.parquet: output already exists \(pass --overwrite"):
        with stage_files(feats, "structural", ("structural.parquet",), replace=False):
            pass
    with pytest.raises(OutputError, match=r"structural\.parquet: not written by simmerge"):
        with stage_files(feats, "structural", ("structural.parquet",), replace=True):
            pass
    assert (feats / "structural.parquet").read_text() == "the user's"
    assert sorted(p.name for p in feats.iterdir()) == ["structural.parquet"]


def test_a_stage_inside_an_input_is_refused(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError, match="the output lies inside the input"):
        with stage_files(model / "feats", "structural", ("x",), replace=True, inputs=[model]):
            pass
    assert list(model.iterdir()) == []


KILLED_STAGE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from simmerge_ray.io.stage_files import stage_files
    with stage_files(Path(sys.argv[1]), "structural", ("structural.parquet",), replace=True) as tmp:
        (tmp / "structural.parquet").write_text("half")
        print(tmp, flush=True)
        time.sleep(600)
""")


def test_killed_stage_leaves_the_folder_as_it_was_and_is_cleaned(tmp_path: Path) -> None:
    feats = tmp_path / "feats"
    with stage_files(feats, "structural", ("structural.parquet",), replace=True) as tmp:
        (tmp / "structural.parquet").write_text("complete")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_STAGE, str(feats)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert tmp.exists() and (feats / "structural.parquet").read_text() == "complete"
    with stage_files(feats, "structural", ("structural.parquet",), replace=True) as new:
        (new / "structural.parquet").write_text("again")
    assert not tmp.exists()
    assert (feats / "structural.parquet").read_text() == "again"


SLOW_MERGE = """
import sys, time
from simmerge_ray.cli import main
from simmerge_ray.merge.unit_merger import UnitMerger

run = UnitMerger.run
def slow(self, *args, **kwargs):  # the merge is under way, its temporary folder written
    print("merging", flush=True)
    time.sleep(5)
    return run(self, *args, **kwargs)
UnitMerger.run = slow
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_interrupted_merge_says_so_in_one_line_and_leaves_no_temporary_folder(workspace: Path, sig) -> None:
    """Ctrl-C and SIGTERM (kill, timeout, `ray job stop`) unwind: one line, exit 130, and the
    temporary output is removed on the way out, not left for the next run."""
    out = workspace / "merged"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(workspace / "merge.yaml"), "--out",
                             str(out), "--workers", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=workspace)
    assert proc.stdout.readline().strip() == "merging"
    assert any(p.name.startswith(".merged.tmp-") for p in workspace.iterdir())
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == ("simmerge merge: interrupted; nothing was published (outputs appear only when complete, "
                           "and caches resume)")
    assert sorted(p.name for p in workspace.iterdir()) == ["merge.yaml", "models"]


def _stderr_once_it_exits(proc: subprocess.Popen, timeout: float = 120) -> str:
    """The stderr of a child sent SIGTERM, once it exits. A hang (seen once under load) fails with
    the child's Python stacks (it registers faulthandler on SIGUSR2), after killing it and the
    processes it started (its local Ray), so nothing is left running."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR2)
        time.sleep(2)
        started = psutil.Process(proc.pid).children(recursive=True)
        proc.kill()
        for p in started:
            with contextlib.suppress(psutil.Error):
                p.kill()
        pytest.fail(f"no exit {timeout:.0f} s after SIGTERM; the child's stacks and stderr:\n"
                    f"{proc.communicate()[1][-8000:]}")


_SIGTERM_AFTER_RAY = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR2, all_threads=True)  # the test asks for the stacks of a hang
from simmerge_ray.cli import _interrupt_on_sigterm
from simmerge_ray.ray_session import init_ray
_interrupt_on_sigterm()  # as the CLI does before running a command
init_ray(num_cpus=1)
try:  # the line inside: the signal may arrive before print returns (a KeyboardInterrupt outside the try)
    print("ray up", flush=True)
    time.sleep(120)
except KeyboardInterrupt:
    from simmerge_ray.ray_session import shutdown_started_ray
    shutdown_started_ray(130)  # as the CLI does
    sys.exit(130)
"""


def test_sigterm_still_unwinds_after_ray_starts(tmp_path: Path) -> None:
    """Ray's core worker installs a C++ failure handler for SIGTERM: a command that had started Ray
    (plan-batch, features, label...) died on `kill` with a native stack dump and exit 15, its
    temporary outputs left behind, instead of unwinding to one line and exit 130."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_AFTER_RAY], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    assert proc.stdout.readline().strip() == "ray up"
    proc.send_signal(signal.SIGTERM)
    err = _stderr_once_it_exits(proc)
    assert proc.returncode == 130, err
    assert "SIGTERM received" not in err


_SIGTERM_WHILE_RAY_STARTS = """
import faulthandler, signal, sys, time
faulthandler.register(signal.SIGUSR2, all_threads=True)
from simmerge_ray.cli import _interrupt_on_sigterm
from simmerge_ray.ray_session import init_ray
_interrupt_on_sigterm()
try:
    init_ray(num_cpus=1)
    time.sleep(120)
except KeyboardInterrupt:
    from simmerge_ray.ray_session import shutdown_started_ray
    shutdown_started_ray(130)  # as the CLI does
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""


def test_sigterm_while_ray_starts_unwinds_and_leaves_nothing_running(tmp_path: Path) -> None:
    """ray.init puts in its own SIGTERM handler as it starts (it exits with the signal's number): a
    command killed then (`serve` while it starts, `ray job stop` of a stage) ended with exit 15, no
    word, and Ray's agents left running. The kill lands as the command's raylet appears."""
    from cluster_processes import processes_naming, reap  # beside this file

    work = Path(tempfile.mkdtemp(prefix="st-", dir="/tmp"))  # Ray's temp root: short, for its socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled",
                                                                          "RAY_TMPDIR": str(work)}
    proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_WHILE_RAY_STARTS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(p.name() == "raylet" for p in processes_naming(work)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no raylet of the command's Ray after 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        err = _stderr_once_it_exits(proc)
        assert (proc.returncode, err.strip().splitlines()[-1:]) == (130, ["interrupted"]), err
    finally:
        if proc.poll() is None:
            proc.kill()
        left = reap(work)
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
    assert left == [], [" ".join(p.cmdline())[:120] for p in left]


_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except OSError:
    sys.exit(3)
"""


def test_a_nested_lock_keeps_the_outer_one(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops the process's POSIX lock on it, so a nested use that
    opened and closed the file of its own would have freed the outer use's lock early."""
    lock = tmp_path / "state.lock"

    def others_can_lock() -> bool:
        return subprocess.run([sys.executable, "-c", _TRY_LOCK, str(lock)], timeout=60).returncode == 0

    with exclusive_lock(lock):
        with exclusive_lock(tmp_path / "." / "state.lock"):  # the same file by another spelling
            assert not others_can_lock()
        assert not others_can_lock()
    assert others_can_lock()


def test_a_worker_that_cannot_see_the_output_file_says_so(tmp_path: Path) -> None:
    """On a cluster the driver preallocates the shard files and actors on other nodes write their
    ranges into them; a node that does not mount the output folder (e.g. a job's staging folder
    left on the head's /tmp) failed with a FileNotFoundError traceback."""
    import socket

    from simmerge_ray.io.safetensors_format import RangeWriter

    missing = tmp_path / ".out.tmp-1" / "model.safetensors.partial"
    with pytest.raises(OutputError) as err:
        RangeWriter(missing)
    assert str(err.value) == (f"{missing}: the output file the driver created is not on this node ({socket.gethostname()}): "
                              "on a cluster, --out (or a job's --staging-dir) must be on storage every node mounts")


_HANGING_SHUTDOWN = """
import subprocess, sys, time
from simmerge_ray.ray_session import run_bounded
child = subprocess.Popen(["sleep", "600"])  # stands for a local Ray's node processes
print(child.pid, flush=True)
run_bounded(lambda: None, 1.0, 130, "a quick call did not return")  # returns: no exit
print("returned", flush=True)
run_bounded(lambda: time.sleep(600), 1.0, 130, "Ray did not shut down")  # a hang: the watchdog ends it
print("not reached", flush=True)
"""


def test_a_hanging_shutdown_is_cut_short_and_its_processes_stopped(tmp_path: Path) -> None:
    """Ray's driver shutdown was seen hanging past 120 s after a SIGTERM under load: a stopped
    command then sat for minutes. The bounded call exits with the command's status after its
    timeout, one line said, and the processes it started killed; a call that returns in time
    goes on as before."""
    proc = subprocess.Popen([sys.executable, "-c", _HANGING_SHUTDOWN], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "simmerge: Ray did not shut down within 1 s; stopped its processes"
    pid, returned = out.split()
    assert returned == "returned"
    deadline = time.monotonic() + 10
    while True:
        try:
            if psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE:
                break  # killed, not yet reaped
        except psutil.NoSuchProcess:
            break  # killed and reaped
        assert time.monotonic() < deadline, "the child the hung call's process started is still running"
        time.sleep(0.1)
