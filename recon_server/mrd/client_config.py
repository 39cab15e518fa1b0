"""What a peer's configuration asks for, in every convention the listeners meet (one parser).

* CONFIG_FILE (1): a name. A method name (``cg-sense``, also ``cg-sense.xml``) selects that
  method; other names (python-ismrmrd-server's ``invertcontrast``, ``simplefft``, ``null``...)
  are logged as a warning by the stream server and the configured method is used. Generic names
  (``default``, ``openrecon``, which OpenRecon always sends) pass silently.
* CONFIG_TEXT (2) / Gadgetron's ``<external><configuration>``: XML whose ``<property>`` elements,
  ``<property name="method" value="dps-fast"/>`` or Gadgetron's older
  ``<property><name>method</name><value>dps-fast</value></property>``, give ``method`` and
  ``contrast`` (:func:`config_properties`). A CONFIG_TEXT holding a JSON object is read as the
  JSON TEXT below.
* TEXT (5) with JSON (FIRE / OpenRecon ``configAdditional``): top-level keys (``method``,
  ``contrast``, ``samples``) and the same keys under ``parameters``, where FIRE puts the user's
  settings and ``config`` (the reconstruction to run; a known method name selects it, another
  name is treated like an unknown CONFIG_FILE). Top-level keys win over ``parameters``.

An explicit ``method`` that is not registered is a :class:`ClientConfigError`: the stream server
answers it (TEXT ``ERR``, CLOSE) as soon as that configuration arrives, before the scan uploads.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Mapping

from recon_server.recon.methods import METHODS

#: CONFIG_FILE names that carry no choice (compared lower-case, without ``.xml``).
GENERIC_CONFIG_NAMES = frozenset({"", "default", "openrecon", "config-text"})


class ClientConfigError(ValueError):
    """The peer's configuration asks for something this server cannot run."""


def config_properties(config: ET.Element | None) -> dict[str, str]:
    """``name -> value`` of every ``<property>`` under ``config`` (attribute or child form)."""
    if config is None:
        return {}
    props = {}
    for prop in config.iter("property"):
        name, value = prop.get("name"), prop.get("value")
        if name is None:
            name, value = prop.findtext("name"), prop.findtext("value")
        if name and value is not None:
            props[name.strip()] = value.strip()
    return props


def _clean(text: str) -> str:
    return text.strip().rstrip("\0").strip()  # FIRE strings end in NUL


def xml_properties(text: str) -> dict[str, str] | None:
    """The ``<property>`` values of an XML configuration text; None when the text is not XML."""
    text = _clean(text)
    if not text.startswith("<"):
        return None
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    return config_properties(root)


def flatten_options(value: Mapping[str, object]) -> dict[str, object]:
    """``parameters`` merged under the top-level keys (which win)."""
    params = value.get("parameters")
    out: dict[str, object] = dict(params) if isinstance(params, dict) else {}
    out.update({k: v for k, v in value.items() if k != "parameters"})
    return out


def json_options(text: str) -> dict[str, object] | None:
    """The options of a JSON object text (flattened), None when the text is not a JSON object."""
    try:
        value = json.loads(_clean(text))
    except json.JSONDecodeError:
        return None
    return flatten_options(value) if isinstance(value, dict) else None


def text_options(text: str) -> dict[str, object]:
    """Options of a CONFIG_TEXT: XML properties, or a JSON object; ``{}`` otherwise."""
    props = xml_properties(text)
    if props is not None:
        return dict(props)
    return json_options(text) or {}


def method_name(name: object) -> str | None:
    """The registered method a configuration name names (``cg-sense``, ``cg-sense.xml``), or None."""
    if not isinstance(name, str):
        return None
    name = _clean(name)
    for candidate in (name, name.removesuffix(".xml"), name.lower(), name.lower().removesuffix(".xml")):
        if candidate in METHODS:
            return candidate
    return None


def requested_method(options: Mapping[str, object], config_name: str = "") -> str | None:
    """The method the peer asks for: ``method``, else ``config`` or the CONFIG_FILE name when
    they name a method; None: the server's own choice. ClientConfigError for an unknown ``method``."""
    explicit = options.get("method")
    if explicit is not None and explicit != "":  # an empty property is no choice
        name = method_name(explicit)
        if name is None:
            raise ClientConfigError(f"unknown reconstruction method {explicit!r}; known: {sorted(METHODS)}")
        return name
    for candidate in (options.get("config"), config_name):
        name = method_name(candidate)
        if name is not None:
            return name
    return None


def unknown_config_names(options: Mapping[str, object], config_name: str = "") -> list[str]:
    """Configuration names (CONFIG_FILE, JSON ``config``) that are neither methods nor generic."""
    out = []
    for candidate in (config_name, options.get("config")):
        if not isinstance(candidate, str):
            continue
        name = _clean(candidate)
        generic = name.lower().removesuffix(".xml") in GENERIC_CONFIG_NAMES
        if not generic and method_name(name) is None and name not in out:
            out.append(name)
    return out
