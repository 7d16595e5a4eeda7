"""Outputs and configs by path or URI: a local folder here, object storage on a cluster.

`resolve()` turns a destination string into a pyarrow filesystem and a path on it: a plain path
is the local disk; a URI goes to pyarrow's own filesystems (file://, s3://, gs://, hdfs://) and,
for schemes pyarrow lacks (abfs://, az://, ...), to fsspec when its backend is installed. Stages
always write a local folder (atomically, by rename); `upload_dir()` then publishes it: files go
under a temporary sibling prefix, which is moved into place in one rename where the filesystem
can, else file by file (object stores); a `_SUCCESS` manifest is written last either way, so a
reader that finds it knows the folder is complete.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from simmerge_ray.errors import ConfigError, SimMergeError, first_line
from simmerge_ray.io.out_checks import MARKER, check_not_input

SUCCESS_MARKER = "_SUCCESS"


class StorageError(SimMergeError):
    """An upload or download to a path or URI failed; the message names the URI."""


@dataclass(frozen=True)
class Location:
    """Where a destination string points: a filesystem, the path on it, and the original text."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_plain_path(self) -> bool:
        """True for a path without a scheme, which stages can write to directly."""
        return "://" not in self.uri

    @property
    def local_path(self) -> str | None:
        """The path on this machine's disk when the URI is one (file:///abs/path), else None."""
        return self.path if isinstance(self.fs, pafs.LocalFileSystem) else None

    def join(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)


def resolve(dest: str | Path) -> Location:
    """The filesystem and path of `dest`; raises ConfigError for a scheme nothing can handle."""
    text = str(dest)
    if "://" not in text:
        return Location(pafs.LocalFileSystem(), str(Path(text).expanduser().resolve()), text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
        return Location(fs, path.rstrip("/") or "/", text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as arrow_error:
        reason = str(arrow_error)
    except OSError as e:  # a known scheme whose client cannot start here (hdfs:// without libjvm)
        raise ConfigError(f"{text}: cannot open this filesystem ({first_line(e)})") from None
    if text.lower().startswith("file://"):
        # fsspec would read file://rel/x or file://host/x as a path under the current folder.
        raise ConfigError(f"{text}: a file:// URI takes an absolute path, file:///abs/path "
                          f"(pyarrow: {reason})")
    try:
        import fsspec.core

        fsspec_fs, path = fsspec.core.url_to_fs(text)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"{text}: no filesystem for this URI (pyarrow: {reason}; fsspec: {e}); "
                          f"install the fsspec backend of its scheme, e.g. adlfs for abfs://") from None
    return Location(pafs.PyFileSystem(pafs.FSSpecHandler(fsspec_fs)), path.rstrip("/"), text)


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def upload_dir(src: Path, dest: str, *, overwrite: bool = False) -> dict:
    """Publish the finished local folder `src` at `dest`; returns the `_SUCCESS` manifest.

    An existing `dest` is refused unless `overwrite`, and replaced only if simmerge wrote it (it
    holds MARKER or `_SUCCESS`); a local `dest` may not be, hold or lie inside `src`. A failure
    while copying to the temporary prefix removes it and leaves a previous `dest` as it was. On an
    object store, where a folder cannot be renamed, a failure while moving the files into place
    leaves `dest` incomplete (no `_SUCCESS`; its MARKER lists the new files, so `--overwrite`
    replaces it) and the temporary prefix, which holds the rest, in place: the error names both.
    """
    src = Path(src)
    if not src.is_dir():
        raise StorageError(f"{src}: nothing to upload (not a folder)")
    loc = resolve(dest)
    if loc.is_plain_path:
        check_not_input(Path(loc.path), [src])
    if exists(loc):
        if not overwrite:
            raise StorageError(f"{dest}: output already exists (pass --overwrite to replace it)")
        check_replaceable_upload(loc, dest)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    manifest: dict = {"files": {p.relative_to(src).as_posix(): p.stat().st_size for p in files}}
    manifest["bytes"] = sum(manifest["files"].values())
    parent, name = posixpath.split(loc.path)
    tmp = posixpath.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        loc.fs.create_dir(tmp, recursive=True)
        pafs.copy_files(str(src), tmp, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=loc.fs, use_threads=True)
    except OSError as e:
        _delete_quietly(loc.fs, tmp)
        raise StorageError(f"{dest}: upload of {src} failed: {e}") from e
    try:
        _replace(loc.fs, tmp, loc.path, sorted(manifest["files"]))
        _write_json(loc.fs, loc.join(SUCCESS_MARKER), manifest)
    except OSError as e:
        left = "" if loc.fs.get_file_info(tmp).type == pafs.FileType.NotFound else \
            f"; the files not yet moved are under {posixpath.join(posixpath.dirname(dest.rstrip('/')), posixpath.basename(tmp))}"
        raise StorageError(f"{dest}: publishing {src} failed: {e}; {dest} is incomplete (no {SUCCESS_MARKER}), "
                           f"rerun with --overwrite{left}") from e
    return manifest


def _write_json(fs: pafs.FileSystem, path: str, value: dict) -> None:
    with fs.open_output_stream(path) as out:
        out.write(json.dumps(value, indent=1, sort_keys=True).encode())


def _listed_files(loc: Location) -> set[str] | None:
    """The files simmerge says it wrote at `loc`: the `_SUCCESS` manifest's, else MARKER's
    (a local output copied there); None when neither lists any."""
    for name, key in ((SUCCESS_MARKER, "files"), (MARKER, "files")):
        try:
            with loc.fs.open_input_stream(loc.join(name)) as f:
                listed = json.loads(f.read().decode()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(listed, (dict, list)):
            return {f for f in listed if not f.endswith("/")}
    return None


def check_replaceable_upload(loc: Location, dest: str) -> None:
    """--overwrite replaces a destination only if simmerge wrote it and it holds nothing else."""
    listed = _listed_files(loc)
    if listed is None:
        raise StorageError(f"{dest}: not written by simmerge (no {MARKER} or {SUCCESS_MARKER} listing its files); "
                           f"--overwrite replaces only simmerge's outputs")
    found = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    present = sorted(posixpath.relpath(i.path, loc.path) for i in found if i.type == pafs.FileType.File)
    stranger = next((f for f in present if f not in listed and f not in (MARKER, SUCCESS_MARKER)), None)
    if stranger is not None:
        raise StorageError(f"{dest}: holds {stranger}, which simmerge did not write there; --overwrite would delete "
                           f"it: move it out, or choose another destination")


def _replace(fs: pafs.FileSystem, tmp: str, final: str, files: list[str]) -> None:
    """Put folder `tmp` (holding `files`) at `final`: one rename where supported (a previous
    `final` is put back if it fails), else a move of each file, after a MARKER listing `files`
    (and the old `final`'s removal) makes a half-moved `final` one that --overwrite replaces."""
    had_old = fs.get_file_info(final).type != pafs.FileType.NotFound
    if isinstance(fs, pafs.LocalFileSystem):
        trash = f"{final}.old-{uuid.uuid4().hex[:8]}"
        if had_old:
            fs.move(final, trash)
        try:
            fs.move(tmp, final)
        except OSError:
            if had_old:
                fs.move(trash, final)
            raise
        if had_old:
            fs.delete_dir(trash)
        return
    if had_old:
        fs.delete_dir(final)
    fs.create_dir(final, recursive=True)
    if MARKER not in files:
        _write_json(fs, posixpath.join(final, MARKER), {"files": files})
    move_files(fs, tmp, final)
    if MARKER not in files:
        fs.delete_file(posixpath.join(final, MARKER))


def move_files(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Move every file under `src` to the same relative path under `dst`, then drop `src`.

    For object stores, where a folder is only a key prefix and cannot be renamed at once; a
    single-file move there is a server-side copy.
    """
    infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
    fs.create_dir(dst, recursive=True)
    for info in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        target = posixpath.join(dst, posixpath.relpath(info.path, src))
        fs.create_dir(posixpath.dirname(target), recursive=True)
        fs.move(info.path, target)
    _delete_quietly(fs, src)


def _delete_quietly(fs: pafs.FileSystem, path: str) -> None:
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)
    except OSError:
        pass


def download_file(uri: str, local_dir: Path) -> Path:
    """A local copy of the file at `uri` (a plain path is returned as is)."""
    loc = resolve(uri)
    if loc.is_plain_path:
        return Path(loc.path)
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: no such file")
    local = Path(local_dir) / posixpath.basename(loc.path)
    local.parent.mkdir(parents=True, exist_ok=True)
    with loc.fs.open_input_stream(loc.path) as inp, open(local, "wb") as out:
        while chunk := inp.read(16 * 1024 * 1024):
            out.write(chunk)
    return local
