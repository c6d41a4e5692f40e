"""The [plugin.*] tables are checked where they are read: the execution plugin's when the kernel opens,
[plugin.execution-adapters] and every table's name when a worker starts. A misspelt key, a wrongly typed
value or a table naming no plugin is refused, by name; the documented settings still start every plugin."""

from __future__ import annotations

import pytest

from planes.kernel.errors import PluginError, SettingsError
from planes.kernel.kernel import Kernel
from planes.kernel.settings import load_settings
from planes.plugins.execution import STORE_FILE
from planes.plugins.execution.worker import load_adapters

EXECUTION_KEYS = ("control_public_key, heartbeat_seconds, lease_seconds, max_attempts, max_spec_bytes, reap_seconds, "
                  "synchronous")
PLUGINS = "control, data, diagnostics, evidence, execution, execution-adapters"

#: Every plugin's documented settings (README, the plugins' docstrings), in one file, as an operator writes it.
DOCUMENTED = """
[plugin.control]
read_only = false
keepalive_seconds = 15
deltas = true
max_subscribers = 10000
subscriber_idle_seconds = 86400

[plugin.evidence]
checkpoint_every = 500
checkpoint_seconds = 5
synchronous = "FULL"
encode_threads = 2
export_max_events = 100000
export_max_bytes = 33554432
export_max_per_tenant = 2
export_max_concurrent = 4
[plugin.evidence.retention]
"model.called" = 2592000

[plugin.data]
max_chunk_bytes = 16777216
durable = true
heap_keep_bytes = 0
credential_keys = []
[plugin.data.egress]
internal = ["tool:*", "model_route:*"]

[plugin.execution]
lease_seconds = 20
heartbeat_seconds = 5
max_attempts = 4
max_spec_bytes = 1048576
reap_seconds = 0.5
synchronous = "NORMAL"

[plugin.execution-adapters]
python_modules = ["planes.plugins.execution.fault_tools"]
"""


def _settings(tmp_path, text: str):
    config = tmp_path / "planes.toml"
    config.write_text(text)
    return load_settings(config, env={}, overrides={"state_dir": str(tmp_path / "state"),
                                                      "server.bind": "127.0.0.1:0"})


def test_every_builtin_plugin_starts_with_its_documented_settings(run, tmp_path):
    settings = _settings(tmp_path, DOCUMENTED)
    kernel = Kernel(settings).open()
    try:
        assert [lp.status for lp in kernel.host.plugins] == ["ready"] * 6
        execution = kernel.host.providers["execution"][0].plugin
        engine = execution.engine_settings
        assert (engine.lease_seconds, engine.heartbeat_seconds, engine.max_attempts, engine.max_spec_bytes,
                execution.reap_seconds) == (20.0, 5.0, 4, 1 << 20, 0.5)
    finally:
        run(kernel.stop())
    tools, _ = load_adapters(settings)
    assert "planes.plugins.execution.fault_tools" in tools["python"].allowed_modules


def test_execution_defaults_still_follow_the_lease(run, tmp_path):
    kernel = Kernel(_settings(tmp_path, "[plugin.execution]\nlease_seconds = 6\n")).open()
    try:
        execution = kernel.host.providers["execution"][0].plugin
        assert (execution.engine_settings.heartbeat_seconds, execution.reap_seconds) == (2.0, 1.0)
    finally:
        run(kernel.stop())


@pytest.mark.parametrize(("table", "problem"), [
    ("max_attempt = 1", f"unknown setting plugin.execution.max_attempt; known here: {EXECUTION_KEYS}"),
    ('max_attempts = "three"', "plugin.execution.max_attempts must be int, got 'three'"),
    ('lease_seconds = "30s"', "plugin.execution.lease_seconds must be float, got '30s'"),
    ('synchronous = "OFF"', "plugin.execution.synchronous must be one of FULL, NORMAL, EXTRA, got 'OFF'"),
], ids=["misspelt key", "wrong type", "wrong number", "synchronous"])
def test_a_bad_execution_key_fails_the_kernel_naming_it(tmp_path, table, problem):
    settings = _settings(tmp_path, f"[plugin.execution]\n{table}\n")
    with pytest.raises(PluginError) as raised:
        Kernel(settings).open()
    assert raised.value.message == f"plugin 'execution': setup failed: SettingsError: {problem}"
    assert not (tmp_path / "state" / STORE_FILE).exists(), "refused before the task store was made"


def test_a_misspelt_execution_adapters_key_fails_the_worker_and_the_kernel_naming_it(tmp_path):
    settings = _settings(tmp_path, '[plugin.execution-adapters]\npython_module = ["my_tools"]\n')
    problem = ("plugin 'execution-adapters': setup failed: SettingsError: unknown setting "
               "plugin.execution-adapters.python_module; known here: python_modules")
    with pytest.raises(PluginError) as by_worker:
        load_adapters(settings)
    with pytest.raises(PluginError) as by_kernel:
        Kernel(settings).open()
    assert by_worker.value.message == by_kernel.value.message == problem


def test_a_table_for_no_installed_plugin_fails_the_worker_and_the_kernel(tmp_path):
    settings = _settings(tmp_path, "[plugin.rev-tool]\nmax_attempts = 1\n")
    message = f"unknown setting plugin.rev-tool: no plugin of that name is installed; known here: {PLUGINS}"
    with pytest.raises(SettingsError) as by_worker:
        load_adapters(settings)
    with pytest.raises(SettingsError) as by_kernel:
        Kernel(settings).open()
    assert by_worker.value.message == by_kernel.value.message == message
    assert not (tmp_path / "state").exists()


def test_the_diagnostics_plugin_has_no_settings_so_any_key_is_refused(tmp_path):
    settings = _settings(tmp_path, '[plugin.diagnostics]\ncolour = "blue"\n')
    with pytest.raises(PluginError) as raised:
        Kernel(settings).open()
    assert raised.value.message == ("plugin 'diagnostics': setup failed: SettingsError: unknown setting "
                                    "plugin.diagnostics.colour; known here: ")
