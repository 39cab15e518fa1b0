"""The client-configuration conventions (mrd.client_config) and the fallback setting."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from recon_server.mrd import client_config as cc
from recon_server.recon.methods import METHODS
from recon_server.service import gadget
from recon_server.service.config import ConfigError, ServiceConfig
from recon_server.service.config_file import parse_config


def test_one_parser_for_the_gadget_and_the_stream_server() -> None:
    assert gadget.config_properties is cc.config_properties
    root = ET.fromstring(
        '<configuration><property name="method" value="cg-sense"/>'
        "<property><name>contrast</name><value> T2 </value></property></configuration>"
    )
    assert cc.config_properties(root) == {"method": "cg-sense", "contrast": "T2"}
    assert cc.config_properties(None) == {}


def test_text_options() -> None:
    assert cc.text_options('<c><property name="method" value="dps"/></c>\0') == {"method": "dps"}
    assert cc.text_options('{"parameters": {"config": "cg-sense"}, "contrast": "T1"}') == {
        "config": "cg-sense",
        "contrast": "T1",
    }
    assert cc.text_options("<not xml") == {} and cc.text_options("plain words") == {}
    assert cc.json_options('{"method": "a", "parameters": {"method": "b", "x": 1}}') == {
        "method": "a",
        "x": 1,
    }
    assert cc.json_options("[1, 2]") is None


@pytest.mark.parametrize(
    ("options", "config_name", "method"),
    [
        ({}, "cg-sense", "cg-sense"),
        ({}, "cg-sense.xml", "cg-sense"),
        ({}, "invertcontrast", None),
        ({"config": "l1-wavelet"}, "openrecon", "l1-wavelet"),
        ({"config": "invertcontrast"}, "cg-sense", "cg-sense"),
        ({"method": "zero-filled", "config": "cg-sense"}, "l1-wavelet", "zero-filled"),
    ],
)
def test_requested_method(options: dict, config_name: str, method: str | None) -> None:
    assert cc.requested_method(options, config_name) == method


def test_unknown_method_and_names() -> None:
    with pytest.raises(cc.ClientConfigError, match="unknown reconstruction method 'nope'"):
        cc.requested_method({"method": "nope"})
    assert cc.unknown_config_names({"config": "simplefft"}, "invertcontrast") == [
        "invertcontrast",
        "simplefft",
    ]
    for generic in ("default", "default.xml", "openrecon", "", "config-text", "cg-sense"):
        assert cc.unknown_config_names({}, generic) == []


def test_fallback_method_setting(tmp_path: Path) -> None:
    assert ServiceConfig().fallback_method == "cg-sense"
    assert ServiceConfig(fallback_method="none").fallback_method is None
    ServiceConfig(fallback_method=None).check_methods(METHODS)
    with pytest.raises(ValueError, match="fallback_method: unknown reconstruction method 'nope'"):
        ServiceConfig(fallback_method="nope").check_methods(METHODS)
    app = parse_config({"recon": {"fallback_method": "zero-filled"}}, known_methods=METHODS)
    assert app.service.fallback_method == "zero-filled"
    assert "fallback zero-filled" in app.summary()
    assert parse_config({"recon": {"fallback_method": "none"}}).service.fallback_method is None
    with pytest.raises(ConfigError, match="recon.fallback_method: unknown reconstruction method"):
        parse_config({"recon": {"fallback_method": "nope"}}, known_methods=METHODS)
    with pytest.raises(ConfigError, match="recon.model_dir: model_dir is required by method"):
        parse_config({"recon": {"fallback_method": "dps-warm"}}, known_methods=METHODS)
