"""The ``qloraflow`` command: registry operations, deployment manifests, config checks.

    qloraflow validate configs/tiny.yaml
    qloraflow models --name tiny-sql
    qloraflow promote --name tiny-sql --version 3 [--force]
    qloraflow rollback --name tiny-sql
    qloraflow deploy --target k8s --model-uri models:/tiny-sql@champion --version 3 --dry-run

The registry commands use ``$MLFLOW_TRACKING_URI`` (default ``sqlite:///mlflow.db``) unless
``--tracking-uri`` is given. Each is a thin layer over the library functions the pipeline uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from qloraflow.errors import QloraflowError


def _client(args: argparse.Namespace):  # noqa: ANN202
    from qloraflow.registry import client_for

    return client_for(args.tracking_uri)


def cmd_validate(args: argparse.Namespace) -> int:
    from qloraflow.config import load_config

    cfg = load_config(args.config)
    print(f"{args.config}: valid (config hash {cfg.hash()})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from qloraflow.registry import list_versions

    for row in list_versions(_client(args), args.name):
        mark = "*" if row.pop("champion") else " "
        print(mark, json.dumps(row, sort_keys=True))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a version by hand: through the gate unless --force."""
    from qloraflow import registry

    client = _client(args)
    mv = client.get_model_version(args.name, args.version)
    metrics = {k[len("metric."):]: float(v) for k, v in (mv.tags or {}).items() if k.startswith("metric.")}
    if args.force:
        registry.set_champion(client, args.name, str(args.version))
        print(f"{args.name}: champion -> version {args.version} (forced)")
        return 0
    decision = registry.promote(client, args.name, str(args.version), metrics, {}, args.metric, args.margin,
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

    return deploy_main(args.rest)


def cmd_compare(args: argparse.Namespace) -> int:
    from qloraflow.compare import compare_main

    return compare_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qloraflow", description=__doc__.split("\n")[0])
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="validate a config: every problem at once")
    p.add_argument("config")
    p.set_defaults(fn=cmd_validate)
    p = sub.add_parser("models", help="list registered versions; * marks the champion")
    p.add_argument("--name", required=True)
    p.set_defaults(fn=cmd_models)
    p = sub.add_parser("promote", help="make a version champion if it passes the gate")
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--metric", default="exact_match")
    p.add_argument("--margin", type=float, default=0.0)
    p.add_argument("--force", action="store_true", help="skip the gate")
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("rollback", help="give the champion alias back to the previous champion")
    p.add_argument("--name", required=True)
    p.set_defaults(fn=cmd_rollback)
    for name, fn, text in (("deploy", cmd_deploy, "render (and apply) serving manifests"),
                           ("compare", cmd_compare, "compare MLflow runs of an experiment")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except QloraflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
