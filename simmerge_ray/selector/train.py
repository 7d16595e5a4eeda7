"""Fitting the selector: plain torch, no Ray (Ray Train and Tune wrap these functions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from simmerge_ray.selector.data import PairData
from simmerge_ray.selector.model import Selector, SelectorConfig, build_net


def new_selector(data: PairData, cfg: SelectorConfig) -> Selector:
    """An untrained selector whose standardisation statistics come from `data`."""
    # NaN marks an undefined feature of a row: statistics ignore it, `design` imputes the mean.
    mean = np.nan_to_num(np.nanmean(data.x, axis=0))
    std = np.nan_to_num(np.nanstd(data.x, axis=0))
    scale = np.where(std > 1e-12, std, 1.0)
    tasks = sorted(set(data.tasks)) if cfg.task_encoding else []
    torch.manual_seed(cfg.seed)
    d_in = data.x.shape[1] + len(tasks)
    net = build_net(d_in, len(data.operators), cfg)
    return Selector(list(data.feature_names), list(data.operators), tasks, mean, scale, cfg, net)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny full-batch MLPs run fastest on one thread; more only adds synchronisation cost
    (and collapses on a loaded machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_epochs(sel: Selector, data: PairData, epochs: int,
                 optimizer: torch.optim.Optimizer | None = None) -> torch.optim.Optimizer:
    """Full-batch AdamW on the mean squared error of every operator's utility.

    Full information labels make this a regression on all k outputs at once; the argmax of
    the fitted utilities is the selection. An ensemble's members each fit the labels (the mean
    of their errors: with disjoint weights and AdamW's per-weight steps, as if trained apart).
    Returns the optimizer so training can resume.
    """
    x = sel.design(data.x, data.tasks)
    y = torch.as_tensor(data.y, dtype=torch.float32)
    # foreach: the same arithmetic as the per-tensor loop (bit-identical weights), in fewer
    # dispatches, which is most of a tiny full-batch step's time.
    opt = optimizer or torch.optim.AdamW(sel.net.parameters(), lr=sel.config.lr,
                                         weight_decay=sel.config.weight_decay, foreach=True)
    sel.net.train()
    with one_thread():
        for _ in range(epochs):
            opt.zero_grad()
            out = sel.net(x)  # [n, k], or [members, n, k] for an ensemble in training mode
            loss = torch.nn.functional.mse_loss(out, y.expand_as(out))
            loss.backward()
            opt.step()
    sel.net.eval()
    return opt


def fit_selector(data: PairData, cfg: SelectorConfig) -> Selector:
    sel = new_selector(data, cfg)
    train_epochs(sel, data, cfg.epochs)
    return sel


def chosen_utility(sel: Selector, data: PairData) -> float:
    """Mean realised utility of the operators the selector picks (higher is better)."""
    pick = sel.predict(data.x, data.tasks).argmax(axis=1)
    return float(data.y[np.arange(len(pick)), pick].mean())
