"""A small, safe expression language for schema files.

Schema files describe dimensions as expressions over config fields (`num_attention_heads * head_dim`,
`moe_latent_size or hidden_size`, `layer_types[i] == 'full_attention'`). They are parsed with `ast` and walked
against a whitelist; nothing is ever passed to `eval`. What is allowed:

- literals: numbers, strings, True/False/None, tuples and lists of expressions;
- names: a variable passed by the caller (e.g. `i`, the layer index, or a schema `let` value) wins; otherwise
  the config field of that name, or None when the config has no such field;
- arithmetic `+ - * / // % **` (small exponents only), unary `- + not`;
- `and` / `or` with Python's short-circuit values (so `head_dim or hidden_size // num_attention_heads` is a
  default), comparisons including `in`, `not in`, `is None`, `is not None`, and `x if c else y`;
- subscripts `layer_types[i]`, `hybrid_override_pattern[i]`, `rope_scaling['factor']`;
- calls to `len`, `min`, `max`, `int`, `bool`, `str` with positional arguments (`str` reads the string keys JSON
  gives an index-keyed mapping: `per_layer_config[str(num_hidden_layers - 1)]`).

Anything else (attribute access, lambdas, comprehensions, other calls, `__import__`) is refused with a
SchemaError that quotes the expression.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from lora_convert.errors import SchemaError

_BIN_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY_OPS = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_CMP_OPS = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: operator.is_,
    ast.IsNot: operator.is_not,
}
_FUNCTIONS = {"len": len, "min": min, "max": max, "int": int, "bool": bool, "str": str}
_MAX_EXPONENT = 64
_MAX_LENGTH = 2000


class _Refused(Exception):
    pass


def _check(node: ast.AST) -> None:
    """Walk the tree once at parse time and refuse every node type outside the whitelist."""
    if isinstance(node, ast.Expression):
        _check(node.body)
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (int, float, str, bool, type(None))):
            raise _Refused(f"constant {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id.startswith("__"):
            raise _Refused(f"name {node.id!r}")
        if not isinstance(node.ctx, ast.Load):
            raise _Refused("assignment")
    elif isinstance(node, ast.BinOp):
        if type(node.op) not in _BIN_OPS:
            raise _Refused(f"operator {type(node.op).__name__}")
        _check(node.left)
        _check(node.right)
    elif isinstance(node, ast.UnaryOp):
        if type(node.op) not in _UNARY_OPS:
            raise _Refused(f"operator {type(node.op).__name__}")
        _check(node.operand)
    elif isinstance(node, ast.BoolOp):
        for value in node.values:
            _check(value)
    elif isinstance(node, ast.Compare):
        for op in node.ops:
            if type(op) not in _CMP_OPS:
                raise _Refused(f"comparison {type(op).__name__}")
        _check(node.left)
        for comparator in node.comparators:
            _check(comparator)
    elif isinstance(node, ast.IfExp):
        _check(node.test)
        _check(node.body)
        _check(node.orelse)
    elif isinstance(node, ast.Subscript):
        if isinstance(node.slice, ast.Slice):
            raise _Refused("slicing")
        _check(node.value)
        _check(node.slice)
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            _check(elt)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCTIONS:
            raise _Refused("a call to anything but " + ", ".join(sorted(_FUNCTIONS)))
        if node.keywords:
            raise _Refused("keyword arguments")
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise _Refused("*arguments")
            _check(arg)
    elif isinstance(node, ast.Attribute):
        raise _Refused("attribute access (use a config field name, or a subscript for nested fields)")
    else:
        raise _Refused(type(node).__name__)


@lru_cache(maxsize=4096)
def compile_expression(expression: str) -> ast.Expression:
    """Parse and whitelist-check an expression (cached). Raises SchemaError if it is not allowed."""
    if not isinstance(expression, str):
        raise SchemaError(f"An expression must be a string, not {type(expression).__name__} ({expression!r}).")
    if len(expression) > _MAX_LENGTH:
        raise SchemaError(f"Expression is longer than {_MAX_LENGTH} characters.")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise SchemaError(f"Expression {expression!r} is not valid syntax ({exc.msg}).") from None
    try:
        _check(tree)
    except _Refused as why:
        raise SchemaError(
            f"Expression {expression!r} uses {why}, which schema expressions do not allow.",
            hint="Allowed: config field names, numbers, strings, + - * / // % **, comparisons, and/or/not, "
            "`x if c else y`, subscripts, len/min/max/int/bool/str.",
        ) from None
    return tree


def names_in(expression: str) -> set[str]:
    """The free names an expression reads (config fields or variables), without the allowed functions."""
    tree = compile_expression(expression)
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - (called & set(_FUNCTIONS))


def evaluate(expression: str, config: Mapping, **variables: Any) -> Any:
    """Evaluate a schema expression against a config mapping.

    Names resolve to `variables` first, then to `config[name]` (None when the field is missing).
    Raises SchemaError for anything outside the language or any failure while evaluating
    (e.g. arithmetic on a missing field), naming the fields that were missing.
    """
    tree = compile_expression(expression)
    try:
        return _eval(tree.body, config, variables)
    except SchemaError:
        raise
    except (TypeError, ValueError, ZeroDivisionError, IndexError, KeyError, OverflowError) as exc:
        missing = sorted(
            n for n in names_in(expression) if n not in variables and _lookup(n, config, variables) is None
        )
        detail = f"; missing (None) field(s): {', '.join(missing)}" if missing else ""
        raise SchemaError(f"Expression {expression!r} failed: {type(exc).__name__}: {exc}{detail}.") from None


def _lookup(name: str, config: Mapping, variables: Mapping) -> Any:
    if name in variables:
        return variables[name]
    if name in _FUNCTIONS:
        return _FUNCTIONS[name]
    try:
        return config.get(name)
    except AttributeError:
        return None


def _eval(node: ast.AST, config: Mapping, variables: Mapping) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return _lookup(node.id, config, variables)
    if isinstance(node, ast.BinOp):
        left = _eval(node.left, config, variables)
        right = _eval(node.right, config, variables)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > _MAX_EXPONENT:
            raise ValueError(f"exponent {right} is larger than {_MAX_EXPONENT}")
        if isinstance(node.op, ast.Mult) and (
            isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))
        ):
            raise TypeError("repetition of strings or lists is not allowed")
        return _BIN_OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp):
        return _UNARY_OPS[type(node.op)](_eval(node.operand, config, variables))
    if isinstance(node, ast.BoolOp):
        is_and = isinstance(node.op, ast.And)
        value = None
        for child in node.values:
            value = _eval(child, config, variables)
            if is_and and not value:
                return value
            if not is_and and value:
                return value
        return value
    if isinstance(node, ast.Compare):
        left = _eval(node.left, config, variables)
        for op, comparator in zip(node.ops, node.comparators, strict=True):
            right = _eval(comparator, config, variables)
            if not _CMP_OPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        branch = node.body if _eval(node.test, config, variables) else node.orelse
        return _eval(branch, config, variables)
    if isinstance(node, ast.Subscript):
        container = _eval(node.value, config, variables)
        index = _eval(node.slice, config, variables)
        if container is None:
            raise TypeError("subscript of a missing (None) field")
        return container[index]
    if isinstance(node, ast.Tuple):
        return tuple(_eval(e, config, variables) for e in node.elts)
    if isinstance(node, ast.List):
        return [_eval(e, config, variables) for e in node.elts]
    if isinstance(node, ast.Call):
        args = [_eval(a, config, variables) for a in node.args]
        return _FUNCTIONS[node.func.id](*args)
    raise SchemaError(f"Unexpected expression node {type(node).__name__}.")  # unreachable after _check
