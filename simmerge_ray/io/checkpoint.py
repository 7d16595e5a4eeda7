"""Open a Hugging Face checkpoint folder without loading it.

A `Checkpoint` is an index (tensor name -> shard file, byte range, dtype, shape) built from the
safetensors headers alone; tensors are read one at a time on demand. Nothing here holds more
than the tensor being read, so a 111B-parameter folder opens in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simmerge_ray.lazy_torch import torch

from simmerge_ray.errors import CheckpointError
from simmerge_ray.io.checkpoint_files import (ADAPTER_CONFIG, INDEX_FILE, PICKLE_FILES, SINGLE_FILE, read_config,
                                              refuse_shard_file, weight_files)
from simmerge_ray.io.digest_cache import file_digest
from simmerge_ray.io.safetensors_format import DTYPE_BYTES, DTYPE_TO_TORCH, TORCH_TO_DTYPE, TensorEntry, read_header
from simmerge_ray.io.side_files import has_loadable_tokenizer

# A block's tensors: `model.layers.7.`, and GPT-2's and BLOOM's `h.7.` as published (no prefix). A
# name that starts with `layers.` is not one: phi-1's mixformer stores its embedding and head as
# `layers.0.` and `layers.N+1.` around its blocks, and is merged as tensors outside blocks.
_LAYER_RE = re.compile(r"(?:^h|\.(?:layers|h|blocks|layer))\.(\d+)\.")

# The attribute that holds the base model in each model_type's causal LM (transformers'
# base_model_prefix; tests/test_checkpoint_io.py checks them against it). Some checkpoints store
# a causal LM's tensors as its base model names them (`h.0.attn.c_attn.weight`: GPT-2 and BLOOM
# as their authors published them), fine-tunes saved from the full model with the prefix
# (`transformer.h.0...`); read with it, as mergekit's aliases read them, the two merge. Only the
# model types listed: elsewhere a missing prefix may be the architecture's own naming.
BASE_MODEL_PREFIX: dict[str, str] = {
    **dict.fromkeys(("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                     "phi", "phi3", "stablelm", "starcoder2", "olmo", "olmo2", "cohere", "granite", "opt"), "model"),
    **dict.fromkeys(("gpt2", "bloom", "falcon", "gpt_bigcode", "gpt_neo", "gptj", "codegen", "mpt"), "transformer"),
    "gpt_neox": "gpt_neox",
}
HEAD_TENSORS = ("lm_head.", "embed_out.", "score.")  # outside the base model: never prefixed


def layer_index(tensor_name: str) -> int | None:
    """Transformer block index of a tensor (`model.layers.7.mlp...` -> 7), None outside blocks."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def with_base_prefix(entries: dict[str, TensorEntry], config: dict) -> dict[str, TensorEntry]:
    """`entries` under the names the full causal LM gives them: its base model's prefix added where
    a checkpoint of a BASE_MODEL_PREFIX type whose config names a model with a head (`...ForCausalLM`,
    `GPT2LMHeadModel`) stores none of its tensors under it. Each entry keeps its stored name."""
    prefix = BASE_MODEL_PREFIX.get(config.get("model_type", ""))
    architectures = config.get("architectures") or [""]
    head = isinstance(architectures, list) and any(k in str(architectures[0]) for k in ("For", "Head"))
    if prefix is None or not head or any(n.startswith(f"{prefix}.") for n in entries):
        return entries
    return {n if n.startswith(HEAD_TENSORS) else f"{prefix}.{n}": e for n, e in entries.items()}


def with_layer_index(tensor_name: str, index: int) -> str:
    """The same tensor in block `index` (`model.layers.7.mlp...`, 2 -> `model.layers.2.mlp...`)."""
    m = _LAYER_RE.search(tensor_name)
    assert m is not None, tensor_name
    return f"{tensor_name[:m.start(1)]}{index}{tensor_name[m.end(1):]}"


# Output heads that a checkpoint with tie_word_embeddings stores only as its input embedding, and
# where each architecture keeps that embedding: llama/mistral/qwen2/gemma, GPT-2, BLOOM/Falcon,
# OPT; GPT-NeoX's embed_out.
TIED_HEADS: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.word_embeddings.weight",
                       "model.decoder.embed_tokens.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
}


def config_ties(config: dict) -> bool:
    """Whether a config.json ties the output head to the input embedding: its
    tie_word_embeddings, and where the key is absent, transformers' own default, which is to tie
    (it writes the key only where it differs; GPT-2's configs leave it out). No config: untied."""
    return bool(config.get("tie_word_embeddings", True)) if config else False


def merged_head(ckpts: Iterable[Checkpoint]) -> str | None:
    """The head some of `ckpts` tie to their embedding while another stores it, or None: such a
    head is merged as a tensor of its own (mergekit's tied_names), a tied model's read from its
    embedding."""
    ckpts = list(ckpts)
    return next((h for h in TIED_HEADS if any(ck.tied_head == h for ck in ckpts)
                 and any(h in ck.entries for ck in ckpts)), None)


def folder_tokenizer_json(folder: Path) -> bytes | None:
    """`folder`'s tokenizer.json, or None without a readable one (no tokenizer to compare)."""
    f = folder / "tokenizer.json"
    try:
        return f.read_bytes() if f.is_file() else None
    except OSError:
        return None


@dataclass
class Checkpoint:
    """A checkpoint folder's tensor index plus its config; reads tensors lazily."""

    path: Path
    config: dict
    entries: dict[str, TensorEntry]
    header_bytes: dict[str, bytes] = field(repr=False, default_factory=dict)
    _pickled: dict[str, torch.Tensor] | None = field(repr=False, default=None)
    _maps: dict[Path, mmap.mmap] = field(repr=False, default_factory=dict, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": {}}  # mappings belong to one process

    # ---- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, *, allow_pickle: bool = False) -> "Checkpoint":
        """Index a checkpoint folder (or a lone .safetensors file) from its headers only."""
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: checkpoint not found")
        if path.is_file():
            if path.suffix != ".safetensors":
                raise CheckpointError(f"{path}: expected a checkpoint folder or a .safetensors file")
            refuse_shard_file(path)
            entries, _, raw = read_header(path)
            return cls(path, {}, entries, {path.name: raw})
        if (path / ADAPTER_CONFIG).exists() and not ((path / INDEX_FILE).exists() or (path / SINGLE_FILE).exists()):
            raise CheckpointError(f"{path}: a PEFT adapter ({ADAPTER_CONFIG}), not a model: merge it into its base "
                                  f"first (peft's merge_and_unload) and give the merged folder")
        config = read_config(path)
        files = weight_files(path)
        if files is None:
            if any((path / name).exists() for name in PICKLE_FILES) or list(path.glob("pytorch_model*.bin")):
                if not allow_pickle:
                    raise CheckpointError(
                        f"{path}: holds only a pickle-based .bin checkpoint, which is not read here; "
                        f"convert it once to safetensors with `simmerge convert {path} --out DIR "
                        f"--allow-pickle` (only for a file you trust)"
                    )
                return cls._from_pickle(path, config)
            raise CheckpointError(f"{path}: no model.safetensors, shards or index found")
        entries: dict[str, TensorEntry] = {}
        headers: dict[str, bytes] = {}
        for fname, expected in files.items():
            shard = path / fname
            if not shard.exists():
                raise CheckpointError(f"{path}: shard {fname} listed in {INDEX_FILE} is missing")
            found, _, raw = read_header(shard)
            headers[fname] = raw
            if expected is not None:
                absent = sorted(expected - found.keys())
                if absent:
                    raise CheckpointError(
                        f"{path}: tensor {absent[0]!r} is listed in {INDEX_FILE} under {fname} "
                        f"but absent from that shard ({len(absent)} missing)"
                    )
            for name, entry in found.items():
                if name in entries:
                    raise CheckpointError(f"{path}: tensor {name!r} appears in two shards")
                entries[name] = entry
        return cls(path, config, with_base_prefix(entries, config), headers)

    @classmethod
    def _from_pickle(cls, path: Path, config: dict) -> "Checkpoint":
        """Tensors only, from the index's shards when there is one (see pickle_state)."""
        from simmerge_ray.io.pickle_state import read_pickle_state

        state, where = read_pickle_state(path)
        entries = {
            name: TensorEntry(name, TORCH_TO_DTYPE[t.dtype], tuple(t.shape), path / where[name], 0, 0)
            for name, t in state.items()
        }
        return cls(path, config, with_base_prefix(entries, config), {}, state)

    # ---- metadata ------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_folder(self) -> bool:
        """A checkpoint folder (config, tokenizer beside the weights), not a lone .safetensors file."""
        return self.path.is_dir()

    def tokenizer_json(self) -> bytes | None:
        """The tokenizer.json a merge reading this checkpoint sees (its folder's; None without one):
        a stand-in for an output not written yet gives the one that output will get."""
        return folder_tokenizer_json(self.path)

    def tokenizer_source(self) -> Any:
        """What a merge reading this checkpoint takes its tokenizer from: its folder when that holds
        one transformers loads alone, else None; a stand-in for an output not written yet gives
        the tokenizer that output will get (a built one, a folder, or None)."""
        return self.path if has_loadable_tokenizer(self.path) else None

    @property
    def tensor_names(self) -> list[str]:
        return list(self.entries)

    @property
    def num_layers(self) -> int:
        key = "num_hidden_layers" if self.config.get("num_hidden_layers") else "n_layer"
        n = self.config.get(key)
        if n:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise CheckpointError(f"{self.path / 'config.json'}: {key}: expected a whole number, got {n!r}")
            return n
        idx = [layer_index(k) for k in self.entries]
        found = [i for i in idx if i is not None]
        return max(found) + 1 if found else 0

    @property
    def tied_embeddings(self) -> bool:
        """True when the output head shares the input embedding (and so is absent on disk where
        the weights show it: tied_head)."""
        return config_ties(self.config)

    @property
    def tied_head(self) -> str | None:
        """The head this checkpoint ties to its embedding and so does not store, or None."""
        if not self.tied_embeddings:
            return None
        return next((h for h, embs in TIED_HEADS.items()
                     if h not in self.entries and any(e in self.entries for e in embs)), None)

    def stored_name(self, name: str) -> str:
        """Where tensor `name` is stored: the embedding for the head this checkpoint ties (as
        mergekit's `tied_names` reads it), else `name` itself."""
        if name != self.tied_head:
            return name
        return next(e for e in TIED_HEADS[name] if e in self.entries)

    def stored_entry(self, name: str) -> TensorEntry:
        """The entry tensor `name` is read from (a tied head's: its embedding's)."""
        return self.entries[self.stored_name(name)]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _entry(self, name: str) -> TensorEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def _check_range(self, entry: TensorEntry, start: int, count: int) -> None:
        if not 0 <= start <= start + count <= entry.numel:
            raise CheckpointError(f"{self.path}: range [{start}, {start + count}) outside tensor {entry.name!r}")

    # ---- reading -------------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        """Read one tensor in its stored dtype.

        Reads the byte range the (validated) header declares with a positioned read into a
        fresh tensor: one copy from the page cache, and no mapping that would leave the
        whole file's pages counted against this process.
        """
        entry = self._entry(name)
        if self._pickled is not None:
            return self._pickled[entry.name]
        return self.read_range(name, 0, entry.numel).reshape(entry.shape)

    @property
    def is_safetensors(self) -> bool:
        """Stored as safetensors (read by byte range), not as a pickled state dict."""
        return self._pickled is None

    def read_range(self, name: str, start: int, count: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor, in its stored dtype.

        Lets a consumer stream a tensor far larger than memory; `out` (a flat buffer of the
        stored dtype) is filled and returned instead of allocating.
        """
        entry = self._entry(name)
        if self._pickled is not None:
            return self._pickled[entry.name].reshape(-1)[start:start + count]
        self._check_range(entry, start, count)
        if out is None:
            out = torch.empty(count, dtype=DTYPE_TO_TORCH[entry.dtype])
        out = out[:count]
        if count:
            self.read_into(name, start, count, memoryview(out.view(torch.uint8).numpy()))
        return out

    def read_into(self, name: str, start: int, count: int, view: memoryview) -> None:
        """Elements [start, start + count) of the flattened tensor's stored bytes into `view` (a
        writable byte buffer of at least that size): read_range without torch."""
        entry = self._entry(name)
        self._check_range(entry, start, count)
        size = DTYPE_BYTES[entry.dtype]
        offset, want, got = entry.begin + start * size, count * size, 0
        fd = os.open(entry.file, os.O_RDONLY)
        try:
            while got < want:
                n = os.preadv(fd, [view[got:want]], offset + got)
                if n <= 0:
                    raise CheckpointError(f"{entry.file}: truncated while reading tensor {name!r}")
                got += n
        except OSError as e:
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {e}") from None
        finally:
            os.close(fd)

    def map_range(self, name: str, start: int, count: int) -> torch.Tensor:
        """Elements [start, start + count) of the flattened tensor as a zero-copy view of the
        memory-mapped shard (copy-on-write, never written back). For passes that only read:
        no copy out of the page cache. Pair with `release_range` so that pages already
        consumed stop counting against this process."""
        entry = self._entry(name)
        if self._pickled is not None:
            return self._pickled[entry.name].reshape(-1)[start:start + count]
        self._check_range(entry, start, count)
        size = DTYPE_BYTES[entry.dtype]
        if count == 0:
            return torch.empty(0, dtype=DTYPE_TO_TORCH[entry.dtype])
        return torch.frombuffer(self._map(entry), dtype=DTYPE_TO_TORCH[entry.dtype], count=count,
                                offset=entry.begin + start * size)

    def release_range(self, name: str, start: int, count: int) -> None:
        """Drop this process's mapping of a consumed range (the page cache keeps the pages), so a
        streaming pass holds a few chunks of mapped memory, not whole files. The page where the
        range ends is kept (the next range may still need it); the page where it starts is
        dropped, which at worst costs one re-fault."""
        entry = self._entry(name)
        m = self._maps.get(entry.file)
        if m is None or count <= 0:
            return
        size = DTYPE_BYTES[entry.dtype]
        lo = (entry.begin + start * size) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = (entry.begin + (start + count) * size) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _map(self, entry: TensorEntry) -> mmap.mmap:
        m = self._maps.get(entry.file)
        if m is None:
            try:
                with open(entry.file, "rb") as f:
                    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{entry.file}: cannot map tensor {entry.name!r}: {e}") from None
            if len(m) < entry.end:
                raise CheckpointError(f"{entry.file}: truncated: tensor {entry.name!r} ends at byte {entry.end}, "
                                      f"the file has {len(m)}")
            m.madvise(mmap.MADV_SEQUENTIAL)
            self._maps[entry.file] = m
        return m

    def read_f32(self, name: str) -> torch.Tensor:
        return self.read(name).to(torch.float32)

    # ---- identity ------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Content fingerprint: headers plus file digests (cached by path, size and mtime).

        Two folders with the same tensors in the same shards get the same fingerprint
        wherever they live, so caches keyed by it survive moves and copies.
        """
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(self.config, sort_keys=True).encode())
        files = sorted({e.file for e in self.entries.values()})
        for f in files:
            h.update(f.name.encode())
            h.update(self.header_bytes.get(f.name, b""))
            h.update(file_digest(f).encode())
        return h.hexdigest()

    def stat_signature(self) -> str:
        """Where the files are, their inodes, sizes, modification and change times: equal to a
        recorded one, the files are the ones a fingerprint was taken of, without reading them (a
        fingerprint of a 111B checkpoint reads 222 GB when its digests are not cached on this
        node). The inode and ctime as file_digest keys them: fine-tunes of one architecture have
        one size, and `cp -p` or an unpacked archive keeps the old mtime, not the ctime."""
        h = hashlib.blake2b(digest_size=16)
        for f in sorted({e.file for e in self.entries.values()}):
            st = Path(f).resolve().stat()
            h.update(f"{Path(f).resolve()}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}\n".encode())
        h.update(json.dumps(self.config, sort_keys=True).encode())
        return h.hexdigest()
