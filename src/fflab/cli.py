"""The ``fflab`` command line: ``train``, ``eval``, ``presets``.

Exit codes: 0 success, 1 runtime failure (data, divergence, checkpoint, a lost process of a
data-parallel run), 2 usage error, 130 interrupted, 143 terminated (SIGTERM, which torchrun
sends to the other processes when one fails). Every failure is one line on stderr, never a
traceback.

``torchrun --nproc-per-node N -m fflab train ...`` trains data-parallel (see
:mod:`fflab.distributed`); only rank 0 prints.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from fflab.checkpoint import CheckpointError
from fflab.config import ConfigError, parse_overrides
from fflab.data import DataError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(2, f"fflab: error: {message}\n")


def _stage_sizes(text: str) -> list[int]:
    """``--stages 2,1``: hidden layers per pipeline stage."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--stages takes layer counts separated by commas, e.g. 2,1; got {text!r}"
        ) from None
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fflab", description="Forward-Forward and Boltzmann learning, reproducible.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a preset and evaluate it")
    t.add_argument("--preset", help="preset name (see 'fflab presets')")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="S.K=V",
        help="override a setting, e.g. --set train.lr=0.01 (repeatable)",
    )
    t.add_argument("--epochs", type=int, help="shorthand for --set train.epochs=N")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", type=Path, help="run directory (default runs/PRESET-TIME)")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a run")
    t.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write per-epoch metrics for TensorBoard into RUN_DIR/tensorboard",
    )
    t.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="under torchrun: how long a process waits for the others before the run stops "
        "(default 300)",
    )
    t.add_argument(
        "--parallel",
        choices=("data", "pipeline"),
        default="data",
        help="under torchrun: data (every process a share of every batch, the default) or "
        "pipeline (every process a block of FF layers)",
    )
    t.add_argument(
        "--stages",
        type=_stage_sizes,
        metavar="N,N,...",
        help="with --parallel pipeline: hidden layers per process (default: balanced by cost)",
    )
    _common(t)

    e = sub.add_parser("eval", help="re-evaluate a saved run on the test set")
    e.add_argument("run_dir", type=Path)
    _common(e)

    sub.add_parser("presets", help="list presets")

    pl = sub.add_parser("plot", help="PNG of test error against wall time for runs")
    pl.add_argument("run_dirs", type=Path, nargs="+")
    pl.add_argument("--out", type=Path, default=Path("time_to_accuracy.png"))
    pl.add_argument("--key", default="test_error_goodness")

    st = sub.add_parser("study", help="run a study of FF's claims: figures and a report")
    st.add_argument("name", nargs="?", help="the study (see 'fflab study --list')")
    st.add_argument("--list", action="store_true", help="list the studies")
    st.add_argument("--quick", action="store_true", help="small nets, few epochs (minutes)")
    st.add_argument("--out", type=Path, help="study directory (default runs/study-NAME)")
    st.add_argument("--seed", type=int, default=0)
    _common(st)
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="folder with the IDX .gz files (default $FFLAB_DATA, cache)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")


def _log(quiet: bool):
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))


def _print_results(summary: dict) -> None:
    shown = ("test_", "train_error", "train_logprob", "val_", "log_z", "uniform_logprob")
    keys = [k for k in summary if k.startswith(shown)]
    for k in keys:
        v = summary[k]
        if isinstance(v, list):
            v = ", ".join(f"{e:.4f}" if isinstance(e, float) else str(e) for e in v)
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")


def _run_figures(run_dir: Path, algorithm: str | None, results: str = "summary.json") -> None:
    """A run's own figures (needs matplotlib; skipped without it): filters.png and
    samples.png for an rbm run, iterations.png (from ``results``) for an ff-recurrent run."""
    if algorithm not in ("rbm", "ff-recurrent"):
        return
    try:
        from fflab.plots import boltzmann_figures, recurrent_figure

        if algorithm == "rbm":
            paths = boltzmann_figures(run_dir)
        else:
            paths = [recurrent_figure(run_dir, results=results)]
        for path in paths:
            print(f"{'figure':>24}: {path}")
    except RuntimeError as e:  # matplotlib missing
        print(f"fflab: no figures ({e})", file=sys.stderr)


def cmd_train(args: argparse.Namespace) -> int:
    from fflab import presets, runs

    device = runs.resolve_device(args.device)
    if args.resume is not None:
        if args.preset or args.overrides or args.epochs:
            raise ConfigError("--resume takes the run's own config; drop --preset/--set/--epochs")
        out, config = args.resume, None
    else:
        if not args.preset:
            raise ConfigError("train needs --preset NAME (or --resume RUN_DIR)")
        overrides = parse_overrides(args.overrides)
        if args.epochs is not None:
            overrides.setdefault("train", {})["epochs"] = str(args.epochs)
        config = presets.resolve(args.preset, overrides, seed=args.seed)
        if args.out is None and "WORLD_SIZE" in os.environ:  # the ranks' clocks may differ
            raise ConfigError("a run under torchrun needs --out RUN_DIR")
        out = args.out or Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    log = _log(args.quiet)
    summary = runs.train(
        config,
        out,
        device=device,
        data_dir=args.data_dir,
        resume=args.resume is not None,
        progress=not args.quiet,
        log=log,
        dist_timeout=args.dist_timeout,
        tensorboard=args.tensorboard,
        parallel=args.parallel,
        stages=args.stages,
    )
    if summary.get("rank", 0) != 0:  # a data-parallel run: rank 0 reports
        return 0
    _print_results(summary)
    print(f"{'wall_seconds':>24}: {summary['wall_seconds']:.1f}")
    print(f"{'train_samples_per_second':>24}: {summary['train_samples_per_second']:.0f}")
    print(f"{'summary':>24}: {out / 'summary.json'}")
    _run_figures(out, summary.get("algorithm"))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fflab import runs

    device = runs.resolve_device(args.device)
    result = runs.evaluate_run(args.run_dir, device=device, data_dir=args.data_dir)
    _print_results(result)
    (out := args.run_dir / "eval.json")
    from fflab.checkpoint import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2))
    print(f"{'results':>24}: {out}")
    config = json.loads((args.run_dir / "config.json").read_text())
    _run_figures(args.run_dir, config.get("algorithm"), results=out.name)
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from fflab.presets import PRESETS

    width = max(map(len, PRESETS))
    for p in PRESETS.values():
        print(f"{p.name:<{width}}  [{p.algorithm}] {p.description}")
        print(f"{'':<{width}}  expected: {p.expected}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from fflab.plots import accuracy_curve, minutes_to_reach, time_to_accuracy

    try:
        png = time_to_accuracy(args.run_dirs, args.out, args.key)
        curves = [(d, *accuracy_curve(d, args.key)) for d in args.run_dirs]
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
    bars = (2.0, 1.5, 1.4)
    head = "".join(f"  <= {b:.1f}% after" for b in bars)
    print(f"{'run':<40} {'epochs':>6} {args.key + ' (last)':>26}{head}")
    for d, minutes, errors in curves:
        cells = "".join(
            f"{'never':>15}"
            if (t := minutes_to_reach(minutes, errors, b)) is None
            else f"{t:>11.1f} min"
            for b in bars
        )
        print(f"{str(d):<40} {len(errors):>6} {errors[-1]:>25.2f}%{cells}")
    print(f"figure: {png}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from fflab import studies

    if args.list:
        listing = studies.describe()
        width = max(map(len, listing))
        for name, text in listing.items():
            print(f"{name:<{width}}  {text}")
        return 0
    if not args.name:
        raise ConfigError("study needs a NAME (or --list)")
    if args.name not in studies.STUDIES:
        raise ConfigError(f"unknown study {args.name!r}; run 'fflab study --list'")
    out = args.out or Path("runs") / f"study-{args.name}{'-quick' if args.quick else ''}"
    ctx = studies.StudyContext(
        out_dir=out,
        quick=args.quick,
        seed=args.seed,
        data_dir=args.data_dir,
        log=_log(args.quiet),
    )
    studies.run_study(args.name, ctx)
    print(f"{'report':>24}: {out / 'report.md'}")
    print(f"{'results':>24}: {out / 'results.json'}")
    return 0


class Terminated(Exception):
    """SIGTERM arrived (torchrun stops the other processes this way when one fails)."""


def _terminate(signum, frame) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from fflab._runtime import tune_allocator
    from fflab.runs import RunError

    tune_allocator()
    if not faulthandler.is_enabled():  # a crash in native code (a backend's abort) says where
        faulthandler.enable()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "presets": cmd_presets,
        "plot": cmd_plot,
        "study": cmd_study,
    }
    handler = commands[args.command]
    try:
        return handler(args)
    except ConfigError as e:
        print(f"fflab: error: {e}", file=sys.stderr)
        return 2
    except (DataError, RunError, CheckpointError) as e:
        print(f"fflab: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "fflab: interrupted; the last completed epoch is checkpointed (train --resume)",
            file=sys.stderr,
        )
        return 130
    except Terminated:
        print(
            "fflab: terminated; the last completed epoch is checkpointed (train --resume)",
            file=sys.stderr,
        )
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def run() -> NoReturn:
    """The ``fflab`` command: :func:`main`, then exit with its code (a process of a torchrun
    launch without the interpreter's teardown: :func:`fflab.distributed.end_process`)."""
    from fflab.distributed import end_process

    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (`fflab presets | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    end_process(code)


if __name__ == "__main__":
    run()
