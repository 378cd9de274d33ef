"""``vembed serve``: deploy a model behind the HTTP API on Ray Serve.

Every :class:`ServeArgs` field is a flag (``max_batch_size`` -> ``--max-batch-size``), generated from the model so
the CLI, ``configs/serve.yaml`` and ``build_app`` accept the same settings with the same validation; so is every
Ray Serve deployment option of :class:`DeploymentSettings` (``--num-replicas``, ``--min-replicas``,
``--max-ongoing-requests``, ``--num-gpus``, ...: the ``deployments:`` entry of ``configs/serve.yaml``). Only Ray
and Serve placement (``--address``, ``--host``, ``--port``, ``--name``, ``--route-prefix``, ``--detach``) and
Serve's throughput-optimised mode are CLI-specific. Ray and torch are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import time
import typing
from typing import Any, Literal

from pydantic.fields import FieldInfo

from vembed.serving.settings import AutoscalingSettings, DeploymentSettings, ReplicaResources, ServeArgs

# Ray Serve's deployment options as flat flags (DeploymentSettings.from_flat nests them again).
DEPLOYMENT_FLAGS: dict[str, FieldInfo] = {
    name: field
    for fields in (DeploymentSettings.model_fields, AutoscalingSettings.model_fields, ReplicaResources.model_fields)
    for name, field in fields.items()
    if name not in {"name", "autoscaling_config", "ray_actor_options"}
}
THROUGHPUT_ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"

# Flags that differ from the field name (the first one is shown in the usage line).
FLAG_NAMES: dict[str, list[str]] = {
    "num_replicas": ["--replicas", "--num-replicas"],
    "allowed_url_prefixes": ["--allowed-url-prefix"],  # repeatable, one prefix each
    "instructions": ["--instruction-preset"],  # repeatable, NAME=INSTRUCTION each
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``vembed serve`` flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    parser.add_argument("--name", default="vembed", help="Serve application name")
    parser.add_argument("--route-prefix", default="/", help="URL prefix of the application")
    parser.add_argument("--detach", action="store_true", help="deploy and return instead of serving until Ctrl-C")
    parser.add_argument(
        "--throughput-optimized",
        choices=["on", "off"],
        default=None,
        help=f"Ray Serve's throughput-optimised mode ({THROUGHPUT_ENV}) for the local Ray this command starts; a "
        "running cluster keeps its own setting (default: off, or the variable when set; off served this app faster "
        "in benchmarks/serve_throughput.py)",
    )
    group = parser.add_argument_group("model, batching and limits (the args of configs/serve.yaml)")
    _add_flags(group, ServeArgs.model_fields)
    group = parser.add_argument_group(
        "Ray Serve scaling and resources (the deployments: entry of configs/serve.yaml; defaults: 1 replica, "
        "max_ongoing_requests = 2 x max_batch_size); any autoscaling flag needs --min-replicas and --max-replicas"
    )
    _add_flags(group, DEPLOYMENT_FLAGS)


def _add_flags(group: argparse._ArgumentGroup, fields: dict[str, FieldInfo]) -> None:
    """One flag per pydantic field: type, choices and default from the field."""
    for name, field in fields.items():
        flags = FLAG_NAMES.get(name, [f"--{name.replace('_', '-')}"])
        help_text = field.description or name
        if field.default is not None and not field.is_required() and field.default_factory is None:
            help_text += f" (default: {field.default})"
        kind, choices = _flag_type(field.annotation)
        if kind is bool:
            group.add_argument(*flags, dest=name, action="store_true", default=None, help=help_text)
        elif kind is list:
            group.add_argument(*flags, dest=name, action="append", default=None, help=help_text + "; repeatable")
        elif kind is dict:
            group.add_argument(
                *flags,
                dest=name,
                action="append",
                type=_name_value,
                default=None,
                metavar="NAME=TEXT",
                help=help_text + "; repeatable",
            )
        else:
            group.add_argument(
                *flags,
                dest=name,
                type=kind,
                choices=choices,
                default=None,
                required=field.is_required(),
                help=help_text,
            )


def serve_args_from(args: argparse.Namespace) -> ServeArgs:
    """The :class:`ServeArgs` given on the command line (unset flags keep their defaults)."""
    given = {name: getattr(args, name) for name in ServeArgs.model_fields if getattr(args, name, None) is not None}
    for name, field in ServeArgs.model_fields.items():
        if name in given and _flag_type(field.annotation)[0] is dict:
            given[name] = dict(given[name])
    return ServeArgs.model_validate(given)


def deployment_settings_from(args: argparse.Namespace) -> DeploymentSettings:
    """The Ray Serve deployment options given on the command line (unset flags keep Serve's / vembed's defaults)."""
    given = {name: getattr(args, name) for name in DEPLOYMENT_FLAGS if getattr(args, name, None) is not None}
    return DeploymentSettings.from_flat(given)


def _name_value(text: str) -> tuple[str, str]:
    """``NAME=TEXT`` -> ``(NAME, TEXT)`` for repeatable mapping flags."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=TEXT (e.g. query='Find the matching image')")
    return name.strip(), value


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, start Serve on ``--host:--port`` and deploy the model; serve until Ctrl-C."""
    settings = serve_args_from(args)
    deployment = deployment_settings_from(args)
    deployment.options(settings)  # max_ongoing_requests against max_batch_size, before Ray starts
    from vembed.modelpath import resolve_source

    resolve_source(settings.model)  # a missing model directory fails here, before Ray starts
    import ray
    from ray import serve

    from vembed.serving.app import embedding_app
    from vembed.serving.overload import CALLBACK, CALLBACK_ENV

    if not ray.is_initialized():
        if args.address is None and "RAY_ADDRESS" not in os.environ:
            # The Ray started here inherits this environment (Serve reads these when its processes start).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray binds 127.0.0.1 only
            if args.throughput_optimized is not None:
                os.environ[THROUGHPUT_ENV] = "1" if args.throughput_optimized == "on" else "0"
            os.environ.setdefault(CALLBACK_ENV, CALLBACK)  # overload 503s in JSON
        ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(embedding_app(settings, deployment), name=args.name, route_prefix=args.route_prefix, blocking=False)
    base = f"http://{args.host}:{args.port}{args.route_prefix.rstrip('/')}"
    print(f"vembed: serving {settings.served_model_name!r} at {base}/v1/embeddings (API docs: {base}/docs)")
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("vembed: shutting down Serve")
        serve.shutdown()
    return 0


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """argparse ``type`` and ``choices`` for a ServeArgs annotation (``Optional`` unwrapped)."""
    if typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    if typing.get_origin(annotation) is list:
        return list, None
    if typing.get_origin(annotation) is dict:
        return dict, None
    return annotation, None
