"""Settings of one served model: what to load, how to scale and batch, and what a request may contain.

:class:`ServeArgs` is the ``args`` mapping of ``configs/serve.yaml`` (``serve run`` / ``serve deploy`` / a KubeRay
RayService) and of ``vembed serve``. These are deployment settings, not training keys, so they live here rather
than in ``configs/defaults.yaml``. Unknown keys are errors, as everywhere in vembed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

MiB = 1024 * 1024


class ServeArgs(BaseModel):
    """Validated settings of the vembed Serve application (one model per application)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    # ---- model ----
    model: str = Field(description="vembed checkpoint directory, HF model directory or hub id to serve")
    instructions: dict[str, str] = Field(
        default_factory=dict,
        description="named instruction presets requests select with `instruction_name` (like sentence-transformers' "
        "prompt_name), e.g. {query: 'Find the image that matches the caption'}",
    )
    model_name: Optional[str] = Field(
        None, description="name clients pass as `model` (default: the checkpoint directory's name)"
    )
    device: Optional[str] = Field(None, description="torch device per replica (default: cuda when present)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    # ---- scaling: a fixed replica count, or autoscaling between min and max ----
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replica count (exclusive with autoscaling)")
    min_replicas: Optional[int] = Field(None, ge=0, description="autoscaling lower bound")
    max_replicas: Optional[int] = Field(None, ge=1, description="autoscaling upper bound")
    target_ongoing_requests: Optional[float] = Field(
        None, gt=0, description="autoscaling target of in-flight requests per replica (default: max_batch_size)"
    )
    max_ongoing_requests: Optional[int] = Field(
        None, ge=1, description="requests one replica accepts at once (default: 2 x max_batch_size)"
    )
    max_queued_requests: int = Field(
        64, ge=0, description="requests that may wait per replica beyond max_ongoing_requests; more get 503"
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica")

    # ---- dynamic batching (@serve.batch; texts and images have separate queues) ----
    max_batch_size: int = Field(32, ge=1, description="items encoded together in one forward pass")
    batch_wait_ms: float = Field(10.0, ge=0, description="how long a partial batch waits for more items")

    # ---- request limits ----
    max_items: int = Field(256, ge=1, description="inputs (texts or images) per request")
    max_text_chars: int = Field(20_000, ge=1, description="characters per text; longer texts get 413")
    text_overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="a text longer than the model's token window: truncate it, or reject it with 413"
    )
    max_image_bytes: int = Field(10 * MiB, ge=1, description="encoded bytes per image; larger images get 413")
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="width x height per image; larger (decompression bombs) get 413"
    )
    max_request_bytes: int = Field(64 * MiB, ge=1, description="HTTP request body size; larger bodies get 413")
    request_timeout_s: float = Field(30.0, gt=0, description="time one request may take before it gets 504")

    # ---- security ----
    api_key_env: Optional[str] = Field(
        "VEMBED_API_KEY", description="environment variable holding the API key (unset or empty: no key from env)"
    )
    api_key_file: Optional[str] = Field(None, description="file holding the API key (takes precedence over env)")
    require_api_key: bool = Field(False, description="refuse to start when no API key is configured")
    allowed_image_root: Optional[str] = Field(
        None, description="serve `file://` images from inside this directory (default: server files are refused)"
    )
    allowed_url_prefixes: list[str] = Field(
        default_factory=list, description="fetch `http(s)://` images that start with one of these prefixes"
    )
    url_timeout_s: float = Field(10.0, gt=0, description="timeout of one image URL fetch")

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeArgs:
        autoscaling = self.min_replicas is not None or self.max_replicas is not None
        if autoscaling and self.num_replicas is not None:
            raise ValueError("set either num_replicas or min_replicas/max_replicas (autoscaling), not both")
        if autoscaling and (self.min_replicas is None or self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if autoscaling and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is larger than max_replicas={self.max_replicas}")
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} < max_batch_size={self.max_batch_size}: "
                "batches could never fill; raise max_ongoing_requests or lower max_batch_size"
            )
        for name, text in self.instructions.items():
            if not name.strip() or not text.strip():
                raise ValueError(f"instructions entry {name!r}: {text!r} needs a non-empty name and instruction")
        for prefix in self.allowed_url_prefixes:
            if not prefix.startswith(("http://", "https://")) or prefix.count("/") < 3:
                raise ValueError(
                    f"allowed_url_prefixes entry {prefix!r} must be an http(s) URL with a path, "
                    "e.g. 'https://images.example.com/'"
                )
        return self

    @property
    def served_model_name(self) -> str:
        """The ``model`` value clients send and ``/v1/models`` lists."""
        return self.model_name or Path(self.model.rstrip("/")).name or self.model

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    @property
    def batch_wait_timeout_s(self) -> float:
        return self.batch_wait_ms / 1000.0

    @property
    def ongoing_requests_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch_size

    @property
    def admitted_requests(self) -> int:
        """Requests one replica holds at once (working + waiting); more get 503 (vembed.serving.overload)."""
        return self.ongoing_requests_limit + self.max_queued_requests

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``: replicas or autoscaling, concurrency, resources.

        Ray Serve delivers up to ``admitted_requests`` plus a few more to a replica, which refuses the excess at once
        with a JSON 503 (so the excess waits in front of the replica only as long as a refusal takes). Ray's own
        ``max_queued_requests`` is a generous backstop for bursts faster than the refusals (its answer past that
        is a plain-text 503 from the Serve proxy).
        """
        options: dict[str, Any] = {
            "max_ongoing_requests": self.admitted_requests + max(4, self.ongoing_requests_limit // 4),
            "max_queued_requests": 4 * self.admitted_requests + 256,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests or float(self.max_batch_size),
            }
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options
