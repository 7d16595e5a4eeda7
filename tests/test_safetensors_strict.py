"""The strict safetensors reader: each hostile header is a CheckpointError naming the file and
the tensor, and a seeded fuzzer checks thousands of random header mutations: the reader either
refuses the file with a CheckpointError, or accepts exactly what the safetensors library
accepts and reads the same values (so nothing it lets through is misread)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from simmerge_ray.cli import main as cli_main
from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.checkpoint import Checkpoint

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "b.weight": torch.linspace(-1, 1, 10).to(torch.bfloat16).reshape(2, 5),
    "c.bias": torch.arange(3, dtype=torch.int64),
    "d.empty": torch.zeros(0, 4, dtype=torch.float16),
}


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: object, body: bytes) -> bytes:
    """The file bytes; a string "DEEPn" becomes n nested JSON arrays (too deep to build here)."""
    raw = re.sub(rb'"DEEP(\d+)"', lambda m: b"[" * int(m[1]) + b"]" * int(m[1]), json.dumps(header).encode())
    return struct.pack("<Q", len(raw)) + raw + body


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file(TENSORS, path, metadata={"format": "pt"})
    return path.read_bytes()


def _write(tmp_path: Path, header: object, body: bytes) -> Path:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_join(header, body))
    return path


def _entry(header: dict, name: str) -> dict:
    return header[name]


@pytest.mark.parametrize("mutate, pattern", [
    (lambda h: _entry(h, "a.weight").update(dtype="F99"), r"tensor 'a\.weight': unknown dtype 'F99'"),
    (lambda h: _entry(h, "a.weight").update(dtype=7), r"tensor 'a\.weight': unknown dtype 7"),
    (lambda h: _entry(h, "c.bias").update(data_offsets=["0", "24"]), r"tensor 'c\.bias': data_offsets \['0', '24'\]"),
    (lambda h: _entry(h, "c.bias").update(data_offsets=[1.0, 25]), r"tensor 'c\.bias': data_offsets"),
    (lambda h: _entry(h, "c.bias").update(data_offsets=[True, 24]), r"tensor 'c\.bias': data_offsets"),
    (lambda h: _entry(h, "a.weight").update(data_offsets=[48, 0]), r"tensor 'a\.weight': data_offsets \[48, 0\]"),
    (lambda h: _entry(h, "a.weight").update(data_offsets=[-8, 40]), r"tensor 'a\.weight': data_offsets \[-8, 40\]"),
    (lambda h: _entry(h, "a.weight").update(shape=[3, -4]), r"tensor 'a\.weight': shape \[3, -4\]"),
    (lambda h: _entry(h, "a.weight").update(shape=[4, 4]), r"tensor 'a\.weight': declares 48 bytes for shape \[4, 4\]"),
    (lambda h: _entry(h, "a.weight").pop("dtype"), r"tensor 'a\.weight': corrupt header entry"),
    (lambda h: h.update({"__metadata__": {"format": {"nested": 1}}}), r"corrupt safetensors header \(__metadata__ must map strings to strings"),
], ids=["unknown-dtype", "dtype-not-string", "string-offsets", "float-offsets", "bool-offsets", "begin-after-end",
        "negative-offset", "negative-dim", "size-mismatch", "missing-dtype", "metadata-nested"])
def test_bad_entries_are_named(tmp_path: Path, valid: bytes, mutate, pattern: str) -> None:
    header, body = _split(valid)
    mutate(header)
    path = _write(tmp_path, header, body)
    with pytest.raises(CheckpointError, match=rf"{path}: {pattern}"):
        Checkpoint.open(path)


def _shift(header: dict, name: str, delta: int) -> None:
    b, e = header[name]["data_offsets"]
    header[name]["data_offsets"] = [b + delta, e + delta]


def test_overlapping_ranges_holes_and_excess_are_refused(tmp_path: Path, valid: bytes) -> None:
    header, body = _split(valid)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    second = order[1]
    over = json.loads(json.dumps(header))
    _shift(over, second, -4)  # starts inside the previous tensor
    with pytest.raises(CheckpointError, match=rf"tensor '{second}' overlaps tensor '{order[0]}'"):
        Checkpoint.open(_write(tmp_path, over, body))
    hole = json.loads(json.dumps(header))
    for name in order[1:]:
        _shift(hole, name, 8)
    with pytest.raises(CheckpointError, match=rf"tensor '{second}' starts at byte \d+, leaving a hole"):
        Checkpoint.open(_write(tmp_path, hole, body + bytes(8)))
    with pytest.raises(CheckpointError, match=r"8 bytes after the last tensor .* belong to no tensor"):
        Checkpoint.open(_write(tmp_path, header, body + bytes(8)))


def test_deep_nesting_and_oversized_headers_are_refused(tmp_path: Path, valid: bytes) -> None:
    header, body = _split(valid)
    path = tmp_path / "deep.safetensors"
    raw = b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt safetensors header"):
        Checkpoint.open(path)
    path.write_bytes(struct.pack("<Q", 200 * 1024 * 1024) + b"{" + bytes(64))
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt or truncated safetensors header"):
        Checkpoint.open(path)
    path.write_bytes(struct.pack("<Q", 4) + b'  {}')
    with pytest.raises(CheckpointError, match=r"does not start with '\{'"):
        Checkpoint.open(path)


def test_index_may_not_point_outside_the_model_folder(tmp_path: Path, valid: bytes) -> None:
    secret = tmp_path / "other" / "model.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(valid)
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "model-1.safetensors").write_bytes(valid)
    for target in ("../../other/model.safetensors", str(secret), "", "sub\\..\\..\\x.safetensors"):
        (model / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {"a.weight": target, "b.weight": "model-1.safetensors"}}))
        with pytest.raises(CheckpointError, match=r"tensor 'a\.weight' is mapped to .*not a file name inside"):
            Checkpoint.open(model)


def _merge_config(tmp_path: Path, m1: Path, m2: Path) -> Path:
    cfg = tmp_path / "merge.yaml"
    cfg.write_text(json.dumps({"merge_method": "linear", "models": [
        {"model": str(m1), "parameters": {"weight": 0.5}}, {"model": str(m2), "parameters": {"weight": 0.5}}]}))
    return cfg


def _valid_and_mutated(tmp_path: Path, valid: bytes, mutate) -> tuple[Path, Path]:
    """m1 holds the valid file, m2 the same bytes with `mutate(header)` applied to its header."""
    m1, m2 = tmp_path / "m1", tmp_path / "m2"
    for m in (m1, m2):
        m.mkdir()
    (m1 / "model.safetensors").write_bytes(valid)
    header, body = _split(valid)
    mutate(header)
    (m2 / "model.safetensors").write_bytes(_join(header, body))
    return m1, m2


def test_a_tensor_relabelled_as_integer_is_not_merged_as_float(tmp_path: Path, valid: bytes, capsys) -> None:
    def relabel(header: dict) -> None:
        header["b.weight"]["dtype"] = "I16"  # same size as BF16: only the label changed

    m1, m2 = _valid_and_mutated(tmp_path, valid, relabel)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.safetensors")}
    out = tmp_path / "out"
    assert cli_main(["merge", str(_merge_config(tmp_path, m1, m2)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tensor 'b.weight' is I16" in err and "has BF16" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*.safetensors")} == before


def test_overlapping_offsets_are_never_merged(tmp_path: Path, valid: bytes, capsys) -> None:
    header, _ = _split(valid)
    order = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    m1, m2 = _valid_and_mutated(tmp_path, valid, lambda h: _shift(h, order[1], -2))
    assert cli_main(["merge", str(_merge_config(tmp_path, m1, m2)), "--out", str(tmp_path / "out")]) == 2
    assert f"{m2 / 'model.safetensors'}: tensor '{order[1]}' overlaps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---- fuzzing ------------------------------------------------------------------------------------

JUNK = [None, True, -1, 0, 1, 3, 7, 2**63, 2**64, 1.5, "", "x", "F32", [], [1], [0, 0], [1, 2, 3], {}, {"a": 1}]
DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U16", "C64", "f32"]


def _mutate_header(rng: random.Random, header: dict) -> object:
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.randrange(12)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES + JUNK)
    elif kind == 1:
        entry["shape"] = rng.choice([[rng.randrange(-2, 9) for _ in range(rng.randrange(4))], rng.choice(JUNK)])
    elif kind == 2:
        i = rng.randrange(2)
        entry["data_offsets"][i] += rng.choice([-64, -9, -8, -2, -1, 1, 2, 8, 64, 10**6])
    elif kind == 3:
        delta = rng.choice([-24, -8, -1, 1, 8])
        entry["data_offsets"] = [o + delta for o in entry["data_offsets"]]
    elif kind == 4:
        entry["data_offsets"] = rng.choice(JUNK)
    elif kind == 5:
        entry.pop(rng.choice(["dtype", "shape", "data_offsets"]))
    elif kind == 6:
        header[name] = rng.choice(JUNK)
    elif kind == 7:
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    elif kind == 8:
        header["__metadata__"] = rng.choice([{"format": rng.choice(JUNK)}, rng.choice(JUNK), {"k": "v"}])
    elif kind == 9:
        header[name + ".nested"] = f"DEEP{rng.choice([1, 10, 5000])}"  # spliced in as raw JSON by _join
    elif kind == 10:
        entry["data_offsets"] = [entry["data_offsets"][0]]
    else:
        return rng.choice(JUNK)  # the whole header replaced
    return header


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    (n,) = struct.unpack("<Q", data[:8])
    kind = rng.randrange(4)
    if kind == 0:  # the declared header length
        return struct.pack("<Q", max(0, n + rng.choice([-9, -1, 1, 7, 8, 2**40]))) + data[8:]
    if kind == 1:  # a flipped byte in the header
        buf = bytearray(data)
        buf[8 + rng.randrange(n)] ^= 1 << rng.randrange(8)
        return bytes(buf)
    if kind == 2:  # truncated
        return data[:rng.randrange(len(data))]
    return data + bytes(rng.choice([1, 8, 100]))  # trailing bytes


def _library_read(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:  # the library's own error types: a rejection
        return None


def test_fuzzed_headers_are_refused_or_read_exactly_as_the_library_does(tmp_path: Path, valid: bytes) -> None:
    rng = random.Random(21)
    header, body = _split(valid)
    path = tmp_path / "fuzz.safetensors"
    t0 = time.perf_counter()
    outcomes = {"refused": 0, "accepted": 0}
    for i in range(2500):
        mutated = json.loads(json.dumps(header))
        if i % 3 == 2:
            data = _mutate_bytes(rng, _join(mutated, body))
        else:
            data = _join(_mutate_header(rng, mutated), body)
        path.write_bytes(data)
        try:
            ck = Checkpoint.open(path)
            ours = {name: ck.read(name) for name in ck.entries}
        except CheckpointError as e:
            assert str(path) in str(e), f"mutation {i}: message does not name the file: {e}"
            outcomes["refused"] += 1
            continue
        theirs = _library_read(path)
        assert theirs is not None, f"mutation {i}: accepted a file the safetensors library refuses"
        assert ours.keys() == theirs.keys()
        for name, t in ours.items():
            assert t.dtype == theirs[name].dtype and torch.equal(t, theirs[name]), f"mutation {i}: {name}"
        outcomes["accepted"] += 1
    assert outcomes["refused"] > 1500 and outcomes["accepted"] > 20, outcomes  # both paths exercised
    assert time.perf_counter() - t0 < 30
