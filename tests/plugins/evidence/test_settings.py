"""[plugin.evidence] is checked at start-up: a misspelt key or a wrongly typed value is refused, by name."""

from __future__ import annotations

import pytest

from planes.kernel.errors import InvalidArgument, PluginError
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.plugins.evidence import STORE_FILE, EvidencePlugin
from tests.conftest import make_settings

KNOWN = ("checkpoint_every, checkpoint_seconds, encode_threads, export_max_bytes, export_max_concurrent, "
         "export_max_events, export_max_per_tenant, retention, synchronous")


def _open(state, table: dict) -> Kernel:
    settings = make_settings(state, plugin={"evidence": table})
    plugin = EvidencePlugin()
    return Kernel(settings, PluginHost.load(settings, [Candidate(plugin.name, "test", plugin)])).open()


@pytest.mark.parametrize(("table", "problem"), [
    ({"export_max_event": 1}, f"unknown setting plugin.evidence.export_max_event; known here: {KNOWN}"),
    ({"checkpoint_every": "1000"}, "plugin.evidence.checkpoint_every must be int, got '1000'"),
    ({"retention": {"model.called": "30d"}}, "plugin.evidence.retention.model.called must be float, got '30d'"),
    ({"synchronous": "FUL"}, "plugin.evidence.synchronous must be one of NORMAL, FULL, EXTRA, got 'FUL'"),
])
def test_a_bad_key_is_refused_by_name_before_the_log_opens(tmp_path, table, problem):
    with pytest.raises(PluginError) as raised:
        _open(tmp_path, table)
    assert raised.value.message == f"plugin 'evidence': setup failed: SettingsError: {problem}"
    assert not (tmp_path / STORE_FILE).exists()


def test_an_export_limit_below_one_is_still_refused_before_the_log_opens(tmp_path):
    with pytest.raises(PluginError) as raised:
        _open(tmp_path, {"export_max_bytes": 0})
    assert isinstance(raised.value.__cause__, InvalidArgument)
    assert raised.value.message.endswith("[plugin.evidence] export_max_bytes must be at least 1, got 0")
    assert not (tmp_path / STORE_FILE).exists()


def test_the_documented_settings_reach_the_log_and_the_plane(run, tmp_path):
    kernel = _open(tmp_path, {"checkpoint_every": 10, "checkpoint_seconds": 2, "synchronous": "normal",
                              "encode_threads": 1, "retention": {"model.called": 2592000},
                              "export_max_events": 5, "export_max_bytes": 1024, "export_max_per_tenant": 1,
                              "export_max_concurrent": 3})
    plugin = kernel.host.providers["evidence"][0].plugin
    log = plugin.log
    assert (log.checkpoint_every, log.checkpoint_seconds, log.encode_threads) == (10, 2.0, 1)
    assert plugin.retention == {"model.called": 2592000.0}
    limits = plugin.plane.export_limits
    assert (limits.max_events, limits.max_bytes, limits.per_tenant, limits.process) == (5, 1024, 1, 3)
    run(kernel.stop())
