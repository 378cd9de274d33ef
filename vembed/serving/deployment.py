"""The Ray Serve deployment: one replica = one :class:`EmbeddingService` behind its FastAPI app.

The FastAPI app is built per replica after the model has loaded (``__serve_build_asgi_app__``), so its routes
close over that replica's service and API key. Scaling, concurrency and resources are Serve's deployment options
(:class:`vembed.serving.settings.DeploymentSettings`, or a config file's ``deployments:`` entry); a replica reads
the ones Serve applied, never a copy.
"""

from __future__ import annotations

from fastapi import FastAPI
from ray import serve

from vembed.serving.api import create_api
from vembed.serving.service import EmbeddingService
from vembed.serving.settings import DEPLOYMENT_NAME, ServeArgs, check_batching


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class EmbeddingDeployment:
    """Loads the Predictor once per replica and serves the vembed HTTP API."""

    def __init__(self, args: ServeArgs) -> None:
        args = ServeArgs.model_validate(args)
        # The options Serve applied (a config file's `deployments:` entry wins over the ones bound in code).
        applied = getattr(serve.get_replica_context(), "_deployment_config", None)
        if applied is not None:
            check_batching(applied.max_ongoing_requests, args.max_batch_size)
        self.service = EmbeddingService(args)

    def __serve_build_asgi_app__(self) -> FastAPI:
        replica_id = serve.get_replica_context().replica_id.unique_id
        return create_api(self.service, replica_id=replica_id)
