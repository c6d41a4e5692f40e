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
