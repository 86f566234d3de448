"""The ``flyp-ray`` command line: parse, dispatch, and turn errors into exit codes.

Exit codes: 0 done; 2 bad input, with one line on stderr naming the file, key and value; 1 any
other failure. What a person reads (trial lines, progress, the final table) goes to stderr; the
result of ``train``, ``tune``, ``tune-all``, ``compare``, ``eval`` and ``demo`` is one JSON
line, last on stdout when stdout is not a terminal (scripts, Ray jobs, CI) or with ``--json``.

One piece past 400 lines: most of it is the parser, the one place that lists every command with
its options and what it prints, in the order a user meets them; each command is a short
function that calls into its wing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flyp_ray import config as config_mod
from flyp_ray.distributed import cluster, verbosity
from flyp_ray.errors import BadInput, FlypRayError, first_line, input_error, worker_failure

log = logging.getLogger("flyp_ray")

Command = Callable[[argparse.Namespace], int]
# tracking.runs.COMMAND_ENV, the MLflow runs' Source (not imported from there: it brings MLflow)
COMMAND_ENV = "FLYP_RAY_COMMAND"


DESCRIPTION = ("Finetune CLIP-style models (open_clip) with FLYP as Ray Train jobs, searched\n"
               "per data set with Ray Tune + Optuna, every run tracked in MLflow.")
START_HERE = """\
where to start:
  flyp-ray demo                      the whole product on built-in data, in a few minutes
  flyp-ray init DATA --out c.yaml    a config for your data folder (or start from an example
                                     in search_spaces/)
  flyp-ray validate CONFIG           the config checked as a run would check it; trains nothing
  flyp-ray train CONFIG              then one run, or
  flyp-ray tune CONFIG               the search, its best model registered in MLflow
  flyp-ray COMMAND --help            what a command takes and prints

A command prints a line when a trial starts and ends, progress, and a final table on stderr;
its result is one JSON line, last on stdout when stdout is not a terminal (or with --json).
--verbose (or FLYP_RAY_VERBOSE=1) adds Ray's, Tune's and the libraries' own logs.
Exit codes: 0 done, 2 bad input (one line naming the file, key and value), 1 anything else."""
RESULT = ("When stdout is not a terminal (or with --json), the result is one JSON line, last "
          "on stdout.")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="the data set's YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="override a train field (lr=3e-5) or a dotted path "
                             "(dataset.root=/data); the value is YAML")


def _add_output(parser: argparse.ArgumentParser, result: bool = True) -> None:
    """``--verbose`` (also after the command) and, for commands with a JSON result, ``--json``."""
    # SUPPRESS: without the flag here, the value given before the command stays.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="also Ray's, Tune's and the libraries' own logs")
    if result:
        parser.add_argument("--json", action="store_true",
                            help="print the JSON result last on stdout on a terminal too")


def _add_promote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--promote", choices=("if-better", "always", "never"),
                        help="whether the registered model becomes `champion`: if it beats the "
                             "champion (default, tracking.promotion), always, or never")


def _command(sub: Any, name: str, summary: str, prints: str,
             result: bool = True) -> argparse.ArgumentParser:
    """A subcommand: one line in the overview, what it does and prints in its own help."""
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=summary, description=f"{summary[0].upper()}{summary[1:]}. {prints}"
        + (f" {RESULT}" if result else ""))
    _add_output(parser, result)
    return parser


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command, in the order a user meets them."""
    top = argparse.ArgumentParser(prog="flyp-ray", description=DESCRIPTION, epilog=START_HERE,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-v", "--verbose", action="store_true",
                     help="also Ray's, Tune's and the libraries' own logs (FLYP_RAY_VERBOSE=1)")
    sub = top.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")

    demo = _command(sub, "demo", "the whole product on built-in data, in a few minutes",
                    "Pre-trains the tiny model on synthetic captions (cached), measures its "
                    "zero-shot accuracy, runs a FLYP search of 6 trials with re-checks and "
                    "registers the champion. Prints a line per trial, progress, and the table "
                    "of zero-shot, best trial and champion, with the `mlflow ui` command.")
    demo.add_argument("--dir", default="flyp-ray-demo",
                      help="where the demo's MLflow database and Ray results go")
    demo.set_defaults(run=cmd_demo)

    init = _command(sub, "init", "write a complete config for your data folder",
                    "Prints what it found and what it could not decide on stderr, and the YAML "
                    "on stdout without --out. Reads an ImageFolder tree, a save_to_disk dataset "
                    "(or a hub name in the local cache), a WILDS or csv root as a run would.",
                    result=False)
    init.add_argument("data", metavar="DATA",
                      help="the data set's folder, or a Hugging Face hub name in the local cache")
    init.add_argument("--out", metavar="FILE", help="write the config here (default: stdout)")
    init.add_argument("--set", dest="overrides", action="append", default=[],
                      metavar="KEY=VALUE", help="override what init decides (model.arch=...)")
    init.set_defaults(run=cmd_init)

    validate = _command(sub, "validate", "check a config, its data and model; train nothing",
                        "Prints what it found on stdout and warnings on stderr; exits 2 with "
                        "one line naming the file, key and value where a run would refuse.",
                        result=False)
    _add_config(validate)
    validate.set_defaults(run=cmd_validate)

    train = _command(sub, "train", "one finetuning run with the config's values",
                     "Prints the workers' progress and the selected epoch's metrics on every "
                     "split; the result is {metrics, best_epoch, checkpoint, mlflow_run_id}.")
    _add_config(train)
    train.add_argument("--name", help="the Ray run name; an existing one resumes")
    train.add_argument("--resume-from", help="a checkpoint folder to start from")
    train.set_defaults(run=cmd_train)

    tune = _command(sub, "tune", "search the config's space; register the best model",
                    "Prints a line when each trial starts and ends, progress, the re-check and "
                    "registry lines, and the table of the best trial (and champion); the "
                    "result is summary.json, also written to the search's folder.")
    _add_config(tune)
    tune.add_argument("--resume", action="store_true",
                      help="continue the newest search of this config; finished trials stay")
    _add_promote(tune)
    tune.set_defaults(run=cmd_tune)

    tune_all = _command(sub, "tune-all", "one search per config file, one budget for all",
                        "Prints each search's lines and a table of every data set's best; the "
                        "result is {searches: [summary, ...]}.")
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

    compare = _command(sub, "compare", "every method (zeroshot, lp, ce, lpft, flyp) side by side",
                       "Prints the table of ID and OOD accuracy with WiSE-FT, also written "
                       "with a CSV and an ID-vs-OOD plot to its folder; the result is "
                       "{folder, table, plot, runs, mlflow_run_id}.")
    _add_config(compare)
    compare.add_argument("--methods", default="zeroshot,lp,ce,lpft,flyp",
                         help="comma-separated: zeroshot, lp, ce, lpft, flyp (default: all)")
    compare.add_argument("--tune", action="store_true",
                         help="one search per method (the config's search section) instead "
                              "of one run with the config's values")
    _add_promote(compare)
    compare.set_defaults(run=cmd_compare)

    evaluate = _command(sub, "eval", "a logged, registered or saved model on every split",
                        "Prints accuracy, macro F1 and worst-group accuracy per split; the "
                        "result is {model, metrics}.")
    evaluate.add_argument("--model", required=True, metavar="URI",
                          help="models:/name/version, models:/name@alias, runs:/id/model, "
                               "or a checkpoint folder or file")
    _add_config(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    status = _command(sub, "status", "each data set's champion, its data and the last search",
                      "Prints per data set, read from MLflow alone (a remote server works): the "
                      "registered model, champion version, its ID and OOD accuracy, the data "
                      "digest it was trained on and whether the data changed since, the last "
                      "search and decision; a table, or one JSON object with --json.",
                      result=False)
    status.add_argument("configs", nargs="*", metavar="CONFIG",
                        help="the data sets' YAML configs (default: every flyp-ray model in "
                             "$MLFLOW_TRACKING_URI)")
    status.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="an override applied to every config")
    status.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    status.set_defaults(run=cmd_status)

    serve = _command(sub, "serve", "a logged model behind Ray Serve: images in, class names out",
                     "Prints one JSON line (model, url, replicas) once its replicas answer, "
                     "then runs until Ctrl-C or SIGTERM.", result=False)
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

    submit = _command(sub, "submit", "any of these commands as a job on a Ray cluster",
                      "Prints the job id as one JSON line; with --wait, the job's output and "
                      "then its status, and exits with the command's exit code. --verbose "
                      "here makes the job verbose too.", result=False)
    submit.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
                        help="the cluster's dashboard URL, e.g. http://127.0.0.1:8265 "
                             "(default: $RAY_API_SERVER_ADDRESS)")
    submit.add_argument("--wait", action="store_true",
                        help="stream the job's logs and exit with its outcome")
    submit.add_argument("--working-dir", help="the folder uploaded with the job (default: .)")
    submit.add_argument("job_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the flyp-ray command to run there, e.g. -- tune CONFIG")
    submit.set_defaults(run=cmd_submit)
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
    print_result(args, {"config": args.out, "dataset": draft.raw["dataset"]["name"]})
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
    from flyp_ray.distributed import draws
    from flyp_ray.finetune import checkpoint

    resume_from = checkpoint.resume_source(args.resume_from) if args.resume_from else None
    preflight.report(preflight.check(cfg, search=False))
    cluster.init_ray(cfg)
    outcome = draws.train(cfg, name=args.name, resume_from=resume_from)
    from flyp_ray.search import report

    print_result(args, outcome.as_json(), report.train_text(cfg, outcome))
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
    from flyp_ray.search import report, tune

    preflight.report(preflight.check(cfg, resume=args.resume))
    cluster.init_ray(cfg)
    summary = tune.run_search(cfg, resume=args.resume)
    print_result(args, summary, report.search_text(cfg, summary))
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
    cluster.shutdown_if_started()  # Ray's late output must not land inside the table
    tune.print_table(cfgs, summaries)
    print_result(args, {"searches": summaries})
    return 0 if all(s.get("best_trial_id") or s.get("unchanged") for s in summaries) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    """Every method through the same loop; the table's paths and rows as the JSON line last."""
    cfg = load_config(args)
    cluster.check_address()
    from flyp_ray import preflight
    from flyp_ray.search import compare, report

    methods = compare.parse_methods(args.methods)
    preflight.report(preflight.check_methods(cfg, methods, search=args.tune))
    cluster.init_ray(cfg)
    summary = compare.run_compare(cfg, methods, tune=args.tune)
    print_result(args, summary, report.compare_text(summary))
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
    from flyp_ray.search import report

    print_result(args, {"model": args.model, "metrics": metrics},
                 report.eval_text(args.model, metrics))
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
    """Pre-train the tiny model (cached), then a small FLYP search; the table, the JSON last."""
    from pathlib import Path

    from flyp_ray import demo

    cluster.init_ray()
    summary, report = demo.run_demo(Path(args.dir))
    print_result(args, summary, report)
    return 0 if summary.get("best_trial_id") is not None else 1


def print_result(args: argparse.Namespace, payload: dict[str, Any],
                 text: str | None = None) -> None:
    """A command's result: ``text`` for a person on stderr, then the JSON line, last on stdout
    where a program reads it (stdout is not a terminal) or ``--json`` asks for it."""
    cluster.shutdown_if_started()  # Ray's late log lines would land after the result
    if text:
        print(text, file=sys.stderr, flush=True)
    if getattr(args, "json", False) or not sys.stdout.isatty():
        print_json(payload)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    # Our own lines at INFO, the libraries' off at their source unless --verbose; all of it on
    # stderr: stdout ends with the JSON result.
    verbosity.configure(args.verbose)
    # The Source of the MLflow runs this command makes: what the user typed (for as long as
    # the command runs: a caller that runs several in one process gets each its own).
    before = os.environ.get(COMMAND_ENV)
    os.environ[COMMAND_ENV] = shlex.join(["flyp-ray", *argv])
    try:
        return run_command(args)
    finally:
        if before is None:
            os.environ.pop(COMMAND_ENV, None)
        else:
            os.environ[COMMAND_ENV] = before


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit code, errors turned into one line on stderr."""
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
