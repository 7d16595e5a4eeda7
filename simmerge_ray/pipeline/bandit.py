"""The bandit stage: the online bandit replayed on held-out pairs, against the offline selector."""

from __future__ import annotations

import json

from simmerge_ray.pipeline.layout import RunLayout

ADD_AT = 60  # the round after which the second replay adds an operator


def replay_bandit(run: RunLayout, *, rounds: int, repeats: int, seed: int) -> None:
    """bandit/regret.json and regret.png. The selector used as encoder and greedy baseline is
    fitted on the training pairs only, so that the held-out replay never saw its pairs."""
    import polars as pl

    from simmerge_ray.bandit.simulate import SimSettings, replay_adding, replay_data, split_by_pair, write_report
    from simmerge_ray.selector.data import load_pair_data
    from simmerge_ray.selector.encoder import SelectorEncoder
    from simmerge_ray.selector.model import Selector, SelectorConfig
    from simmerge_ray.selector.train import fit_selector

    feats = pl.read_parquet(run.feature_table)
    labels = pl.read_parquet(run.pair_labels)
    pairs = load_pair_data(str(run.features), str(run.pair_labels))
    usable = pl.DataFrame({"task": pairs.tasks, "expert": pairs.experts, "aux": pairs.auxes})
    labels = labels.join(usable, on=["task", "expert", "aux"], how="semi")  # rows the selector can use
    # An undefined feature stays NaN: the encoder (the selector fitted below) imputes its own
    # training mean there, as it does when it serves.
    data = replay_data(labels, feats, pairs.feature_names)
    train, test = split_by_pair(data, 0.3, seed)
    train_keys = set(train.keys)
    rows = [i for i, k in enumerate(zip(pairs.tasks, pairs.experts, pairs.auxes)) if k in train_keys]
    cfg = json.loads((run.selector / "selector.json").read_text())["config"]
    sel: Selector = fit_selector(pairs.subset(rows), SelectorConfig.from_dict({**cfg, "task_encoding": False}))
    settings = SimSettings(rounds=rounds, repeats=repeats, seed=seed)
    every, added = replay_adding(train, test, settings, add_at=ADD_AT, encoder=SelectorEncoder(sel),
                                 offline_predict=sel.predict)
    results = {"main": every, f"add_{added['new_operator']}_at_{ADD_AT}": added}
    run.bandit.mkdir(exist_ok=True)
    write_report(results, run.bandit)
