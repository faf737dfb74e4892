"""Configuration: YAML defaults (every key commented) < ``--config file.yaml`` < ``--key value``."""
from __future__ import annotations

import os
from importlib import resources

import yaml

DEFAULT_CONFIG = "default.yaml"


def defaults_text() -> str:
    """The default configuration file, comments included (``--help`` prints it)."""
    return resources.files("glrec_fast.configs").joinpath(DEFAULT_CONFIG).read_text()


def defaults() -> dict:
    return yaml.safe_load(defaults_text())


def _coerce(key: str, value, default, source: str):
    """Check ``value`` has the type of the default (ints promote to float; null defaults take anything)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
        if isinstance(value, (int, float)):
            return [value]
    raise ValueError(f"{source}: key {key!r} expects {type(default).__name__} (like the default "
                     f"{default!r}), got {value!r}")


def parse_overrides(argv: list[str]) -> dict:
    """``["--epochs", "5", "--fanouts", "[10,5]", "--sampled"]`` -> ``{"epochs": 5, ...}``."""
    out, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ValueError(f"command line: expected --key [value], got {tok!r}")
        key = tok[2:].replace("-", "_")
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"  # a bare flag: --sampled, --resume
            i += 1
        out[key] = _scalar(raw)
    return out


def _scalar(raw: str):
    """YAML typing for a command-line value, plus the float spellings YAML 1.1 misses (``1e30``)."""
    if raw == "":
        return ""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def resolve(argv: list[str] | None = None, overrides: dict | None = None) -> dict:
    """Defaults, then ``--config FILE``, then the remaining ``--key value`` pairs (and ``overrides``)."""
    cfg = defaults()
    cli = parse_overrides(list(argv or []))
    cfg_file = cli.pop("config", None)
    layers = []
    if cfg_file is not None:
        path = os.fspath(cfg_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--config: no such file {path!r}")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"--config {path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--config {path}: expected a mapping of key: value, got {type(data).__name__}")
        layers.append((path, data))
    layers.append(("command line", cli))
    if overrides:
        layers.append(("overrides", overrides))
    base = defaults()
    for source, layer in layers:
        for key, value in layer.items():
            key = key.replace("-", "_")
            if key not in base:
                close = [k for k in base if k.startswith(key[:3])]
                raise ValueError(f"{source}: unknown key {key!r}" + (f" (did you mean {close}?)" if close else ""))
            cfg[key] = _coerce(key, value, base[key], source)
    return cfg


def dump(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
