"""The importable Serve application: ``vembed.serving.app:build_app``.

Used by ``serve run configs/serve.yaml``, ``serve deploy``, a KubeRay RayService (``import_path`` plus ``args``)
and by ``vembed serve``. ``args`` are the keys of :class:`vembed.serving.settings.ServeArgs`, e.g.::

    serve run vembed.serving.app:build_app model=output/checkpoint-epoch-3 max_batch_size=32

Replicas, autoscaling, ``max_ongoing_requests``, ``max_queued_requests`` and ``ray_actor_options`` are Ray Serve's
own deployment options: a config file sets them in its ``deployments:`` entry ``VEmbedEmbeddings`` (Serve applies
that over the defaults bound here), Python and ``vembed serve`` pass a :class:`DeploymentSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

from ray.serve import Application

from vembed.serving.deployment import EmbeddingDeployment
from vembed.serving.settings import DeploymentSettings, ServeArgs


def build_app(args: Union[ServeArgs, Mapping[str, Any]]) -> Application:
    """Serve's application builder: validate ``args`` and bind the deployment with default options."""
    return embedding_app(args)


def embedding_app(
    args: Union[ServeArgs, Mapping[str, Any]], deployment: Optional[DeploymentSettings] = None
) -> Application:
    """The embedding deployment bound to ``args``, with ``deployment``'s replicas, concurrency and resources."""
    settings = args if isinstance(args, ServeArgs) else ServeArgs.model_validate(dict(args))
    options = (deployment or DeploymentSettings()).options(settings)
    return EmbeddingDeployment.options(**options).bind(settings)
