"""``fedapp`` command line: jobs that run outside a Flower simulation.

Two promises to whoever types these commands. A bad argument is one line on stderr and exit 2,
never a traceback: argparse rejects what it can see (the ``type=`` checkers below), the commands
reject what needs a file read, and :func:`main` turns their OSError or ValueError into that line.
And ``fedapp --help`` is quick: nothing here imports torch, diffusers or matplotlib at module
level, each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import torch

    from fedapp.config import FedConfig


class _Parser(argparse.ArgumentParser):
    """argparse, with its error as one line (no usage block) and exit 2, like the commands' errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type=`` for integers in [low, high]; argparse names the argument in its message."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            allowed = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {value}")
        return value

    return parse


def _dim_mults(text: str) -> str:
    """The UNet's ``model.dim-mults``, checked the way the run config checks it."""
    from pydantic import ValidationError

    from fedapp.config import ModelConfig

    try:
        return ModelConfig(dim_mults=text).dim_mults
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated positive integers, e.g. '1,2,4', got {text!r}") from None


def _png(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"{text!r} is not a .png path")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a .png file path")
    return path


def _app_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "pyproject.toml").is_file():
        raise argparse.ArgumentTypeError(f"{text} is not an app folder (no pyproject.toml)")
    return path


def _out_dir(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    return path


def _ray_address(text: str) -> str:
    from fedapp.deploy.ray_cluster import parse_ray_address

    try:
        parse_ray_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("--ray-address ")) from None
    return text.strip()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"fedapp {version('fedapp')}"
    except PackageNotFoundError:
        return "fedapp (not installed; run from a source tree)"


def checkpoint_of(path: Path) -> Path:
    """The checkpoint ``fedapp sample`` reads: the file given, or a run directory's final.pt, else its newest
    ``checkpoints/round-NNN.pt``."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        return path
    if (path / "final.pt").is_file():
        return path / "final.pt"
    from fedapp.runs.resume import latest_checkpoint

    try:
        return latest_checkpoint(path)[1]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} holds no final.pt and no checkpoints/round-NNN.pt to sample from") from None


def _sample(args: argparse.Namespace) -> int:
    from fedapp.data.pixels import image_shape
    from fedapp.eval.grid import save_grid
    from fedapp.model.build import build_diffusion
    from fedapp.model.sampling import generate
    from fedapp.runs.checkpoint import load_checkpoint
    from fedapp.train.collafuse import split_sample
    from fedapp.train.loop import pick_device

    checkpoint = checkpoint_of(args.checkpoint)
    device = pick_device(args.device)
    model, cfg, payload = load_checkpoint(checkpoint, device=device)
    clients = payload["extra"].get("clients") or {}
    if args.classes and (cfg.data.name, image_shape(cfg.data)) != ("fashion-mnist", (1, 28)):
        raise ValueError(f"--classes: the FD-CNN classifier knows fashion-mnist at 28 px; {checkpoint} "
                         f"is {cfg.data.name} at {image_shape(cfg.data)[1]} px")
    split = cfg.strategy.name == "collafuse" and cfg.collafuse.cut(cfg.diffusion.timesteps) > 0
    if split and args.client is None:
        raise ValueError(f"{checkpoint} is a CollaFuse run: the server's model owns only "
                         f"t >= {cfg.collafuse.cut(cfg.diffusion.timesteps)}; pick a client with --client N")
    own = None
    if args.client is not None:
        if args.client not in clients:
            known = ", ".join(map(str, sorted(clients))) or "none (not a personalized run)"
            raise ValueError(f"{checkpoint} has no model for client {args.client}; clients: {known}")
        own = copy.deepcopy(model)
        own.load_state_dict(clients[args.client])
    elif clients:
        print(f"note: personalized run; sampling the server's model, pick a client with --client {min(clients)}")
    # The run's own evaluation sampler by default: what its grids and scores were made with.
    sampler = args.sampler or cfg.eval.sampler
    steps = args.steps or cfg.eval.sampler_steps
    diffusion = build_diffusion(cfg)
    try:  # a --steps this run's T cannot take fails before any work
        diffusion.sampler(sampler, steps)
    except ValueError as err:
        raise ValueError(f"--sampler {sampler} --steps {steps}: {err}") from None
    if split:  # the server's model down to t_c, the client's own from there (CollaFuse's split inference)
        channels, side = image_shape(cfg.data)
        samples = split_sample(model, own, diffusion, args.n, (channels, side, side),
                               cfg.collafuse.cut(cfg.diffusion.timesteps), kind=sampler, steps=steps,
                               server_seed=args.seed, client_seed=args.seed + 1, device=device)
    else:
        samples = generate(
            own if own is not None else model, diffusion, args.n, image_shape(cfg.data),
            kind=sampler, steps=steps, seed=args.seed, device=device, progress=True,
        )
    who = f"-client{args.client}" if args.client is not None else ""
    out = args.out or checkpoint.with_name(f"{checkpoint.stem}{who}-{sampler}{steps}-seed{args.seed}.png")
    save_grid(samples, out)
    if args.classes:
        print(_class_report(cfg, samples, args.client, len(clients)))
    print(f"wrote {len(samples)} samples ({sampler}-{steps}) from round {payload['round']} of {checkpoint} "
          f"to {out}")
    return 0


def _class_report(cfg: FedConfig, samples: torch.Tensor, client: int | None, num_clients: int) -> str:
    """``fedapp sample --classes``: the classifier's count of each class among ``samples``, beside the
    class shares of the training pool and, for a client's model, of that client's training images
    (its partition of ``data.num-partitions``, or of as many as the run kept client models when that is 0)."""
    import numpy as np

    from fedapp.data.share import local_data, training_pool
    from fedapp.data.sources import CLASS_NAMES
    from fedapp.eval.classes import class_counts, class_table
    from fedapp.eval.classifier import find_classifier, load_classifier

    net, _ = load_classifier(find_classifier(cfg.eval.fd_cnn_weights))
    names = CLASS_NAMES[cfg.data.name]
    references = {"training pool": np.bincount(training_pool(cfg.data, cfg.seed).labels.numpy(),
                                               minlength=len(names))}
    if client is not None:  # the split is data.num-partitions', else one partition per client model kept
        num = cfg.data.num_partitions or num_clients
        own = local_data(cfg.data, cfg.seed, client, num).train.labels
        references[f"client {client} of {num}"] = np.bincount(own.numpy(), minlength=len(names))
    return class_table(class_counts(net, samples.cpu()), names, references)


def _comm(args: argparse.Namespace) -> int:
    from fedapp.model.unet import UNet, part_sizes
    from fedapp.protocol.methods import METHODS, cumulative_cost, round_cost
    from fedapp.report.figures import plot_cumulative_comm

    if args.check:
        return _check_comm(args.check)
    mults = tuple(int(m) for m in args.dim_mults.split(","))  # checked by _dim_mults
    sizes = part_sizes(UNet(args.dim, mults, args.channels))
    whole = sum(sizes.values())
    print(f"UNet dim={args.dim} mults={args.dim_mults} channels={args.channels}: {whole:,} parameters "
          + ", ".join(f"{p} {n:,} ({n / whole:.1%})" for p, n in sizes.items()))
    print(f"K={args.clients} clients, all taking part, R={args.rounds} rounds; parameters down+up")
    curves = {m: cumulative_cost(m, sizes, args.clients, args.rounds) for m in METHODS}
    print(f"{'method':<9}{'round 1':>14}{'round 2+':>14}{'cumulative':>16}{'vs full':>10}")
    for method, curve in curves.items():
        first = round_cost(method, sizes, args.clients, first_round=True)
        later = round_cost(method, sizes, args.clients, first_round=False)
        cut = (1 - curve[-1] / curves["full"][-1]) or 0.0
        print(f"{method:<9}{first.down + first.up:>14,.0f}{later.down + later.up:>14,.0f}"
              f"{curve[-1]:>16,.0f}{-cut or 0.0:>10.1%}")
    if args.plot:
        title = f"cumulative communication, K={args.clients}, UNet {whole / 1e6:.2f} M"
        print(f"plot: {plot_cumulative_comm(curves, args.plot, title)}")
    return 0


def _check_comm(runs: list[Path]) -> int:
    """Measured training traffic of finished runs against the analytic count for their own setup."""
    import tomllib

    from fedapp.config import parse_config
    from fedapp.model.build import build_model
    from fedapp.model.unet import part_sizes
    from fedapp.protocol.methods import METHODS, cumulative_cost
    from fedapp.runs.rundir import read_jsonl

    print(f"{'run':<28}{'method':<9}{'K':>4}{'R':>4}{'measured':>16}{'analytic':>16}  match")
    mismatched = 0
    for run in runs:
        if not (run / "config.toml").is_file() or not (run / "metrics.jsonl").is_file():
            raise ValueError(f"{run} is not a finished run directory (config.toml, metrics.jsonl)")
        cfg = parse_config(tomllib.loads((run / "config.toml").read_text()))
        if cfg.strategy.name not in METHODS:
            raise ValueError(f"{run}: a {cfg.strategy.name} run; the analytic count covers {', '.join(METHODS)}")
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if "train" in r.get("comm", {})]
        if not rows:
            raise ValueError(f"{run}: no round with measured training traffic (a centralized run?)")
        first = read_jsonl(run / "comm.jsonl")
        clients = len({t["node_id"] for t in first if t["server_round"] == 1 and t["message_type"] == "train"})
        cum = rows[-1]["comm"]["train"]["cumulative"]
        measured = cum["down_params"] + cum["up_params"]
        sizes = part_sizes(build_model(cfg))
        analytic = cumulative_cost(cfg.strategy.name, sizes, clients, int(rows[-1]["round"]))[-1]
        ok = measured == analytic
        mismatched += not ok
        print(f"{run.name:<28}{cfg.strategy.name:<9}{clients:>4}{rows[-1]['round']:>4}{measured:>16,}"
              f"{analytic:>16,.0f}  {'yes' if ok else 'NO'}")
    return 1 if mismatched else 0


def _app_config(app: Path, overrides: list[str]) -> dict[str, object]:
    """The app's ``[tool.flwr.app.config]`` with ``k=v`` overrides on top, as ``flwr run`` would pass it."""
    import tomllib

    from fedapp.config import flatten, parse_overrides

    pyproject = app / "pyproject.toml"
    try:
        defaults = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as err:
        raise FileNotFoundError(f"{pyproject} holds no [tool.flwr.app.config] ({type(err).__name__})") from None
    return {**flatten(defaults), **parse_overrides(overrides)}


def _check(args: argparse.Namespace) -> int:
    """Preflight: the config, the data and the split, before any SuperLink or SuperNode starts."""
    from fedapp.config import ConfigError, parse_config
    from fedapp.data.partition import partition_indices
    from fedapp.data.share import pool_partitioner
    from fedapp.model.build import build_model

    cfg = parse_config(_app_config(args.app, args.overrides))
    num = args.partitions or cfg.data.num_partitions
    if not num:
        raise ConfigError("how many clients? give --partitions N or data.num-partitions")
    if cfg.strategy.name != "centralized" and cfg.strategy.min_nodes > num:
        raise ConfigError(f"strategy.min-nodes = {cfg.strategy.min_nodes} but only {num} partitions: "
                          "the first round would wait for nodes that cannot exist")
    partitioner = pool_partitioner(cfg.data, cfg.seed, num)
    sizes = [len(partition_indices(partitioner, pid)) for pid in range(num)]
    params = sum(p.numel() for p in build_model(cfg).parameters())
    print(f"ok: {cfg.strategy.name} on {cfg.data.name}, {num} {cfg.data.partitioner} partitions of "
          f"{min(sizes)}..{max(sizes)} images, UNet {params:,} parameters, {cfg.train.rounds} rounds")
    return 0


def _run(args: argparse.Namespace) -> int:
    """A local simulation (or a run on ``--connection``) that exits non-zero unless the run finished."""
    from fedapp.deploy.simulation import launch, merged_run_config

    clients = f"num-supernodes={args.clients}" if args.clients and not args.connection else ""
    federation = " ".join(filter(None, [clients, args.resources]))
    return launch(args.app.resolve(), merged_run_config(args.run_config), args.flwr_args, federation,
                  args.connection, args.ray_address or "")


def _resume(args: argparse.Namespace) -> int:
    """Check the run and its newest checkpoint here, then hand the saved config back to ``flwr run``."""
    import tempfile
    import tomllib

    import tomli_w

    from fedapp.config import parse_config
    from fedapp.deploy.simulation import launch
    from fedapp.runs.resume import load_resume_point

    run = args.run.expanduser().resolve()
    config = run / "config.toml"
    if not config.is_file():
        raise FileNotFoundError(f"{run} is not a run directory (no config.toml)")
    try:
        saved = parse_config(tomllib.loads(config.read_text()))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{config} is not readable TOML ({err})") from None
    changes = {"resume": str(run)}
    cfg = saved.model_copy(update={
        "output": saved.output.model_copy(update=changes),
        "train": saved.train.model_copy(update={"rounds": args.rounds or saved.train.rounds})})
    point = load_resume_point(parse_config(cfg.flat()))  # the server checks again; failing here is cheaper
    print(f"resuming {run.name} after round {point.round} of {cfg.train.rounds} ({point.checkpoint.name})",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="fedapp-resume-") as tmp:
        run_config = Path(tmp) / "run-config.toml"
        run_config.write_text(tomli_w.dumps(cfg.model_dump(by_alias=True)))
        return launch(args.app.resolve(), [str(run_config)], args.flwr_args, connection=args.connection,
                      ray_address=args.ray_address or "")


def _report(args: argparse.Namespace) -> int:
    from fedapp.report.markdown import write_report

    report = write_report(args.runs, args.out)
    print(report)
    if args.html:
        from fedapp.report.htmlpage import write_html

        print(write_html(report))
    return 0


def _tradeoff(args: argparse.Namespace) -> int:
    from fedapp.report.tradeoff import write_tradeoff
    print(write_tradeoff(args.runs, args.out))
    return 0


def _audit(args: argparse.Namespace) -> int:
    import json

    from fedapp.report.audit import audit_run
    from fedapp.runs.rundir import audit_path
    from fedapp.train.loop import pick_device

    checkpoint = checkpoint_of(args.run)
    rows = audit_run(checkpoint, num_partitions=args.num_partitions, members=args.members,
                     nonmembers=args.nonmembers, draws=args.draws, seed=args.seed, max_timestep=args.max_timestep,
                     device=pick_device(args.device))
    print("| client | model | members | non-members | ROC AUC | TPR at 1 % FPR |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['client']} | {row['model']} | {row['members']} | {row['nonmembers']} | "
              f"{row['auc']:.3f} | {row['tpr@1%fpr']:.3f} |")
    out = args.out or audit_path(checkpoint)
    out.write_text(json.dumps({"checkpoint": str(checkpoint), "draws": args.draws, "seed": args.seed,
                               "max_timestep": args.max_timestep, "clients": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    positive, natural = _whole_number(1), _whole_number(0)
    parser = _Parser(prog="fedapp", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    sample = sub.add_parser("sample", help="write a PNG grid of samples from a checkpoint or a run directory")
    sample.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a checkpoint file, or a run directory (its final.pt, else its newest "
                             "checkpoints/round-NNN.pt)")
    sample.add_argument("--out", type=_png, default=None, help="PNG path (default: next to the checkpoint)")
    sample.add_argument("--n", type=positive, default=64, help="number of images")
    sample.add_argument("--sampler", choices=["ddim", "ddpm"], default=None,
                        help="default: the checkpoint's eval.sampler (what the run's grids and scores used)")
    sample.add_argument("--steps", type=positive, default=None,
                        help="grid steps (default: the checkpoint's eval.sampler-steps; at most "
                             "diffusion.timesteps, which is the full chain; DDIM's must divide it)")
    sample.add_argument("--seed", type=_whole_number(0, 2**32 - 2), default=0)
    sample.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    sample.add_argument("--client", type=natural, default=None,
                        help="personalized and CollaFuse runs: this client's own model (its partition id)")
    sample.add_argument("--classes", action="store_true",
                        help="fashion-mnist: print how many samples the FD-CNN classifier puts in each class, "
                             "beside each class's share of the training data")
    sample.set_defaults(func=_sample)

    comm = sub.add_parser("comm", help="analytic communication of the four FedDiffuse methods")
    comm.add_argument("--clients", type=positive, default=10, help="K")
    comm.add_argument("--rounds", type=positive, default=15, help="R")
    comm.add_argument("--dim", type=_whole_number(4, 512), default=28, help="model.dim")
    comm.add_argument("--dim-mults", type=_dim_mults, default="1,2,4", help="model.dim-mults")
    comm.add_argument("--channels", type=_whole_number(1, 4), default=1, help="image channels")
    comm.add_argument("--plot", type=_png, default=None, help="write the cumulative plot (PNG) here")
    comm.add_argument("--check", type=Path, nargs="+", default=None, metavar="RUN_DIR",
                      help="compare finished runs' measured training traffic with the analytic count "
                           "for their own model, method, K and R (exit 1 on any mismatch)")
    comm.set_defaults(func=_comm)

    tradeoff = sub.add_parser("tradeoff", help="CollaFuse's cut-ratio trade-off table and plot over run directories")
    tradeoff.add_argument("runs", nargs="+", type=Path, help="CollaFuse run directories (cut ratios and seeds; one row each)")
    tradeoff.add_argument("--out", type=_out_dir, required=True, help="folder for tradeoff.md and tradeoff.png")
    tradeoff.set_defaults(func=_tradeoff)

    report = sub.add_parser("report", help="Markdown (and HTML) report with figures comparing run directories")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", type=_out_dir, default=Path("report"),
                        help="folder for report.md and its figures (default: ./report)")
    report.add_argument("--html", action="store_true",
                        help="also write report.html: the same report as one file, figures embedded")
    report.set_defaults(func=_report)
    audit = sub.add_parser("audit", help="membership inference audit (loss attack) of a run's final model(s)")
    audit.add_argument("run", type=Path, help="a run directory or checkpoint")
    audit.add_argument("--members", type=_whole_number(1), default=500, help="training images per client")
    audit.add_argument("--nonmembers", type=_whole_number(1), default=500, help="held-out test images")
    audit.add_argument("--draws", type=_whole_number(1), default=8, help="(t, ε) draws per image")
    audit.add_argument("--max-timestep", type=_whole_number(0), default=0, help="draw t below this (0: all)")
    audit.add_argument("--num-partitions", type=_whole_number(0), default=0,
                       help="the run's clients, where its config does not say")
    audit.add_argument("--seed", type=_whole_number(0), default=0)
    audit.add_argument("--device", default="auto")
    audit.add_argument("--out", type=Path, default=None, help="JSON rows (default: beside the checkpoint)")
    audit.set_defaults(func=_audit)
    check = sub.add_parser("check", help="validate a config, its data and its split without running anything")
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="run-config overrides, as for flwr run --run-config (e.g. strategy.name=udec)")
    check.add_argument("--partitions", type=natural, default=0, help="clients (default: data.num-partitions)")
    check.add_argument("--app", type=_app_dir, default=".", help="the app folder with pyproject.toml")
    check.set_defaults(func=_check)

    resume = sub.add_parser("resume", help="continue a run from its last complete round (runs flwr run)",
                            epilog="Arguments after -- go to flwr run, e.g. -- --federation-config "
                                   "'num-supernodes=3'.")
    resume.add_argument("run", type=Path, metavar="RUN_DIR")
    resume.add_argument("--rounds", type=natural, default=0, help="train.rounds to reach (default: the run's)")
    resume.add_argument("--app", type=_app_dir, default=".", help="the app folder (default: .)")
    resume.add_argument("--connection", default="",
                        help="flwr connection, e.g. a deployment's (default: flwr's default)")
    resume.add_argument("--ray-address", type=_ray_address, default=None, metavar="HOST:PORT",
                        help="run the simulation on this running Ray cluster (its head's ray start --port)")
    resume.set_defaults(func=_resume, flwr_args=[])

    run = sub.add_parser("run", help="flwr run with a SuperLink of its own; exit 1 unless every round finished",
                         epilog="Arguments after -- go to flwr run as they are.")
    run.add_argument("--clients", type=natural, default=5,
                     help="num-supernodes of a local simulation (0: the federation's own)")
    run.add_argument("--resources", default="",
                     help="more federation config, e.g. 'client-resources-num-cpus=2 client-resources-num-gpus=0.2'")
    run.add_argument("--run-config", action="append", default=[], metavar="CONFIG",
                     help="'key=value ...' or a TOML file, as for flwr run (repeatable)")
    run.add_argument("--app", type=_app_dir, default=".", help="the app folder (default: .)")
    run.add_argument("--connection", default="", help="a flwr connection (default: a local simulation)")
    run.add_argument("--ray-address", type=_ray_address, default=None, metavar="HOST:PORT",
                     help="run the simulation on this running Ray cluster (its head's ray start --port; "
                          "docs/ray-cluster.md)")
    run.set_defaults(func=_run, flwr_args=[])
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """What a command raises for bad input. DatasetNotFoundError lives beside torch: it is only looked up
    once its module is loaded (it cannot have been raised before), so ``--help`` never imports torch."""
    data = sys.modules.get("fedapp.data.imagedata")
    return (OSError, ValueError, *([data.DatasetNotFoundError] if data is not None else []))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # argparse cannot take them after options
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    if hasattr(args, "flwr_args"):
        args.flwr_args = argv[cut + 1:]
    elif cut < len(argv):
        parser.error(f"fedapp {args.command} takes no arguments after --")
    try:
        return int(args.func(args))
    except Exception as err:
        if not isinstance(err, _expected_errors()):
            raise
        print(f"fedapp {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
