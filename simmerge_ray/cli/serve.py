"""`simmerge bandit-init`, `simmerge serve` and `simmerge bandit-sim`: the online bandit."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from simmerge_ray.cli import raise_interrupt
from simmerge_ray.cli.common import (at_least_one, at_least_zero, at_least_zero_number, open_fraction, positive,
                                     seed, tcp_port)
from simmerge_ray.errors import ConfigError
from simmerge_ray.features.schema import read_feature_table
from simmerge_ray.io.tables import LABEL_KEYS, read_labels
from simmerge_ray.selector.data import features_file


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bandit-init",
        help="create a bandit state folder (the selector's encoder or the identity; warm start from labels if given)",
        epilog="example:\n  simmerge bandit-init --state bandit/ --features feats/features.parquet "
               "--labels labels/labels.parquet --selector sel/",
    )
    p.add_argument("--state", "--out", dest="state", type=Path, required=True,
                   help="state folder to create (--out, as the other commands name their output)")
    p.add_argument("--features", type=Path, required=True,
                   help="features folder or its features.parquet (a, b, task, s_*, f_*)")
    start = p.add_mutually_exclusive_group()  # with labels, --operators was ignored without a word
    start.add_argument("--labels", type=Path, help="labels.parquet for the warm start (full information)")
    start.add_argument("--operators", help="comma-separated arms when there are no labels (cold start); a name that is "
                                       "not one of simmerge's arms is served too, with a warning")
    p.add_argument("--selector", type=Path,
                   help="a `simmerge fit` folder: its last hidden layer encodes the contexts and its head is each "
                        "arm's prior mean, as in the pipeline's replay (default: standardised raw features)")
    _add_bandit_args(p)
    p.add_argument("--warm-weight", type=positive, default=1.0, help="weight of each offline row")
    p.add_argument("--overwrite", action="store_true", help="replace a state folder that simmerge wrote")
    p.set_defaults(func=_init)

    p = subparsers.add_parser("serve", help="serve bandit decisions over HTTP (Ray Serve)",
                              epilog="example:\n  simmerge serve --state bandit/ --port 8000 --token-file bandit.token")
    p.add_argument("--state", type=Path, required=True, help="state folder from `bandit-init`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=tcp_port, default=8000, help="HTTP port (1-65535)")
    p.add_argument("--features", type=Path,
                   help="features folder or its features.parquet, for name lookups (default: the state's)")
    p.add_argument("--token-file", type=Path,
                   help="file holding the token that POST /feedback and /arms require "
                        "(default: the SIMMERGE_BANDIT_TOKEN environment variable)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.set_defaults(func=_serve)

    p = subparsers.add_parser("bandit-sim", help="replay simulator: cumulative regret of bandit policies",
                              epilog="example:\n  simmerge bandit-sim --labels labels/labels.parquet "
                                     "--features feats/features.parquet --out bandit-sim/\n"
                                     "cost: 2 replays x --repeats x --rounds decisions of two bandits, O(operators x "
                                     "width^2) each;\n  with the defaults 2-4 s of replays (~5 s for the whole command) on the tiny "
                                     "zoo's or the demo's\n  labels (~90 features, 9 operators, 2 cores; docs/bandit.md, "
                                     "benchmarks/bandit_sim.py)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", type=Path, help="labels.parquet")
    src.add_argument("--synthetic", action="store_true", help="a synthetic problem with a known optimum")
    p.add_argument("--features", type=Path, help="features folder or its features.parquet (with --labels)")
    p.add_argument("--out", type=Path, required=True, help="output folder (regret.json, regret.png)")
    p.add_argument("--rounds", type=at_least_one, default=200, help="decisions per replay")
    p.add_argument("--repeats", type=at_least_one, default=20, help="replays (different seeds) averaged")
    p.add_argument("--test-frac", type=open_fraction, default=0.3, help="share of model pairs held out")
    p.add_argument("--add-operator", help="operator added as a new arm (default: most often best in training)")
    p.add_argument("--add-at", type=at_least_zero, default=60, help="it becomes available after this many rounds")
    _add_bandit_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an --out that simmerge wrote")
    p.set_defaults(func=_simulate)


_LABEL_COLUMNS = (*LABEL_KEYS, "utility")  # what the bandit reads of a labels table (the reward: utility)


def _add_bandit_args(p: argparse.ArgumentParser) -> None:
    from simmerge_ray.bandit.lints import LinTSConfig

    p.add_argument("--noise-var", type=positive, default=LinTSConfig.noise_var,
                   help="reward noise variance (a warm start chooses it by evidence)")
    p.add_argument("--prior-var", type=positive, default=LinTSConfig.prior_var,
                   help="prior variance of each arm's weights (a warm start chooses it by evidence)")
    p.add_argument("--exploration", type=at_least_zero_number, default=1.0, help="posterior std multiplier")
    p.add_argument("--seed", type=seed, default=0, help="seed of the posterior sampling")


def _config(args: argparse.Namespace):
    from simmerge_ray.bandit.lints import LinTSConfig

    return LinTSConfig(
        noise_var=args.noise_var, prior_var=args.prior_var, exploration=args.exploration, seed=args.seed
    )


def _init(args: argparse.Namespace) -> int:
    from simmerge_ray.bandit.core import BanditCore, check_new_state
    from simmerge_ray.bandit.initial import initial_bandit, left_out_line
    from simmerge_ray.bandit.simulate import SimSettings

    if not (args.labels or args.operators):
        raise ConfigError("give --labels (warm start) or --operators (cold start)")
    check_new_state(args.state, args.overwrite)  # before the warm start's work
    labels = read_labels(args.labels, required=_LABEL_COLUMNS) if args.labels else None
    operators = _cold_start_arms(args.operators)
    features = features_file(args.features)
    if args.labels:
        from simmerge_ray.features.provenance import check_labels_measured_alike

        check_labels_measured_alike(features, Path(args.labels))
    encoder = None
    if args.selector is not None:
        from simmerge_ray.selector.encoder import SelectorEncoder

        encoder = SelectorEncoder.load(args.selector)
        if (target := encoder.selector.meta.get("target", "utility")) != "utility":
            raise ConfigError(f"{args.selector}: --selector was fitted with --target {target}, and its head is each "
                              "arm's prior mean of the bandit's reward, the two-sided utility: give a selector "
                              "fitted on utility (`simmerge fit --target utility`, the default)")
        if encoder.selector.config.task_encoding and encoder.selector.tasks:
            print(f"simmerge bandit-init: warning: {args.selector} was fitted with task encoding, and the bandit's "
                  "encoder has no task code: its hidden layer and prior head see every task's one-hot as zero "
                  "(a selector fitted with --no-task-encoding encodes as it was trained)", file=sys.stderr)
    start = initial_bandit(read_feature_table(features, encoder.feature_names if encoder else None),
                           SimSettings(bandit=_config(args), warm_weight=args.warm_weight),
                           labels=labels, operators=operators, source=str(features), encoder=encoder)
    if start.dropped:
        print(f"bandit-init: {left_out_line(start.dropped)}")
    from simmerge_ray.bandit.lints import LinTSConfig

    chosen = [flag for flag, name in (("--noise-var", "noise_var"), ("--prior-var", "prior_var"))
              if getattr(args, name) != getattr(LinTSConfig, name)]
    if start.contexts and chosen:
        later = " (--prior-var stays the prior variance of an arm added later)" if "--prior-var" in chosen else ""
        print(f"simmerge bandit-init: warning: {', '.join(chosen)} not used: a warm start chooses both variances by "
              f"evidence on the labels{later}", file=sys.stderr)
    core = BanditCore.create(args.state, start.encoder, start.bandit, feature_table=features,
                             overwrite=args.overwrite)
    how = f"warm start from {start.contexts} contexts" if start.contexts else "cold start"
    what = f"the encoder of {args.selector} ({start.encoder.width} wide)" if args.selector else \
        f"{start.encoder.width} features"
    print(f"bandit state in {args.state}: arms {core.bandit.arm_names}, {what}, {how}, "
          f"prior_var {core.bandit.arms[0].prior_var:.4g}, noise_var {core.bandit.noise_var:.4g}")
    return 0


def _cold_start_arms(text: str | None) -> list[str]:
    """--operators as a list: a repeated name is an error; a name that is not one of the registry's
    arms (a typo, or an operator of the team's own) is served, with a warning that suggests the
    nearest arm, since the bandit learns any arm from feedback alone."""
    from difflib import get_close_matches

    from simmerge_ray.merge.arms import ARM_NAMES

    names = [o.strip() for o in (text or "").split(",") if o.strip()]
    if text is not None and not names:
        raise ConfigError(f"--operators {text!r}: no arm names (give them comma-separated: linear,ties)")
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise ConfigError(f"--operators: {repeated!r} is listed twice")
    for name in names:
        if name not in ARM_NAMES:
            near = get_close_matches(name, ARM_NAMES, n=1)
            print(f"simmerge bandit-init: warning: --operators: {name!r} is not one of simmerge's arms"
                  + (f" (did you mean {near[0]!r}?)" if near else "") + "; it is served as its own arm", file=sys.stderr)
    return names


def _check_port_free(host: str, port: int) -> None:
    """Bind and release the address before Ray starts: one line when something else listens
    there (Serve's own failure is a traceback after Ray started)."""
    import errno
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except socket.gaierror as e:  # the host is at fault, not the port
        raise ConfigError(f"--host {host}: not an address of this machine ({e.strerror or e}); give one of its "
                          f"addresses or names, e.g. 127.0.0.1 or 0.0.0.0") from None
    except OSError as e:
        what, fix = (("an address this machine does not have", "--host") if e.errno == errno.EADDRNOTAVAIL
                     else (e.strerror or e, "--port"))
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({what}); choose another {fix}") from None


def _serve(args: argparse.Namespace) -> int:
    from simmerge_ray.bandit.auth import load_token
    from simmerge_ray.bandit.core import BanditCore
    from simmerge_ray.bandit.feature_table import FeatureTable

    # Clear errors before starting Ray: the state, and the feature table the service will look up.
    core = BanditCore(args.state)
    # a features folder as bandit-init takes it; absolute, since the replicas read it, not this process
    given = features_file(args.features).resolve() if args.features else None
    table = given or core.settings.get("feature_table")
    if table:
        FeatureTable.load(Path(table), core.encoder.feature_names)
    token = load_token(args.token_file)
    _check_port_free(args.host, args.port)
    import ray

    from simmerge_ray.bandit.service import serve_bandit, stop_serving
    from simmerge_ray.ray_session import init_ray

    init_ray(args.address)
    # The actor is owned by this process: keep its handle alive for as long as we serve (a
    # non-detached actor whose handles are all dropped is destroyed), and stop both on exit.
    actor = serve_bandit(args.state, token=token, host=args.host, port=args.port, feature_table=given)
    print(f"bandit serving on http://{args.host}:{args.port} (state {args.state}); Ctrl-C to stop", flush=True)
    signal.signal(signal.SIGTERM, raise_interrupt)  # `kill`, `ray job stop`, Kubernetes
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second `kill` must not cut the shutdown short
        stop_serving(actor)
        ray.shutdown()
    print("stopped", flush=True)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simmerge_ray.bandit.initial import left_out_line, usable_feature_columns
    from simmerge_ray.bandit.simulate import SimSettings, replay_data, replay_adding, split_by_pair, write_report
    from simmerge_ray.bandit.synthetic import synthetic_tables
    from simmerge_ray.io.atomic import atomic_output_dir

    if args.synthetic:
        if args.features is not None:  # it was ignored, and error messages named it as the table
            raise ConfigError("--features goes with --labels; --synthetic makes its own feature table")
        labels, features = synthetic_tables()
    else:
        if args.features is None:
            raise ConfigError("--labels needs --features")
        labels = read_labels(args.labels, required=_LABEL_COLUMNS)
        features = read_feature_table(features_file(args.features))  # a folder too, as bandit-init takes
    source = str(args.features or "synthetic features")
    names, dropped = usable_feature_columns(features, source)
    if dropped:  # as bandit-init leaves them out: the bandit that is simulated is the one served
        print(f"bandit-sim: {left_out_line(dropped)}")
    train, test = split_by_pair(replay_data(labels, features, names, source=source), args.test_frac, args.seed)
    settings = SimSettings(rounds=args.rounds, repeats=args.repeats, seed=args.seed, bandit=_config(args))
    # seconds on a labelled catalog since the rank-one posterior updates (minutes before, with
    # nothing printed until the table): still a line per quarter of each replay's repeats
    started = time.perf_counter()

    def progress(replay: str, done: int, total: int) -> None:
        if done == total or done % max(1, total // 4) == 0:
            print(f"bandit-sim: {replay}: {done}/{total} repeats ({time.perf_counter() - started:.0f} s)", flush=True)

    every, added = replay_adding(train, test, settings, add_at=args.add_at, new_operator=args.add_operator,
                                 progress=progress)
    results = {"all_operators": every, "operator_added": added}
    inputs = [p for p in (args.features, args.labels) if p is not None]
    with atomic_output_dir(args.out, overwrite=args.overwrite, inputs=inputs) as tmp:
        write_report(results, tmp)
    print(_table(results))
    print(f"wrote {args.out}/regret.json and {args.out}/regret.png")
    return 0


def _table(results: dict) -> str:
    lines = []
    for run, res in results.items():
        marks = list(next(iter(res["policies"].values()))["at"])
        title = run
        if res["new_operator"] is not None:
            title += f" ({res['new_operator']} added after round {res['add_at']})"
        lines.append(f"{title}: cumulative regret, mean ± std over {res['repeats']} repeats")
        lines.append(f"  {'policy':<16}" + "".join(f"{'@' + m:>16}" for m in marks) + f"{'oracle pick':>13}")
        for name, e in res["policies"].items():
            cells = "".join(f"{e['at'][m]['mean']:>9.2f} ± {e['at'][m]['std']:<4.2f}" for m in marks)
            lines.append(f"  {name:<16}{cells}{e['oracle_pick_rate']:>13.1%}")
    return "\n".join(lines)
