"""The tool adapter guide's example (docs/examples/word_count_tool.py) runs as documented."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import pytest

from planes.common.v1 import common_pb2
from planes.control.v1 import control_service_pb2 as cpb
from planes.execution.v1 import execution_service_pb2 as pb
from planes.kernel import errors
from planes.kernel.host import check_implementation, validate
from planes.plugins.execution.config import ToolContract
from planes.plugins.execution.tools import DataAccess, Secrets, ToolCall, ToolContext
from planes.plugins.execution.worker import Worker, load_adapters

from .conftest import spec, tool, wait_state

EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "word_count_tool.py"


@pytest.fixture
def example():
    module_spec = importlib.util.spec_from_file_location("word_count_tool", EXAMPLE)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_the_example_adapter_validates_and_counts(run, example):
    plugin = example.WordCountPlugin()
    validate(plugin)
    (provision,) = plugin.provides
    adapter = plugin.implementation(provision)
    check_implementation(plugin, provision, adapter)
    contract = ToolContract("count-words", "acme", {"adapter": "word_count", "target": {"field": "text"}})
    context = ToolContext(tenant="acme", task_id="t", attempt_epoch=1, correlation=common_pb2.Correlation(),
                          secrets=Secrets(lambda ref: b"", ""), data=DataAccess("", frozenset()),
                          cancelled=asyncio.Event(), deadline=time.monotonic() + 5,
                          egress_allowed=lambda destination: False)
    result = run(adapter.invoke(ToolCall("a", "count-words", {"text": "one two  three"}, (), contract, "k"), context))
    assert result.output == {"words": 3}
    with pytest.raises(errors.InvalidArgument, match="must be a string"):
        run(adapter.invoke(ToolCall("a", "count-words", {"text": 7}, (), contract, "k"), context))


def test_the_example_adapter_runs_a_task_end_to_end(scenario, example):
    async def body(cluster):
        await cluster.publish([(cpb.RESOURCE_KIND_TOOL_CONTRACT, "count-words", {
            "version": "1", "adapter": "word_count", "target": {"field": "text"}, "side_effect": "none",
            "classification": "internal"})])
        tools, models = load_adapters(cluster.kernel.settings)
        plugin = example.WordCountPlugin()
        tools["word_count"] = plugin.implementation(plugin.provides[0])
        worker = Worker(cluster.workers(), cache=cluster.plugin.cache, name="guide", adapters=tools, models=models)
        stop = asyncio.Event()
        running = asyncio.get_running_loop().create_task(worker.run(stop))
        tasks = cluster.tasks()
        submitted = await tasks.submit_task(pb.SubmitTaskRequest(task=spec(
            tool("a", "count-words", text="planes runs governed work"))))
        end = await wait_state(tasks, submitted.task.task_id, pb.TASK_STATE_COMPLETED, pb.TASK_STATE_FAILED)
        stop.set()
        await running
        events = await cluster.events(submitted.task.spec.correlation.correlation_id)
        return end, events
    end, events = scenario(body)
    assert end.state == pb.TASK_STATE_COMPLETED, end.failure
    assert end.result.summary["actions"]["a"]["words"] == 4
    invoked = [{f.name: f.string_value for f in e.fields} for e in events if e.event_type == "tool.invoked"]
    assert invoked[0]["adapter"] == "word_count" and invoked[0]["note.isolation"] == "in-process"


def test_the_guides_task_spec_json_is_a_task_spec_that_planes_task_submit_reads():
    import re

    from google.protobuf import json_format

    guide = (EXAMPLE.parents[1] / "tool-adapters.md").read_text()
    (block,) = [b for b in re.findall(r"```json\n(.*?)```", guide, re.S) if "allowedTools" in b]
    parsed = json_format.Parse(block, pb.TaskSpec())  # unknown or misspelt names raise
    assert list(parsed.allowed_tools) == ["count-words"]
    (action,) = parsed.actions
    assert action.action_id == "count" and action.tool.tool == "count-words"
    assert action.tool.inputs[0].classification == common_pb2.CLASSIFICATION_INTERNAL
    assert parsed.inputs[0].payload_id == parsed.actions[0].tool.inputs[0].payload_id
    assert re.fullmatch(r"pl_[0-9a-f]{32}", parsed.inputs[0].payload_id), "an id the data plane would accept"
