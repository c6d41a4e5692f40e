"""Model routes: classification-aware selection, the OpenAI-compatible client, fallbacks end to end."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from google.protobuf import json_format, struct_pb2

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.plugins.execution.config import ModelRoute, RunConfig
from planes.plugins.execution.models import EchoModel, ModelRequest, OpenAIChatModel, select_routes
from planes.plugins.execution.tools import Secrets
from planes.plugins.execution.worker import Worker

from .conftest import spec, wait_state

CONFIDENTIAL = common_pb2.CLASSIFICATION_CONFIDENTIAL
PUBLIC = common_pb2.CLASSIFICATION_PUBLIC


def _config(routes: dict[str, dict]) -> RunConfig:
    content = cpb.SnapshotContent()
    for name, body in routes.items():
        content.resources.add(kind=cpb.RESOURCE_KIND_MODEL_ROUTE, tenant="acme", name=name,
                              spec=json_format.ParseDict(body, struct_pb2.Struct()))
    return RunConfig(7, b"d", content)


def test_a_confidential_prompt_never_goes_to_a_route_not_approved_for_it():
    config = _config({
        "cheap": {"adapter": "openai", "allowed_classifications": ["public", "internal"], "fallbacks": ["vault"]},
        "vault": {"adapter": "echo", "allowed_classifications": ["internal", "confidential"]},
        "open": {"adapter": "echo", "allowed_classifications": ["public"]},
    })
    assert [r.name for r in select_routes(config, "acme", "cheap", PUBLIC)] == ["cheap"]
    assert [r.name for r in select_routes(config, "acme", "cheap", CONFIDENTIAL)] == ["vault"], \
        "only the approved fallback"
    assert [r.name for r in select_routes(config, "acme", "", CONFIDENTIAL)] == ["vault"]
    with pytest.raises(errors.PermissionDenied, match="no model route approved for confidential data"):
        select_routes(config, "acme", "open", CONFIDENTIAL)
    with pytest.raises(errors.PermissionDenied, match="restricted"):
        select_routes(config, "acme", "", common_pb2.CLASSIFICATION_RESTRICTED)


class _StandIn(BaseHTTPRequestHandler):
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _StandIn.requests.append((self.path, self.headers.get("Authorization"), body))
        text = " ".join(m["content"] for m in body["messages"])[::-1]
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                            "usage": {"prompt_tokens": 3, "completion_tokens": 5}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _StandIn.requests = []
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_the_openai_client_speaks_chat_completions(run, stand_in):
    route = ModelRoute("gpt", "acme", {"adapter": "openai", "endpoint": stand_in,
                                       "allowed_classifications": ["internal"]})
    reply = run(OpenAIChatModel().complete(route, ModelRequest([{"role": "user", "content": "abc"}],
                                                               {"model": "small", "temperature": 0.1})))
    assert (reply.text, reply.route, reply.prompt_tokens, reply.completion_tokens) == ("cba", "gpt", 3, 5)
    path, _, body = _StandIn.requests[0]
    assert path == "/v1/chat/completions"
    assert body == {"model": "small", "messages": [{"role": "user", "content": "abc"}], "temperature": 0.1}
    down = ModelRoute("down", "acme", {"adapter": "openai", "endpoint": "http://127.0.0.1:9/v1"})
    with pytest.raises(errors.Unavailable):
        run(OpenAIChatModel().complete(down, ModelRequest([{"role": "user", "content": "x"}])))
    keyed = ModelRoute("keyed", "acme", {"adapter": "openai", "endpoint": stand_in, "model": "big",
                                         "credential_ref": "openai-key", "allowed_classifications": ["internal"]})
    run(OpenAIChatModel().complete(keyed, ModelRequest([{"role": "user", "content": "k"}]),
                                   Secrets(lambda ref: b"sk-test\n", "openai-key")))
    _, authorization, body = _StandIn.requests[-1]
    assert authorization == "Bearer sk-test" and body["model"] == "big"
    echo = run(EchoModel().complete(route, ModelRequest([{"role": "user", "content": "same"}])))
    assert echo.text == "echo: same"


def _model_action(route: str, prompt: str, classification=None) -> pb.Action:
    parameters = struct_pb2.Struct()
    parameters.update({"prompt": prompt})
    inputs = [common_pb2.PayloadRef(payload_id="p", classification=classification)] if classification else []
    return pb.Action(action_id="m", model=pb.ModelAction(route=route, parameters=parameters, inputs=inputs))


def test_a_failing_route_falls_back_and_evidence_names_the_route_used(scenario):
    async def body(cluster):
        await cluster.publish([(cpb.RESOURCE_KIND_MODEL_ROUTE, "gpt", {
            "adapter": "openai", "endpoint": "http://127.0.0.1:9/v1", "allowed_classifications": ["internal"],
            "fallbacks": ["public-echo"]})])
        from planes.plugins.execution.worker import load_adapters
        tools, models = load_adapters(cluster.kernel.settings)
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="in-test", adapters=tools,
                        models=models)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(_model_action("gpt", "hello"))))
        end = await wait_state(tasks, submitted.task.task_id, pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED)
        refused = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
            _model_action("public-echo", "secret plans", CONFIDENTIAL))))
        stop.set()
        await running
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, refused, events
    end, refused, events = scenario(body)
    assert end.state == pb.TASK_STATE_COMPLETED, end.failure
    assert end.result.summary["actions"]["m"]["text"] == "echo: hello"
    assert end.result.usage.model_calls == 1
    called = [{f.name: f.string_value for f in e.fields} for e in events if e.event_type == "model.called"]
    assert called and called[0]["target"] == "public-echo" and called[0]["note.fallback_from"] == "gpt"
    assert refused.task.state == pb.TASK_STATE_FAILED and refused.task.failure.code == "policy.denied"
    assert "model-route-classification" in refused.task.policy.rules
