"""The importable Serve application: ``vembed.serving.app:build_app``.

Used by ``serve run configs/serve.yaml``, ``serve deploy``, a KubeRay RayService (``import_path`` plus ``args``)
and by ``vembed serve``. ``args`` are the keys of :class:`vembed.serving.settings.ServeArgs`, e.g.::

    serve run vembed.serving.app:build_app model=output/checkpoint-epoch-3 max_batch_size=32
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from ray.serve import Application

from vembed.serving.deployment import EmbeddingDeployment
from vembed.serving.settings import ServeArgs


def build_app(args: Union[ServeArgs, Mapping[str, Any]]) -> Application:
    """Validate ``args`` and bind the embedding deployment with its replicas, autoscaling and concurrency."""
    settings = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args))
    return EmbeddingDeployment.options(**settings.deployment_options()).bind(settings)
