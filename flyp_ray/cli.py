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
from flyp_ray.distributed import cluster
from flyp_ray.errors import BadInput, FlypRayError, first_line, input_error, worker_failure

log = logging.getLogger("flyp_ray")

Command = Callable[[argparse.Namespace], int]


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the data set's YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a train field (lr=3e-5) or a dotted path "
                             "(dataset.root=/data); the value is YAML")


def _add_promote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--promote", choices=("if-better", "always", "never"),
                        help="whether the registered model becomes `champion`: if it beats the "
                             "champion (default, tracking.promotion), always, or never")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(prog="flyp-ray", description=__doc__.splitlines()[0])
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = top.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="write a complete config for a data set folder "
                                       "(ImageFolder, save_to_disk dataset, WILDS, csv)")
    init.add_argument("data", metavar="DATA",
                      help="the data set's folder, or a Hugging Face hub name in the local cache")
    init.add_argument("--out", metavar="FILE", help="write the config here (default: stdout)")
    init.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override what init decides (model.arch=...)")
    init.set_defaults(run=cmd_init)

    validate = sub.add_parser("validate", help="check a config, its data and model; train nothing")
    _add_config(validate)
    validate.set_defaults(run=cmd_validate)

    train = sub.add_parser("train", help="one finetuning run with fixed hyperparameters")
    _add_config(train)
    train.add_argument("--name", help="the Ray run name; an existing one resumes")
    train.add_argument("--resume-from", help="a checkpoint folder to start from")
    train.set_defaults(run=cmd_train)

    tune = sub.add_parser("tune", help="search the config's space (Ray Tune + Optuna)")
    _add_config(tune)
    tune.add_argument("--resume", action="store_true",
                      help="continue the newest search of this config; finished trials stay")
    _add_promote(tune)
    tune.set_defaults(run=cmd_tune)

    tune_all = sub.add_parser("tune-all", help="one search per config file, in order")
    tune_all.add_argument("configs", nargs="+", metavar="CONFIG",
                          help="the data sets' YAML configs")
    tune_all.add_argument("--set", dest="overrides", action="append", default=[],
                          metavar="KEY=VALUE", help="an override applied to every config")
    tune_all.add_argument("--budget", type=float, metavar="WORKER_HOURS",
                          help="one budget for all the searches (GPU-hours when workers have "
                               "GPUs), shared in proportion to each data set's work per trial")
    tune_all.add_argument("--changed", action="store_true",
                          help="only the data sets whose data or training config changed since "
                               "their champion was made; the others start nothing")
    _add_promote(tune_all)
    tune_all.set_defaults(run=cmd_tune_all)

    compare = sub.add_parser("compare", help="run several methods on the config's data set and "
                                             "write the comparison table and plot")
    _add_config(compare)
    compare.add_argument("--methods", default="zeroshot,lp,ce,lpft,flyp",
                         help="comma-separated: zeroshot, lp, ce, lpft, flyp (default: all)")
    compare.add_argument("--tune", action="store_true",
                         help="one search per method (the config's search section) instead "
                              "of one run with the config's values")
    _add_promote(compare)
    compare.set_defaults(run=cmd_compare)

    evaluate = sub.add_parser("eval", help="evaluate a logged, registered or saved model on "
                                           "every split of the config's data set")
    evaluate.add_argument("--model", required=True, metavar="URI",
                          help="models:/name/version, models:/name@alias, runs:/id/model, "
                               "or a checkpoint folder or file")
    _add_config(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    status = sub.add_parser("status", help="each data set's champion, its data and the last "
                                           "search, read from MLflow")
    status.add_argument("configs", nargs="*", metavar="CONFIG",
                        help="the data sets' YAML configs (default: every flyp-ray model in "
                             "$MLFLOW_TRACKING_URI)")
    status.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="an override applied to every config")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    status.set_defaults(run=cmd_status)

    submit = sub.add_parser("submit", help="run a flyp-ray command on a Ray cluster as a Ray job")
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs and exit with its outcome")
    submit.add_argument("--working-dir", help="the folder uploaded with the job (default: .)")
    submit.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the flyp-ray command to run there, e.g. -- tune CONFIG")
    submit.set_defaults(run=cmd_submit)
    serve = sub.add_parser("serve", help="serve a logged model behind Ray Serve: images in, "
                                         "class names out, as `mlflow models serve` answers")
    serve.add_argument("model", metavar="MODEL_URI",
                       help="models:/name@alias, models:/name/version, runs:/id/model or a "
                            "model folder; an alias is pinned to its version at start")
    serve.add_argument("--replicas", type=int, default=1, help="model copies (default: 1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    serve.add_argument("--address", default=None,
                       help="a Ray cluster to deploy on (default: $RAY_ADDRESS, else a local Ray)")
    serve.add_argument("--max-batch-size", type=int, default=16,
                       help="requests merged into one model call (default: 16)")
    serve.add_argument("--batch-wait-s", type=float, default=0.01,
                       help="how long a request waits for others to join its batch "
                            "(default: 0.01)")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0,
                       help="Ray CPUs each replica reserves (default: 1)")
    serve.set_defaults(run=cmd_serve)

    demo = sub.add_parser("demo", help="the built-in default: synthetic data, tiny model, "
                                       "local Ray, local MLflow")
    demo.add_argument("--dir", default="flyp-ray-demo",
                      help="where the demo's MLflow database and Ray results go")
    demo.set_defaults(run=cmd_demo)
    return top


def load_config(args: argparse.Namespace) -> config_mod.Config:
    """The config named on the command line, with its --set overrides."""
    return config_mod.load(args.config, overrides(args))


def overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` overrides, with ``--promote`` as the setting it stands for."""
    promote = getattr(args, "promote", None)
    return [*args.overrides, *([f"tracking.promotion.policy={promote}"] if promote else [])]


def cmd_init(args: argparse.Namespace) -> int:
    """Write a config for a data folder (the YAML on stdout without --out); what was found and
    what was not decided on stderr."""
    from pathlib import Path

    from flyp_ray import init

    if args.out and Path(args.out).exists():
        raise BadInput(f"--out: {args.out} exists; remove it or name another file")
    if args.out and not Path(args.out).absolute().parent.is_dir():
        raise BadInput(f"--out: {args.out}: no folder {Path(args.out).absolute().parent}")
    text, draft = init.run_init(args.data, args.overrides, args.out)
    for line in draft.found:
        print(f"flyp-ray init: {line}", file=sys.stderr)
    for line in draft.undecided:
        print(f"flyp-ray init: not decided: {line}", file=sys.stderr)
    if not args.out:
        sys.stdout.write(text)
        return 0
    Path(args.out).write_text(text)
    print(f"flyp-ray init: wrote {args.out}; next: flyp-ray validate {args.out}", file=sys.stderr)
    print_json({"config": args.out, "dataset": draft.raw["dataset"]["name"]})
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Everything train and tune would check before Ray starts; print what was found.

    Warnings (allowed, but most likely not meant) go to stderr and leave the exit code 0.
    """
    cfg = load_config(args)
    address = cluster.check_address()
    from flyp_ray import preflight

    checked = preflight.check(cfg, search=preflight.searches(cfg))
    for line in checked.lines:
        print(line)
    if address:
        print(f"RAY_ADDRESS {address}: takes connections")
    print(preflight.fit_for(cfg))
    for warning in checked.warnings:
        print(f"flyp-ray: warning: {warning}", file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run one training and print its JSON line last."""
    cfg = load_config(args)  # first: bad YAML is reported before the heavy imports below
    cluster.check_address()
    from flyp_ray import preflight
    from flyp_ray.distributed import trainer
    from flyp_ray.finetune import checkpoint

    resume_from = checkpoint.resume_source(args.resume_from) if args.resume_from else None
    preflight.report(preflight.check(cfg, search=False))
    cluster.init_ray(cfg)
    outcome = trainer.train(cfg, name=args.name, resume_from=resume_from)
    print_json(outcome.as_json())
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit the command after ``--`` as a Ray job; with --wait, its exit code."""
    from pathlib import Path

    from flyp_ray.distributed import submit

    command = args.job_command[1:] if args.job_command[:1] == ["--"] else args.job_command
    if not args.address:
        raise BadInput("submit: --address is required (or set RAY_API_SERVER_ADDRESS)")
    working_dir = Path(args.working_dir) if args.working_dir else None
    client, job_id = submit.start(args.address, command, working_dir=working_dir)
    if not args.wait:
        print_json({"job_id": job_id, "address": client.get_address()})
        return 0
    return submit.follow(client, job_id)


def cmd_tune(args: argparse.Namespace) -> int:
    """Run or resume one search and print its summary last; 1 if no trial gave the metric."""
    cfg = load_config(args)
    cluster.check_address()
    from flyp_ray import preflight
    from flyp_ray.search import tune

    preflight.report(preflight.check(cfg, resume=args.resume))
    cluster.init_ray(cfg)
    summary = tune.run_search(cfg, resume=args.resume)
    print_json(summary)
    return 0 if summary["best_trial_id"] is not None else 1


def cmd_tune_all(args: argparse.Namespace) -> int:
    """One search per config (all checked first); a table on stderr, a JSON line last.

    With ``--changed``, the data sets unchanged since their champion start nothing (and take no
    share of ``--budget``); exit 0 when each data set is searched or unchanged.
    """
    if args.budget is not None and not args.budget > 0:
        raise BadInput(f"--budget: must be a number of worker-hours > 0, got {args.budget}")
    cfgs = [config_mod.load(path, overrides(args)) for path in args.configs]
    cluster.check_address()
    from flyp_ray import preflight
    from flyp_ray.search import changed, tune

    selected = changed.select(cfgs) if args.changed else [{} for _ in cfgs]
    searched = changed.to_search(cfgs, selected)
    if searched:
        searched = preflight.check_searches(searched, args.budget)
        cluster.init_ray()
        for cfg in searched:
            cluster.check_connected(cfg)
    summaries = changed.merge(selected, tune.run_all(searched))
    tune.print_table(cfgs, summaries)
    print_json({"searches": summaries})
    return 0 if all(s.get("best_trial_id") or s.get("unchanged") for s in summaries) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method through the same loop; the table's paths and rows as the JSON line last."""
    cfg = load_config(args)
    cluster.check_address()
    from flyp_ray import preflight
    from flyp_ray.search import compare

    methods = compare.parse_methods(args.methods)
    preflight.report(preflight.check_methods(cfg, methods, search=args.tune))
    cluster.init_ray(cfg)
    summary = compare.run_compare(cfg, methods, tune=args.tune)
    print_json(summary)
    return 0 if not any(row["error"] for row in summary["table"]) else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Each data set's champion, data and last search: a table, or one JSON object."""
    cfgs = [config_mod.load(path, args.overrides) for path in args.configs]
    from flyp_ray.tracking import status

    entries = [status.of_config(cfg) for cfg in cfgs] if cfgs else status.of_registry()
    if args.json:
        print_json({"data_sets": entries})
    else:
        print(status.table(entries))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a model on every evaluation split; print its metrics as the JSON line last."""
    cfg = load_config(args)
    from flyp_ray import preflight
    from flyp_ray.tracking import registry

    preflight.check_eval(cfg)
    metrics = registry.evaluate_model(cfg, args.model)
    print_json({"model": args.model, "metrics": metrics})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a model behind Ray Serve until Ctrl-C; a JSON line with its URL once it answers."""
    from flyp_ray.serve import app, deploy

    options = app.ServeOptions(model_uri=args.model, replicas=args.replicas,
                               max_batch_size=args.max_batch_size,
                               batch_wait_timeout_s=args.batch_wait_s,
                               num_cpus=args.cpus_per_replica)
    deploy.serve_model(options, host=args.host, port=args.port, address=args.address)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Pre-train the tiny model (cached), then a small FLYP search; summary JSON last."""
    from pathlib import Path

    from flyp_ray import demo

    cluster.init_ray()
    summary, report = demo.run_demo(Path(args.dir))
    cluster.shutdown_if_started()  # Ray's late log lines would land after the report
    print(report, file=sys.stderr)
    print_json(summary)
    return 0 if summary.get("best_trial_id") is not None else 1


def print_json(payload: dict[str, Any]) -> None:
    """The machine-readable result: one JSON line, last on stdout."""
    # Ray streams its processes' output to ours until it shuts down: a late warning would
    # otherwise land after the result line that scripts read.
    cluster.shutdown_if_started()
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True, default=str), flush=True)


def _quiet_ray() -> None:
    """Stop Ray's log stream before the last line: its late output would come after it."""
    try:
        cluster.shutdown_if_started()
    except Exception as err:  # noqa: BLE001 - the error being reported matters more
        log.debug("Ray did not shut down cleanly: %s", err)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flyp-ray`` and ``python -m flyp_ray``."""
    args = parser().parse_args(argv)
    # Libraries (open_clip logs every model build on the root logger) speak at WARNING; our own
    # progress at INFO. All of it goes to stderr: stdout ends with the JSON result.
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("flyp_ray").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    run: Command = args.run
    try:
        return run(args)
    except BadInput as err:
        _quiet_ray()
        print(f"flyp-ray: error: {err}", file=sys.stderr)
        return err.exit_code
    except FlypRayError as err:
        _quiet_ray()
        print(f"flyp-ray: failed: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("flyp-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        failure = input_error(err) or worker_failure(err)
        if failure is None:
            raise
        # Ray has already logged the worker's traceback; end with the one line that matters.
        _quiet_ray()
        kind = "error" if isinstance(failure, BadInput) else "failed"
        print(f"flyp-ray: {kind}: a training worker stopped: {first_line(failure)}",
              file=sys.stderr)
        return failure.exit_code if isinstance(failure, FlypRayError) else 1


if __name__ == "__main__":
    raise SystemExit(main())
