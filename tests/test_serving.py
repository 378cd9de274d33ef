"""Ray Serve endpoint, end to end: a real Serve app on 127.0.0.1 (deployed through ``vembed serve``'s ``run``),
real HTTP (httpx) and the official ``openai`` client; every vector is compared with the in-process Predictor."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import socket
import struct
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent

API_KEY = "serve-test-key"
MODEL = "tiny-clip"
MAX_ITEMS = 16
MAX_IMAGE_BYTES = 200_000
MAX_IMAGE_PIXELS = 1_000_000
MAX_REQUEST_BYTES = 1_000_000
ATOL = 1e-5  # batch composition changes padding and summation order, nothing more


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def image_root(shapes_t2i) -> Path:
    return shapes_t2i["images"]


@pytest.fixture(scope="module")
def base_url(ray_local, tiny_clip_dir, image_root, tmp_path_factory):
    """One Serve app for the module, deployed the way ``vembed serve ... --detach`` does it."""
    from ray import serve

    from vembed.serving.cli import add_arguments, run

    key_file = tmp_path_factory.mktemp("serve_key") / "key"
    key_file.write_text(API_KEY + "\n")
    port = _free_port()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", str(tiny_clip_dir), "--model-name", MODEL, "--port", str(port), "--detach"]
    argv += ["--api-key-file", str(key_file), "--max-batch-size", "8", "--batch-wait-ms", "20"]
    argv += ["--max-items", str(MAX_ITEMS), "--max-image-bytes", str(MAX_IMAGE_BYTES)]
    argv += ["--max-image-pixels", str(MAX_IMAGE_PIXELS), "--max-request-bytes", str(MAX_REQUEST_BYTES)]
    argv += ["--max-text-chars", "2000", "--text-overflow", "reject", "--allowed-image-root", str(image_root)]
    argv += ["--replicas", "1", "--max-ongoing-requests", "48", "--max-queued-requests", "100", "--num-cpus", "1"]
    assert run(parser.parse_args(argv)) == 0
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def predictor(tiny_clip_dir):
    from vembed.inference import VEmbedFactoryPredictor

    return VEmbedFactoryPredictor(tiny_clip_dir)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def oai(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def replica_at_start(http) -> str:
    return http.get("/health").json()["replica"]


@pytest.fixture(scope="module")
def image_paths(image_root) -> list[Path]:
    return sorted(image_root.glob("*.jpg"))[:4]


def _data_url(path: Path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but carries almost no data (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------------------------
# vectors equal the Predictor's
# ---------------------------------------------------------------------------------------------------------------------


def test_openai_client_returns_predictor_vectors(oai, predictor, replica_at_start):
    texts = ["a small red circle on a white background", "a large blue square", "green triangle"]
    expected = predictor.encode_text(texts)

    default = oai.embeddings.create(model=MODEL, input=texts)  # the client asks for base64 and decodes it itself
    as_floats = oai.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for response in (default, as_floats):
        assert response.model == MODEL and [d.index for d in response.data] == [0, 1, 2]
        np.testing.assert_allclose(np.array([d.embedding for d in response.data]), expected, atol=ATOL)

    single = oai.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=ATOL)

    short = oai.embeddings.create(model=MODEL, input=texts, dimensions=16, encoding_format="float")
    vectors = np.array([d.embedding for d in short.data])
    assert vectors.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, predictor.encode_text(texts, dimension=16), atol=ATOL)


def test_base64_encoding_decodes_to_the_same_floats(http):
    body = {"model": MODEL, "input": ["a purple cross", "an orange circle"]}
    floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()["data"]
    b64 = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()["data"]
    for f, b in zip(floats, b64, strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.asarray(f["embedding"], dtype=np.float32))


def test_usage_counts_the_tokens_the_model_reads(http, predictor):
    texts = ["a red circle", "a small yellow triangle on a gray background"]
    usage = http.post("/v1/embeddings", json={"model": MODEL, "input": texts}).json()["usage"]
    tokens = int(predictor.preprocessor.process_texts(texts)["attention_mask"].sum())
    assert usage == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_images_by_data_url_base64_file_and_upload_equal_predictor(http, predictor, image_paths, image_root):
    expected = predictor.encode_image([str(p) for p in image_paths])
    items = [{"type": "image", "image": _data_url(p)} for p in image_paths]
    by_data_url = http.post("/v1/embeddings", json={"model": MODEL, "input": items, "encoding_format": "float"})
    assert by_data_url.status_code == 200, by_data_url.text
    np.testing.assert_allclose([d["embedding"] for d in by_data_url.json()["data"]], expected, atol=ATOL)

    raw_b64 = [base64.b64encode(p.read_bytes()).decode() for p in image_paths]
    by_json = http.post("/embed/image", json={"images": raw_b64})
    np.testing.assert_allclose(by_json.json()["embeddings"], expected, atol=ATOL)

    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in image_paths]
    by_upload = http.post("/embed/image", files=files, data={"model": MODEL})
    assert by_upload.status_code == 200, by_upload.text
    np.testing.assert_allclose(by_upload.json()["embeddings"], expected, atol=ATOL)

    by_file = http.post("/embed/image", json={"images": [f"file://{p.relative_to(image_root)}" for p in image_paths]})
    np.testing.assert_allclose(by_file.json()["embeddings"], expected, atol=ATOL)

    short = http.post("/embed/image", files=files[:1], data={"dimensions": "8"}).json()
    np.testing.assert_allclose(
        short["embeddings"], predictor.encode_image([str(image_paths[0])], dimension=8), atol=ATOL
    )


def test_mixed_texts_and_images_keep_their_order(http, predictor, image_paths):
    texts = ["a red circle", "a blue cross"]
    inputs = [texts[0], {"type": "image", "image": _data_url(image_paths[0])}, texts[1]]
    data = http.post("/v1/embeddings", json={"model": MODEL, "input": inputs, "encoding_format": "float"}).json()
    got = np.array([d["embedding"] for d in data["data"]])
    np.testing.assert_allclose(got[[0, 2]], predictor.encode_text(texts), atol=ATOL)
    np.testing.assert_allclose(got[1], predictor.encode_image(str(image_paths[0])), atol=ATOL)


def test_embed_text_and_similarity_equal_predictor(http, predictor, image_paths):
    texts = ["a green square", "a yellow circle on black"]
    got = http.post("/embed/text", json={"texts": texts, "dimensions": 8}).json()
    assert got["model"] == MODEL and got["dimensions"] == 8
    np.testing.assert_allclose(got["embeddings"], predictor.encode_text(texts, dimension=8), atol=ATOL)

    docs = [{"type": "image", "image": _data_url(p)} for p in image_paths]
    scores = http.post("/similarity", json={"query_text": "a red circle", "documents": docs}).json()["scores"]
    expected = predictor.similarity(query_text="a red circle", documents=[str(p) for p in image_paths])
    np.testing.assert_allclose(scores, expected, atol=ATOL)

    text_scores = http.post("/similarity", json={"query_image": _data_url(image_paths[0]), "documents": texts})
    expected = predictor.similarity(query_image=str(image_paths[0]), documents=texts, document_type="text")
    np.testing.assert_allclose(text_scores.json()["scores"], expected, atol=ATOL)


def test_serve_and_batch_embedding_give_identical_vectors(http, tiny_clip_dir, image_paths, tmp_path):
    """Images (one decode path, one preprocessing) through ``vembed embed``'s Ray Data job and through Serve."""
    import shutil

    from vembed.batch import embed_corpus, read_embeddings

    folder = tmp_path / "images"
    folder.mkdir()
    for path in image_paths:
        shutil.copy(path, folder / path.name)
    output = tmp_path / "embedded"
    embed_corpus(str(tiny_clip_dir), str(folder), str(output), num_actors=1, max_decoders=1, batch_size=4)
    batch = {row["id"]: row["embedding"] for row in read_embeddings(str(output)).to_pylist()}

    files = [("files", (p.name, p.read_bytes(), "image/jpeg")) for p in image_paths]
    served = http.post("/embed/image", files=files).json()["embeddings"]
    np.testing.assert_allclose(served, [batch[p.name] for p in image_paths], atol=ATOL)


def test_models_probes_and_openapi(http, oai, base_url, predictor):
    models = oai.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert oai.models.retrieve(MODEL).id == MODEL
    info = http.get("/v1/models").json()["data"][0]["info"]
    assert info["embedding_dim"] == predictor.embedding_dim and info["family"] == "dual"

    with httpx.Client(base_url=base_url, timeout=60) as anonymous:  # probes need no key
        assert anonymous.get("/health").json()["status"] == "ok"
        ready = anonymous.get("/ready").json()
        assert ready == {"status": "ready", "model": MODEL, "embedding_dim": predictor.embedding_dim}
        schema = anonymous.get("/openapi.json").json()
        assert anonymous.get("/docs").status_code == 200
    assert {"/v1/embeddings", "/embed/text", "/embed/image", "/similarity", "/v1/models", "/health", "/ready"} <= set(
        schema["paths"]
    )
    image_body = schema["paths"]["/embed/image"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} == set(image_body)
    assert "EmbeddingsRequest" in schema["components"]["schemas"]


def test_openai_client_raises_its_own_errors(base_url):
    wrong_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.embeddings.create(model=MODEL, input="a red circle")
    right_key = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        right_key.embeddings.create(model="text-embedding-3-small", input="a red circle")
    assert info.value.code == "model_not_found" and info.value.type == "invalid_request_error"  # OpenAI's own


# ---------------------------------------------------------------------------------------------------------------------
# bad requests: each a documented 4xx in the OpenAI error shape
# ---------------------------------------------------------------------------------------------------------------------


JSON = {"content-type": "application/json"}


def _bad_requests(image: bytes) -> list[tuple[str, dict, int, str]]:
    emb = "/v1/embeddings"
    ok = {"model": MODEL}
    b64 = base64.b64encode
    too_big = b64(b"\xff" * (MAX_IMAGE_BYTES + 10)).decode()
    return [
        ("malformed JSON", {"url": emb, "content": b'{"model": "tiny-clip", "input": [', "headers": JSON}, 400, "invalid_json"),
        ("not a JSON object", {"url": emb, "json": ["x"]}, 400, "invalid_json"),
        ("image item of wrong type", {"url": emb, "json": {**ok, "input": [{"type": "image", "image": 3}]}}, 400, "invalid_value"),
        ("input of wrong type", {"url": emb, "json": {**ok, "input": {"text": "x"}}}, 400, "invalid_value"),
        ("token ids", {"url": emb, "json": {**ok, "input": [[1, 2, 3]]}}, 400, "invalid_value"),
        ("dimensions not an int", {"url": emb, "json": {**ok, "input": "x", "dimensions": "big"}}, 400, "invalid_value"),
        ("dimensions too large", {"url": emb, "json": {**ok, "input": "x", "dimensions": 4096}}, 400, "invalid_value"),
        ("misspelt field", {"url": emb, "json": {**ok, "input": "x", "dimension": 8}}, 400, "invalid_value"),
        ("missing model", {"url": emb, "json": {"input": "x"}}, 400, "invalid_value"),
        ("empty input list", {"url": emb, "json": {**ok, "input": []}}, 400, "empty_input"),
        ("blank text", {"url": emb, "json": {**ok, "input": ["a", "  "]}}, 400, "empty_input"),
        ("too many items", {"url": emb, "json": {**ok, "input": ["x"] * (MAX_ITEMS + 1)}}, 413, "too_many_items"),
        ("text too many chars", {"url": emb, "json": {**ok, "input": "red " * 600}}, 413, "text_too_long"),
        ("text over token window", {"url": emb, "json": {**ok, "input": "red " * 100}}, 413, "text_too_long"),
        ("unknown model", {"url": emb, "json": {"model": "gpt-embed", "input": "x"}}, 404, "model_not_found"),
        ("oversize image", {"url": "/embed/image", "json": {"images": [too_big]}}, 413, "image_too_large"),
        ("non-image bytes", {"url": "/embed/image", "json": {"images": [b64(b"hello world").decode()]}}, 400, "invalid_image"),
        ("truncated image", {"url": "/embed/image", "json": {"images": [b64(image[: len(image) // 2]).decode()]}}, 400, "invalid_image"),
        ("not base64", {"url": "/embed/image", "json": {"images": ["/etc/passwd"]}}, 400, "invalid_image"),
        ("huge declared pixels", {"url": "/embed/image", "json": {"images": [b64(_png_header_only(100_000, 100_000)).decode()]}}, 413, "image_too_large"),
        ("pixels over limit", {"url": "/embed/image", "json": {"images": [b64(_png(2000, 1000)).decode()]}}, 413, "image_too_large"),
        ("path outside root", {"url": "/embed/image", "json": {"images": ["file://../../../../etc/passwd"]}}, 403, "path_not_allowed"),
        ("absolute path outside root", {"url": "/embed/image", "json": {"images": ["file:///etc/hostname"]}}, 403, "path_not_allowed"),
        ("URL not allowed", {"url": "/embed/image", "json": {"images": ["http://127.0.0.1:1/x.jpg"]}}, 403, "url_not_allowed"),
        ("upload of non-image", {"url": "/embed/image", "files": [("files", ("a.jpg", b"nope", "image/jpeg"))]}, 400, "invalid_image"),
        ("upload without files", {"url": "/embed/image", "files": [("other", ("a.txt", b"x", "text/plain"))]}, 400, "empty_input"),
        ("wrong content type", {"url": "/embed/image", "content": b"abc", "headers": {"content-type": "text/plain"}}, 415, "invalid_body"),
        ("mixed documents", {"url": "/similarity", "json": {"query_text": "x", "documents": ["a", {"type": "image", "image": b64(image).decode()}]}}, 400, "invalid_value"),
        ("no query", {"url": "/similarity", "json": {"documents": ["a"]}}, 400, "empty_input"),
        ("instruction for a model without", {"url": "/embed/text", "json": {"texts": "a", "instruction": "Find it"}}, 400, "unsupported_input"),
        ("unknown instruction preset", {"url": emb, "json": {**ok, "input": "x", "instruction_name": "nope"}}, 400, "invalid_value"),
        ("body too large", {"url": emb, "json": {**ok, "input": ["x" * 1000] * 1100}}, 413, "request_too_large"),
        ("missing API key", {"url": emb, "json": {**ok, "input": "x"}, "headers": {"Authorization": ""}}, 401, "missing_api_key"),
        ("wrong API key", {"url": emb, "json": {**ok, "input": "x"}, "headers": {"Authorization": "Bearer nope"}}, 401, "invalid_api_key"),
        ("unknown route", {"url": "/v2/embeddings", "json": {}}, 404, "http_error"),
    ]  # fmt: skip


BAD_REQUEST_NAMES = [case[0] for case in _bad_requests(b"x")]


@pytest.mark.parametrize("name", BAD_REQUEST_NAMES)
def test_bad_request_gets_documented_4xx(name, http, image_paths, replica_at_start):
    case = {c[0]: c for c in _bad_requests(image_paths[0].read_bytes())}[name]
    _, kwargs, status, code = case
    response = http.post(**kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and isinstance(error["message"], str) and error["message"]


def test_wrong_method_is_405_in_the_same_shape(http):
    response = http.get("/v1/embeddings")
    assert response.status_code == 405 and response.json()["error"]["type"] == "invalid_request_error"


def test_replica_survives_every_bad_request(http, predictor, replica_at_start):
    assert http.get("/health").json()["replica"] == replica_at_start  # the same replica: never restarted
    got = http.post("/embed/text", json={"texts": ["still alive"]}).json()["embeddings"]
    np.testing.assert_allclose(got, predictor.encode_text(["still alive"]), atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# concurrency: batched requests never see each other's answers
# ---------------------------------------------------------------------------------------------------------------------


def test_64_concurrent_requests_each_get_their_own_answer(base_url, http, predictor):
    texts = [f"request {i}: a {'red green blue yellow'.split()[i % 4]} shape number {i}" for i in range(64)]
    dims = [None, 8, 16, None][:4]

    async def one(client: httpx.AsyncClient, i: int) -> list[float]:
        body = {"model": MODEL, "input": texts[i], "encoding_format": "float"}
        if dims[i % 4] is not None:
            body["dimensions"] = dims[i % 4]
        response = await client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["embedding"]

    async def all_at_once() -> list[list[float]]:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    before = http.get("/health").json()["batches"]["text"]
    results = asyncio.run(all_at_once())
    after = http.get("/health").json()["batches"]["text"]
    assert after["items"] - before["items"] == 64
    assert after["batches"] - before["batches"] < 64  # requests shared forward passes
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, predictor.encode_text(texts[i], dimension=dims[i % 4]), atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------------
# a Serve config file's `deployments:` entry: Serve applies and enforces it; overload is a JSON 503, the replica lives
# ---------------------------------------------------------------------------------------------------------------------


def test_deployments_section_applies_and_overload_gets_json_503s(base_url, tiny_clip_dir, predictor):
    """Deployed as ``serve run configs/serve.yaml`` deploys (a declarative config with a ``deployments:`` entry over
    the options build_app binds); Serve reports the options it applied, and enforces them: one request in the
    replica, one waiting, the rest get Serve's 503, which reaches the client as vembed's JSON error."""
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from vembed.serving.settings import DEPLOYMENT_NAME, check_serve_config

    (template,) = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())["applications"]
    app = {**template, "name": "overload", "route_prefix": "/overload"}
    app["args"] = {**template["args"], "model": str(tiny_clip_dir), "model_name": MODEL, "api_key_env": None}
    app["args"] |= {"max_batch_size": 1, "batch_wait_ms": 0}
    autoscaling = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1.0}
    autoscaling |= {"upscale_delay_s": 5.0, "downscale_delay_s": 60.0}
    app["deployments"] = [
        {"name": DEPLOYMENT_NAME, "autoscaling_config": autoscaling, "max_ongoing_requests": 1}
        | {"max_queued_requests": 1, "ray_actor_options": {"num_cpus": 0.5, "memory": 2**28}}
    ]
    config = {"applications": [app]}
    check_serve_config(config)  # vembed's edge check passes
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    url = f"{base_url}/overload"
    texts = [f"shape {i}: " + "a red circle beside a blue square " * 6 for i in range(64)]  # slow enough to queue

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            body = {"model": MODEL, "input": texts}
            return await asyncio.gather(*(client.post("/v1/embeddings", json=body) for _ in range(32)))

    try:
        status = serve.status().applications["overload"]
        assert status.status == "RUNNING", status
        assert status.deployments[DEPLOYMENT_NAME].replica_states == {"RUNNING": 1}
        details = client.get_serve_details()["applications"]
        cli = details["vembed"]["deployments"][DEPLOYMENT_NAME]["deployment_config"]  # `vembed serve` flags
        assert (cli["num_replicas"], cli["max_ongoing_requests"], cli["max_queued_requests"]) == (1, 48, 100)
        assert cli["ray_actor_options"]["num_cpus"] == 1 and cli.get("autoscaling_config") is None
        applied = details["overload"]["deployments"][DEPLOYMENT_NAME]["deployment_config"]
        assert (applied["max_ongoing_requests"], applied["max_queued_requests"]) == (1, 1)
        assert {k: applied["autoscaling_config"][k] for k in autoscaling} == autoscaling
        assert applied["ray_actor_options"]["num_cpus"] == 0.5 and applied["ray_actor_options"]["memory"] == 2**28
        assert applied["backpressure_config"] == {"status_code": 503, "retry_after_s": 1.0}  # bound by build_app

        replica = httpx.get(f"{url}/health", timeout=60).json()["replica"]
        responses = asyncio.run(burst())
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
        for response in responses:
            if response.status_code == 503:
                error = response.json()["error"]
                assert error["type"] == "server_error" and error["code"] == "server_overloaded", error
                assert "backpressure" in error["message"] and response.headers["retry-after"] == "1"
        ok = httpx.post(f"{url}/embed/text", json={"texts": ["still serving"]}, timeout=60)
        assert ok.status_code == 200
        np.testing.assert_allclose(ok.json()["embeddings"], predictor.encode_text(["still serving"]), atol=ATOL)
        assert httpx.get(f"{url}/health", timeout=60).json()["replica"] == replica  # not restarted
    finally:
        serve.delete("overload")
