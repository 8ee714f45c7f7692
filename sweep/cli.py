"""`wsg`: the command line. Each stage command runs one stage of the
pipeline (docs/design.md) on a run directory; `wsg run` drives them all and resumes.

User errors (`WsgError`) print a short message and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..core.console import say
from ..core.errors import WsgError
from ..core.runlock import RunLock

EXIT_USER_ERROR = 2


def _add_config_arg(p: argparse.ArgumentParser, optional: bool = False) -> None:
    if optional:
        p.add_argument("config", nargs="?", default=None,
                       help="experiment YAML (default: the embedded configs/smoke.yaml)")
    else:
        p.add_argument("config", help="experiment YAML, e.g. configs/smoke.yaml")


def _add_run_arg(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--run", required=required, default=None,
                   help="run directory: a local path or s3:// / gs:// URI")


def _add_ray_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help="Ray cluster to join ('auto' or host:port; default: $RAY_ADDRESS, "
                        "else start a local Ray instance)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show Ray's, vLLM's and transformers' own output here too "
                        "(default: only in <run>/logs/wsg.log)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="wsg",
        description="Do different post-training losses change a model in different ways? "
                    "Train losses x seeds x LRs with LoRA on identical rollouts, then measure "
                    "the geometry of the updates.")
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    # In the order `wsg --help` lists them: the stages, then the analyses, then the tools.
    _add_stage_commands(sub)
    _add_analysis_commands(sub)
    _add_tool_commands(sub)
    return ap


def _add_stage_commands(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline: rollouts -> grid -> eval -> geometry -> report (resumes)")
    _add_config_arg(p, optional=True)
    _add_run_arg(p, required=False)
    _add_ray_arg(p)

    p = sub.add_parser("study", help="one run per value of a factor (the config's study: section), "
                                     "then their claims in one table (resumes)")
    _add_config_arg(p)
    p.add_argument("--study", default=None, help="study folder: a local path or s3:// / gs:// URI "
                                                   "(default: <storage.runs_root>/<config name>-study)")
    _add_ray_arg(p)

    p = sub.add_parser("rollouts", help="sample K completions per prompt with vLLM and reward them")
    _add_config_arg(p)
    _add_run_arg(p, required=True)
    _add_ray_arg(p)

    p = sub.add_parser("train", help="train one cell (loss, seed, lr) exactly as the grid does")
    _add_config_arg(p)
    _add_run_arg(p, required=True)
    p.add_argument("--loss", required=True)
    p.add_argument("--seed", type=int, required=True, help="the grid seed: LoRA init and data order")
    p.add_argument("--init-seed", type=int, default=None, help="a different LoRA-init seed (a control cell)")
    p.add_argument("--data-seed", type=int, default=None, help="a different data-order seed (a control cell)")
    p.add_argument("--lr", type=float, required=True)
    _add_ray_arg(p)


def _add_analysis_commands(sub) -> None:
    p = sub.add_parser("eval", help="greedy pass@1 of the base and every adapter, Wilson CIs, McNemar")
    _add_config_arg(p)
    _add_run_arg(p, required=True)
    _add_ray_arg(p)

    p = sub.add_parser("functional", help="linear mode connectivity, CKA and logit lens of a run's adapters")
    _add_config_arg(p)
    _add_run_arg(p, required=True)
    _add_ray_arg(p)

    p = sub.add_parser("geometry", help="factored weight-update geometry of PEFT adapters -> Parquet tables")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT adapter folder (repeat); with --run, added to the run's adapters")
    p.add_argument("--out", default=None, help="output folder (default: <run>/geometry)")
    p.add_argument("--top-k", type=int, default=None, help="principal angles between top-k singular vectors")
    p.add_argument("--run", default=None, help="analyse every cell x checkpoint of this run")
    p.add_argument("--config", dest="config_opt", default=None,
                   help="config for --run (default: the run's config.yaml)")
    _add_ray_arg(p)

    p = sub.add_parser("report", help="build report/index.html from a run's tables")
    p.add_argument("run", help="run directory")


def _add_tool_commands(sub) -> None:
    p = sub.add_parser("status", help="which stages and cells of a run are complete")
    p.add_argument("run", help="run directory")

    p = sub.add_parser("verify", help="check every artifact of a run against its completion marker "
                                      "(exit 1 listing each problem)")
    p.add_argument("run", help="run directory: a local path or s3:// / gs:// URI")

    p = sub.add_parser("config", help="config tools")
    csub = p.add_subparsers(dest="config_cmd", metavar="SUBCOMMAND")
    cs = csub.add_parser("show", help="print the resolved config and its hash")
    cs.add_argument("config", nargs="?", default=None, help="experiment YAML (default: embedded smoke)")


def _load(path: str | None):
    from ..core.config import default_config_path
    from .config import load_config
    return load_config(path if path else default_config_path())


def _dispatch(args: argparse.Namespace) -> int:
    from ..core import rundir
    from . import pipeline

    if getattr(args, "run", None):  # workers and Tune trials run in other working directories
        args.run = rundir.canonical(args.run)
    if args.cmd == "config":
        if args.config_cmd != "show":
            raise WsgError("usage: wsg config show [CONFIG]")
        from ..core.config import dump_config
        print(dump_config(_load(args.config)), end="")
        return 0
    if args.cmd == "status":
        print(pipeline.status_text(args.run))
        return 0
    if args.cmd == "verify":
        from ..core.integrity import verify_text

        code, text = verify_text(args.run)
        print(text)
        return code
    if args.cmd == "report":
        path = pipeline.build_report(args.run)
        print(f"report: {path}")
        return 0
    if args.cmd == "geometry":
        return pipeline.geometry_command(args)
    if args.cmd == "study":
        from .study import run_study

        return run_study(args.config, args.study, address=args.address or os.environ.get("RAY_ADDRESS"),
                         verbose=args.verbose)

    cfg = _load(args.config)
    run = args.run
    address = args.address or os.environ.get("RAY_ADDRESS") or cfg.resources.ray_address
    if args.cmd == "run":
        return pipeline.run_all(cfg, run, address=address, verbose=args.verbose)
    if args.cmd == "train":
        pipeline.check_cell_args(args.loss, args.lr)  # before any Ray start-up
    run = pipeline.prepare_run(cfg, run)
    with RunLock(run), pipeline.open_console(run, verbose=args.verbose), pipeline.session(address, dashboard=True):
        if args.cmd == "train":
            cfg = pipeline.check_tracking(cfg)
        if args.cmd == "rollouts":
            out = pipeline.run_rollouts(cfg, run)
        elif args.cmd == "train":
            out = pipeline.stage_train_one(cfg, run, loss=args.loss, seed=args.seed, lr=args.lr,
                                           init_seed=args.init_seed, data_seed=args.data_seed)
        elif args.cmd == "eval":
            out = pipeline.run_eval(cfg, run)
        else:
            out = pipeline.run_functional(cfg, run)
        say(f"wsg: [{args.cmd}] {pipeline._brief(args.cmd, out)}")
        print(out, flush=True)  # the whole summary, into the log
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.cmd:
        parser.print_help()
        return 0
    try:
        return _dispatch(args)
    except WsgError as err:
        print(f"wsg: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("wsg: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # vLLM engines spawn processes: keep the guard.
    sys.exit(main())
