"""The ``flyp-ray`` command line: parse, dispatch, and turn errors into exit codes.

Exit codes: 0 done; 2 bad input, with one line on stderr naming the file, key and value; 1 any
other failure. The last line on stdout of ``train`` and ``tune`` is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flyp_ray import config as config_mod
from flyp_ray.errors import BadInput, FlypRayError

log = logging.getLogger("flyp_ray")

Command = Callable[[argparse.Namespace], int]


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the data set's YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a train field (lr=3e-5) or a dotted path "
                             "(dataset.root=/data); the value is YAML")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(prog="flyp-ray", description=__doc__.splitlines()[0])
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check a config, its data and model; train nothing")
    _add_config(validate)
    validate.set_defaults(run=cmd_validate)

    train = sub.add_parser("train", help="one finetuning run with fixed hyperparameters")
    _add_config(train)
    train.add_argument("--name", help="the Ray run name; an existing one resumes")
    train.add_argument("--resume-from", help="a checkpoint folder to start from")
    train.set_defaults(run=cmd_train)
    return top


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config named on the command line, with its --set overrides."""
    return config_mod.load(args.config, args.overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check the config, the data root and the model spec; print what was found."""
    from flyp_ray.data import check_data
    from flyp_ray.model import check_model

    cfg = load_config(args)
    print(f"{cfg.source}: config ok")
    print(check_data(cfg.dataset, cfg.source))
    print(check_model(cfg.model, cfg.source))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run one training and print its JSON line last."""
    cfg = load_config(args)
    _preflight(cfg)
    from flyp_ray import trainer

    init_ray()
    outcome = trainer.train(cfg, name=args.name, resume_from=args.resume_from)
    print_json(outcome.as_json())
    return 0


def _preflight(cfg: config_mod.Config) -> None:
    """Everything that can be checked before Ray starts: data, model, tracking."""
    from flyp_ray import tracking
    from flyp_ray.data import check_data
    from flyp_ray.loop import check_method
    from flyp_ray.model import check_model

    check_method(cfg.train)
    check_data(cfg.dataset, cfg.source)
    check_model(cfg.model, cfg.source)
    tracking.check_uri(cfg.tracking.uri, cfg.source)


def init_ray() -> None:
    """Join the cluster in RAY_ADDRESS (or the one this job runs in), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True,
                 configure_logging=False)


def print_json(payload: dict[str, Any]) -> None:
    """The machine-readable result: one JSON line, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True, default=str), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flyp-ray`` and ``python -m flyp_ray``."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    run: Command = args.run
    try:
        return run(args)
    except BadInput as err:
        print(f"flyp-ray: error: {err}", file=sys.stderr)
        return err.exit_code
    except FlypRayError as err:
        print(f"flyp-ray: failed: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("flyp-ray: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
