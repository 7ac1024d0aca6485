"""`braintumor` command line: parses arguments and calls one component. No logic lives here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from components.config import Params, ProjectError, load_params
from flows.console import stage_console

COMMANDS: dict[str, Callable[[argparse.Namespace, Params], object]] = {}


def command(name: str):
    def register(function):
        COMMANDS[name] = function
        return function
    return register


def _print(result: object, out=None) -> None:
    if result is not None:
        print(json.dumps(result, indent=2, default=str), file=out or sys.stdout)


@command("data import")
def _data_import(args, params):
    if args.append:
        from components.data_append import Labels, append_dataset

        labels = None
        if args.labels:
            labels = Labels(Path(args.labels), tuple(args.classes.split(",")) if args.classes else None, args.sample)
        elif args.classes or args.sample:
            raise ProjectError("--classes and --sample pick rows of a labels file with --append: pass --labels FILE")
        return append_dataset(args.source, params, labels, args.source_name)
    if args.labels or args.classes or args.source_name:
        raise ProjectError("--labels, --classes and --source-name go with --append (new labelled scans)")
    from components.data_import import import_dataset

    return import_dataset(args.source, params.paths.raw, sample=args.sample)


@command("manifest")
def _manifest(args, params):
    from components.manifest import write_manifest

    frame = write_manifest(params.paths.raw, params.paths.manifest, params.manifest)
    return {"files": len(frame), "unreadable": int((~frame.readable).sum()), "out": str(params.paths.manifest)}


@command("validate")
def _validate(args, params):
    import pandas as pd

    from components.validate import validate_manifest

    return validate_manifest(pd.read_parquet(params.paths.manifest), params.validate_params, params.data.classes,
                             params.paths.validation_reports, params.paths.quarantine,
                             params.paths.validation_summary)


@command("split")
def _split(args, params):
    from components.split import write_splits

    return write_splits(params.paths, params.split, params.seed)


@command("train")
def _train(args, params):
    from components.train import train_model

    result = train_model(args.model, params)
    return {"model": result.name, "run_id": result.run_id, "epochs_run": result.epochs_run,
            "resumed_from_epoch": result.resumed_from_epoch, "val_accuracy": result.metrics["val"]["accuracy"],
            "metrics": str(params.paths.metrics / f"{result.name}.json")}


@command("stack")
def _stack(args, params):
    from components.stack import run_stack

    summary = run_stack(params)
    return {k: summary[k] for k in ("models", "fit_rows", "best_estimator", "run_id")}


@command("reference")
def _reference(args, params):
    from components.reference import build_reference

    return build_reference(params)


@command("evaluate")
def _evaluate(args, params):
    from components.evaluate import run_evaluate

    return run_evaluate(params)


@command("register")
def _register(args, params):
    from components.register import run_register

    return run_register(params)


@command("promote")
def _promote(args, params):
    from components.promote import promote

    result = promote(params, dry_run=args.dry_run, model=args.model)
    print(result.pop("table"), file=args.console.out)
    return result


@command("rollback")
def _rollback(args, params):
    from components.promote import rollback

    return rollback(params, model=args.model)


@command("predict")
def _predict(args, params):
    from components import tracking
    from components.predict import predict_paths

    tracking.configure(params.tracking)
    frame = predict_paths(args.paths, args.model_uri)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(args.out, index=False)
        return {"rows": len(frame), "out": args.out}
    print(frame.to_csv(index=False), end="", file=args.console.out)
    return None


@command("style")
def _style(args, params):
    from components.style import run_style

    return run_style(params)


@command("audit")
def _audit(args, params):
    from components.audit import run_audit

    return run_audit(params)


@command("evaluate-external")
def _evaluate_external(args, params):
    from components.external import run_external

    return run_external(params, args.source, args.model_uri, args.name)


@command("explain")
def _explain(args, params):
    from components.explain import explain_image

    out = Path(args.out or f"reports/explain/{Path(args.image).stem}_{args.model}.png")
    return explain_image(Path(args.image), params.paths.models / args.model / "model.keras", params.data,
                         out)


def _prefect_startup_timeout(params) -> None:
    """Give Prefect's ephemeral server params' startup timeout, unless the environment already sets one."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(params.flow.server_startup_timeout))


@command("report")
def _report(args, params):
    from components.report import write_report
    from components.tracking import git_commit

    return str(write_report(params, git_commit()))


def _refuse_overrides(args, why: str) -> None:
    if args.overrides:
        raise ProjectError(f"-S {' -S '.join(args.overrides)}: `braintumor flow {args.flow_command}` does not take "
                           f"overrides: {why}")


@command("flow train")
def _flow_train(args, params):
    _prefect_startup_timeout(params)
    from flows.training import run_with_runner  # Prefect lives in flows/, imported only for `flow` commands

    # -S is written into params.yaml under the run lock (as `dvc exp run -S` does), so DVC and the flow agree.
    return run_with_runner(args.params, args.overrides, args.promote, params)


@command("flow predict")
def _flow_predict(args, params):
    _refuse_overrides(args, "batch_predict reads params.yaml as committed; edit it, or pass --params FILE")
    _prefect_startup_timeout(params)
    from flows.inference import batch_predict

    return batch_predict(args.folder, args.model_uri, args.params, params)


@command("flow monitor")
def _flow_monitor(args, params):
    _refuse_overrides(args, "monitor_batch reads params.yaml as committed; edit it, or pass --params FILE")
    _prefect_startup_timeout(params)
    from flows.monitoring import monitor_batch

    return monitor_batch(args.folder, args.model_uri, args.params, params)


@command("flow serve")
def _flow_serve(args, params):
    _refuse_overrides(args, "every scheduled run reads params.yaml afresh; edit and commit it instead")
    from flows.deploy import serve

    serve(args.params, params)


@command("quick")
def _quick(args, params):
    from flows.quick import run_quick

    return run_quick(params, Path(args.params).resolve().parent)


@command("services")
def _services(args, params):
    from flows.services import run

    result = run(args.action, params)
    if args.action == "up":  # shell lines for the pipeline, e.g. eval "$(braintumor services up)"
        print("\n".join(result["exports"]), file=args.console.out)
        return None
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braintumor", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param for this run, e.g. -S train.epochs=2 (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data set management").add_subparsers(dest="data_command", required=True)
    data_import = data.add_parser("import", help="copy a Kaggle-layout data set into data/raw and `dvc add` it")
    data_import.add_argument("--source", required=True,
                             help="a folder, a .zip, or kaggle:masoudnickparvar/brain-tumor-mri-dataset")
    data_import.add_argument("--append", action="store_true",
                             help="add the labelled scans of the folder SRC/<class>/ (or SRC/Training/<class>/) to "
                             "data/raw/Training as a new DVC version; refuses unreadable, invalid or unknown-class "
                             "files and near duplicates of test images, all or nothing")
    data_import.add_argument("--labels", metavar="FILE",
                             help="with --append: a labels file (under SRC or a path) with columns file and label, "
                             "optionally weighting and group; SRC's layout then does not matter")
    data_import.add_argument("--classes", metavar="C1,C2",
                             help="with --labels: take only rows of these labels (training classes only)")
    data_import.add_argument("--sample", type=int, metavar="N",
                             help="only the first N scans of each class (a smoke run; Testing: a quarter as many); "
                             "with --append, the first N rows of each label")
    data_import.add_argument("--source-name", metavar="NAME",
                             help="with --append: the source recorded in the manifest (default: SRC's folder name)")

    sub.add_parser("manifest", help="scan data/raw into data/manifest.parquet")
    sub.add_parser("validate", help="Great Expectations checks; writes quarantine and Data Docs")
    sub.add_parser("split", help="leakage-free train/val/stack/gate/test CSVs")
    sub.add_parser("style", help="acquisition style and MRI weighting of every scan: data/style.parquet "
                   "(params: style)")
    train = sub.add_parser("train", help="train one CNN; one MLflow run")
    train.add_argument("--model", required=True, help="custom_cnn | mobilenetv2 | densenet169 | resnet50")
    sub.add_parser("stack", help="fit the FLAML meta-learner on the stack split's predictions")
    sub.add_parser("reference", help="profile of the training data for drift monitoring: embeddings, style "
                   "features, predicted class mix, OOD threshold (params: monitor)")
    sub.add_parser("evaluate", help="metrics, plots and Grad-CAM on the official and clean test sets")
    sub.add_parser("register", help="register base models and the ensemble; new versions get @challenger")
    for name, text in (("promote", "move @champion to @challenger if the gate in params passes"),
                       ("rollback", "move @champion back to the champion it replaced")):
        action = sub.add_parser(name, help=text)
        action.add_argument("--model", help="registered model suffix (default: params promote.model)")
        if name == "promote":
            action.add_argument("--dry-run", action="store_true", help="print the comparison, change nothing")
    sub.add_parser("report", help="write docs/results.md from the last run's outputs (params: report)")
    predict = sub.add_parser("predict", help="score images with a registered model")
    predict.add_argument("paths", nargs="+", help="image files")
    predict.add_argument("--model-uri", default="models:/brain-tumor-ensemble@champion")
    predict.add_argument("--out", help="write a CSV here instead of printing it")
    sub.add_parser("audit", help="shortcut audit: label x style tables, style alone against chance, models per "
                   "style cell (params: audit)")
    external = sub.add_parser("evaluate-external", help="score a labelled folder of another collection with the "
                              "ensemble and every base model, without the Kaggle set's duplicates (params: external)")
    external.add_argument("--source", required=True, help="DIR/<class>/ (Kaggle classes, optionally under "
                          "Training/ and Testing/), DIR/{yes,no}/ or DIR/{tumor,notumor}/")
    external.add_argument("--model-uri", help="a pyfunc ensemble, e.g. models:/brain-tumor-ensemble@champion "
                          "(default: the workspace's trained models/, no registry needed)")
    external.add_argument("--name", help="report name: external.out_dir/NAME.{md,json} (default: the folder's name)")
    flow = sub.add_parser("flow", help="Prefect flows").add_subparsers(dest="flow_command", required=True)
    flow_train = flow.add_parser("train", help="run train_pipeline (ephemeral Prefect server unless PREFECT_API_URL);"
                                 " -S KEY=VALUE is written into params.yaml under the run lock, like `dvc exp run -S`")
    flow_train.add_argument("--promote", action="store_true", default=None,
                            help="end with the gated promotion (default: params flow.promote)")
    flow_predict = flow.add_parser("predict", help="run batch_predict on a folder under flow.inference_root")
    flow_predict.add_argument("folder")
    flow_predict.add_argument("--model-uri", default="models:/brain-tumor-ensemble@champion")
    flow_monitor = flow.add_parser("monitor", help="run monitor_batch on a folder under flow.inference_root: GX "
                                   "checks, embedding, style and class-mix drift, OOD scans; retrains on evidence "
                                   "(params: monitor)")
    flow_monitor.add_argument("folder")
    flow_monitor.add_argument("--model-uri", help="a registered ensemble, e.g. models:/brain-tumor-ensemble@champion, "
                              "compared with its `reference` artifact (default: the workspace's trained models and "
                              "paths.reference, no registry needed)")
    flow.add_parser("serve", help="serve the scheduled train_pipeline deployment (cron from params)")
    sub.add_parser("quick", help="every stage once on a small sample at a small size, in a scratch checkout of HEAD "
                   "(params: quick): a smoke run, marked as such, in minutes")
    services = sub.add_parser("services", help="team PostgreSQL, MLflow (basic auth) and Prefect servers (params: "
                              "services); credentials from the environment")
    services.add_argument("action", choices=["up", "down", "status"],
                          help="up: start what is not running and print the pipeline's env; down: stop all; status")
    explain = sub.add_parser("explain", help="Grad-CAM overlay PNG for one image")
    explain.add_argument("image")
    explain.add_argument("--model", required=True, help="base model name")
    explain.add_argument("--out", help="PNG path (default: reports/explain/<image>_<model>.png)")
    return parser


def stage_name(args: argparse.Namespace, command: str) -> str:
    """How the console and the log file name this run: DVC's stage name where there is one (`train@custom_cnn`)."""
    return f"{command}@{args.model}" if command == "train" else command


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = args.command + (f" {args.data_command}" if args.command == "data" else "")
    name = name + (f" {args.flow_command}" if args.command == "flow" else "")
    with stage_console(stage_name(args, name), args.verbose) as console:
        try:
            params = load_params(Path(args.params), args.overrides)
            args.console = console
            _print(COMMANDS[name](args, params), console.out)
        except (FileNotFoundError, ProjectError) as exc:  # anything else is a bug: its traceback is kept
            if args.verbose:
                raise
            where = f"; the full log is {console.log_file}" if console.log_file else ""
            print(f"braintumor {name}: error: {exc}\n(run `braintumor -v ...` for the traceback{where})",
                  file=console.err)
            return 1
        except BaseException:  # a bug: its traceback reaches the console as the exception leaves, and the log here
            logging.getLogger("braintumor").exception("braintumor %s failed", name)
            raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
