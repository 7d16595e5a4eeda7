"""Functional pair features: the math, and end to end (CLI, Ray, cache) against direct computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F

from simmerge_ray.cli import main
from simmerge_ray.errors import ConfigError
from simmerge_ray.features.functional import B_TASK_COLUMNS, FUNCTIONAL_COLUMNS, functional_table, with_b_task_columns
from simmerge_ray.features.joined import join_structural
from simmerge_ray.features.functional_math import depth_summary, depth_thirds, kl_per_position, layer_cosines
from simmerge_ray.inference.backend import load_backend
from simmerge_ray.inference.cache import ProbeCache
from simmerge_ray.inference.catalog_probes import ModelProbes
from simmerge_ray.inference.extract import pad_batch, probe_records
from simmerge_ray.inference.settings import ProbeSettings
from benchmarks.synthetic_lm import make_corpus, make_tiny_lm, train_tokenizer
from simmerge_ray.probes.tokenize import load_tokenizer, tokenize_probes, vocabulary_digest
from simmerge_ray.io.checkpoint import Checkpoint
from vocab_fixtures import extended_copy  # beside this file (the tests folder is on sys.path)

MAX_LEN, ATTN_LEN = 10, 5


# ---- pure math --------------------------------------------------------------------------------
def test_kl_matches_torch_kl_div_and_is_asymmetric() -> None:
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(6, 30, generator=g) * 2, dim=-1)
    lq = torch.log_softmax(torch.randn(6, 30, generator=g) * 2, dim=-1)
    want = F.kl_div(lq.double(), lp.double(), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_per_position(lp, lq), want)
    assert not torch.allclose(kl_per_position(lp, lq), kl_per_position(lq, lp))
    assert torch.all(kl_per_position(lp, lp).abs() < 1e-12)


def test_depth_thirds_use_relative_depth() -> None:
    assert depth_thirds([1.0, 2.0, 3.0]) == pytest.approx([1.0, 2.0, 3.0])
    assert depth_thirds([1.0, 3.0, 5.0, 7.0, 9.0, 11.0]) == pytest.approx([2.0, 6.0, 10.0])
    # 2 layers: the middle third overlaps each layer by 1/6
    assert depth_thirds([1.0, 3.0]) == pytest.approx([1.0, 2.0, 3.0])
    assert depth_thirds([4.0]) == pytest.approx([4.0, 4.0, 4.0])
    for depth in (1, 2, 7, 40):
        assert list(depth_summary(np.linspace(0, 1, depth), "f_x")) == ["f_x_mean", "f_x_d0", "f_x_d1", "f_x_d2"]


def test_layer_cosines_flatten_per_layer() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 10.0]]])
    y = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, -1.0], [1.0, -1.0]], [[1.0, 0.0], [10.0, 0.0]]])
    # The third layer's rows differ in norm: flattened, its cosine is 1/101 (the mean of its rows'
    # cosines would be 0.5).
    torch.testing.assert_close(layer_cosines(x, y), torch.tensor([1.0, 0.0, 1 / 101], dtype=torch.float64))


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two 3-layer llamas sharing a tokenizer (b = a + noise), one with another tokenizer, a catalog."""
    root = tmp_path_factory.mktemp("functional")
    tok = train_tokenizer(make_corpus(300, seed=1))
    a = make_tiny_lm(root / "a", tok, num_layers=3, seed=1)
    b = make_tiny_lm(root / "b", tok, num_layers=3, seed=2, base=a, delta_std=0.08)
    other_tok = train_tokenizer(make_corpus(300, seed=1, max_words=4), vocab_size=30)
    make_tiny_lm(root / "odd", other_tok, num_layers=3, seed=4)  # read through catalog_odd.yaml
    texts = make_corpus(7, seed=11, max_words=14)
    (root / "probes.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "other.txt").write_text("\n".join(make_corpus(4, seed=12, max_words=6)) + "\n")
    (root / "catalog.yaml").write_text(
        "models:\n  - {name: a, path: a, task: words}\n  - {name: b, path: b}\n"
        "tasks:\n  words: {probes: probes.jsonl}\n  other: {probes: other.txt}\n")
    (root / "catalog_odd.yaml").write_text(
        "models:\n  - {name: a, path: a}\n  - {name: odd, path: odd}\ntasks:\n  words: {probes: probes.jsonl}\n")
    return {"root": root, "a": a, "b": b, "texts": texts}


def direct_outputs(model_dir: Path, texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Each probe alone through plain transformers: log-probs, mean-pooled blocks, head-mean attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    outs = []
    for text in texts:
        ids = tok(text)["input_ids"][:MAX_LEN]
        with torch.no_grad():
            o = model(torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
        t = min(len(ids), ATTN_LEN)
        outs.append({"logp": torch.log_softmax(o.logits[0], -1),
                     "hidden": [h[0].mean(0) for h in o.hidden_states[1:]],
                     "attn": [x[0, :, :t, :t].mean(0) for x in o.attentions]})
    return outs


def test_cli_features_equal_direct_computation(zoo: dict, ray_cluster, capsys) -> None:
    out = zoo["root"] / "out"
    out.mkdir()
    structural = pl.DataFrame({"a": ["a", "b"], "b": ["b", "a"], "s_weight_cos": [0.9, 0.9], "s_l2": [1.5, 1.5]})
    structural.write_parquet(out / "structural.parquet")
    argv = ["--catalog", str(zoo["root"] / "catalog.yaml"), "--out", str(out),
            "--max-length", str(MAX_LEN), "--attn-max-length", str(ATTN_LEN), "--batch-size", "3"]
    assert main(["features", "functional", *argv]) == 0
    table = pl.read_parquet(out / "functional.parquet")
    assert table.columns == ["a", "b", "task", *FUNCTIONAL_COLUMNS, *B_TASK_COLUMNS]
    assert table.select("a", "b", "task").rows() == [("a", "b", "words"), ("b", "a", "words"),
                                                     ("a", "b", "other"), ("b", "a", "other")]
    # b's own task is a's `words` for rows (b, a, .); b itself is no task's expert: null
    assert table["f_kl_ab_mean_on_b_task"].to_list()[1::2] == [table["f_kl_ab_mean"][1]] * 2
    assert table["f_kl_ab_mean_on_b_task"].to_list()[0::2] == [None, None]
    got = table.filter(pl.col("task") == "words")
    assert table.filter(pl.col("task") == "other")["f_kl_ab_mean"][0] != got["f_kl_ab_mean"][0]

    pa, pb = direct_outputs(zoo["a"], zoo["texts"]), direct_outputs(zoo["b"], zoo["texts"])
    kl_ab = np.concatenate([F.kl_div(y["logp"], x["logp"], log_target=True, reduction="none").sum(-1).numpy()
                            for x, y in zip(pa, pb)])
    kl_ba = np.concatenate([F.kl_div(x["logp"], y["logp"], log_target=True, reduction="none").sum(-1).numpy()
                            for x, y in zip(pa, pb)])
    act = np.mean([[F.cosine_similarity(hx, hy, dim=0).item() for hx, hy in zip(x["hidden"], y["hidden"])]
                   for x, y in zip(pa, pb)], axis=0)
    att = np.mean([[F.cosine_similarity(ax.flatten(), ay.flatten(), dim=0).item() for ax, ay in zip(x["attn"], y["attn"])]
                   for x, y in zip(pa, pb)], axis=0)
    row = got.row(0, named=True)
    want = {"f_kl_ab_mean": kl_ab.mean(), "f_kl_ab_median": np.median(kl_ab), "f_kl_ab_p10": np.quantile(kl_ab, 0.1),
            "f_kl_ab_p90": np.quantile(kl_ab, 0.9), "f_kl_ba_mean": kl_ba.mean(), "f_kl_ba_median": np.median(kl_ba),
            "f_kl_ba_p10": np.quantile(kl_ba, 0.1), "f_kl_ba_p90": np.quantile(kl_ba, 0.9),
            "f_act_cos_mean": act.mean(), "f_act_cos_d0": act[0], "f_act_cos_d1": act[1], "f_act_cos_d2": act[2],
            "f_attn_cos_mean": att.mean(), "f_attn_cos_d0": att[0], "f_attn_cos_d1": att[1], "f_attn_cos_d2": att[2]}
    assert kl_ab.mean() > 1e-4 and act.min() < 0.9999, "the two models really differ"
    for col, value in want.items():
        assert row[col] == pytest.approx(float(value), rel=1e-4, abs=1e-6), col
    swapped = got.row(1, named=True)
    assert swapped["f_kl_ab_mean"] == row["f_kl_ba_mean"] and swapped["f_act_cos_d1"] == row["f_act_cos_d1"]

    features = pl.read_parquet(out / "features.parquet")
    assert features.columns == [*table.columns, "s_weight_cos", "s_l2"] and features.height == 4

    # A second command on the same folder finds every output cached: nothing runs again.
    capsys.readouterr()
    assert main(["probe", *argv]) == 0
    manifest = json.loads((out / "probe_manifest.json").read_text())
    assert [m["probes_run"] for t in ("words", "other") for m in manifest["tasks"][t].values()] == [0, 0, 0, 0]
    assert [m["num_probes"] for m in manifest["tasks"]["words"].values()] == [7, 7]
    assert "words/b: 7 probes, 3 truncated to 10 tokens; ran 0 (0 tokens), 7 from the cache" in capsys.readouterr().out


def test_different_depths_or_widths_are_refused_from_the_configs() -> None:
    """From config.json, before any probe runs (it used to surface after every model had run)."""
    from simmerge_ray.inference.catalog_probes import check_comparable
    from simmerge_ray.probes.errors import VocabularyError

    a = ModelProbes("a", Path("ca"), "v", 10, 10, None, None, (2, 32))  # type: ignore[arg-type]
    for shape, words in (((3, 32), "2 layers of width 32 vs 3 of 32"), ((2, 48), "2 layers of width 32 vs 2 of 48")):
        with pytest.raises(VocabularyError, match=f"models 'a' \\(ca\\) and 'b' \\(cb\\) have {words} \\(config.json\\)"):
            check_comparable(a, ModelProbes("b", Path("cb"), "v", 10, 10, None, None, shape))  # type: ignore[arg-type]


def test_different_vocabularies_are_refused_before_running(zoo: dict, capsys) -> None:
    code = main(["features", "functional", "--catalog", str(zoo["root"] / "catalog_odd.yaml"),
                 "--out", str(zoo["root"] / "out_odd")])
    err = capsys.readouterr().err
    assert code == 2
    assert "models 'a'" in err and "'odd'" in err and "neither vocabulary extends the other" in err
    assert not (zoo["root"] / "out_odd").exists()


def test_an_extended_vocabulary_is_compared_on_the_shared_ids(zoo: dict, ray_cluster, tmp_path: Path) -> None:
    """b with two chat tokens added and its embedding and head padded (as a chat fine-tune
    ships): compared with a on the ids they share, its next-token distributions renormalised
    over them, so its features equal those of b itself (float32 rounding apart)."""
    root = zoo["root"]
    extended_copy(zoo["b"], tmp_path / "b_ext", rows=Checkpoint.open(zoo["b"]).config["vocab_size"] + 6)
    (tmp_path / "a").symlink_to(zoo["a"])
    (tmp_path / "probes.jsonl").symlink_to(root / "probes.jsonl")
    tables = {}
    for b in ("b", "b_ext"):
        if b == "b":
            (tmp_path / "b").symlink_to(zoo["b"])
        (tmp_path / f"{b}.yaml").write_text(
            f"models:\n  - {{name: a, path: a, task: words}}\n  - {{name: b, path: {b}}}\n"
            "tasks:\n  words: {probes: probes.jsonl}\n")
        out = tmp_path / f"out-{b}"
        assert main(["features", "functional", "--catalog", str(tmp_path / f"{b}.yaml"), "--out", str(out),
                     "--max-length", str(MAX_LEN), "--attn-max-length", str(ATTN_LEN)]) == 0
        tables[b] = pl.read_parquet(out / "functional.parquet")
    got, want = tables["b_ext"], tables["b"]
    assert got.height == want.height == 2 and want["f_kl_ab_mean"][0] > 1e-4
    for col in FUNCTIONAL_COLUMNS:
        np.testing.assert_allclose(got[col].to_numpy(), want[col].to_numpy(), rtol=1e-5, atol=1e-7, err_msg=col)


def _in_process_plan(model_dir: Path, name: str, texts: list[str], root: Path) -> ModelProbes:
    """Fill a cache without Ray (same extract path), for shape-only checks."""
    settings = ProbeSettings(max_length=MAX_LEN, attn_max_length=ATTN_LEN)
    tok = load_tokenizer(model_dir)
    probes = tokenize_probes(texts, tok, MAX_LEN)
    cache = ProbeCache(root / name)
    backend = load_backend("hf", model_dir)
    ids, mask = pad_batch([list(p) for p in probes.ids])
    cache.write_chunk(dict(enumerate(probe_records(backend.forward(ids, mask), mask, settings))), "t", 0)
    return ModelProbes(name, model_dir, vocabulary_digest(tok), len(tok.get_vocab()), len(tok), probes, cache)


def test_width_does_not_depend_on_depth(tmp_path: Path) -> None:
    tok = train_tokenizer(make_corpus(100, seed=2))
    texts = make_corpus(3, seed=3)
    widths = []
    for depth in (1, 5):
        a = make_tiny_lm(tmp_path / f"a{depth}", tok, num_layers=depth, hidden_size=16, seed=1)
        b = make_tiny_lm(tmp_path / f"b{depth}", tok, num_layers=depth, hidden_size=16, seed=2)
        plan = {n: _in_process_plan(p, n, texts, tmp_path / f"c{depth}") for n, p in (("a", a), ("b", b))}
        table = functional_table({"t": plan}, {"a": "t", "b": "t"})
        assert table.height == 2 and table.null_count().sum_horizontal().item() == 0
        widths.append(table.columns)
    assert widths[0] == widths[1] == ["a", "b", "task", *FUNCTIONAL_COLUMNS, *B_TASK_COLUMNS]


def test_rows_carry_the_pair_on_the_auxiliary_s_own_task() -> None:
    """(a, b, t) also holds (a, b)'s columns on b's task's probes; null where b has no task."""
    rows = [{"a": a, "b": b, "task": t, **{c: float(i * 100 + j) for j, c in enumerate(FUNCTIONAL_COLUMNS)}}
            for i, (a, b, t) in enumerate((a, b, t) for a in "xyz" for b in "xyz" if a != b for t in ("p", "q"))]
    table = with_b_task_columns(pl.DataFrame(rows), {"x": "p", "y": "q", "z": None})
    assert table.columns == ["a", "b", "task", *FUNCTIONAL_COLUMNS, *B_TASK_COLUMNS] and table.height == 12
    by_key = {(r["a"], r["b"], r["task"]): r for r in table.iter_rows(named=True)}
    for (a, b, t), r in by_key.items():
        own = {"x": "p", "y": "q"}.get(b)
        for c in FUNCTIONAL_COLUMNS:
            want = None if own is None else by_key[(a, b, own)][c]
            assert r[c + "_on_b_task"] == want, (a, b, t, c)
    assert by_key[("x", "y", "p")]["f_kl_ab_mean_on_b_task"] == by_key[("x", "y", "q")]["f_kl_ab_mean"] != \
        by_key[("x", "y", "p")]["f_kl_ab_mean"]


def test_join_refuses_pairs_missing_from_structural(tmp_path: Path) -> None:
    functional = pl.DataFrame({"a": ["x", "y"], "b": ["y", "x"], "task": ["t", "t"], "f_kl_ab_mean": [0.1, 0.2]})
    pl.DataFrame({"a": ["x"], "b": ["y"], "s_l2": [1.0]}).write_parquet(tmp_path / "structural.parquet")
    with pytest.raises(ConfigError, match=r"structural.parquet: no structural row for pair \(y, x\)"):
        join_structural(functional, tmp_path / "structural.parquet")


def test_a_join_gone_stale_is_removed_not_left_beside_the_new_tables(tmp_path: Path) -> None:
    """A feature stage rerun on another catalog leaves tables that no longer join: the old
    features.parquet (which fit and plan read) must go, and only it: a file of the user's of
    that name is left alone."""
    from simmerge_ray.features.joined import write_joined
    from simmerge_ray.io.stage_files import stage_files

    functional = pl.DataFrame({"a": ["x", "y"], "b": ["y", "x"], "task": ["t", "t"], "f_kl_ab_mean": [0.1, 0.2]})
    with stage_files(tmp_path, "functional", ("functional.parquet",), replace=True) as tmp:
        functional.write_parquet(tmp / "functional.parquet")
    with stage_files(tmp_path, "structural", ("structural.parquet",), replace=True) as tmp:
        pl.DataFrame({"a": ["x", "y"], "b": ["y", "x"], "s_l2": [1.0, 1.0]}).write_parquet(tmp / "structural.parquet")
    assert write_joined(tmp_path) == tmp_path / "features.parquet"
    with stage_files(tmp_path, "structural", ("structural.parquet",), replace=True) as tmp:  # another catalog
        pl.DataFrame({"a": ["x", "z"], "b": ["z", "x"], "s_l2": [1.0, 1.0]}).write_parquet(tmp / "structural.parquet")
    with pytest.raises(ConfigError, match=r"no structural row for pair \(x, y\).*features.parquet, which joined the "
                                          r"previous tables, was removed"):
        write_joined(tmp_path)
    assert not (tmp_path / "features.parquet").exists()
    assert (tmp_path / "functional.parquet").exists() and (tmp_path / "structural.parquet").exists()
    (tmp_path / "features.parquet").write_text("the user's")  # not a stage's: never removed
    with pytest.raises(ConfigError, match=r"no structural row") as err:
        write_joined(tmp_path)
    assert "removed" not in str(err.value) and (tmp_path / "features.parquet").read_text() == "the user's"


def test_tables_measured_from_two_versions_of_a_model_are_not_joined(tmp_path: Path) -> None:
    """Structural features rerun after a checkpoint changed used to rejoin the old functional
    columns to the new structural ones, and plan accepted the table (its check read the
    structural record only): each stage records its checkpoints and the join compares them."""
    from simmerge_ray.features.joined import write_joined
    from simmerge_ray.io.stage_files import stage_files

    def record(fingerprint: str) -> str:
        return json.dumps({"fingerprints": {"x": fingerprint, "y": "fy"}, "signatures": {}, "paths": {}})

    with stage_files(tmp_path, "functional", ("functional.parquet", "functional_meta.json"), replace=True) as tmp:
        pl.DataFrame({"a": ["x", "y"], "b": ["y", "x"], "task": ["t", "t"], "f_kl_ab_mean": [0.1, 0.2]}).write_parquet(
            tmp / "functional.parquet")
        (tmp / "functional_meta.json").write_text(record("fx-old"))
    for fingerprint in ("fx-old", "fx-new"):  # the structural stage run before, then after the change
        with stage_files(tmp_path, "structural", ("structural.parquet", "gram_meta.json"), replace=True) as tmp:
            pl.DataFrame({"a": ["x", "y"], "b": ["y", "x"], "s_l2": [1.0, 1.0]}).write_parquet(tmp / "structural.parquet")
            (tmp / "gram_meta.json").write_text(record(fingerprint))
        if fingerprint == "fx-old":
            assert write_joined(tmp_path) == tmp_path / "features.parquet"
    with pytest.raises(ConfigError, match=r"functional_meta.json: model 'x' was measured from another checkpoint than the "
                                          r"one gram_meta.json records .*features.parquet, which joined the previous "
                                          r"tables, was removed"):
        write_joined(tmp_path)
    assert not (tmp_path / "features.parquet").exists()
