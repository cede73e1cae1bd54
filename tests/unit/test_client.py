"""The typed client against httpx.MockTransport: requests it builds, answers it parses, and the
error mapping's edge cases (non-JSON bodies, Retry-After, connection failures, secrets)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import pytest

from mlserve import client as mc
from mlserve.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    Forbidden,
    InferenceTimeout,
    InvalidResponse,
    MLServeClientError,
    MLServeConnectionError,
    MLServeTimeoutError,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    ServerError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationFailed,
)
from mlserve.schemas import (
    AdminChangeResult,
    BatchPredictResponse,
    PredictResponse,
    ReadyResponse,
)

KEY = "predict-key-0123456789abcdef"
TOKEN = "admin-token-0123456789abcdef"
URL = "http://mlserve.test:3000"

PREDICTION = PredictResponse.model_config["json_schema_extra"]["examples"][0]
BATCH = BatchPredictResponse.model_config["json_schema_extra"]["examples"][0]
CHANGE = {
    "action": "default",
    "complete": True,
    "generation": 3,
    "models": ["sentiment:v1", "sentiment:v2"],
    "defaults": {"sentiment": "v2"},
    "workers": {"w1": {"generation": 3, "loaded": ["sentiment:v1"], "defaults": {}}},
    "lagging": [],
    "failed": {},
}
READY = {"ready": False, "models": {"sentiment:v1": "loading"}, "errors": {}, "control": {},
         "cache": {"backend": "off"}}  # fmt: skip


class Recorder:
    """A MockTransport handler answering from a script, keeping every request it got."""

    def __init__(self, *answers: httpx.Response | Exception) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return answer


def json_answer(status: int, body: object, **headers: str) -> httpx.Response:
    return httpx.Response(status, json=body, headers=headers)


def error_answer(status: int, code: str, message: str = "nope", **headers: str) -> httpx.Response:
    body = {"error": code, "message": message, "details": {"x": 1}, "request_id": "rid-body"}
    return json_answer(status, body, **headers)


def sync_client(rec: Recorder, **kw) -> Client:
    return Client(URL, api_key=KEY, admin_token=TOKEN, transport=httpx.MockTransport(rec), **kw)


def run_async(rec: Recorder, call):
    async def go():
        transport = httpx.MockTransport(rec)
        async with AsyncClient(URL, api_key=KEY, admin_token=TOKEN, transport=transport) as c:
            return await call(c)

    return asyncio.run(go())


def both(rec_factory, call):
    """The result of ``call`` on the sync client and on the async one (each with a fresh
    recorder), and the two recorders."""
    r1, r2 = rec_factory(), rec_factory()
    with sync_client(r1) as c:
        sync = _capture(lambda: call(c))

    async def acall(c):
        try:
            return await call(c)
        except MLServeClientError as exc:
            return exc

    asynchronous = run_async(r2, acall)
    return sync, asynchronous, r1, r2


def _capture(fn):
    try:
        return fn()
    except MLServeClientError as exc:
        return exc


# --- requests ---------------------------------------------------------------------------------
def test_predict_sends_the_key_and_parses_the_answer() -> None:
    sync, asynchronous, r1, r2 = both(
        lambda: Recorder(json_answer(200, PREDICTION)), lambda c: c.predict("hi", "sentiment:v1")
    )
    for result, rec in ((sync, r1), (asynchronous, r2)):
        assert isinstance(result, PredictResponse) and result.label == "positive"
        (request,) = rec.requests
        assert request.method == "POST" and str(request.url) == f"{URL}/predict"
        assert request.headers["x-api-key"] == KEY and "authorization" not in request.headers
        assert json.loads(request.content) == {"text": "hi", "model_version": "sentiment:v1"}


def test_admin_calls_send_the_token_only() -> None:
    sync, asynchronous, r1, r2 = both(
        lambda: Recorder(json_answer(200, CHANGE)), lambda c: c.load("sentiment:v2", True)
    )
    for result, rec in ((sync, r1), (asynchronous, r2)):
        assert isinstance(result, AdminChangeResult) and result.complete
        (request,) = rec.requests
        assert request.url.path == "/admin/models/load"
        assert request.headers["authorization"] == f"Bearer {TOKEN}"
        assert "x-api-key" not in request.headers
        assert json.loads(request.content) == {"tag": "sentiment:v2", "make_default": True}


def test_paths_and_bodies_of_every_route() -> None:
    rec = Recorder(json_answer(200, {}))
    with sync_client(rec) as c:
        for call in (
            lambda: c.model("sentiment:v1"),
            lambda: c.model("sentiment", "v1"),
            lambda: c.drift("topic:v1"),
            lambda: c.model("../etc", "passwd"),
            lambda: c.model("..", "x"),
            lambda: c.set_default("sentiment:v2"),
            lambda: c.unload("sentiment:v1"),
            lambda: c.batch_predict(["a", "b"]),
            lambda: c.gpu(),
        ):
            with pytest.raises(InvalidResponse):
                call()
    seen = [(r.method, r.url.raw_path.decode(), r.content) for r in rec.requests]
    assert seen == [
        ("GET", "/models/sentiment/v1", b""),
        ("GET", "/models/sentiment/v1", b""),
        ("GET", "/models/topic/v1/drift", b""),
        ("GET", "/models/..%2Fetc/passwd", b""),
        ("GET", "/models/%2E%2E/x", b""),
        ("POST", "/admin/models/default", b'{"name":"sentiment","version":"v2"}'),
        ("POST", "/admin/models/unload", b'{"tag":"sentiment:v1"}'),
        ("POST", "/batch-predict", b'{"texts":["a","b"],"model_version":null}'),
        ("GET", "/gpu", b""),
    ]
    with pytest.raises(ValueError, match="name:version"):
        Client(URL).model("sentiment")


@pytest.mark.parametrize(
    "source,filename,expected_name",
    [
        (b'{"text": "a"}\n', None, "upload.jsonl"),
        (b"text\na\n", None, "upload.csv"),
        (b"text\na\n", "mine.csv", "mine.csv"),
    ],
)
def test_predict_file_uploads_multipart(source, filename, expected_name) -> None:
    rec = Recorder(json_answer(200, BATCH))
    with sync_client(rec) as c:
        result = c.predict_file(source, filename=filename, model_version="topic:v1")
    assert isinstance(result, BatchPredictResponse)
    (request,) = rec.requests
    assert request.headers["content-type"].startswith("multipart/form-data")
    body = request.content
    assert f'name="file"; filename="{expected_name}"'.encode() in body
    assert b'name="model_version"' in body and b"topic:v1" in body
    assert source in body


def test_predict_file_reads_a_path(tmp_path) -> None:
    path = tmp_path / "texts.jsonl"
    path.write_bytes(b'{"text": "a"}\n')
    rec = Recorder(json_answer(200, BATCH))
    with sync_client(rec) as c:
        c.predict_file(path)
        with path.open("rb") as fh:
            c.predict_file(fh)
    for request in rec.requests:
        assert b'filename="texts.jsonl"' in request.content
        assert b'name="model_version"' not in request.content


# --- results that are not errors --------------------------------------------------------------
def test_ready_returns_the_body_on_503() -> None:
    sync, asynchronous, _, _ = both(lambda: Recorder(json_answer(503, READY)), lambda c: c.ready())
    for result in (sync, asynchronous):
        assert isinstance(result, ReadyResponse) and result.ready is False


def test_ready_503_without_its_body_is_an_error() -> None:
    rec = Recorder(httpx.Response(503, text="upstream down", headers={"retry-after": "7"}))
    with sync_client(rec) as c, pytest.raises(Unavailable) as info:
        c.ready()
    assert info.value.retry_after == 7 and info.value.code is None
    assert info.value.message == "upstream down"


def test_a_202_change_is_a_result() -> None:
    partial = {**CHANGE, "complete": False, "lagging": ["w2"]}
    sync, asynchronous, _, _ = both(
        lambda: Recorder(json_answer(202, partial)), lambda c: c.unload("sentiment:v1")
    )
    for result in (sync, asynchronous):
        assert isinstance(result, AdminChangeResult)
        assert result.complete is False and result.lagging == ["w2"]


# --- promote ----------------------------------------------------------------------------------
def test_promote_sets_the_default_of_a_loaded_version() -> None:
    sync, asynchronous, r1, r2 = both(
        lambda: Recorder(json_answer(200, CHANGE)), lambda c: c.promote("sentiment:v2")
    )
    for result, rec in ((sync, r1), (asynchronous, r2)):
        assert result.action == "default"
        assert [r.url.path for r in rec.requests] == ["/admin/models/default"]


def test_promote_loads_a_version_that_is_not_loaded() -> None:
    loaded = {**CHANGE, "action": "load"}
    sync, asynchronous, r1, r2 = both(
        lambda: Recorder(
            error_answer(404, "model_not_found", "sentiment:v3 is not loaded; load it first"),
            json_answer(200, loaded),
        ),
        lambda c: c.promote("sentiment:v3"),
    )
    for result, rec in ((sync, r1), (asynchronous, r2)):
        assert isinstance(result, AdminChangeResult) and result.action == "load"
        assert [r.url.path for r in rec.requests] == [
            "/admin/models/default",
            "/admin/models/load",
        ]
        assert json.loads(rec.requests[1].content) == {"tag": "sentiment:v3", "make_default": True}


def test_promote_does_not_load_after_other_errors() -> None:
    sync, asynchronous, r1, r2 = both(
        lambda: Recorder(error_answer(401, "unauthorized")), lambda c: c.promote("sentiment:v3")
    )
    for result, rec in ((sync, r1), (asynchronous, r2)):
        assert isinstance(result, Unauthorized) and len(rec.requests) == 1


# --- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status,cls",
    [
        (400, BadRequest),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (409, Conflict),
        (413, PayloadTooLarge),
        (415, UnsupportedMediaType),
        (422, ValidationFailed),
        (429, RateLimited),
        (500, ServerError),
        (502, ServerError),
        (503, Unavailable),
        (504, InferenceTimeout),
        (405, MLServeClientError),
    ],
)
def test_each_status_has_its_error(status: int, cls: type) -> None:
    sync, asynchronous, _, _ = both(
        lambda: Recorder(error_answer(status, "some_code", "what went wrong")),
        lambda c: c.predict("hi"),
    )
    for exc in (sync, asynchronous):
        assert type(exc) is cls
        assert exc.status == status and exc.code == "some_code"
        assert exc.message == "what went wrong" and exc.details == {"x": 1}
        assert exc.request_id == "rid-body"
    if status >= 500:
        assert isinstance(sync, ServerError)


def test_a_non_json_error_body_still_gives_a_typed_error() -> None:
    rec = Recorder(
        httpx.Response(502, text="<html>Bad Gateway</html>", headers={"x-request-id": "rid-h"})
    )
    with sync_client(rec) as c, pytest.raises(ServerError) as info:
        c.models()
    exc = info.value
    assert exc.status == 502 and exc.code is None and exc.request_id == "rid-h"
    assert exc.message == "<html>Bad Gateway</html>"
    rec = Recorder(httpx.Response(404, content=b""))
    with sync_client(rec) as c, pytest.raises(NotFound) as info:
        c.models()
    assert info.value.message == "Not Found" and info.value.code is None


def test_the_header_request_id_fills_in_for_the_body() -> None:
    body = {"error": "not_found", "message": "no route for this path"}
    rec = Recorder(json_answer(404, body, **{"x-request-id": "rid-header"}))
    with sync_client(rec) as c, pytest.raises(NotFound) as info:
        c.gpu()
    assert info.value.request_id == "rid-header" and info.value.code == "not_found"
    assert info.value.details is None


def test_retry_after_seconds_and_http_date() -> None:
    rec = Recorder(error_answer(429, "rate_limited", **{"retry-after": "3"}))
    with sync_client(rec) as c, pytest.raises(RateLimited) as info:
        c.predict("x")
    assert info.value.retry_after == 3.0
    when = email.utils.formatdate(time.time() + 60, usegmt=True)
    rec = Recorder(error_answer(503, "unavailable", **{"retry-after": when}))
    with sync_client(rec) as c, pytest.raises(Unavailable) as info:
        c.predict("x")
    assert 50 < info.value.retry_after <= 61
    rec = Recorder(error_answer(503, "unavailable", **{"retry-after": "soon"}))
    with sync_client(rec) as c, pytest.raises(Unavailable) as info:
        c.predict("x")
    assert info.value.retry_after is None


def test_a_success_with_a_wrong_body_is_an_invalid_response() -> None:
    rec = Recorder(httpx.Response(200, text="not json"))
    with sync_client(rec) as c, pytest.raises(InvalidResponse) as info:
        c.health()
    assert info.value.status == 200


def test_connection_failures() -> None:
    refused = httpx.ConnectError("[Errno 111] Connection refused")
    sync, asynchronous, _, _ = both(lambda: Recorder(refused), lambda c: c.health())
    for exc in (sync, asynchronous):
        assert type(exc) is MLServeConnectionError and exc.status is None
        assert "cannot reach http://mlserve.test:3000" in str(exc)
        assert "Connection refused" in str(exc)
        assert exc.__cause__ is None  # the httpx request (with its headers) is not kept
    sync, asynchronous, _, _ = both(
        lambda: Recorder(httpx.ReadTimeout("timed out")), lambda c: c.predict("x")
    )
    for exc in (sync, asynchronous):
        assert isinstance(exc, MLServeTimeoutError) and isinstance(exc, MLServeConnectionError)


def test_a_real_refused_connection() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=5) as c, pytest.raises(MLServeConnectionError):
        c.health()


def test_an_admin_change_outwaits_the_client_s_read_timeout() -> None:
    """The server answers an admin change when every worker has applied it or after
    MLSERVE_CONTROL_TIMEOUT_SECONDS (30 s, as the client's default timeout): admin changes read
    for at least ADMIN_CHANGE_TIMEOUT. Against a real server that answers after 1 s, a client
    with a 0.3 s timeout gets the 202 of a change, and a timeout on a prediction."""
    import http.server
    import threading

    partial = json.dumps({**CHANGE, "action": "load", "complete": False, "lagging": ["w2"]})

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(1.0)
            body = partial.encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = False  # server_close() waits for every answer (no stray output later)

        def handle_error(self, request, client_address) -> None:
            pass  # the prediction's client has left when its answer is written: expected

    server = Server(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with Client(url, admin_token=TOKEN, timeout=0.3) as c:
            assert c.load("sentiment:v2").lagging == ["w2"]
            with pytest.raises(MLServeTimeoutError):
                c.predict("x")

        async def go():
            async with AsyncClient(url, admin_token=TOKEN, timeout=0.3) as c:
                return await c.load("sentiment:v2")

        assert asyncio.run(go()).lagging == ["w2"]
    finally:
        server.shutdown()
        server.server_close()
    assert mc.ADMIN_CHANGE_TIMEOUT > 60  # the server's request limit with the default settings


def test_the_admin_read_timeout_keeps_a_longer_or_no_client_timeout() -> None:
    for timeout, admin_read in ((None, None), (300.0, 300.0), (5.0, mc.ADMIN_CHANGE_TIMEOUT)):
        rec = Recorder(json_answer(200, CHANGE), json_answer(200, PREDICTION))
        with sync_client(rec, timeout=timeout) as c:
            c.load("sentiment:v2")
            c.predict("x")
        load, predict = rec.requests
        assert load.extensions["timeout"]["read"] == admin_read
        assert load.extensions["timeout"]["connect"] == timeout
        assert predict.extensions["timeout"]["read"] == timeout


def test_secrets_never_appear_in_errors_or_reprs() -> None:
    for answer in (
        lambda: error_answer(401, "unauthorized", "missing or wrong API key"),
        lambda: httpx.ConnectError("refused"),
        lambda: httpx.Response(500, text="oops"),
    ):
        for call in (lambda c: c.predict("x"), lambda c: c.stats()):
            sync, asynchronous, _, _ = both(lambda a=answer: Recorder(a()), call)
            for exc in (sync, asynchronous):
                for text in (str(exc), repr(exc), exc.message, repr(vars(exc))):
                    assert KEY not in text and TOKEN not in text
    client = Client("http://user:secret-pass@mlserve.test", api_key=KEY, admin_token=TOKEN)
    assert KEY not in repr(client) and TOKEN not in repr(client)
    assert "secret-pass" not in repr(client)
    rec = Recorder(httpx.ConnectError("refused"))
    c = Client("http://user:secret-pass@mlserve.test", transport=httpx.MockTransport(rec))
    with pytest.raises(MLServeConnectionError) as info:
        c.health()
    assert "secret-pass" not in str(info.value)


def test_an_injected_httpx_client_is_used_and_not_closed() -> None:
    rec = Recorder(json_answer(200, {"status": "ok"}))
    http = httpx.Client(transport=httpx.MockTransport(rec))
    with Client(URL, httpx_client=http) as c:
        assert c.health().status == "ok"
    assert not http.is_closed
    http.close()

    async def go():
        rec = Recorder(json_answer(200, {"status": "ok"}))
        http = httpx.AsyncClient(transport=httpx.MockTransport(rec))
        async with AsyncClient(URL, httpx_client=http) as c:
            assert (await c.health()).status == "ok"
        assert not http.is_closed
        await http.aclose()

    asyncio.run(go())


def test_both_flavours_have_the_same_methods() -> None:
    public = {n for n in dir(mc._Calls) if not n.startswith("_")} - {"build", "call"}
    for cls in (Client, AsyncClient):
        assert public <= {n for n in dir(cls) if not n.startswith("_")}


# --- the CLI's --server commands go through the client ----------------------------------------
@pytest.fixture
def cli_server(monkeypatch: pytest.MonkeyPatch):
    """Point the CLI's client at a Recorder; returns a function that installs one."""
    import functools

    def install(*answers) -> Recorder:
        rec = Recorder(*answers)
        client = functools.partial(Client, transport=httpx.MockTransport(rec))
        monkeypatch.setattr(mc, "Client", client)
        return rec

    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", TOKEN)
    return install


def cli(*args: str):
    from typer.testing import CliRunner

    from mlserve.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_promote_and_unload(cli_server) -> None:
    rec = cli_server(json_answer(200, CHANGE))
    result = cli("promote", "sentiment:v2", "--server", URL + "/")
    assert result.exit_code == 0, result.output
    assert "generation 3: loaded sentiment:v1, sentiment:v2; defaults sentiment:v2" in result.output
    assert "applied on all 1 workers" in result.output
    (request,) = rec.requests
    assert str(request.url) == f"{URL}/admin/models/default"
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert json.loads(request.content) == {"name": "sentiment", "version": "v2"}

    partial = {**CHANGE, "complete": False, "lagging": ["w2"], "failed": {"w3": {"t": "boom"}}}
    cli_server(json_answer(202, partial))
    result = cli("unload", "sentiment:v1", "--server", URL)
    assert result.exit_code == 2
    assert "worker w2 has not applied it yet" in result.output and "boom" in result.output


def test_cli_errors_keep_their_messages_and_exit_codes(cli_server) -> None:
    cli_server(error_answer(409, "model_state_conflict", "sentiment:v1 is the default version"))
    result = cli("unload", "sentiment:v1", "--server", URL)
    assert result.exit_code == 1
    assert "409: sentiment:v1 is the default version" in result.output
    cli_server(httpx.Response(502, text="bad gateway"))
    result = cli("stats", "--server", URL)
    assert result.exit_code == 1 and "502: bad gateway" in result.output
    cli_server(httpx.ConnectError("[Errno 111] Connection refused"))
    result = cli("list", "--server", URL)
    assert result.exit_code == 1 and "cannot reach" in result.output
    assert "Connection refused" in result.output and "Traceback" not in result.output


def test_cli_needs_the_admin_token(cli_server, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = cli_server(json_answer(200, CHANGE))
    monkeypatch.delenv("MLSERVE_ADMIN_TOKEN")
    result = cli("promote", "sentiment:v2", "--server", URL)
    assert result.exit_code == 1 and "MLSERVE_ADMIN_TOKEN" in result.output
    assert rec.requests == []


def test_verify_takes_a_certificate_file(tmp_path) -> None:
    import ssl

    import certifi

    assert isinstance(mc._ssl(certifi.where()), ssl.SSLContext)
    assert mc._ssl(False) is False and mc._ssl(True) is True
    with pytest.raises(FileNotFoundError):
        mc._ssl(tmp_path / "missing.pem")
    Client("https://mlserve.test", verify=certifi.where()).close()
