"""Plugin discovery, validation and ordering: a bad plugin fails at start-up, by name."""

from __future__ import annotations

import json
import textwrap

import pytest

from planes.kernel.errors import PluginError, SettingsError
from planes.kernel.host import PluginHost, discover
from planes.kernel.kernel import Kernel
from planes.kernel.plugin import Plugin, Provision
from tests.conftest import RecordingDiagnostics, RecordingPlugin, candidates, make_settings
from tests.kernel.test_cli import planes

PLUGIN_MODULE = textwrap.dedent('''
    from planes.kernel.contracts.diagnostics import DiagnosticsPlane
    from planes.kernel.plugin import Plugin, Provision
    from tests.conftest import RecordingDiagnostics


    class Good(Plugin):
        name = "good"
        version = "2.1.0"
        provides = (Provision(DiagnosticsPlane, supports=("1.0", "2.0")),)

        def implementation(self, provision):
            return RecordingDiagnostics()


    class Future(Good):
        name = "future"
        provides = (Provision(DiagnosticsPlane, supports=("2.0", "3.0")),)


    class Incomplete(DiagnosticsPlane):
        async def echo(self, request, call):
            return None


    Incomplete.__abstractmethods__ = frozenset()


    class Lacking(Good):
        name = "lacking"

        def implementation(self, provision):
            return Incomplete()
''')


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Install a distribution with entry points on sys.path, as pip would."""
    def install(entries: dict[str, str], module: str = PLUGIN_MODULE):
        (tmp_path / "thirdparty_plugins.py").write_text(module)
        info = tmp_path / "thirdparty_plugins-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: thirdparty-plugins\nVersion: 1.0\n")
        lines = "\n".join(f"{name} = {target}" for name, target in entries.items())
        (info / "entry_points.txt").write_text(f"[planes.plugins]\n{lines}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
    return install


def test_entry_point_plugin_is_discovered_and_served(installed, tmp_path):
    installed({"good": "thirdparty_plugins:Good"})
    settings = make_settings(tmp_path / "state")
    found = {c.name: c for c in discover(settings)}
    assert found["good"].plugin.version == "2.1.0"
    assert "diagnostics" in found, "the built-in plugin is registered the same way"
    builtin = _disable("diagnostics", "evidence", "control", "execution", "execution-adapters", "data")
    kernel = Kernel(make_settings(tmp_path / "state", plugins=builtin)).open()
    assert [lp.name for lp in kernel.host.plugins] == ["good"]
    assert kernel.host.plugins[0].status == "ready"


def _disable(*names):
    from planes.kernel.settings import PluginSettings
    return PluginSettings(disabled=names)


def test_incompatible_contract_version_fails_at_start_up(installed, tmp_path):
    installed({"future": "thirdparty_plugins:Future"})
    with pytest.raises(PluginError) as raised:
        Kernel(make_settings(tmp_path / "state", plugins=_disable("diagnostics"))).open()
    assert raised.value.plugin == "future"
    assert "supports diagnostics contract 2.0 up to (not including) 3.0" in raised.value.message
    assert "this kernel has diagnostics contract 1.0" in raised.value.message


def test_missing_method_fails_at_start_up(installed, tmp_path):
    installed({"lacking": "thirdparty_plugins:Lacking"})
    with pytest.raises(PluginError) as raised:
        Kernel(make_settings(tmp_path / "state", plugins=_disable("diagnostics"))).open()
    assert raised.value.plugin == "lacking"
    assert "collect_echo (missing)" in raised.value.message
    assert "stream_echo (missing)" in raised.value.message


def test_unimportable_plugin_fails_with_its_name(installed, tmp_path):
    installed({"broken": "thirdparty_plugins_nope:Thing"})
    with pytest.raises(PluginError) as raised:
        Kernel(make_settings(tmp_path / "state")).open()
    assert raised.value.plugin == "broken"
    assert "ModuleNotFoundError" in raised.value.message


def test_disabled_broken_plugin_does_not_stop_start_up(installed, tmp_path):
    installed({"broken": "thirdparty_plugins_nope:Thing"})
    kernel = Kernel(make_settings(tmp_path / "state", plugins=_disable("broken"))).open()
    names = [lp.name for lp in kernel.host.plugins]
    assert "broken" not in names and "diagnostics" in names


def test_two_providers_of_one_plane_are_refused(installed, tmp_path):
    installed({"good": "thirdparty_plugins:Good"})
    with pytest.raises(PluginError, match="provides diagnostics, which plugin 'diagnostics' provides too"):
        Kernel(make_settings(tmp_path / "state")).open()


def test_plugin_from_settings_modules(tmp_path, monkeypatch):
    (tmp_path / "local_plugin.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from planes.kernel.settings import PluginSettings
    builtin = ("diagnostics", "evidence", "control", "execution", "execution-adapters", "data")
    settings = make_settings(tmp_path / "s", plugins=PluginSettings(disabled=builtin, modules=("local_plugin:Good",)))
    loaded = Kernel(settings).open().host.plugins
    assert [(lp.name, lp.origin) for lp in loaded] == [("good", "setting plugins.modules local_plugin:Good")]


BUILTIN = "control, data, diagnostics, evidence, execution, execution-adapters"


def test_a_table_for_no_installed_plugin_is_refused_before_anything_is_created(tmp_path):
    state = tmp_path / "state"
    settings = make_settings(state, plugin={"rev-tool": {"colour": "blue"}})
    with pytest.raises(SettingsError) as raised:
        Kernel(settings).open()
    assert raised.value.message == ("unknown setting plugin.rev-tool: no plugin of that name is installed; "
                                    f"known here: {BUILTIN}")
    assert not state.exists(), "no key, token or store was made"


def test_a_table_names_any_installed_plugin_even_disabled_or_not_loaded_here(tmp_path):
    from planes.kernel.settings import PluginSettings
    # The same file serves hosts that disable plugins and hosts given their plugins directly (tests, embedders).
    disabled = make_settings(tmp_path / "a", plugins=PluginSettings(disabled=("diagnostics",)),
                             plugin={"diagnostics": {}, "execution-adapters": {}})
    assert "diagnostics" not in [lp.name for lp in PluginHost.load(disabled).plugins]
    given = make_settings(tmp_path / "b", plugin={"recording-diagnostics": {}, "data": {}})
    loaded = PluginHost.load(given, candidates(RecordingPlugin())).plugins
    assert [lp.name for lp in loaded] == ["recording-diagnostics"]


def test_planes_plugins_reports_a_table_for_no_installed_plugin(tmp_path):
    config = tmp_path / "planes.toml"
    config.write_text('[plugin.rev-tool]\ncolour = "blue"\n')
    result = planes("plugins", "--json", "--config", str(config), state=tmp_path / "state")
    assert result.returncode == 1
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["[plugin.rev-tool]"] == {
        "name": "[plugin.rev-tool]", "version": "-", "status": "invalid",
        "detail": f"unknown setting plugin.rev-tool: no plugin of that name is installed; known here: {BUILTIN}"}
    assert rows["execution"]["status"] == "ok", "the plugins themselves are fine"


class Consumer(Plugin):
    name = "consumer"
    requires = ("diagnostics",)

    def setup(self, kernel):
        self.order_seen = [lp.name for lp in kernel.host.plugins]


class NeedsMissing(Plugin):
    name = "needs-missing"
    requires = ("evidence",)


def test_providers_are_ordered_before_their_users(tmp_path):
    consumer, provider = Consumer(), RecordingPlugin()
    host = PluginHost.load(make_settings(tmp_path), candidates(consumer, provider))
    assert [lp.name for lp in host.plugins] == ["recording-diagnostics", "consumer"]


def test_required_plane_nobody_provides_fails(tmp_path):
    with pytest.raises(PluginError) as raised:
        PluginHost.load(make_settings(tmp_path), candidates(NeedsMissing()))
    assert raised.value.plugin == "needs-missing"
    assert "no enabled plugin provides" in raised.value.message


def test_required_plane_reachable_remotely_is_accepted(tmp_path):
    from planes.kernel.settings import PlaneEndpoint
    settings = make_settings(tmp_path, planes={"evidence": PlaneEndpoint(endpoint="127.0.0.1:1")})
    assert [lp.name for lp in PluginHost.load(settings, candidates(NeedsMissing())).plugins] == ["needs-missing"]


def test_setup_failure_names_the_plugin(tmp_path):
    class Exploding(RecordingPlugin):
        name = "exploding"

        def setup(self, kernel):
            raise OSError("disk full")

    settings = make_settings(tmp_path)
    with pytest.raises(PluginError) as raised:
        Kernel(settings, PluginHost.load(settings, candidates(Exploding()))).open()
    assert raised.value.message == "plugin 'exploding': setup failed: OSError: disk full"


def test_plugin_without_name_or_provisions_is_refused(tmp_path):
    class Nameless(RecordingPlugin):
        name = ""

    class Idle(Plugin):
        name = "idle"

    with pytest.raises(PluginError, match="has no name"):
        PluginHost.load(make_settings(tmp_path), candidates(Nameless()))
    with pytest.raises(PluginError, match="provides nothing"):
        PluginHost.load(make_settings(tmp_path), candidates(Idle()))


def test_wrong_implementation_type_is_refused(tmp_path):
    class Impostor(RecordingPlugin):
        name = "impostor"

        def implementation(self, provision):
            return object()

    settings = make_settings(tmp_path)
    with pytest.raises(PluginError, match="not a DiagnosticsPlane"):
        Kernel(settings, PluginHost.load(settings, candidates(Impostor()))).open()


def test_sync_method_where_async_is_required_is_refused(tmp_path):
    class SyncEcho(RecordingDiagnostics):
        def echo(self, request, call):  # type: ignore[override]
            return None

    class Plug(RecordingPlugin):
        name = "sync"

        def implementation(self, provision):
            return SyncEcho()

    settings = make_settings(tmp_path)
    with pytest.raises(PluginError, match=r"echo \(must be async def\)"):
        Kernel(settings, PluginHost.load(settings, candidates(Plug()))).open()


def test_wire_requests_must_name_rpcs(tmp_path):
    class Wired(RecordingDiagnostics):
        wire_requests = frozenset({"reverse"})

    class Plug(RecordingPlugin):
        name = "wired"

        def implementation(self, provision):
            return Wired()

    settings = make_settings(tmp_path)
    with pytest.raises(PluginError, match="wire_requests names reverse, which is not an RPC"):
        Kernel(settings, PluginHost.load(settings, candidates(Plug()))).open()


def test_planes_plugins_reports_a_set_that_serve_would_refuse(installed, tmp_path):
    """Each plugin is fine alone, but two provide one plane: `planes plugins` says so and exits 1, as serve refuses."""
    installed({"good": "thirdparty_plugins:Good"})
    listed = planes("plugins", "--json", state=tmp_path / "state", env={"PYTHONPATH": str(tmp_path)})
    assert listed.returncode == 1, listed.stdout
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["good"]["status"] == "invalid"
    assert rows["good"]["detail"] == ("provides diagnostics, which plugin 'diagnostics' provides too; "
                                      "disable one in [plugins] disabled")
    assert rows["diagnostics"]["status"] == "ok"


def test_planes_plugins_reports_a_required_plane_nobody_provides(tmp_path):
    (tmp_path / "needy_plugin.py").write_text(textwrap.dedent('''
        from planes.kernel.plugin import Plugin

        class Needy(Plugin):
            name = "needy"
            version = "1.0.0"
            requires = ("nowhere",)
    '''))
    (tmp_path / "settings.toml").write_text('[plugins]\nmodules = ["needy_plugin:Needy"]\n')
    listed = planes("plugins", "--config", str(tmp_path / "settings.toml"), state=tmp_path / "state",
                    env={"PYTHONPATH": str(tmp_path)})
    assert listed.returncode == 1
    needy = [line for line in listed.stdout.splitlines() if line.startswith("needy")]
    assert needy and "invalid" in needy[0] and "requires the nowhere plane" in needy[0], listed.stdout


def test_an_extension_with_a_plain_def_where_async_is_required_is_refused_at_open(tmp_path):
    """Extensions are awaited by their host: a plain def is refused at start-up, as for a plane."""
    from planes.plugins.execution.tools import ToolAdapter, ToolDescription

    class PlainTool(ToolAdapter):
        def describe(self, contract):
            return ToolDescription("plain", "test")

        def invoke(self, call, context):  # type: ignore[override]
            return None

    class Plug(Plugin):
        name = "plain-tool"
        version = "1.0.0"
        provides = (Provision(ToolAdapter, supports=("1.0", "2.0"), name="plain"),)

        def implementation(self, provision):
            return PlainTool()

    settings = make_settings(tmp_path)
    with pytest.raises(PluginError) as raised:
        Kernel(settings, PluginHost.load(settings, candidates(Plug()))).open()
    assert raised.value.plugin == "plain-tool"
    assert raised.value.problem == ("tool_adapter:plain implementation has a plain def where async def is needed: "
                                    "invoke")
