"""The README documents every command-line flag of every tool."""
import dataclasses

import pytest

from chitchat import config
from chitchat.server import ServeConfig
from conftest import ROOT

TOOLS = [config.PreprocessConfig, config.TrainConfig, config.InteractConfig,
         config.EvaluateConfig, ServeConfig]


@pytest.mark.parametrize("cls", TOOLS, ids=lambda c: c.__name__)
def test_readme_documents_every_flag(cls):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(cls)
               if "help" in f.metadata and f"`--{f.name}`" not in readme]
    assert not missing, f"README lacks {cls.__name__} flags: {missing}"


@pytest.mark.parametrize("cls", TOOLS, ids=lambda c: c.__name__)
def test_every_flag_has_help_and_parses_its_default(cls):
    parser = config.build_parser(cls)
    ns = parser.parse_args(["--model_path", "x"] if any(
        f.name == "model_path" and f.default is None for f in dataclasses.fields(cls)) else [])
    for f in dataclasses.fields(cls):
        if "help" in f.metadata:
            assert f.metadata["help"].strip()
            assert hasattr(ns, f.name)
