"""Strict loading of a dataclass config tree from YAML plus ``section.key=value`` overrides.

Every problem is collected before raising: unknown keys (full dotted path and a did-you-mean),
wrong types (key, expected and given type) and the ``__post_init__`` rules of each section.
The user sees one line per problem and no traceback.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from spmd_rl.durable_files import write_text_atomic

from spmd_rl.errors import UserError


class ConfigError(UserError):
    """One or more config problems; each line of the message is one problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def rule_errors(checks: list[tuple[bool, str, str]]) -> None:
    """Raise ConfigError for every ``(ok, key, message)`` whose ``ok`` is False.

    Used by ``__post_init__``: keys are relative to the section; the loader prefixes the
    section's dotted path."""
    problems = [f"{key}: {msg}" for ok, key, msg in checks if not ok]
    if problems:
        raise ConfigError(problems)


def load_config(cls: type, path: str | None, overrides: list[str] = ()) -> Any:
    """Build ``cls`` from the YAML file at ``path`` (or defaults) with CLI overrides applied.

    Precedence: overrides > YAML > dataclass defaults."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path} does not exist: pass --config with a YAML file (see configs/)")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, got {type(raw).__name__}")
    problems: list[str] = []
    for item in overrides:
        _apply_override(raw, item, problems)
    value = build_dataclass(cls, raw, "", problems)
    if problems:
        raise ConfigError(problems)
    return value


def parse_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    """Split ``--config x.yaml a.b=1 --c.d=2`` into the config path and the override list."""
    path, overrides = None, []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            path = next(it, None)
            if path is None:
                raise UserError("--config needs a path: --config configs/x.yaml")
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            raise UserError("usage: --config FILE.yaml [section.key=value ...] (see configs/ and README.md)")
        else:
            overrides.append(arg[2:] if arg.startswith("--") else arg)
    return path, overrides


def _apply_override(raw: dict, item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"override '{item}' is not of the form section.key=value")
        return
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text  # an unparsable value stays a string; the type check decides
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def build_dataclass(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    """Recursively build ``cls`` from a dict, appending problems instead of raising."""
    if not isinstance(raw, dict):
        problems.append(f"{prefix or '<root>'}: expected a mapping (section), got {_type_name(raw)}")
        return cls()
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    first_problem = len(problems)
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            problems.append(_unknown_key(path, key, list(fields)))
            continue
        kwargs[key] = _convert(hints[key], value, path, problems)
    if len(problems) > first_problem:  # rules would only trip over the bad values
        return _construct_unchecked(cls, kwargs)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        problems.extend(f"{prefix}{p}" for p in e.problems)
        return _construct_unchecked(cls, kwargs)


def _construct_unchecked(cls: type, kwargs: dict) -> Any:
    # Keep going after a failed rule so sibling sections still report their own problems.
    obj = cls.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()
        object.__setattr__(obj, f.name, value)
    return obj


def _unknown_key(path: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f" — did you mean '{path[: -len(key)]}{close[0]}'?" if close else ""
    return f"{path}: unknown key{hint} (valid: {', '.join(valid)})"


def _convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Type-check ``value`` against annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, f"{path}.", problems)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            trial: list[str] = []
            converted = _convert(option, value, path, trial)
            if not trial:
                return converted
        problems.append(_type_problem(path, tp, value))
        return value
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(c) for c in get_args(tp))
            problems.append(f"{path}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        (item_tp, *_) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            problems.append(_type_problem(path, tp, value))
            return value
        return [_convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(_type_problem(path, tp, value))
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-6" (no dot) as a string; users write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        problems.append(_type_problem(path, tp, value))
    return value


def _type_problem(path: str, tp: Any, value: Any) -> str:
    return f"{path}: expected {_annotation_name(tp)}, got {_type_name(value)} ({value!r})"


def _annotation_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def config_to_dict(cfg: Any) -> dict:
    """Plain nested dict of a dataclass config (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


__all__ = [
    "ConfigError",
    "build_dataclass",
    "config_to_dict",
    "load_config",
    "parse_cli",
    "rule_errors",
    "save_config",
]
