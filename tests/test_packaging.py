"""The sdist: a wheel built from it compiles the contracts and the native modules, so their sources ship."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_carries_the_contracts_and_native_sources(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True, timeout=600)
    (archive,) = tmp_path.glob("planes-*.tar.gz")
    with tarfile.open(archive) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    needed = [*ROOT.glob("proto/**/*.proto"), *(p for p in ROOT.glob("native/*") if p.suffix in (".pyx", ".pxd", ".h"))]
    assert len(needed) > 10
    missing = [str(path.relative_to(ROOT)) for path in needed if str(path.relative_to(ROOT)) not in names]
    assert missing == []
    assert not [name for name in names if name.endswith(".c")], "generated C is rebuilt from the .pyx, not shipped"
    assert {"setup.py", "pyproject.toml", "README.md"} <= names


def test_with_extensions_disabled_no_plugin_loads_a_compiled_module():
    """PLANES_NO_EXTENSIONS=1 means the pure-Python twins everywhere: the switch the twin test runs rely on."""
    script = (
        "import importlib, pkgutil, sys\n"
        "import planes.kernel, planes.plugins\n"
        "for package in (planes.kernel, planes.plugins):\n"
        "    for module in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):\n"
        "        importlib.import_module(module.name)\n"
        "compiled = sorted(name for name, module in sys.modules.items() if name.startswith('planes.native.')\n"
        "                  and (getattr(module, '__file__', '') or '').endswith('.so'))\n"
        "print(' '.join(compiled) or 'none')\n"
    )
    env = {**__import__("os").environ, "PLANES_NO_EXTENSIONS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "none"
