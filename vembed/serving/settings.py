"""Settings of one served model: what to load, how to batch, what a request may contain, and how Serve scales it.

:class:`ServeArgs` is the ``args`` mapping of ``configs/serve.yaml`` (``serve run`` / ``serve deploy`` / a KubeRay
RayService) and of ``vembed serve``. :class:`DeploymentSettings` holds Ray Serve's own deployment options (replicas
or autoscaling, ``max_ongoing_requests``, ``max_queued_requests``, ``ray_actor_options``) under Ray's names: in
``configs/serve.yaml`` they are the ``deployments:`` entry of :data:`DEPLOYMENT_NAME`, so changing them is an
in-place update that Serve applies and enforces itself (one source of truth; vembed keeps no copy of them). These
are deployment settings, not training keys, so they live here rather than in ``configs/defaults.yaml``. Unknown
keys are errors, as everywhere in vembed.
"""

from __future__ import annotations

from collections.abc import Mapping
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

    @model_validator(mode="before")
    @classmethod
    def _scaling_is_not_an_arg(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            moved = sorted(set(data) & DEPLOYMENT_KEYS)
            if moved:
                raise ValueError(
                    f"{', '.join(moved)}: Ray Serve deployment options, not args; put them in the `deployments:` "
                    f"entry named {DEPLOYMENT_NAME} (see configs/serve.yaml) or pass them as `vembed serve` flags"
                )
        return data

    @model_validator(mode="after")
    def _check_consistency(self) -> ServeArgs:
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
    def batch_wait_timeout_s(self) -> float:
        return self.batch_wait_ms / 1000.0


# ---------------------------------------------------------------------------------------------------------------------
# Ray Serve's deployment options (the `deployments:` section), validated with vembed's rules
# ---------------------------------------------------------------------------------------------------------------------

DEPLOYMENT_NAME = "VEmbedEmbeddings"
"""The embedding deployment's name: the ``name`` of its entry under ``deployments:`` in a Serve config."""

RETRY_AFTER_S = 1.0
"""``Retry-After`` of Serve's overload answer (``backpressure_config.retry_after_s``) unless a config sets it."""


class AutoscalingSettings(BaseModel):
    """Ray Serve ``autoscaling_config``: the replica count follows the ongoing requests per replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="autoscaling: fewest replicas (0 scales to zero when idle)")
    max_replicas: int = Field(4, ge=1, description="autoscaling: most replicas")
    target_ongoing_requests: float = Field(
        32.0, gt=0, description="autoscaling: ongoing requests per replica it aims at (working + waiting for a batch)"
    )
    upscale_delay_s: float = Field(
        30.0, ge=0, description="autoscaling: seconds of demand above target before adding replicas"
    )
    downscale_delay_s: float = Field(
        600.0, ge=0, description="autoscaling: seconds of demand below target before removing replicas"
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"autoscaling_config: min_replicas={self.min_replicas} is larger than max_replicas={self.max_replicas}"
            )
        return self


class ReplicaResources(BaseModel):
    """Ray Serve ``ray_actor_options``: what Ray reserves for each replica."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    num_cpus: float = Field(1.0, ge=0, description="CPUs per replica (Ray also sets the replica's torch threads)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU)")
    memory: Optional[int] = Field(None, ge=1, description="bytes of memory Ray reserves per replica (null: none)")


class DeploymentSettings(BaseModel):
    """Ray Serve options of the embedding deployment, under Ray's names and meanings.

    ``max_ongoing_requests`` is what Serve sends one replica at once (its batches work on them and the rest wait for
    a batch inside the replica); ``max_queued_requests`` is what waits in front of the replicas (per proxy) when all
    are full; past that Serve answers 503 with ``Retry-After`` (JSON through :mod:`vembed.serving.overload`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["VEmbedEmbeddings"] = Field(DEPLOYMENT_NAME, description="the embedding deployment")
    num_replicas: Optional[int] = Field(None, ge=1, description="fixed replica count (default 1; not with autoscaling)")
    autoscaling_config: Optional[AutoscalingSettings] = Field(None, description="autoscaling instead of num_replicas")
    max_ongoing_requests: Optional[int] = Field(
        None, ge=1, description="requests one replica holds at once; >= max_batch_size (default: 2 x max_batch_size)"
    )
    max_queued_requests: int = Field(
        64, ge=-1, description="requests waiting per proxy when every replica is full; more get 503 (-1: no limit)"
    )
    ray_actor_options: ReplicaResources = Field(default_factory=ReplicaResources)

    @model_validator(mode="after")
    def _check_scaling(self) -> DeploymentSettings:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("set either num_replicas or autoscaling_config (min/max replicas), not both")
        return self

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> DeploymentSettings:
        """From flat names (``vembed serve`` flags): ``min_replicas`` ... go into ``autoscaling_config``,
        ``num_cpus`` / ``num_gpus`` / ``memory`` into ``ray_actor_options``."""
        flat = dict(values)
        autoscaling = {k: flat.pop(k) for k in AutoscalingSettings.model_fields if k in flat}
        resources = {k: flat.pop(k) for k in ReplicaResources.model_fields if k in flat}
        if autoscaling:
            if "min_replicas" not in autoscaling or "max_replicas" not in autoscaling:
                raise ValueError("autoscaling needs both min_replicas and max_replicas")
            flat["autoscaling_config"] = autoscaling
        if resources:
            flat["ray_actor_options"] = resources
        return cls.model_validate(flat)

    def ongoing_limit(self, args: ServeArgs) -> int:
        """``max_ongoing_requests``, or its default for ``args``' batch size."""
        return self.max_ongoing_requests or 2 * args.max_batch_size

    def options(self, args: ServeArgs) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``; a ``deployments:`` entry in a Serve config overrides them."""
        check_batching(self.ongoing_limit(args), args.max_batch_size)
        options: dict[str, Any] = {
            "max_ongoing_requests": self.ongoing_limit(args),
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
            "ray_actor_options": self.ray_actor_options.model_dump(exclude_none=True),
        }
        if self.autoscaling_config is not None:
            options["autoscaling_config"] = self.autoscaling_config.model_dump()
        else:
            options["num_replicas"] = self.num_replicas or 1
        return options


DEPLOYMENT_KEYS = (
    set(DeploymentSettings.model_fields) | set(AutoscalingSettings.model_fields) | set(ReplicaResources.model_fields)
) - {"name"}
"""Flat names of the deployment options (``vembed serve`` flags); as ``args`` keys they are errors."""


def check_batching(max_ongoing_requests: int, max_batch_size: int) -> None:
    """A replica must be allowed at least ``max_batch_size`` requests, or its batches never fill."""
    if max_ongoing_requests < max_batch_size:
        raise ValueError(
            f"max_ongoing_requests={max_ongoing_requests} < max_batch_size={max_batch_size}: batches could never "
            "fill; raise max_ongoing_requests (deployments:) or lower max_batch_size (args:)"
        )


def check_serve_config(config: Mapping[str, Any]) -> list[tuple[ServeArgs, DeploymentSettings]]:
    """Validate a Serve config file's vembed applications (``serve.yaml``, a RayService's ``serveConfigV2``).

    Ray's schema first (``ServeDeploySchema``), then each vembed application's ``args`` (:class:`ServeArgs`) and its
    ``deployments:`` entry (:class:`DeploymentSettings`, the options vembed knows), and the two against each other.
    Raises ``ValueError`` naming the application and the key.
    """
    from ray.serve.schema import ServeDeploySchema

    checked = []
    for app in ServeDeploySchema.model_validate(dict(config)).applications:
        if not app.import_path.startswith("vembed.serving.app:"):
            continue
        where = f"application {app.name!r}"
        try:
            args = ServeArgs.model_validate(app.args or {})
        except ValueError as exc:
            raise ValueError(f"{where}, args: {exc}") from None
        entries = [d.model_dump(exclude_unset=True) for d in app.deployments]
        unknown = [d["name"] for d in entries if d["name"] != DEPLOYMENT_NAME]
        if unknown:
            raise ValueError(
                f"{where}, deployments: unknown deployment {unknown[0]!r}; vembed's is {DEPLOYMENT_NAME!r}"
            )
        try:
            deployment = DeploymentSettings.model_validate(_known_options(entries[0]) if entries else {})
            check_batching(deployment.ongoing_limit(args), args.max_batch_size)
        except ValueError as exc:
            raise ValueError(f"{where}, deployments[{DEPLOYMENT_NAME}]: {exc}") from None
        checked.append((args, deployment))
    return checked


def _known_options(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a ``deployments:`` entry that vembed checks (Ray's schema has checked all of them)."""
    known = {k: v for k, v in entry.items() if k in DeploymentSettings.model_fields and v is not None}
    if known.get("num_replicas") == "auto":  # Serve's default autoscaling
        del known["num_replicas"]
    for key, model in (("autoscaling_config", AutoscalingSettings), ("ray_actor_options", ReplicaResources)):
        if isinstance(known.get(key), Mapping):
            known[key] = {k: v for k, v in known[key].items() if k in model.model_fields and v is not None}
    return known
