"""Outputs by path or URI: resolution, atomic-enough uploads, downloads (local paths and file:// only)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from simmerge_ray import storage
from simmerge_ray.errors import ConfigError


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def test_resolve_plain_path_and_file_uri(tmp_path: Path) -> None:
    plain = storage.resolve(str(tmp_path / "x" / ".." / "out"))
    assert isinstance(plain.fs, pafs.LocalFileSystem)
    assert plain.path == str(tmp_path / "out") and plain.is_plain_path
    uri = storage.resolve(f"file://{tmp_path}/out/")
    assert isinstance(uri.fs, pafs.LocalFileSystem)
    assert uri.path == str(tmp_path / "out") and not uri.is_plain_path


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nosuchscheme://bucket/x"):
        storage.resolve("nosuchscheme://bucket/x")


def test_upload_dir_copies_everything_and_writes_manifest_last(tmp_path: Path) -> None:
    files = {"model.safetensors": b"\x01" * 1000, "sub/config.json": b"{}", "sub/deeper/a.txt": b"abc"}
    src = _folder(tmp_path / "src", files)
    manifest = storage.upload_dir(src, f"file://{tmp_path}/dest/run1")
    dest = tmp_path / "dest" / "run1"
    for rel, data in files.items():
        assert (dest / rel).read_bytes() == data
    assert manifest["files"] == {k: len(v) for k, v in files.items()}
    assert manifest["bytes"] == 1005
    assert json.loads((dest / storage.SUCCESS_MARKER).read_text()) == manifest
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["run1"]  # no temp prefix left


def test_upload_refuses_existing_unless_overwrite(tmp_path: Path) -> None:
    dest = f"file://{tmp_path}/out"
    storage.upload_dir(_folder(tmp_path / "v1", {"a.txt": b"one", "old.txt": b"x"}), dest)
    with pytest.raises(storage.StorageError, match="already exists"):
        storage.upload_dir(_folder(tmp_path / "v2", {"a.txt": b"two"}), dest)
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"one"
    storage.upload_dir(tmp_path / "v2", dest, overwrite=True)
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"two"
    assert not (tmp_path / "out" / "old.txt").exists()  # replaced, not merged into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v1", "v2"]
    # A file added to the published folder is not simmerge's: --overwrite names it, deletes nothing.
    (tmp_path / "out" / "notes").mkdir()
    (tmp_path / "out" / "notes" / "eval.json").write_text("mine")
    with pytest.raises(storage.StorageError, match="holds notes/eval.json, which simmerge did not write there"):
        storage.upload_dir(tmp_path / "v1", dest, overwrite=True)
    assert (tmp_path / "out" / "a.txt").read_bytes() == b"two"
    assert (tmp_path / "out" / "notes" / "eval.json").read_text() == "mine"


def test_upload_to_plain_path(tmp_path: Path) -> None:
    src = _folder(tmp_path / "src", {"x.bin": b"xyz"})
    storage.upload_dir(src, str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "x.bin").read_bytes() == b"xyz"


def test_upload_of_missing_folder_names_it(tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="nothing to upload"):
        storage.upload_dir(tmp_path / "missing", f"file://{tmp_path}/out")


def test_move_files_is_the_object_store_path(tmp_path: Path) -> None:
    """The file-by-file move used where folders cannot be renamed gives the same tree."""
    _folder(tmp_path / "tmp", {"a": b"1", "b/c": b"2"})
    fs = pafs.LocalFileSystem()
    storage.move_files(fs, str(tmp_path / "tmp"), str(tmp_path / "final"))
    assert (tmp_path / "final" / "a").read_bytes() == b"1"
    assert (tmp_path / "final" / "b" / "c").read_bytes() == b"2"
    assert not (tmp_path / "tmp").exists()


def test_download_file(tmp_path: Path) -> None:
    (tmp_path / "conf.yaml").write_text("a: 1\n")
    local = storage.download_file(f"file://{tmp_path}/conf.yaml", tmp_path / "dl")
    assert local == tmp_path / "dl" / "conf.yaml" and local.read_text() == "a: 1\n"
    assert storage.download_file(str(tmp_path / "conf.yaml"), tmp_path / "unused") == tmp_path / "conf.yaml"
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.download_file(f"file://{tmp_path}/nope.yaml", tmp_path / "dl")


def _failing_store(fail_on_move: int):
    """An object-store-like filesystem (pyarrow over fsspec: no folder rename, the file-by-file
    path) on the real local disk whose `fail_on_move`-th file move fails, as a network error
    would mid-publish."""
    fsspec_local = pytest.importorskip("fsspec.implementations.local")

    class Flaky(fsspec_local.LocalFileSystem):
        moves = 0

        def mv(self, *args, **kwargs):
            Flaky.moves += 1
            if Flaky.moves == fail_on_move:
                raise OSError("connection reset")
            return super().mv(*args, **kwargs)

    return pafs.PyFileSystem(pafs.FSSpecHandler(Flaky(skip_instance_cache=True)))


def test_a_publish_failing_mid_move_keeps_every_new_file_and_can_be_replaced(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On an object store the old output is removed before the new files move in; a failure
    there must not lose the new files (the temporary prefix stays, named in the error), and the
    half-moved destination stays one that --overwrite replaces."""
    dest = tmp_path / "out"
    storage.upload_dir(_folder(tmp_path / "v1", {"a.txt": b"one", "old.txt": b"x"}), str(dest))
    v2 = _folder(tmp_path / "v2", {"a.txt": b"two", "b.txt": b"bee", "c/d.txt": b"dee"})
    flaky = _failing_store(fail_on_move=2)
    monkeypatch.setattr(storage, "resolve", lambda text: storage.Location(flaky, str(dest), "mem://out"))
    with pytest.raises(storage.StorageError, match=r"mem://out: publishing .* failed: .*connection reset.*incomplete "
                                                   r"\(no _SUCCESS\), rerun with --overwrite; the files not yet moved "
                                                   r"are under .*\.out\.tmp-"):
        storage.upload_dir(v2, "mem://out", overwrite=True)
    moved = {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    (tmp,) = tmp_path.glob(".out.tmp-*")
    pending = {p.relative_to(tmp).as_posix(): p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
    assert storage.SUCCESS_MARKER not in moved and "old.txt" not in moved
    new = {"a.txt": b"two", "b.txt": b"bee", "c/d.txt": b"dee"}
    assert {k: v for k, v in moved.items() if k != ".simmerge-output.json"} | pending == new  # nothing lost
    assert set(pending) and not set(pending) & set(moved)
    monkeypatch.setattr(storage, "resolve", lambda text: storage.Location(pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()),
                                                                          str(dest).lstrip("/"), "mem://out"))
    storage.upload_dir(v2, "mem://out", overwrite=True)  # the rerun replaces the half-moved folder
    assert {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()
            and p.name != storage.SUCCESS_MARKER} == new
