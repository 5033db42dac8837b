"""Load a task file (JSON with comments and trailing commas, or YAML) and report every problem.

Parsing uses json5 (JSON) or PyYAML (YAML); validation uses the pydantic models
and then the checks pydantic cannot make alone (unique task names, known
connector types, a type that can be a source or a destination). Every problem
carries its path in the document (`tasks[1].source.type`) and, where it can be
found, its line. Nothing is partially accepted: `load` returns a valid config or
raises `ConfigError` listing all problems.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import json5
import yaml
from pydantic import ValidationError

from syncworker import errors
from syncworker.config import models
from syncworker.connectors import registry as connector_registry


def _strip_json_comments(text: str) -> str:
    """Blank out // and /* */ comments and trailing commas, keeping every line where it was."""
    out: list[str] = []
    i, n = 0, len(text)
    in_str = False
    while i < n:
        c = text[i]
        if in_str:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_str = False
            i += 1
            continue
        if c == '"':
            in_str = True
            out.append(c)
        elif text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
            continue
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in text[i:j]))
            i = j
            continue
        elif c == ",":
            k = i + 1
            while k < n and text[k] in " \t\r\n":
                k += 1
            out.append(" " if k < n and text[k] in "]}" else c)
        else:
            out.append(c)
        i += 1
    return "".join(out)


def _line_index(text: str, is_json: bool) -> dict[str, int]:
    """Path -> 1-based line of each node, found by composing the text as YAML (JSON is YAML)."""
    src = _strip_json_comments(text) if is_json else text
    if is_json:
        src = src.replace("\t", " ")
    try:
        root = yaml.compose(src)
    except yaml.YAMLError:
        return {}
    index: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        index[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = f"{path}.{key.value}" if path else str(key.value)
                index[sub] = key.start_mark.line + 1
                walk(value, sub)
                index[sub] = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")

    if root is not None:
        walk(root, "")
    return index


def _path(loc: Iterable[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _locate(path: str, lines: dict[str, int]) -> str:
    probe = path
    while probe:
        if probe in lines:
            return f"{path} (line {lines[probe]})"
        cut = max(probe.rfind("."), probe.rfind("["))
        probe = probe[:cut] if cut > 0 else ""
    return path


def parse_text(text: str, name: str = "<config>") -> tuple[dict[str, Any], dict[str, int]]:
    stripped = text.lstrip()
    is_json = name.endswith(".json") or stripped.startswith("{")
    try:
        data = json5.loads(text) if is_json else yaml.safe_load(text)
    except ValueError as exc:  # json5 raises ValueError with line and column
        raise errors.ConfigError([errors.ConfigProblem("", f"invalid JSON: {exc}")], name) from exc
    except yaml.YAMLError as exc:
        raise errors.ConfigError([errors.ConfigProblem("", f"invalid YAML: {exc}")], name) from exc
    if not isinstance(data, dict):
        raise errors.ConfigError(
            [errors.ConfigProblem("", f"the top level must be an object, not {type(data).__name__}")], name)
    return data, _line_index(text, is_json)


def validate(data: dict[str, Any], name: str = "<config>",
             lines: dict[str, int] | None = None) -> models.RegistryConfig:
    lines = lines or {}
    problems: list[errors.ConfigProblem] = []
    config: models.RegistryConfig | None = None
    try:
        config = models.RegistryConfig.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "required field is missing"
            problems.append(errors.ConfigProblem(_locate(_path(err["loc"]), lines), msg))

    # checks that need the whole document, done on the raw data so they run even
    # when pydantic already found problems elsewhere
    tasks = data.get("tasks") if isinstance(data.get("tasks"), list) else []
    seen: dict[str, int] = {}
    known = connector_registry.known_types()
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            continue
        tname = task.get("name")
        if isinstance(tname, str) and tname.strip():
            if tname.strip() in seen:
                problems.append(errors.ConfigProblem(
                    _locate(f"tasks[{i}].name", lines),
                    f"duplicate task name {tname!r} (also tasks[{seen[tname.strip()]}]); names must be unique"))
            else:
                seen[tname.strip()] = i
        for role in ("source", "destination"):
            ep = task.get(role)
            if not isinstance(ep, dict):
                continue
            etype = ep.get("type")
            if isinstance(etype, str) and etype.strip() and etype.strip() not in known:
                problems.append(errors.ConfigProblem(
                    _locate(f"tasks[{i}].{role}.type", lines),
                    f"unknown type {etype!r}; known types: {', '.join(known)}"))
            elif isinstance(etype, str) and etype.strip():
                caps = connector_registry.connector_class(etype.strip()).capabilities
                if role == "source" and not caps.source:
                    problems.append(errors.ConfigProblem(
                        _locate(f"tasks[{i}].source.type", lines), f"{etype!r} cannot be a source"))
                if role == "destination" and not caps.destination:
                    problems.append(errors.ConfigProblem(
                        _locate(f"tasks[{i}].destination.type", lines), f"{etype!r} cannot be a destination"))
    if problems:
        unique = list(dict.fromkeys(problems))
        raise errors.ConfigError(unique, name)
    assert config is not None
    return config


def load_text(text: str, name: str = "<config>") -> models.RegistryConfig:
    data, lines = parse_text(text, name)
    return validate(data, name, lines)


def load(path: str | Path) -> models.RegistryConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise errors.ConfigError([errors.ConfigProblem("", f"cannot read {p}: {exc.strerror}")], str(p)) from exc
    return load_text(text, str(p))


def dump(config: models.RegistryConfig) -> str:
    """The config as JSON with secrets masked (for display, never for storage)."""
    return json.dumps(config.model_dump(mode="json", by_alias=True), indent=2)
