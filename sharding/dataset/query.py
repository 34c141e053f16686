"""Row queries over a dataset's index.parquet: `--where` expressions, `--bbox`, `--start`/`--end`.

`--where` is parsed with Python's `ast` and only these nodes are accepted: comparisons
(`== != < <= > >=`, chained, and `in` / `not in` a list of constants), `and` / `or` / `not`,
parentheses, index column names, numbers and quoted strings. The result is a
pyarrow.compute expression; nothing is ever evaluated as Python.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from datetime import date, datetime, timedelta, timezone
from functools import reduce

import pyarrow as pa
import pyarrow.compute as pc

from sharding.errors import InputError

_COMPARISONS: dict[type, Callable] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt,
    ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
}
_ALLOWED = "comparisons of index columns with numbers or quoted strings, and/or/not, parentheses"


class _WhereParser:
    """Turns the `ast` of one `--where` expression into a pyarrow.compute expression."""

    def __init__(self, text: str, schema: pa.Schema):
        self.text, self.schema = text, schema

    def fail(self, why: str) -> InputError:
        return InputError(f"--where {self.text!r}: {why}")

    def condition(self, node: ast.AST) -> pc.Expression:
        if isinstance(node, ast.BoolOp):
            parts = [self.condition(value) for value in node.values]
            return reduce(operator.and_ if isinstance(node.op, ast.And) else operator.or_, parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return ~self.condition(node.operand)
        if isinstance(node, ast.Compare):
            return self.compare(node)
        raise self.fail(f"{ast.unparse(node)!r} is not a condition (allowed: {_ALLOWED})")

    def compare(self, node: ast.Compare) -> pc.Expression:
        terms, operands = [], [node.left, *node.comparators]
        for left, op, right in zip(operands, node.ops, operands[1:]):
            if isinstance(op, (ast.In, ast.NotIn)):
                member = pc.field(self.column(left)).isin(self.constant_list(right, left))
                terms.append(~member if isinstance(op, ast.NotIn) else member)
                continue
            if type(op) not in _COMPARISONS:
                raise self.fail(f"operator {type(op).__name__} is not allowed (allowed: {_ALLOWED})")
            sides = self.operand(left, right), self.operand(right, left)
            if not any(isinstance(side, ast.Name) for side in (left, right)):
                raise self.fail(f"{ast.unparse(left)!r} and {ast.unparse(right)!r}: a comparison without a column")
            terms.append(_COMPARISONS[type(op)](*sides))
        return reduce(operator.and_, terms)

    def column(self, node: ast.AST) -> str:
        if not isinstance(node, ast.Name):
            raise self.fail(f"{ast.unparse(node)!r} is not an index column")
        if node.id not in self.schema.names:
            raise self.fail(f"unknown column {node.id!r} (index columns: {', '.join(self.schema.names)})")
        return node.id

    def operand(self, node: ast.AST, other: ast.AST) -> pc.Expression:
        if isinstance(node, ast.Name):
            return pc.field(self.column(node))
        return pc.scalar(self.constant(node, other))

    def constant(self, node: ast.AST, column: ast.AST) -> float | int | str:
        """A number or string literal (unary minus allowed), type-checked against the compared column."""
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.constant(node.operand, column)
            if isinstance(value, str):
                raise self.fail(f"{ast.unparse(node)!r}: a sign before a string")
            return -value if isinstance(node.op, ast.USub) else value
        if not isinstance(node, ast.Constant) or isinstance(node.value, bool) \
                or not isinstance(node.value, (int, float, str)):
            raise self.fail(f"{ast.unparse(node)!r} is not allowed (allowed: {_ALLOWED})")
        if isinstance(column, ast.Name):
            kind = self.schema.field(self.column(column)).type
            numeric = pa.types.is_integer(kind) or pa.types.is_floating(kind)
            if numeric == isinstance(node.value, str):
                wanted = "a number" if numeric else "a quoted string"
                raise self.fail(f"column {column.id!r} ({kind}) is compared with {ast.unparse(node)}; "
                                f"expected {wanted}")
        return node.value

    def constant_list(self, node: ast.AST, column: ast.AST) -> list:
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            raise self.fail(f"'in' needs a list of constants, got {ast.unparse(node)!r}")
        return [self.constant(element, column) for element in node.elts]


def parse_where(text: str, schema: pa.Schema) -> pc.Expression:
    """A pyarrow.compute filter expression for `text`; InputError naming the expression if it is not allowed."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise InputError(f"--where {text!r}: syntax error at character {error.offset} ({error.msg})") from error
    return _WhereParser(text, schema).condition(tree.body)


def bbox_expression(bbox: tuple[float, float, float, float]) -> pc.Expression:
    """Tiles whose centre lies in W,S,E,N (edges included), as `phileo-shard build --bbox`."""
    west, south, east, north = bbox
    if not (-180 <= west < east <= 180 and -90 <= south < north <= 90):
        raise InputError(f"--bbox {','.join(map(str, bbox))}: expected W,S,E,N with W<E and S<N in degrees")
    lon, lat = pc.field("centre_lon"), pc.field("centre_lat")
    return (lon >= west) & (lon <= east) & (lat >= south) & (lat <= north)


def _utc_stamp(value: str, flag: str) -> tuple[str, bool]:
    """(`YYYY-MM-DDTHH:MM:SSZ` as stored in the index, whether `value` was a date only)."""
    try:
        return f"{date.fromisoformat(value):%Y-%m-%d}T00:00:00Z", True
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as error:
        raise InputError(f"{flag} {value!r}: expected an ISO date or time, e.g. 2020-06-01 or "
                         "2020-06-01T10:00:00Z") from error
    if moment.tzinfo is not None:
        moment = moment.astimezone(timezone.utc).replace(tzinfo=None)
    return f"{moment:%Y-%m-%dT%H:%M:%S}Z", False


def time_expression(start: str | None, end: str | None) -> pc.Expression | None:
    """`--start` inclusive; `--end` inclusive (a date alone includes that whole day)."""
    terms = []
    stamp = pc.field("timestamp")
    if start is not None:
        terms.append(stamp >= _utc_stamp(start, "--start")[0])
    if end is not None:
        text, date_only = _utc_stamp(end, "--end")
        if date_only:
            next_day = date.fromisoformat(text[:10]) + timedelta(days=1)
            terms.append(stamp < f"{next_day:%Y-%m-%d}T00:00:00Z")
        else:
            terms.append(stamp <= text)
    return reduce(operator.and_, terms) if terms else None


def build_query(schema: pa.Schema, where: str | None = None, bbox: tuple[float, float, float, float] | None = None,
                start: str | None = None, end: str | None = None) -> pc.Expression | None:
    """All given criteria combined with `and`; None when none is given (every row)."""
    terms = []
    if where is not None and where.strip():
        terms.append(parse_where(where, schema))
    if bbox is not None:
        terms.append(bbox_expression(bbox))
    time_terms = time_expression(start, end)
    if time_terms is not None:
        terms.append(time_terms)
    return reduce(operator.and_, terms) if terms else None


def select(index: pa.Table, query: pc.Expression | None, where: str | None = None) -> pa.Table:
    """Rows of `index` matching `query` (null comparisons count as false), in index order."""
    if query is None:
        return index
    try:
        return index.filter(query)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
        raise InputError(f"--where {where!r}: {str(error).splitlines()[0]}") from error
