"""Every TOML block in the docs parses, and every resource block loads as `planes config apply` reads it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from planes.plugins.control.cli import load_resources
from planes.plugins.control.schema import validate

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(doc, index, block) for doc in DOCS
          for index, block in enumerate(re.findall(r"```toml\n(.*?)```", doc.read_text(), re.S))]


@pytest.mark.parametrize(("doc", "index", "block"), BLOCKS,
                         ids=[f"{doc.name}#{index}" for doc, index, _ in BLOCKS])
def test_a_toml_block_in_the_docs_is_valid(tmp_path, doc, index, block):
    tomllib.loads(block)
    if "[[resource]]" in block:
        path = tmp_path / "resources.toml"
        path.write_text(block)
        for resource in load_resources(str(path)):
            validate(resource.kind, resource.tenant, resource.name, resource.spec)


def test_the_docs_have_toml_blocks_to_check():
    assert any("[[resource]]" in block for _, _, block in BLOCKS)
