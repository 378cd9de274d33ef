"""Serving pieces without Ray: settings and CLI flags, configs/serve.yaml, API key, image sources, limits, errors."""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.server
import io
import threading
from pathlib import Path

import pytest
import yaml
from fastapi import FastAPI, Request
from PIL import Image
from pydantic import ValidationError
from starlette.testclient import TestClient

from vembed.serving.cli import add_arguments, deployment_settings_from, serve_args_from
from vembed.serving.errors import APIError, install_error_handlers, param_path, validation_error
from vembed.serving.limits import BodySizeLimit, check_item_count, check_model, check_texts
from vembed.serving.security import check_api_key, load_api_key
from vembed.serving.service import within_timeout
from vembed.serving.settings import DeploymentSettings, ServeArgs, check_serve_config
from vembed.serving.sources import load_request_image, read_image_source

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parent.parent


def _png(width: int = 8, height: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _status(exc_info: pytest.ExceptionInfo) -> tuple[int, str | None]:
    return exc_info.value.status, exc_info.value.code


# ---- settings, CLI flags, serve.yaml ----


def test_deployment_options_are_ray_serve_options():
    args = ServeArgs(model="m", max_batch_size=16)
    assert DeploymentSettings(num_replicas=3).options(args) == {
        "num_replicas": 3,
        "max_ongoing_requests": 32,  # default: 2 x max_batch_size
        "max_queued_requests": 64,
        "backpressure_config": {"status_code": 503, "retry_after_s": 1.0},
        "ray_actor_options": {"num_cpus": 1.0, "num_gpus": 0.0},
    }
    auto = DeploymentSettings.from_flat(
        {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 5, "max_ongoing_requests": 40, "num_gpus": 1,
         "memory": 2**30}
    )  # fmt: skip
    options = auto.options(args)
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 32.0,
        "upscale_delay_s": 5.0,
        "downscale_delay_s": 600.0,
    }
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 40
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": 2**30}
    # Ray's own schema accepts every option vembed binds
    from ray.serve.schema import DeploymentSchema

    DeploymentSchema.model_validate({"name": "VEmbedEmbeddings", **options})
    assert ServeArgs(model="/ckpt/run-7/").served_model_name == "run-7"
    assert ServeArgs(model="/ckpt/run-7", model_name="prod").served_model_name == "prod"
    assert ServeArgs(model="m", batch_wait_ms=25).batch_wait_timeout_s == pytest.approx(0.025)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"num_replicas": 2, "min_replicas": 1, "max_replicas": 2}, "not both"),
        ({"min_replicas": 1}, "both min_replicas and max_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "larger than max_replicas"),
        ({"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 0}, "greater than 0"),
        ({"min_replicas": 1, "max_replicas": 2, "downscale_delay_s": -1}, "greater than or equal to 0"),
        ({"max_ongoing_requests": 0}, "greater than or equal to 1"),
        ({"max_queued_requests": -2}, "greater than or equal to -1"),
        ({"num_gpus": -1}, "greater than or equal to 0"),
        ({"memory": 0}, "greater than or equal to 1"),
        ({"max_replica": 2}, "max_replica"),
    ],
)
def test_deployment_settings_reject_bad_values(bad, fragment):
    with pytest.raises(ValueError) as info:
        DeploymentSettings.from_flat(bad)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"allowed_url_prefixes": ["ftp://x/"]}, "http(s) URL"),
        ({"allowed_url_prefixes": ["https://example.com"]}, "with a path"),
        ({"max_batch_sise": 8}, "max_batch_sise"),
        ({"text_overflow": "drop"}, "text_overflow"),
        ({"num_replicas": 2, "max_queued_requests": 8}, "max_queued_requests, num_replicas: Ray Serve deployment"),
    ],
)
def test_settings_reject_inconsistent_values(bad, fragment):
    with pytest.raises(ValidationError, match=None) as info:
        ServeArgs(model="m", **bad)
    assert fragment in str(info.value)


def test_batches_must_fit_max_ongoing_requests():
    with pytest.raises(ValueError, match="batches could never fill"):
        DeploymentSettings(max_ongoing_requests=8).options(ServeArgs(model="m", max_batch_size=32))


def _serve_config(args: dict, deployment: dict | None) -> dict:
    app = {"name": "vembed", "import_path": "vembed.serving.app:build_app", "args": {"model": "m", **args}}
    if deployment is not None:
        app["deployments"] = [deployment]
    return {"applications": [app]}


@pytest.mark.parametrize(
    "args, deployment, fragment",
    [
        ({"max_batch_size": 32}, {"name": "VEmbedEmbeddings", "max_ongoing_requests": 16}, "batches could never"),
        ({}, {"name": "Embeddings", "num_replicas": 2}, "unknown deployment 'Embeddings'"),
        (
            {},
            {
                "name": "VEmbedEmbeddings",
                "num_replicas": 2,
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 2},
            },
            "num_replicas",
        ),  # fmt: skip (Ray's own schema refuses this one)
        ({}, {"name": "VEmbedEmbeddings", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "larger"),
        ({"max_ongoing_requests": 8}, None, "application 'vembed', args: "),
    ],
)
def test_serve_config_check_names_the_application_and_key(args, deployment, fragment):
    with pytest.raises(ValueError) as info:
        check_serve_config(_serve_config(args, deployment))
    assert fragment in str(info.value)


def test_serve_config_check_keeps_options_vembed_does_not_know():
    deployment = {"name": "VEmbedEmbeddings", "num_replicas": "auto", "health_check_period_s": 5,
                  "autoscaling_config": {"min_replicas": 0, "max_replicas": 2, "look_back_period_s": 30}}  # fmt: skip
    ((_, settings),) = check_serve_config(_serve_config({}, deployment))
    assert settings.autoscaling_config.min_replicas == 0 and settings.num_replicas is None


def test_cli_flags_mirror_settings():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--model", "/ckpt", "--replicas", "2", "--max-batch-size", "16", "--batch-wait-ms", "5", "--text-overflow",
         "reject", "--require-api-key", "--allowed-url-prefix", "https://a.example/x/", "--allowed-url-prefix",
         "https://b.example/"]
    )  # fmt: skip
    settings = serve_args_from(args)
    assert deployment_settings_from(args).num_replicas == 2
    assert settings.max_batch_size == 16 and settings.batch_wait_ms == 5.0
    assert settings.text_overflow == "reject" and settings.require_api_key is True
    assert settings.allowed_url_prefixes == ["https://a.example/x/", "https://b.example/"]
    assert settings.max_items == ServeArgs.model_fields["max_items"].default  # unset flags keep defaults
    assert (args.host, args.port) == ("127.0.0.1", 8000)
    scaled = parser.parse_args(
        ["--model", "m", "--min-replicas", "0", "--max-replicas", "3", "--target-ongoing-requests", "8",
         "--max-queued-requests", "-1", "--num-gpus", "0.5", "--memory", "1000000"]
    )  # fmt: skip
    deployment = deployment_settings_from(scaled)
    assert deployment.autoscaling_config.max_replicas == 3 and deployment.autoscaling_config.min_replicas == 0
    assert deployment.max_queued_requests == -1 and deployment.ray_actor_options.num_gpus == 0.5
    assert deployment.ray_actor_options.memory == 1_000_000
    with pytest.raises(SystemExit):
        parser.parse_args(["--replicas", "2"])  # --model is required
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m", "--dtype", "int8"])


def test_serve_yaml_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    assert app.import_path == "vembed.serving.app:build_app"
    assert schema.http_options.host == "127.0.0.1"
    ((settings, deployment),) = check_serve_config(config)
    assert set(app.args) == set(ServeArgs.model_fields)  # every setting is shown with its value
    # every option vembed knows is shown under deployments:, with Ray's names
    (entry,) = config["applications"][0]["deployments"]
    assert set(entry) >= set(DeploymentSettings.model_fields) - {"num_replicas"}
    assert set(entry["autoscaling_config"]) == set(type(deployment.autoscaling_config).model_fields)
    assert set(entry["ray_actor_options"]) == set(type(deployment.ray_actor_options).model_fields)


# ---- API key ----


def test_api_key_from_file_then_env(tmp_path, monkeypatch):
    monkeypatch.setenv("VEMBED_TEST_KEY", " env-key ")
    assert load_api_key(ServeArgs(model="m", api_key_env="VEMBED_TEST_KEY")) == "env-key"
    key_file = tmp_path / "key"
    key_file.write_text("file-key\n")
    assert load_api_key(ServeArgs(model="m", api_key_env="VEMBED_TEST_KEY", api_key_file=str(key_file))) == "file-key"
    monkeypatch.delenv("VEMBED_TEST_KEY")
    assert load_api_key(ServeArgs(model="m", api_key_env="VEMBED_TEST_KEY")) is None


def test_api_key_misconfiguration_fails_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="api_key_file"):
        load_api_key(ServeArgs(model="m", api_key_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_api_key(ServeArgs(model="m", api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ValueError, match="require_api_key"):
        load_api_key(ServeArgs(model="m", api_key_env="VEMBED_UNSET_VARIABLE_X", require_api_key=True))


def test_check_api_key():
    check_api_key(None, None)  # open server
    check_api_key("s3cret", "s3cret")
    with pytest.raises(APIError) as info:
        check_api_key(None, "s3cret")
    assert _status(info) == (401, "missing_api_key")
    with pytest.raises(APIError) as info:
        check_api_key("s3cre", "s3cret")
    assert _status(info) == (401, "invalid_api_key")
    assert info.value.body()["error"]["type"] == "authentication_error"


# ---- image sources ----


def test_inline_images_data_url_and_base64():
    png = _png()
    args = ServeArgs(model="m")
    assert read_image_source("data:image/png;base64," + base64.b64encode(png).decode(), args, "p") == png
    wrapped = base64.encodebytes(png).decode()  # line-wrapped base64 (76 columns) is accepted
    assert read_image_source(wrapped, args, "p") == png
    with pytest.raises(APIError) as info:
        read_image_source("data:image/png,rawbytes", args, "p")
    assert _status(info) == (400, "invalid_image")
    with pytest.raises(APIError) as info:
        read_image_source("not base64!", args, "p")
    assert _status(info) == (400, "invalid_image")


def test_oversize_base64_is_refused_before_decoding():
    args = ServeArgs(model="m", max_image_bytes=100)
    with pytest.raises(APIError) as info:
        read_image_source("A" * 140, args, "images[3]")  # decodes to 105 bytes
    assert _status(info) == (413, "image_too_large") and info.value.param == "images[3]"
    assert len(read_image_source("A" * 132, args, "p")) == 99


def test_server_files_only_inside_the_allowed_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(_png())
    (outside / "secret.png").write_bytes(_png())
    (root / "link.png").symlink_to(outside / "secret.png")
    with pytest.raises(APIError) as info:
        read_image_source("file://a.png", ServeArgs(model="m"), "p")
    assert _status(info) == (403, "file_access_disabled")
    args = ServeArgs(model="m", allowed_image_root=str(root))
    assert read_image_source("file://a.png", args, "p") == (root / "a.png").read_bytes()
    assert read_image_source(f"file://{root / 'a.png'}", args, "p") == (root / "a.png").read_bytes()
    for escape in ("file://../outside/secret.png", f"file://{outside / 'secret.png'}", "file://link.png"):
        with pytest.raises(APIError) as info:
            read_image_source(escape, args, "p")
        assert _status(info) == (403, "path_not_allowed"), escape
    with pytest.raises(APIError) as info:
        read_image_source("file://missing.png", args, "p")
    assert _status(info) == (400, "image_not_found")


@pytest.fixture()
def image_http_server(tmp_path):
    """A loopback HTTP server: /allowed/a.png, /allowed/big.png, and /allowed/jump redirecting outside /allowed/."""
    (tmp_path / "allowed").mkdir()
    (tmp_path / "allowed" / "a.png").write_bytes(_png())
    (tmp_path / "allowed" / "big.png").write_bytes(_png(64, 64) + b"\0" * 5000)
    (tmp_path / "private.png").write_bytes(_png())

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path == "/allowed/jump":
                self.send_response(302)
                self.send_header("Location", "/private.png")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path
    server.shutdown()
    server.server_close()


def test_urls_only_under_allowed_prefixes_without_redirects(image_http_server):
    base, root = image_http_server
    with pytest.raises(APIError) as info:
        read_image_source(f"{base}/allowed/a.png", ServeArgs(model="m"), "p")
    assert _status(info) == (403, "url_not_allowed")
    args = ServeArgs(model="m", allowed_url_prefixes=[f"{base}/allowed/"], max_image_bytes=2000)
    assert read_image_source(f"{base}/allowed/a.png", args, "p") == (root / "allowed" / "a.png").read_bytes()
    cases = {
        f"{base}/private.png": (403, "url_not_allowed"),
        f"{base}/allowed/../private.png": (403, "url_not_allowed"),  # dot segments would leave the prefix
        f"{base}/allowed/%2e%2e/private.png": (403, "url_not_allowed"),
        f"{base}/allowed\\..\\private.png": (403, "url_not_allowed"),
        f"{base}/allowed/jump": (400, "image_fetch_failed"),  # the redirect leaves the prefix: not followed
        f"{base}/allowed/missing.png": (400, "image_fetch_failed"),
        f"{base}/allowed/big.png": (413, "image_too_large"),
    }
    for url, expected in cases.items():
        with pytest.raises(APIError) as info:
            read_image_source(url, args, "p")
        assert _status(info) == expected, url


def test_decode_limits_pixels_and_non_images():
    args = ServeArgs(model="m", max_image_pixels=100)
    assert load_request_image(_png(10, 10), args, "p").size == (10, 10)
    with pytest.raises(APIError) as info:
        load_request_image(_png(11, 10), args, "images[0]")
    assert _status(info) == (413, "image_too_large") and "110" in info.value.message
    with pytest.raises(APIError) as info:
        load_request_image(b"GIF89a not really", args, "p")
    assert _status(info) == (400, "invalid_image")


# ---- limits and errors ----


def test_item_text_and_model_limits():
    args = ServeArgs(model="m", max_items=2, max_text_chars=5)
    check_item_count(2, args, "input")
    check_texts(["abcde"], args, "input")
    check_model(None, "served")
    check_model("served", "served")
    cases = [
        (lambda: check_item_count(0, args, "input"), 400, "empty_input", "input"),
        (lambda: check_item_count(3, args, "input"), 413, "too_many_items", "input"),
        (lambda: check_texts(["ok", "toolong"], args, "input", offsets=[3, 7]), 413, "text_too_long", "input[7]"),
        (lambda: check_texts([" \n"], args, "texts"), 400, "empty_input", "texts[0]"),
        (lambda: check_model("other", "served"), 404, "model_not_found", "model"),
    ]
    for call, status, code, param in cases:
        with pytest.raises(APIError) as info:
            call()
        assert (info.value.status, info.value.code, info.value.param) == (status, code, param)


def test_validation_errors_name_the_field_to_fix():
    assert param_path(("body", "input", 2, "ImageItem", "image")) == "input[2].image"
    assert param_path(("body", "input", "list[union[str,ImageItem]]", 0, "str")) == "input[0]"
    assert param_path(("body",)) is None
    union = [
        {"type": "string_type", "loc": ("body", "input", "str"), "msg": "Input should be a valid string"},
        {"type": "string_type", "loc": ("body", "input", "list[...]", 1, "ImageItem", "image"), "msg": "bad image"},
    ]
    err = validation_error(union)
    assert (err.status, err.param, err.message) == (400, "input[1].image", "input[1].image: bad image")
    assert validation_error(
        [{"type": "json_invalid", "loc": ("body", 5), "msg": "x", "ctx": {"error": "EOF"}}]
    ).code == ("invalid_json")


def _limited_app(max_bytes: int) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=max_bytes)

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"size": len(await request.body())}

    return TestClient(app)


def test_body_size_limit_declared_and_streamed():
    client = _limited_app(max_bytes=100)
    assert client.post("/echo", content=b"x" * 100).json() == {"size": 100}
    declared = client.post("/echo", content=b"x" * 101)
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "request_too_large"
    streamed = client.post("/echo", content=(b"x" * 40 for _ in range(3)))  # chunked: no Content-Length
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"


def test_unexpected_errors_become_500_in_the_same_shape():
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    response = TestClient(app, raise_server_exceptions=False).get("/boom")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}
    }


def test_serve_plain_text_503_becomes_the_json_error_and_json_passes_through():
    from starlette.responses import JSONResponse, PlainTextResponse

    from vembed.serving.overload import JSONOverload, proxy_middlewares

    app = FastAPI()

    @app.get("/serve-backpressure")
    async def backpressure() -> PlainTextResponse:  # what Serve's proxy writes past max_queued_requests
        return PlainTextResponse("Request dropped due to backpressure", status_code=503, headers={"Retry-After": "1"})

    @app.get("/app-503")
    async def own() -> JSONResponse:
        return JSONResponse({"error": {"code": "mine"}}, status_code=503)

    @app.get("/ok")
    async def ok() -> PlainTextResponse:
        return PlainTextResponse("fine")

    (middleware,) = proxy_middlewares()
    assert middleware.cls is JSONOverload
    client = TestClient(JSONOverload(app))
    refused = client.get("/serve-backpressure")
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "server_overloaded")
    assert "Request dropped due to backpressure" in error["message"]
    assert int(refused.headers["content-length"]) == len(refused.content)
    assert client.get("/app-503").json() == {"error": {"code": "mine"}}
    assert client.get("/ok").text == "fine"


def test_within_timeout_answers_504():
    async def slow() -> None:
        await asyncio.sleep(5)

    async def fast() -> int:
        return 7

    assert asyncio.run(within_timeout(fast(), 1.0)) == 7
    with pytest.raises(APIError) as info:
        asyncio.run(within_timeout(slow(), 0.05))
    assert _status(info) == (504, "timeout")


# ---- the model-dependent checks of the service ----


@pytest.fixture(scope="module")
def service_factory(tiny_clip_dir):
    from vembed.serving.service import EmbeddingService

    return lambda **kw: EmbeddingService(ServeArgs(model=str(tiny_clip_dir), api_key_env=None, **kw))


def test_token_window_truncates_or_rejects(service_factory):
    long_text = "red " * 100  # more than CLIP's 77-token window
    truncating = service_factory()
    window = truncating.predictor.preprocessor.max_text_length
    assert truncating.count_tokens([long_text, "red"], "input") == window + 3  # <bos> red <eos>
    rejecting = service_factory(text_overflow="reject")
    assert rejecting.count_tokens(["red"], "input") == 3
    with pytest.raises(APIError) as info:
        rejecting.count_tokens(["red", long_text], "input", offsets=[4, 9])
    assert _status(info) == (413, "text_too_long") and info.value.param == "input[9]"
    with pytest.raises(APIError) as info:
        truncating.check_dimensions(truncating.predictor.model_info["full_dim"] + 1)
    assert _status(info) == (400, "invalid_value")


def test_single_modality_models_refuse_the_other(tiny_bert_dir, tiny_vit_dir):
    from vembed.serving.service import EmbeddingService

    text_only = EmbeddingService(ServeArgs(model=str(tiny_bert_dir), api_key_env=None))
    image_only = EmbeddingService(ServeArgs(model=str(tiny_vit_dir), api_key_env=None))
    with pytest.raises(APIError) as info:
        text_only.check_modalities(texts=False, images=True, param="input[1].image")
    assert _status(info) == (400, "unsupported_input") and info.value.param == "input[1].image"
    with pytest.raises(APIError) as info:
        image_only.count_tokens(["a red circle"], "input")
    assert _status(info) == (400, "unsupported_input")
