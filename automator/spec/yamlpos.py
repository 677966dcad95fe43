"""YAML with positions: the data of a file, and where each key and value stands in it.

PyYAML's composer keeps a mark on every node; we walk the node tree once, building
the plain data and a map from each path (``("steps", 2, "with", "url")``) to the line
and column of the key and of the value, so that a pydantic error location can be
reported at the exact place in the file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Position:
    line: int  # 1-based
    column: int  # 1-based


@dataclass
class Located:
    """A YAML document's data with the positions of its keys and values."""

    data: Any
    values: dict[Path, Position] = field(default_factory=dict)
    keys: dict[Path, Position] = field(default_factory=dict)
    block_scalars: set[Path] = field(default_factory=set)
    duplicate_keys: list[tuple[Path, Position]] = field(default_factory=list)

    def value_at(self, path: Path) -> Position:
        """Where the value at ``path`` stands; the nearest enclosing node if it is absent."""
        for cut in range(len(path), -1, -1):
            pos = self.values.get(path[:cut])
            if pos is not None:
                return pos
        return Position(1, 1)

    def key_at(self, path: Path) -> Position:
        return self.keys.get(path) or self.value_at(path)


class YamlSyntaxError(ValueError):
    def __init__(self, message: str, position: Position) -> None:
        super().__init__(message)
        self.position = position


def _mark(node: yaml.Node) -> Position:
    return Position(node.start_mark.line + 1, node.start_mark.column + 1)


def load_located(text: str) -> Located:
    """Parse one YAML document, keeping positions; raises YamlSyntaxError."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        located = Located(data=None)
        if node is None:
            return located
        located.data = _build(node, (), located, loader)
        return located
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = Position(mark.line + 1, mark.column + 1) if mark else Position(1, 1)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise YamlSyntaxError(f"invalid YAML: {problem}{context}", pos) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", Position(1, 1)) from None
    finally:
        loader.dispose()


def _build(node: yaml.Node, path: Path, located: Located, loader: yaml.SafeLoader) -> Any:
    located.values[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        loader.flatten_mapping(node)  # resolves YAML merge keys (<<)
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            key = str(key) if not isinstance(key, str) else key
            child = (*path, key)
            if key in result:
                located.duplicate_keys.append((child, _mark(key_node)))
            located.keys[child] = _mark(key_node)
            result[key] = _build(value_node, child, located, loader)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_build(item, (*path, i), located, loader) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.ScalarNode) and node.style in ("|", ">"):
        located.block_scalars.add(path)
    return loader.construct_object(node, deep=True)
