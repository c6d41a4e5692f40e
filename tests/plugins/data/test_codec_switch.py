"""The data plane and its client take the codec ``PLANES_NO_EXTENSIONS`` selects, like every other user of it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import planes.plugins.data.client as client, planes.plugins.data.plane as plane; "
         "print(plane.codec.__name__, client.codec.__name__)")


@pytest.mark.parametrize("switch, expected", [("1", "planes.native.codec_py"), ("0", "planes.native.codec")],
                         ids=["python", "native"])
def test_plane_and_client_follow_the_no_extensions_switch(switch, expected):
    """A fresh interpreter each: the choice is made once, at import."""
    env = {**os.environ, "PLANES_NO_EXTENSIONS": switch}
    probe = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [expected, expected]
