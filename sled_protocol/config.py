"""Frozen config dataclasses become CLI flags and ``SLED_*`` environment variables, in one place.

A field ``max_wait_ms`` becomes ``--max-wait-ms`` and ``SLED_MAX_WAIT_MS``; the dataclass default is the only
default; a flag beats the environment, which beats the default. Each field's ``metadata["help"]`` is its
help text; ``metadata["formerly"]`` names a renamed field's old names, still accepted as flags and variables. Invalid values raise ``ConfigError``, which entry points turn into exit status 78 (EX_CONFIG).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from typing import Any



class ConfigError(ValueError):
    """A configuration value that cannot work; the message says which and why."""


def env_name(field_name: str) -> str:
    return "SLED_" + field_name.upper()


def _base_type(annotation: Any) -> type:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type, *, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        if field.name in skip:
            continue
        kind = _base_type(hints[field.name])
        flag = "--" + field.name.replace("_", "-")
        formerly = ["--" + name.replace("_", "-") for name in field.metadata.get("formerly", ())]
        default = None if field.default is dataclasses.MISSING else field.default
        was = f"; formerly {', '.join(formerly)}" if formerly else ""
        help_text = f"{field.metadata.get('help', '')} [env {env_name(field.name)}; default {default!r}{was}]"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help: a literal "50%" would break --help
        if kind is bool:
            parser.add_argument(flag, *formerly, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, *formerly, dest=field.name, default=None, metavar=field.name.upper(),
                                help=help_text)


def _convert(raw: Any, kind: type, name: str) -> Any:
    if not isinstance(raw, str) or kind is str:
        return raw
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{name}: {raw!r} is not a valid {kind.__name__}") from None


def config_from_args(config_cls: type, args: argparse.Namespace, environ: dict[str, str] | None = None):
    """Build ``config_cls`` from parsed flags, then ``SLED_*`` variables, then the dataclass defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(config_cls)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_cls):
        raw = getattr(args, field.name, None)
        for name in (field.name, *field.metadata.get("formerly", ())):
            raw = environ.get(env_name(name)) if raw is None else raw
        if raw is None:
            if field.default is dataclasses.MISSING:
                raise ConfigError(f"--{field.name.replace('_', '-')} (or {env_name(field.name)}) is required")
            continue
        values[field.name] = _convert(raw, _base_type(hints[field.name]), field.name)
    try:
        return config_cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


LOG_LEVELS = ("debug", "info", "warning", "error")


def described(text: str, *, formerly: tuple[str, ...] = ()) -> dict[str, Any]:
    """``field(metadata=described("..."))``: the help text of a config field, and the names it had before a
    rename (``formerly``: their flags and ``SLED_*`` variables still work)."""
    return {"help": text, "formerly": formerly}


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """The broker block both services' configurations extend (``EdgeConfig``, ``VerifierConfig``): where the broker
    is, the MQTT version and the CA for mqtts://; checked by ``check_broker`` with the service's own ids."""

    mqtt_url: str = dataclasses.field(default="mqtt://127.0.0.1:1883", metadata=described(
        "broker URL, mqtt:// or mqtts://; a cluster's nodes separated by commas, tried in turn"))
    mqtt_protocol: str = dataclasses.field(default="5", metadata=described("MQTT version: 5, or 3.1.1 (RabbitMQ 3.10)"))
    ca_file: str = dataclasses.field(default="", metadata=described("CA certificate for mqtts:// (default: the system's CAs)"))

    def check_broker(self, log_level: str, **names: str) -> None:
        """ConfigError unless the broker block, ``log_level`` and the topic-level ids in ``names`` can work."""
        require_connection(self.mqtt_url, log_level, ca_file=self.ca_file, mqtt_protocol=self.mqtt_protocol, **names)


def require_connection(mqtt_url: str, log_level: str, *, ca_file: str = "", mqtt_protocol: str = "5",
                       **names: str) -> None:
    """What every service checks: usable broker URLs and MQTT version, a readable ``ca_file`` when one is
    named, a known log level, and topic-level ids (``names`` maps a description such as ``device_id`` to its
    value; empty values are skipped)."""
    from sled_protocol.topics import check_name
    from sled_protocol.transport import check_protocol, parse_broker_urls

    require_ca_file(ca_file)
    try:
        parse_broker_urls(mqtt_url)
        check_protocol(mqtt_protocol)
        for what, value in names.items():
            if value:
                check_name(value, what.replace("_", " "))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    require(log_level in LOG_LEVELS, f"log_level must be one of {', '.join(LOG_LEVELS)}")


def require_ca_file(path: str) -> None:
    """A CA certificate file, when one is named, that TLS will be able to load (not a crash at connect)."""
    from sled_protocol.transport import check_ca_file

    if path:
        try:
            check_ca_file(path)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


def require_duration(value: float, name: str, *, allow_zero: bool = False) -> None:
    """A duration option: a finite number of seconds (or ms), > 0 (>= 0 with ``allow_zero``)."""
    positive, bound = (value >= 0, ">= 0") if allow_zero else (value > 0, "> 0")
    require(math.isfinite(value) and positive, f"{name} must be a finite number {bound}, not {value}")


def bind_failed(what: str, host: str, port: int, exc: OSError) -> ConfigError:
    """A listening port that cannot be bound (in use, not ours to take): a configuration problem."""
    return ConfigError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}")


def require(condition: bool, message: str) -> None:
    """Validation helper for ``__post_init__``: raise ConfigError(message) unless ``condition``."""
    if not condition:
        raise ConfigError(message)
