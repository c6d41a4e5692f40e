"""A worker's adapter plugins are loaded, set up and checked at start-up, and a bad one stops `planes worker`
with one line naming the plugin, before any task."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from planes.kernel.errors import PluginError
from planes.kernel.settings import PluginSettings
from planes.plugins.execution.worker import load_adapters
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[3]
HERE = "tests.plugins.execution.adapter_plugins"

#: (plugin class in adapter_plugins, plugin name in the error, what the error says)
BROKEN = [
    ("NoInvokePlugin", "no-invoke", "cannot make its tool_adapter:no_invoke implementation: TypeError"),
    ("PlainInvokePlugin", "plain-invoke", "tool_adapter:plain_invoke implementation has a plain def where "
                                          "async def is needed: invoke"),
    ("FailingSetupPlugin", "failing-setup", "setup failed: RuntimeError: no licence file"),
    ("PlaneClientPlugin", "plane-client", "setup failed: FailedPrecondition: a worker hosts no planes"),
    ("FutureContractPlugin", "future-contract", "supports tool_adapter:future contract 2.0"),
]


def _settings(tmp_path: Path, *modules: str, **plugin_settings):
    return make_settings(tmp_path, plugins=PluginSettings(modules=modules), plugin=plugin_settings)


def test_setup_runs_with_the_plugins_settings_before_its_adapters_are_made(tmp_path):
    tools, _ = load_adapters(_settings(tmp_path, f"{HERE}:GreetingPlugin", greeting={"greeting": "hello"}))
    assert tools["greet"].greeting == "hello"
    assert {"python", "subprocess", "http", "mcp"} <= set(tools), "the built-in adapters still load"


@pytest.mark.parametrize("plugin_class, name, problem", BROKEN, ids=[row[1] for row in BROKEN])
def test_a_broken_adapter_plugin_is_refused_naming_it(tmp_path, plugin_class, name, problem):
    with pytest.raises(PluginError) as raised:
        load_adapters(_settings(tmp_path, f"{HERE}:{plugin_class}"))
    assert raised.value.plugin == name and problem in raised.value.problem


def test_a_listed_module_that_cannot_be_imported_is_refused_whatever_its_name(tmp_path):
    # The name holds none of "adapter", "tool", "model", which used to be skipped silently.
    spec = "acme_widgets_missing:WidgetsPlugin"
    with pytest.raises(PluginError) as raised:
        load_adapters(_settings(tmp_path, spec))
    assert raised.value.plugin == spec and "ModuleNotFoundError" in raised.value.problem


def test_a_disabled_broken_plugin_is_left_alone(tmp_path):
    settings = make_settings(tmp_path, plugins=PluginSettings(modules=("acme_widgets_missing:WidgetsPlugin",
                                                                       f"{HERE}:NoInvokePlugin"),
                                                              disabled=("acme_widgets_missing:WidgetsPlugin",
                                                                        "no-invoke")))
    tools, _ = load_adapters(settings)
    assert "no_invoke" not in tools and "python" in tools


def _worker(tmp_path: Path, *modules: str) -> subprocess.CompletedProcess:
    """`planes worker` with ``modules`` listed in its settings file; no kernel needed, it must stop first."""
    config = tmp_path / "worker.toml"
    listed = ", ".join(f'"{m}"' for m in modules)
    config.write_text(f"[plugins]\nmodules = [{listed}]\n")
    token = tmp_path / "worker.token"
    token.write_text("not-a-token\n")
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLANES_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "planes.kernel.cli", "worker", "--config", str(config), "--state-dir",
         str(tmp_path / "state"), "--address", "127.0.0.1:9", "--token-file", str(token)],
        env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("plugin_class, name, problem",
                         BROKEN[:3] + [("", "acme_widgets_missing:WidgetsPlugin", "cannot load: ModuleNotFoundError")],
                         ids=["no-invoke", "plain-invoke", "failing-setup", "unimportable"])
def test_planes_worker_stops_with_one_line_naming_the_plugin(tmp_path, plugin_class, name, problem):
    done = _worker(tmp_path, f"{HERE}:{plugin_class}" if plugin_class else name)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"planes: error: plugin {name!r}: "), done.stderr
    assert problem in lines[0]
    assert "worker " not in done.stdout, "it never started"


def test_two_plugins_with_one_adapter_name_are_refused(tmp_path):
    with pytest.raises(PluginError) as raised:
        load_adapters(_settings(tmp_path, f"{HERE}:GreetingPlugin", f"{HERE}:OtherGreetingPlugin",
                                greeting={"greeting": "hello"}))
    assert raised.value.plugin == "other-greeting"
    assert raised.value.problem == ("provides tool_adapter:greet, which plugin 'greeting' provides too; "
                                    "disable one in [plugins] disabled")
