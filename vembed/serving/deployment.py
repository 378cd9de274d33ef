"""The Ray Serve deployment: one replica = one :class:`EmbeddingService` behind its FastAPI app.

The FastAPI app is built per replica after the model has loaded (``__serve_build_asgi_app__``), so its routes
close over that replica's service and API key. Scaling, concurrency and resources come from
:meth:`ServeArgs.deployment_options` when the application is built.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from vembed.serving.api import create_api
from vembed.serving.service import EmbeddingService
from vembed.serving.settings import ServeArgs


@serve.deployment(name="VEmbedEmbeddings")
@serve.ingress()
class EmbeddingDeployment:
    """Loads the Predictor once per replica and serves the vembed HTTP API."""

    def __init__(self, args: ServeArgs) -> None:
        self.service = EmbeddingService(ServeArgs.model_validate(args))

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica_id = serve.get_replica_context().replica_id.unique_id
        return create_api(self.service, replica_id=replica_id)
