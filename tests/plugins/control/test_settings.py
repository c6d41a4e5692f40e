"""[plugin.control] is checked at start-up: a misspelt key or a wrongly typed value is refused, by name."""

from __future__ import annotations

import pytest

from planes.kernel.errors import PluginError
from planes.kernel.host import Candidate, PluginHost
from planes.kernel.kernel import Kernel
from planes.plugins.control import STORE_FILE, ControlPlugin
from planes.plugins.evidence import EvidencePlugin
from tests.conftest import make_settings


def _open(state, table: dict) -> Kernel:
    settings = make_settings(state, plugin={"control": table})
    plugins = [EvidencePlugin(), ControlPlugin()]
    return Kernel(settings, PluginHost.load(settings, [Candidate(p.name, "test", p) for p in plugins])).open()


@pytest.mark.parametrize(("table", "problem"), [
    ({"read_onl": True}, "unknown setting plugin.control.read_onl; known here: deltas, keepalive_seconds, "
                         "max_subscribers, read_only, subscriber_idle_seconds"),
    ({"read_only": "false"}, "plugin.control.read_only must be true or false, got 'false'"),
    ({"max_subscribers": 2.5}, "plugin.control.max_subscribers must be int, got 2.5"),
])
def test_a_bad_key_is_refused_by_name_before_the_store_opens(tmp_path, table, problem):
    with pytest.raises(PluginError) as raised:
        _open(tmp_path, table)
    assert raised.value.message == f"plugin 'control': setup failed: SettingsError: {problem}"
    assert not (tmp_path / STORE_FILE).exists()


def test_the_documented_settings_reach_the_plane(run, tmp_path):
    kernel = _open(tmp_path, {"read_only": False, "keepalive_seconds": 2, "deltas": False, "max_subscribers": 5,
                              "subscriber_idle_seconds": 60})
    plane = kernel.host.providers["control"][0].plugin.plane
    assert (plane.keepalive, plane.deltas, plane.max_subscribers, plane.subscriber_idle_seconds) == (2.0, False, 5, 60.0)
    assert isinstance(plane.keepalive, float)
    run(kernel.stop())
