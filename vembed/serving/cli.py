"""``vembed serve``: deploy a model behind the HTTP API on Ray Serve.

Every :class:`ServeArgs` field is a flag (``max_batch_size`` -> ``--max-batch-size``), generated from the model so
the CLI, ``configs/serve.yaml`` and ``build_app`` accept the same settings with the same validation. Only Ray
and Serve placement (``--address``, ``--host``, ``--port``, ``--name``, ``--route-prefix``, ``--detach``) is
CLI-specific. Ray and torch are imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import time
import typing
from typing import Any, Literal

from vembed.serving.settings import ServeArgs

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
    group = parser.add_argument_group("model, scaling, batching and limits (the keys of configs/serve.yaml args)")
    for name, field in ServeArgs.model_fields.items():
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


def _name_value(text: str) -> tuple[str, str]:
    """``NAME=TEXT`` -> ``(NAME, TEXT)`` for repeatable mapping flags."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r} must look like NAME=TEXT (e.g. query='Find the matching image')")
    return name.strip(), value


def run(args: argparse.Namespace) -> int:
    """Start (or join) Ray, start Serve on ``--host:--port`` and deploy the model; serve until Ctrl-C."""
    settings = serve_args_from(args)
    from vembed.modelpath import resolve_source

    resolve_source(settings.model)  # a missing model directory fails here, before Ray starts
    import ray
    from ray import serve

    from vembed.serving.app import build_app

    if not ray.is_initialized():
        if args.address is None and "RAY_ADDRESS" not in os.environ:
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local Ray binds 127.0.0.1 only
        ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(settings), name=args.name, route_prefix=args.route_prefix, blocking=False)
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
