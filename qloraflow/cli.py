"""The ``qloraflow`` command: registry operations, deployment manifests, run comparison, config checks.

    qloraflow validate configs/tiny.yaml
    qloraflow plan configs/llama3-8b-qlora-a10g.yaml --gpu a10g [--price-per-hour 1.0]
    qloraflow models --name tiny-sql [--json]
    qloraflow promote --name tiny-sql --version 3 [--force]
    qloraflow rollback --name tiny-sql
    qloraflow deploy --target k8s --model-uri models:/tiny-sql@champion --version 3 --dry-run
    qloraflow compare --experiment qloraflow-demo
    qloraflow tracking replay [FOLDER]

Every subcommand has its own ``-h``. The registry commands and ``compare`` use ``--tracking-uri``
(before or after the subcommand), else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``. Each is
a thin layer over the library functions the pipeline uses; ``deploy`` and ``compare`` take exactly
the options their modules define (``qloraflow.deploy``, ``qloraflow.compare``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from qloraflow.errors import DataValidationError, QloraflowError, RegistryError, TrackingError

# When neither --metric nor the registered model (its last promotion's gate) names one.
DEFAULT_GATE_METRIC = "exact_match"


class _SubcommandParser(argparse.ArgumentParser):
    """A subcommand's parser: rejects unknown arguments itself and records the ones it was given.

    Rejecting here (not in the top-level parser) prints the subcommand's own usage, which lists the
    options it does take. ``deploy`` hands the recorded strings to ``qloraflow.deploy.deploy_main``,
    which parses them with the same parser the subcommand was built from.
    """

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        ns, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)} (see '{self.prog} -h')")
        ns.subcommand_argv = list(args) if args is not None else []
        return ns, extras


# ---------------------------------------------------------------------------------------------
# The tracking store
# ---------------------------------------------------------------------------------------------


def _tracking_uri(args: argparse.Namespace) -> str:
    """``--tracking-uri`` after the subcommand, else before it, else $MLFLOW_TRACKING_URI, else the default.

    Raises:
        TrackingError: a ``sqlite:///`` store whose file does not exist (MLflow would create an empty
            one and then report that nothing is in it), or an HTTP server that does not answer.
    """
    from qloraflow.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(getattr(args, "tracking_uri", None) or args.global_tracking_uri)
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):].split("?", 1)[0]
        if path and path != ":memory:" and not Path(path).is_file():
            raise TrackingError(
                f"MLflow store {uri} does not exist (no file {os.path.abspath(path)}); run the pipeline first "
                "(make demo), run this from the folder that holds mlflow.db, or pass --tracking-uri / set "
                "MLFLOW_TRACKING_URI to the store the pipeline wrote")
    check_reachable(uri)
    return uri


def _client(args: argparse.Namespace):  # noqa: ANN202
    from qloraflow.registry import client_for

    return client_for(_tracking_uri(args))


def _model_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        raise RegistryError(f"model {name!r} has no version {version!r} in the registry ({e.message}); "
                            f"list the versions with: qloraflow models --name {name}") from e


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from qloraflow.config import load_config, parse_overrides
    from qloraflow.plan import check_fit
    from qloraflow.preflight import check_launch

    cfg = load_config(args.config, parse_overrides(args.set))
    if not args.config_only:
        check_launch(cfg, args.config)  # the files it names: data, base model, database
        check_fit(cfg, args.config, args.gpu)  # the pipeline's first task runs the same check
    print(f"{args.config}: valid (config hash {cfg.hash()})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qloraflow.config import load_config, parse_overrides
    from qloraflow.plan import ModelShape, data_tokens, format_plan, plan_config

    cfg = load_config(args.config, parse_overrides(args.set))
    shape = None
    if args.model_config:
        path = Path(args.model_config)
        shape = ModelShape.from_config(json.loads((path / "config.json" if path.is_dir() else path).read_text()))
    try:
        data = None if args.no_data else data_tokens(cfg, args.tokenized)
    except (DataValidationError, OSError) as e:
        raise DataValidationError(f"{e}; or plan memory and speed alone with --no-data") from e
    plan = plan_config(cfg, args.gpu, shape=shape, data=data, price_per_hour=args.price_per_hour)
    if args.json:
        print(json.dumps({"gpu": plan.gpu.name, "fits": plan.fits, "peak_gib": round(plan.device_gib, 2),
                          "memory_gib": {k: round(v, 3) for k, v in plan.memory.items()},
                          "tokens_per_s": round(plan.tokens_per_s), "step_s": {k: round(v, 4) for k, v in plan.step.items()},
                          "steps_per_epoch": plan.steps_per_epoch, "optimizer_steps": plan.optimizer_steps,
                          "epoch_hours": plan.epoch_hours, "hours": plan.hours, "gpu_hours": plan.gpu_hours,
                          "price_per_hour": plan.price_per_hour, "cost": plan.cost,
                          "data": None if data is None else vars(data), "notes": plan.notes}, indent=1))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


def _short_source(source: Optional[str]) -> str:
    """Run and logged-model ids cut to 8 hex (``runs:/0123abcd/merged_model``, ``models:/m-0123abcd``);
    other long URIs keep their end."""
    if not source:
        return ""
    m = re.match(r"^(runs:/|models:/m-)([0-9a-f]{9,})(.*)$", source)
    if m:
        return f"{m[1]}{m[2][:8]}{m[3]}"
    return source if len(source) <= 48 else "..." + source[-45:]


def _created(ms: Optional[int]) -> str:
    if not ms:
        return ""
    return datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _registered_model(client: Any, name: str) -> Any:
    """The registered model ``name``.

    Raises:
        RegistryError: no registered model has this name (the message lists the ones there are).
    """
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        known = sorted(m.name for m in client.search_registered_models())
        raise RegistryError(f"no registered model named {name!r} at {client.tracking_uri} (registered: "
                            f"{', '.join(known) or 'none'}); pass --name with one of them") from e


def gate(client: Any, name: str, metric: Optional[str], margin: Optional[float]) -> tuple[str, float]:
    """``--metric``/``--margin`` when given, else the gate the pipeline's last promotion of ``name`` used."""
    from qloraflow.registry import GATE_MARGIN_TAG, GATE_METRIC_TAG

    tags = _registered_model(client, name).tags or {}
    return (metric or tags.get(GATE_METRIC_TAG) or DEFAULT_GATE_METRIC,
            margin if margin is not None else float(tags.get(GATE_MARGIN_TAG, 0.0)))


def version_rows(client: Any, name: str) -> list[dict[str, Any]]:
    """``registry.list_versions`` plus each version's aliases, creation time and content digest.

    Raises:
        RegistryError: no registered model has this name (the message lists the ones there are).
    """
    from qloraflow.registry import DIGEST_TAG, list_versions

    aliases: dict[str, list[str]] = {}
    for alias, version in (_registered_model(client, name).aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    extra = {str(mv.version): mv for mv in client.search_model_versions(f"name='{name}'")}
    rows = []
    for row in list_versions(client, name):
        mv = extra.get(str(row["version"]))
        row["aliases"] = sorted(aliases.get(str(row["version"]), []))
        row["creation_timestamp"] = getattr(mv, "creation_timestamp", None)
        row[DIGEST_TAG] = (getattr(mv, "tags", None) or {}).get(DIGEST_TAG)
        rows.append(row)
    return rows


def format_versions(name: str, rows: list[dict[str, Any]], metric: str) -> str:
    """The table ``qloraflow models`` prints: one line per version, oldest first."""
    from qloraflow.registry import ALIAS, DIGEST_TAG

    if not rows:
        return f"{name}: no versions registered"
    champion = next((r["version"] for r in rows if r["champion"]), None)
    header = ["version", "aliases", metric, "created (UTC)", "digest", "source"]
    table = [header]
    for r in rows:
        value = r.get(f"metric.{metric}")
        try:
            shown = f"{float(value):.4f}" if value is not None else "-"
        except ValueError:
            shown = str(value)
        table.append([str(r["version"]), " ".join(f"@{a}" for a in r["aliases"]) or "-", shown,
                      _created(r["creation_timestamp"]), (r.get(DIGEST_TAG) or "-")[:12],
                      _short_source(r.get("source"))])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = (f"{name}: {len(rows)} version(s), @{ALIAS} = version {champion}" if champion is not None
             else f"{name}: {len(rows)} version(s), no @{ALIAS} yet")
    return "\n".join([f"{title}; gate metric {metric}", *lines])


def cmd_models(args: argparse.Namespace) -> int:
    client = _client(args)
    rows = version_rows(client, args.name)
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
    else:
        print(format_versions(args.name, rows, gate(client, args.name, args.metric, None)[0]))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a version by hand: through the gate unless --force."""
    from qloraflow import registry

    client = _client(args)
    mv = _model_version(client, args.name, args.version)
    metrics = {k[len("metric."):]: float(v) for k, v in (mv.tags or {}).items() if k.startswith("metric.")}
    if args.force:
        registry.set_champion(client, args.name, str(args.version))
        print(f"{args.name}: champion -> version {args.version} (forced)")
        return 0
    metric, margin = gate(client, args.name, args.metric, args.margin)
    decision = registry.promote(client, args.name, str(args.version), metrics, {}, metric, margin,
                                smoke_passed=True)
    print(json.dumps(decision, indent=1))
    return 0 if decision["promoted"] else 1


def cmd_rollback(args: argparse.Namespace) -> int:
    from qloraflow.registry import rollback

    result = rollback(_client(args), args.name)
    print(f"{args.name}: champion version {result['from']} -> {result['to']}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from qloraflow.deploy import deploy_main

    # The subparser was built from deploy's own parser and has checked these; deploy_main parses them again.
    return deploy_main(args.subcommand_argv)


def cmd_compare(args: argparse.Namespace) -> int:
    from qloraflow.compare import run_compare

    args.tracking_uri = _tracking_uri(args)
    return run_compare(args)


def cmd_tracking_replay(args: argparse.Namespace) -> int:
    from qloraflow.tracking import replay_command

    return replay_command(args.folder, args.tracking_uri or args.global_tracking_uri)


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------


def _store_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--tracking-uri", metavar="URI", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    return p


def build_parser() -> argparse.ArgumentParser:
    from qloraflow import compare, deploy
    from qloraflow.plan import GPUS

    ap = argparse.ArgumentParser(prog="qloraflow",
                                 description="Registry operations, deployment manifests, run comparison and "
                                             "config checks of the qloraflow pipeline.",
                                 epilog="Run 'qloraflow COMMAND -h' for a command's options.")
    ap.add_argument("--tracking-uri", dest="global_tracking_uri", metavar="URI", default=None,
                    help="MLflow tracking URI of the registry commands and compare (default: $MLFLOW_TRACKING_URI, "
                         "else sqlite:///mlflow.db); the pods take theirs from deploy's --tracking-secret")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_SubcommandParser)
    store = _store_options()

    p = sub.add_parser("validate", help="validate a config: every problem at once",
                       description="Validate a config file and the files it names (data files exist and are "
                                   "UTF-8, a local base model's weights are complete, the SQLite database "
                                   "exists) and that its predicted peak GPU memory fits --gpu (qloraflow plan), "
                                   "and print its hash; lists every problem at once.")
    p.add_argument("config", help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting as the trainer's --set does, e.g. train.max_steps=5")
    p.add_argument("--config-only", action="store_true",
                   help="check the config's values only, not the files it names (data, model, database)")
    p.add_argument("--gpu", choices=list(GPUS), default="a10g",
                   help="refuse a config whose predicted peak memory does not fit this GPU (default: %(default)s, "
                        "what the train task requests; see qloraflow plan)")
    p.set_defaults(fn=cmd_validate)

    p = sub.add_parser("plan", help="predict peak GPU memory, tokens/s, time and cost before launching",
                       description="Predict a config's peak GPU memory, training tokens/s, time an epoch, GPU hours "
                                   "and cost on one GPU kind, from the base model's config.json and the data's "
                                   "token counts (qloraflow/plan.py; its error against measured runs: "
                                   "benchmarks/plan_error.py). Exits 1 when the config does not fit the GPU.")
    p.add_argument("config", help="YAML config, e.g. configs/llama3-8b-qlora-a10g.yaml")
    p.add_argument("--gpu", choices=list(GPUS), default="a10g",
                   help="GPU kind (default: %(default)s, what the pipeline's train task requests)")
    p.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                   help="price of one GPU an hour (default: the GPU table's on-demand price)")
    p.add_argument("--tokenized", metavar="DIR", default=None,
                   help="the tokenize stage's output folder (or its report.json) for exact token counts; "
                        "default: estimated from data.train_files")
    p.add_argument("--no-data", action="store_true", help="memory and tokens/s only: read no data files")
    p.add_argument("--model-config", metavar="PATH", default=None,
                   help="the base model's config.json (or its folder) when model.base_model is a Hub id not in "
                        "the local cache")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. train.micro_batch_size=1")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(fn=cmd_plan)

    gate_default = f"the gate metric the pipeline last promoted with, else {DEFAULT_GATE_METRIC}"
    p = sub.add_parser("models", parents=[store], help="list registered versions with their aliases",
                       description="List a registered model's versions: aliases (@champion), gate metric, "
                                   "creation time, content digest and source.")
    p.add_argument("--name", required=True, help="registered model name, e.g. tiny-sql")
    p.add_argument("--metric", default=None, help=f"metric to show (default: {gate_default})")
    p.add_argument("--json", action="store_true", help="print the versions as JSON (for scripts)")
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser("promote", parents=[store], help="make a version champion if it passes the gate",
                       description="Make a version the champion if it beats the current one on the gate metric.")
    p.add_argument("--name", required=True, help="registered model name, e.g. tiny-sql")
    p.add_argument("--version", required=True, help="registry version to promote, e.g. 3")
    p.add_argument("--metric", default=None, help=f"gate metric (default: {gate_default})")
    p.add_argument("--margin", type=float, default=None,
                   help="must beat the champion by more than this (default: the pipeline's last margin, else 0)")
    p.add_argument("--force", action="store_true", help="skip the gate")
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser("rollback", parents=[store], help="give the champion alias back to the previous champion",
                       description="Point the champion alias back at the version that held it before.")
    p.add_argument("--name", required=True, help="registered model name, e.g. tiny-sql")
    p.set_defaults(fn=cmd_rollback)

    # deploy's parser (with its -h) is the parent: its options are defined once, in qloraflow.deploy.
    deploy_parser = deploy._parser()
    p = sub.add_parser("deploy", parents=[deploy_parser], add_help=False,
                       help="render (and apply) vLLM serving manifests", description=deploy_parser.description)
    p.set_defaults(fn=cmd_deploy)

    p = sub.add_parser("compare", help="compare MLflow pipeline runs of an experiment",
                       description=compare.DESCRIPTION)
    compare.add_compare_arguments(p)
    p.set_defaults(fn=cmd_compare)

    # tracking replay: what an MLflow outage buffered (qloraflow.tracking_buffer) sent to the server now.
    p = sub.add_parser("tracking", help="MLflow tracking buffers: replay what an outage kept",
                       description="Work with the buffers a tracker writes while MLflow is unreachable.")
    actions = p.add_subparsers(dest="tracking_action", metavar="ACTION", required=True,
                               parser_class=_SubcommandParser)
    r = actions.add_parser("replay", parents=[store], help="send the pending buffers to the server, in order",
                           description="Replay pending MLflow buffers in order and end their runs with the status "
                                       "they closed with. --tracking-uri replays into another address of the store "
                                       "(default: the URI each buffer was written for).")
    r.add_argument("folder", nargs="?", default=None,
                   help="a folder holding buffers, searched below (default: every pending buffer of this machine)")
    r.set_defaults(fn=cmd_tracking_replay)
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except QloraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - MLflow's own errors: its message, not a traceback
        mlflow_exceptions = sys.modules.get("mlflow.exceptions")
        if mlflow_exceptions is None or not isinstance(e, mlflow_exceptions.MlflowException):
            raise
        print(f"error: MLflow: {e.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
