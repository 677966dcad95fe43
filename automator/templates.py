"""Jinja2 templates in a sandbox: strict about undefined names, bounded, free of Python internals.

A string that is exactly one expression (``"{{ item.id }}"``) renders to the value
itself, not its text, so numbers, lists and objects keep their type; any other string
renders to text. Compiled templates are cached, since the same few strings are rendered
once per item.

Each :class:`~automator.plugins.manager.Plugins` owns one :class:`Templates`: the Jinja
environment with the filters and globals of exactly the plugins it loaded, and its
compile cache. Nothing about templates is global to the process.

Jinja's sandbox blocks attribute escapes but not CPU or memory, so every render here is
bounded (see docs/workflows.md, "Limits"): the size of its result and of any value it
builds, the text it builds in all, ``range()`` and loop sizes, integer sizes, format and
padding widths, and wall time. The checks sit in the sandbox's own intercepts (calls,
attribute lookups, operators), in every filter, in each loop iteration and in each piece
of output, so even a render on the event loop ends within about ``MAX_SECONDS``. A render
past a bound fails its item with the reason; the run goes on.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import threading
import time
import types
from collections import ChainMap
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, Undefined, nodes
from jinja2 import filters as jinja_filters
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.runtime import BlockReference, Context, LoopContext, TemplateReference
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedFormatter
from jinja2.utils import Cycler, Joiner, Namespace, generate_lorem_ipsum, pass_environment, pass_eval_context
from markupsafe import EscapeFormatter, Markup

from automator.errors import TemplateRenderError

CONTEXT_NAMES = frozenset({"item", "steps", "run", "secrets", "params", "items", "group"})  # items, group: digests

# --- limits -------------------------------------------------------------------------
# Documented in docs/workflows.md ("Templates", "Limits"); a render past one fails its item.

MAX_OUTPUT = 1_000_000
"""Characters in a template's result, and in any one value it builds (1 MB of text)."""
MAX_BUILT = 10_000_000
"""Characters (and list entries) one render may build in all, intermediate values included."""
MAX_RANGE = 10_000
"""Items of one ``range()``, ``batch`` or ``slice`` (Jinja's own sandbox allows 100,000)."""
MAX_INT_BITS = 65_536
"""Bits of an integer a template computes (about 19,700 decimal digits)."""
MAX_LIPSUM_WORDS = 10_000
"""Words ``lipsum()`` may produce (paragraphs times the most words per paragraph)."""
MAX_SECONDS = 2.0
"""Wall time of one render. Renders run on the event loop: this keeps a step, and the daemon, responsive."""


class _LimitExceeded(Exception):  # noqa: N818 - internal, becomes a TemplateRenderError
    """A render went past one of the limits above (never caught by Jinja or its filters)."""


class _NotText(Exception):  # noqa: N818 - internal, becomes a TemplateRenderError
    """A template tried to show a callable or an internal object as text."""


# --- the budget of the render in progress ----------------------------------------------


class _Budget:
    __slots__ = ("built", "deadline")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + MAX_SECONDS
        self.built = 0


_state = threading.local()  # renders in step threads each have their own budget


def _current() -> _Budget | None:
    return getattr(_state, "budget", None)


def _bounded(evaluate: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    """``evaluate`` (Jinja at work) under a budget of its own, or its caller's when nested.

    Only what runs Jinja needs one: a plain lookup (``{{ item.id }}``) skips the cost.
    """

    def bounded(context: Mapping[str, Any]) -> Any:
        if getattr(_state, "budget", None) is not None:
            return evaluate(context)
        _state.budget = _Budget()
        try:
            return evaluate(context)
        finally:
            _state.budget = None

    return bounded


def _tick() -> None:
    budget = getattr(_state, "budget", None)
    if budget is not None and time.monotonic() > budget.deadline:
        raise _LimitExceeded(f"template took longer than {MAX_SECONDS:g}s")


def _megabytes(size: int) -> str:
    return f"{size / 1_000_000:g} MB"


def _allow_size(size: int, what: str = "a value") -> None:
    """Refuse, before building it, a value of ``size`` characters (or entries)."""
    if size > MAX_OUTPUT:
        raise _LimitExceeded(
            f"{what} of {size:,} characters would exceed the limit of {MAX_OUTPUT:,} ({_megabytes(MAX_OUTPUT)})"
        )


def _spend(size: int) -> None:
    """Count ``size`` characters (or list entries) built against the render's budget."""
    budget = getattr(_state, "budget", None)
    if budget is None:
        return
    budget.built += size
    if budget.built > MAX_BUILT:
        raise _LimitExceeded(f"template built more than {_megabytes(MAX_BUILT)} of text")
    if time.monotonic() > budget.deadline:
        raise _LimitExceeded(f"template took longer than {MAX_SECONDS:g}s")


def _allow_width(width: Any, what: str) -> None:
    if isinstance(width, int) and width > MAX_OUTPUT:
        raise _LimitExceeded(f"{what} {width:,} exceeds the limit of {MAX_OUTPUT:,}")


def _allow_count(count: Any, what: str) -> None:
    if isinstance(count, int) and count > MAX_RANGE:
        raise _LimitExceeded(f"{what} of {count:,} items exceeds the limit of {MAX_RANGE:,}")


# --- keeping Python internals out of the output -----------------------------------------


class _Opaque:
    """A callable or internal object as templates see it: usable, but never shown as text.

    Its text (``str``, ``repr``, ``format``) would name Python internals (``<function ...
    at 0x...>``, ``<class ...>``), so asking for it fails the render with a clear reason.
    """

    __slots__ = ("name", "target")

    def __init__(self, target: Any, name: str) -> None:
        self.target = target
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.target(*args, **kwargs)

    def __iter__(self) -> Iterator[Any]:
        try:
            return iter(self.target)
        except TypeError:
            raise TypeError(f"{self.name} is not a list") from None  # Python's text names the type

    def __str__(self) -> str:
        raise _NotText(f"{self.name} is not data and cannot be shown as text (call it, or pick one of its fields)")

    def __repr__(self) -> str:
        return self.__str__()

    def __format__(self, spec: str) -> str:
        return self.__str__()


_Opaque.__name__ = _Opaque.__qualname__ = "internal object"  # how Python's own messages name it

_PLAIN = frozenset({str, int, float, bool, type(None), dict, list, tuple, Markup})
_internal_types: dict[type, bool] = {}


def _is_internal(value: Any) -> bool:
    """Would the value's text show Python internals? (Callables, classes, default reprs.)"""
    kind = type(value)
    if kind in _PLAIN:
        return False
    known = _internal_types.get(kind)
    if known is None:
        known = not issubclass(kind, Undefined | _Opaque) and (
            callable(value)
            or issubclass(kind, type | types.ModuleType | types.GeneratorType | Cycler | Joiner | LoopContext)
            or issubclass(kind, TemplateReference | BlockReference)
            or kind.__repr__ is object.__repr__  # type: ignore[comparison-overlap]
        )
        _internal_types[kind] = known
    return known


def _hide(value: Any, name: str) -> Any:
    return _Opaque(value, name) if _is_internal(value) else value


def _shown(value: Any, nested: bool = False) -> Any:
    """What a template hands out (``{{ }}`` output, or a lone expression's value): data only."""
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if kind is _Opaque:
        return str(value)  # raises _NotText with the name
    if kind is dict:
        for key, inner in value.items():
            _shown(key, True)
            _shown(inner, True)
    elif kind is list or kind is tuple:
        for inner in value:
            _shown(inner, True)
    elif isinstance(value, Undefined):
        if nested:  # the caller checks a lone Undefined; inside a list it would surface later
            str(value)
    elif _is_internal(value) or isinstance(value, Namespace):
        raise _NotText(f"a {kind.__name__} is not data and cannot be shown as text")
    return value


def _built(value: Any) -> Any:
    """Count a newly built value against the budget; collect lazy sequences into lists."""
    kind = type(value)
    if kind is str or kind is Markup:
        _allow_size(len(value))
        _spend(len(value))
    elif kind is list or kind is tuple:
        _allow_size(len(value), "a list")
        _spend(len(value))
    elif isinstance(value, Iterator) and not isinstance(value, str):
        # Jinja's map/select/reverse/... hand back generators whose text is a Python repr
        collected = list(itertools.islice(value, MAX_OUTPUT + 1))
        _allow_size(len(collected), "a list")
        _spend(len(collected))
        return collected
    return value


# --- bounded globals and filters ---------------------------------------------------------


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise _LimitExceeded(f"range of {len(numbers):,} items exceeds the limit of {MAX_RANGE:,}")
    return numbers


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    words = (n if isinstance(n, int) else 0) * (max if isinstance(max, int) else 0)
    if words > MAX_LIPSUM_WORDS or (isinstance(min, int) and min > MAX_LIPSUM_WORDS):
        raise _LimitExceeded(f"lipsum of up to {words:,} words exceeds the limit of {MAX_LIPSUM_WORDS:,}")
    return _built(str(generate_lorem_ipsum(n, html, min, max)))


def _tojson(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")


def _percent(text: str, args: Any) -> str:
    """``text % args`` with every width and precision bounded (``'%1000000000s'``)."""
    star = False
    for match in _PERCENT_SPEC.finditer(text):
        for number in match.groups():
            if number == "*":
                star = True
            elif number is not None:
                _allow_width(int(number), "format width")
    if star:
        for arg in args if isinstance(args, tuple) else (args,):
            _allow_width(arg, "format width")
    for arg in args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,):
        if type(arg) is _Opaque:
            str(arg)
    return _built(text % args)


_FORMAT_SPEC = re.compile(r"^(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)[,_]?(?:\.(\d+))?[a-zA-Z%]?$", re.DOTALL)


class _Formatter(SandboxedFormatter):
    """``'{:>10}'.format(x)`` with widths and precisions bounded and no internals shown."""

    def format_field(self, value: Any, format_spec: str) -> Any:
        match = _FORMAT_SPEC.match(format_spec)
        if match:
            for number in match.groups():
                if number:
                    _allow_width(int(number), "format width")
        elif format_spec:
            _allow_width(len(format_spec) * 1000, "format specification")  # nothing sane is that long
        if type(value) is _Opaque:
            str(value)
        return _built(super().format_field(value, format_spec))


class _EscapeFormatter(_Formatter, EscapeFormatter):
    pass


def _guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that checks time and counts what it builds; Jinja's pass_* marks are kept."""

    @functools.wraps(function)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        if type(result) is str:  # the common case: one size and time check
            _allow_size(len(result))
            _spend(len(result))
            return result
        _tick()
        return _built(result)

    return guarded


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _center(value: Any, width: int = 80) -> str:
    _allow_width(width, "center width")
    return _text_of(value).center(width)


def _indent(value: Any, width: int | str = 4, first: bool = False, blank: bool = False) -> str:
    text = _text_of(value)
    pad = width if isinstance(width, int) else len(str(width))
    _allow_width(pad, "indent width")
    _allow_size(len(text) + (text.count("\n") + 1) * max(pad, 0), "an indented text")
    return jinja_filters.do_indent(text, width, first, blank)


@pass_environment
def _wordwrap(
    environment: Any,
    value: str,
    width: int = 79,
    break_long_words: bool = True,
    wrapstring: str | None = None,
    break_on_hyphens: bool = True,
) -> str:
    text = _text_of(value)
    separator = len(wrapstring if wrapstring is not None else environment.newline_sequence)
    lines = len(text) // max(width, 1) + text.count("\n") + 1 if isinstance(width, int) else len(text)
    _allow_size(len(text) + lines * separator, "a wrapped text")
    return jinja_filters.do_wordwrap(environment, text, width, break_long_words, wrapstring, break_on_hyphens)


def _replace_size(text: str, old: str, new: str, count: int | None) -> int:
    found = text.count(old) if old else len(text) + 1
    if count is not None and count >= 0:
        found = min(found, count)
    return len(text) + found * (len(new) - len(old))


@pass_eval_context
def _replace(eval_ctx: Any, value: Any, old: Any, new: Any, count: int | None = None) -> str:
    text = _text_of(value)
    _allow_size(_replace_size(text, str(old), str(new), count), "a replaced text")
    return jinja_filters.do_replace(eval_ctx, text, old, new, count)


@pass_eval_context
def _join(eval_ctx: Any, value: Iterable[Any], d: str = "", attribute: Any = None) -> str:
    parts = list(itertools.islice(value, MAX_OUTPUT + 1))
    _allow_size(len(parts), "a join")
    known = sum(len(part) for part in parts if isinstance(part, str))
    _allow_size(known + len(d) * max(len(parts) - 1, 0), "a joined text")
    for part in parts:
        if type(part) is _Opaque:
            str(part)
    return jinja_filters.sync_do_join(eval_ctx, parts, d, attribute)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    if args and kwargs:
        raise TypeError("can't handle positional and keyword arguments at the same time")
    return _percent(_text_of(value), kwargs or args)


def _batch(value: Any, linecount: int, fill_with: Any = None) -> Any:
    _allow_count(linecount, "a batch")
    return jinja_filters.do_batch(value, linecount, fill_with)


def _slice(value: Any, slices: int, fill_with: Any = None) -> Any:
    _allow_count(slices, "a slice")
    return jinja_filters.sync_do_slice(value, slices, fill_with)


@pass_environment
def _attr(environment: Any, obj: Any, name: str) -> Any:
    if isinstance(obj, Undefined):
        return obj  # keep the first reason (Jinja's would name the Undefined's Python type)
    if type(obj) is _Opaque:
        return environment.getattr(obj, name)
    return jinja_filters.do_attr(environment, obj, name)


_BOUNDED_FILTERS: dict[str, Callable[..., Any]] = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "replace": _replace,
    "join": _join,
    "format": _format,
    "batch": _batch,
    "attr": _attr,
    "slice": _slice,
    "tojson": _tojson,
    "json": _tojson,
}


def _check_method_call(method: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Size checks before a call of a built-in method (``'x'.center(10**9)``, ``.replace``...)."""
    owner = getattr(method, "__self__", None)
    if isinstance(owner, types.ModuleType) or owner is None:
        return
    if not isinstance(owner, str | bytes | int):
        return
    for arg in itertools.chain(args, kwargs.values()):  # widths: center, ljust, zfill, to_bytes...
        if isinstance(arg, int):
            _allow_width(arg, f"{method.__name__}() argument")
    if isinstance(owner, int):
        return
    name = method.__name__
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        _allow_size(len(owner) + tabs * max(size, 0), "a text")
    elif name == "replace" and isinstance(owner, str) and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        _allow_size(_replace_size(owner, old, new, args[2] if len(args) > 2 else None), "a replaced text")
    elif name == "join" and args:
        parts = args[0]
        if isinstance(parts, list | tuple):
            for part in parts:
                if type(part) is _Opaque:
                    str(part)
            known = sum(len(part) for part in parts if isinstance(part, str | bytes))
            _allow_size(known + len(owner) * max(len(parts) - 1, 0), "a joined text")
    elif name == "translate" and args and isinstance(args[0], dict):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        _allow_size(len(owner) * max(longest, 1), "a translated text")


# --- the environment ---------------------------------------------------------------------


def _loop_items(iterable: nodes.Node) -> nodes.Call:
    """The iterable of a ``{% for %}`` loop, handed out one item at a time under the time limit."""
    return nodes.Call(nodes.EnvironmentAttribute("loop_items"), [iterable], [], None, None, lineno=iterable.lineno)


class _CodeGenerator(CodeGenerator):
    def visit_Call(self, node: nodes.Call, frame: Frame, forward_caller: bool = False) -> None:  # noqa: N802
        # the parser never makes an EnvironmentAttribute: this call is one _loop_items made
        if isinstance(node.node, nodes.EnvironmentAttribute) and node.node.name == "loop_items":
            self.write("environment.loop_items(")
            self.visit(node.args[0], frame)
            self.write(")")
            return
        super().visit_Call(node, frame, forward_caller=forward_caller)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802 - Jinja's naming
        # `a ~ b` goes through the environment, bounded, instead of Jinja's str_join
        self.write("environment.join_text((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with bounds on time, sizes and ranges, and internals hidden."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, finalize=_shown)
        self.globals = {
            "range": _Opaque(_range, "range"),
            "lipsum": _Opaque(_lipsum, "lipsum"),
            "dict": _Opaque(dict, "dict"),
            "cycler": _Opaque(Cycler, "cycler"),
            "joiner": _Opaque(Joiner, "joiner"),
            "namespace": _Opaque(Namespace, "namespace"),
        }
        self.filters.update(_BOUNDED_FILTERS)
        self.filters = {name: _guarded_filter(name, function) for name, function in self.filters.items()}

    # concat joins a template's (or a block's) pieces: bounded piece by piece
    @staticmethod
    def concat(pieces: Iterable[str]) -> str:
        collected: list[str] = []
        size = 0
        budget = _current()
        for piece in pieces:
            size += len(piece)
            if size > MAX_OUTPUT:
                raise _LimitExceeded(f"template output exceeded {_megabytes(MAX_OUTPUT)}")
            if budget is not None and time.monotonic() > budget.deadline:
                raise _LimitExceeded(f"template took longer than {MAX_SECONDS:g}s")
            collected.append(piece)
        return "".join(collected)

    @staticmethod
    def join_text(values: tuple[Any, ...]) -> str:
        texts = [_text_of(_shown(value)) for value in values]
        return _built("".join(texts))

    @staticmethod
    def loop_items(iterable: Any) -> Iterator[Any]:
        if type(iterable) is _Opaque:
            iterable = iterable.target
        budget = _current()
        if budget is None:
            yield from iterable
            return
        deadline = budget.deadline
        for value in iterable:
            if time.monotonic() > deadline:
                raise _LimitExceeded(f"template took longer than {MAX_SECONDS:g}s")
            yield value

    def _generate(self, source: nodes.Template, *args: Any, **kwargs: Any) -> str:
        for loop in source.find_all(nodes.For):
            loop.iter = _loop_items(loop.iter)
        return super()._generate(source, *args, **kwargs)

    # -- the sandbox's intercepts ----------------------------------------------------

    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # Jinja's message names the object's Python type ('function', say): ours does not
        return self.undefined(
            f"access to attribute {attribute!r} is not allowed in templates",
            name=attribute,
            obj=obj,
            exc=SecurityError,
        )

    def getattr(self, obj: Any, attribute: str) -> Any:
        if type(obj) is dict and type(attribute) is str and attribute not in _DICT_ATTRIBUTES:
            # `item.title`: a dict has no such attribute, so Jinja would look the key up
            # after an AttributeError; an absent key takes Jinja's path for its Undefined
            value = obj.get(attribute, _MISSING)
            if value is not _MISSING:
                return _hide(value, attribute)
        if type(obj) is _Opaque:
            value = super().getattr(obj.target, attribute)
            if isinstance(value, Undefined):
                return self.undefined(f"{obj.name} has no field {attribute!r}", name=attribute, exc=SecurityError)
            return _hide(value, attribute)
        return _hide(super().getattr(obj, attribute), attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if type(obj) is _Opaque:
            value = super().getitem(obj.target, argument)
            if isinstance(value, Undefined):
                return self.undefined(f"{obj.name} has no field {argument!r}", name=str(argument), exc=SecurityError)
            return _hide(value, str(argument))
        return _hide(super().getitem(obj, argument), str(argument))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        if not isinstance(value, types.MethodType | types.BuiltinMethodType) or value.__name__ not in (
            "format",
            "format_map",
        ):
            return None
        text: Any = value.__self__
        if not isinstance(text, str):
            return None
        formatter = _EscapeFormatter(self, escape=text.escape) if isinstance(text, Markup) else _Formatter(self)
        is_format_map = value.__name__ == "format_map"

        def format_text(*args: Any, **kwargs: Any) -> str:
            if is_format_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one argument")
                kwargs, args = args[0], ()
            return _built(type(text)(formatter.vformat(text, args, kwargs)))

        return format_text

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        _tick()
        name = "the result of a call"
        if type(__obj) is _Opaque:
            name = f"{__obj.name}()"
            __obj = __obj.target
        if not __self.is_safe_callable(__obj):
            raise SecurityError("calling this is not allowed in templates")
        if isinstance(__obj, types.BuiltinMethodType | types.BuiltinFunctionType):
            _check_method_call(__obj, args, kwargs)
        return _hide(_built(__context.call(__obj, *args, **kwargs)), name)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "%":
            if isinstance(left, str):
                return _percent(left, right)
        elif operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > MAX_INT_BITS:
                    raise _LimitExceeded(f"a product of more than {MAX_INT_BITS:,} bits exceeds the limit")
            elif isinstance(left, int) and hasattr(right, "__len__"):
                _allow_size(len(right) * left, "a repetition")
            elif isinstance(right, int) and hasattr(left, "__len__"):
                _allow_size(len(left) * right, "a repetition")
        elif operator == "**":
            big = isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0
            if big and left.bit_length() * right > MAX_INT_BITS:
                raise _LimitExceeded(f"a power of more than {MAX_INT_BITS:,} bits exceeds the limit")
        elif operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            _allow_size(len(left) + len(right), "a sum")
        return _built(self.binop_table[operator](left, right))


# --- one plugin set's templates -----------------------------------------------------------

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)
_DOTTED = re.compile(r"^\s*\{\{\s*(?P<root>[A-Za-z_]\w*)(?P<rest>(?:\.[A-Za-z_]\w*)+)\s*\}\}\s*$")
_DICT_ATTRIBUTES = frozenset(dir(dict))
_MISSING = object()


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def _dotted_getter(root: str, parts: list[str], fallback: Callable[[Mapping[str, Any]], Any]) -> Callable[..., Any]:
    """``{{ item.a.b }}`` without Jinja's per-call context: the same value, much faster.

    Only plain dict lookups take the fast path; anything else (a missing key, an object,
    a name that is also a dict method) goes through Jinja for its exact semantics.
    """

    def get(context: Mapping[str, Any]) -> Any:
        value = context.get(root, _MISSING) if isinstance(context, dict) else _MISSING
        for part in parts:
            if type(value) is not dict or part not in value:
                return fallback(context)
            value = value[part]
        return fallback(context) if value is _MISSING else value

    return get


def _context_maker(environment: _Sandbox, template: Template) -> Callable[[Mapping[str, Any]], Context]:
    """``template.new_context``, without its cost per render.

    Jinja gives each template a ``ChainMap`` of its own globals (none, here) over the
    environment's, and walks it twice per context; a template rendered for every item
    spent more on that than on its expression. The context made here is the same: the
    environment's globals (read at each render, as Jinja's would be) overlaid by the
    render's names. A template whose globals look otherwise takes Jinja's own path.
    """
    globals_ = template.globals
    shared = environment.globals
    maps = globals_.maps if isinstance(globals_, ChainMap) else []
    if not (len(maps) == 2 and not maps[0] and maps[1] is shared):
        return lambda context: template.new_context(dict(context))
    make = environment.context_class
    name, blocks = template.name, template.blocks

    def new_context(context: Mapping[str, Any]) -> Context:
        return make(environment, {**shared, **context}, name, blocks, shared)

    return new_context


def _expression(environment: _Sandbox, source: str) -> Callable[[Mapping[str, Any]], Any]:
    """A lone expression's value for a context, as Jinja's ``compile_expression`` computes it."""
    expression = environment.compile_expression(source, undefined_to_none=False)
    template = getattr(expression, "_template", None)  # what the expression runs; Jinja keeps it private
    if not isinstance(template, Template):
        return _bounded(lambda context: _shown(expression(**context)))
    run = template.root_render_func
    new_context = _context_maker(environment, template)

    @_bounded
    def evaluate(context: Mapping[str, Any]) -> Any:
        frame = new_context(context)
        for _ in run(frame):  # an expression's template yields nothing: it sets `result`
            pass
        return _shown(frame.vars["result"])

    return evaluate


class Templates:
    """The templates of one set of plugins: a sandboxed Jinja environment and its compile cache.

    Created by each ``Plugins``; its filters and globals are those plugins' and no others.
    """

    def __init__(self) -> None:
        self.environment = _Sandbox()
        self._compile = functools.lru_cache(maxsize=4096)(self._compile_uncached)

    # -- plugins' filters and globals -------------------------------------------------

    def add_filters(self, filters: Mapping[str, Callable[..., Any]]) -> None:
        """Make plugin-provided filters available to these templates."""
        for name, function in filters.items():
            self.environment.filters[name] = _guarded_filter(name, function)
        self._compile.cache_clear()

    def add_globals(self, values: Mapping[str, Any]) -> None:
        """Make plugin-provided globals available; callables and objects are never shown as text."""
        for name, value in values.items():
            self.environment.globals[name] = _hide(value, name)
        self._compile.cache_clear()

    @property
    def known_names(self) -> frozenset[str]:
        """Top-level names a template may read: the run's data and the globals."""
        return CONTEXT_NAMES | frozenset(self.environment.globals)

    # -- rendering --------------------------------------------------------------------

    def _compile_uncached(self, text: str) -> Callable[[Mapping[str, Any]], Any]:
        environment = self.environment
        dotted = _DOTTED.match(text)
        if dotted:
            parts = dotted.group("rest").split(".")[1:]
            if not _DICT_ATTRIBUTES.intersection(parts) and dotted.group("root") in CONTEXT_NAMES:
                expression = _expression(environment, text.strip()[2:-2])
                return _dotted_getter(dotted.group("root"), parts, expression)
        match = _SINGLE_EXPRESSION.match(text)
        if match and "}}" not in match.group("expr") and "{{" not in match.group("expr"):
            return _expression(environment, match.group("expr"))
        template = environment.from_string(text)
        new_context = _context_maker(environment, template)

        @_bounded
        def render(context: Mapping[str, Any]) -> str:
            return environment.concat(template.root_render_func(new_context(context)))

        return render

    def render(self, text: str, context: Mapping[str, Any]) -> Any:
        """Render one template string; raises TemplateRenderError with the reason."""
        if not is_template(text):
            return text
        try:
            value = self._compile(text)(context)
        except UndefinedError as exc:
            raise TemplateRenderError(f"template {_short(text)}: {exc.message}") from None
        except SecurityError as exc:
            raise TemplateRenderError(f"template {_short(text)}: not allowed: {exc}") from None
        except TemplateSyntaxError as exc:
            raise TemplateRenderError(f"template {_short(text)}: {exc.message}") from None
        except (_LimitExceeded, _NotText) as exc:
            raise TemplateRenderError(f"template {_short(text)}: {exc}") from None
        except RecursionError:
            raise TemplateRenderError(f"template {_short(text)}: nested too deeply (recursion)") from None
        except MemoryError:
            raise TemplateRenderError(f"template {_short(text)}: ran out of memory") from None
        except TemplateError as exc:  # TemplateRuntimeError, FilterArgumentError...
            raise TemplateRenderError(f"template {_short(text)}: {exc.message or type(exc).__name__}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError, AttributeError, RuntimeError) as exc:
            raise TemplateRenderError(f"template {_short(text)}: {type(exc).__name__}: {exc}") from None
        if isinstance(value, Undefined):
            # a lone expression hands back the Undefined itself instead of raising
            raise TemplateRenderError(f"template {_short(text)}: {value._undefined_message}")
        return value

    def render_text(self, text: str, context: Mapping[str, Any]) -> str:
        value = self.render(text, context)
        return value if isinstance(value, str) else _tojson(value) if isinstance(value, dict | list) else str(value)

    def render_value(self, value: Any, context: Mapping[str, Any]) -> Any:
        """Render every string inside a structure of dicts and lists."""
        if isinstance(value, str):
            return self.render(value, context)
        if isinstance(value, dict):
            return {k: self.render_value(v, context) for k, v in value.items()}
        if isinstance(value, list):
            return [self.render_value(v, context) for v in value]
        return value

    # -- load-time checks -------------------------------------------------------------

    def references(self, text: str) -> tuple[set[str], set[tuple[str, str]]]:
        """Parse a template: the top-level names it reads and its (``steps``|``params``, name) lookups.

        Raises TemplateSyntaxProblemError for a syntax error, with the line inside the template.
        """
        try:
            tree = self.environment.parse(text)
        except TemplateSyntaxError as exc:
            raise TemplateSyntaxProblemError(f"template syntax error: {exc.message}", exc.lineno or 1) from None
        assigned = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
        assigned |= {n.name for n in tree.find_all(nodes.Macro)}  # {% macro f() %} defines f
        names = {n.name for n in tree.find_all(nodes.Name) if n.ctx == "load"} - assigned
        lookups: set[tuple[str, str]] = set()
        node: Any
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            if isinstance(node.node, nodes.Name) and node.node.name in ("steps", "params"):
                if isinstance(node, nodes.Getattr):
                    lookups.add((node.node.name, node.attr))
                elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                    lookups.add((node.node.name, node.arg.value))
        return names, lookups

    def unknown_filters(self, text: str) -> set[str]:
        """Filters and tests a (parseable) template uses that no loaded plugin has registered."""
        tree = self.environment.parse(text)
        filters = {n.name for n in tree.find_all(nodes.Filter)} - set(self.environment.filters)
        tests = {n.name for n in tree.find_all(nodes.Test)} - set(self.environment.tests)
        return filters | tests


def _short(text: str) -> str:
    one_line = " ".join(text.split())
    return repr(one_line if len(one_line) <= 60 else one_line[:57] + "...")


# --- load-time helpers ----------------------------------------------------------------


class TemplateSyntaxProblemError(ValueError):
    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


def iter_strings(value: Any, path: tuple[str | int, ...] = ()) -> list[tuple[tuple[str | int, ...], str]]:
    """Every string in a structure, with its path, for checking templates at load time."""
    found: list[tuple[tuple[str | int, ...], str]] = []
    if isinstance(value, str):
        found.append((path, value))
    elif isinstance(value, dict):
        for k, v in value.items():
            found.extend(iter_strings(v, (*path, k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found.extend(iter_strings(v, (*path, i)))
    return found
