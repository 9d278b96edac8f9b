"""SQL fragments that pull features and fields out of recorded JSON (pure string building).

Every feature becomes a set-returning SQL expression over a request body ``b``: one row
``(v jsonb, ord bigint)`` per input row of the request, so that a batch request (several
rows) lines up with its batch of predictions by ``ord``. jsonpaths go into the SQL as quoted
literals, so PostgreSQL itself parses them; each section of the report asks it to validate
its own first and reports a rejected one by its configuration key.

``ignore`` jsonpaths are matched against the flattened field paths of a response, so they
support the path subset that names fields: ``.key``, ``."key"``, ``[3]``, ``[*]``, ``.*``.
"""

from __future__ import annotations

import re

from shadowproxy.compare.config import FeatureConfig
from shadowproxy.errors import UsageError

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def literal(text: str) -> str:
    """``text`` as a SQL string literal (standard_conforming_strings, PostgreSQL's default)."""
    return "'" + text.replace("'", "''") + "'"


def float8_sql(value: str) -> str:
    """SQL: the jsonb ``value`` as a float8 when it is a number, else NULL.

    JSON numbers have no range and float8 has one: a cast of ``1e400`` (or ``1e-400``) fails
    the whole statement, so one such value in one request stopped the report. A number too
    large for float8 is not one the statistics can take (NULL, like a value that is not a
    number); one too small for it (under about 1e-320 in magnitude) is 0. jsonb holds a
    number as a numeric: the bounds are checked on it, with no text in between.
    """
    n = f"{value}::numeric"
    return (f"CASE WHEN jsonb_typeof({value}) = 'number' THEN CASE "
            f"WHEN abs({n}) > 1.7976931348623157e308 THEN NULL "
            f"WHEN abs({n}) < 1e-320 THEN 0 ELSE {value}::float8 END END")


def square_sql(value: str) -> str:
    """SQL: the float8 ``value`` squared, 0 where the square is below float8's smallest
    number. PostgreSQL raises ``value out of range: underflow`` rather than round such a
    square to 0 as float arithmetic does, so one pair of predictions 1e-200 apart (tiny
    probabilities from an ``exp``) stopped the report. Squares of under 1e-160 (under
    1e-320) are what float8 can no longer tell from 0."""
    return f"CASE WHEN abs({value}) < 1e-160 THEN 0 ELSE ({value}) ^ 2 END"


def pearson_sql(x: str, y: str, cast: str) -> str:
    """SQL: Pearson's r of the columns ``x`` and ``y`` (see ``Snapshot.fetchrow_wide``);
    read as numeric, where PostgreSQL has no ``corr``, from the population moments."""
    if not cast:
        return f"corr({x}, {y})"
    x, y = x + cast, y + cast
    return (f"((avg({x} * {y}) - avg({x}) * avg({y})) "
            f"/ nullif(stddev_pop({x}) * stddev_pop({y}), 0))")


def within_sql(p: str, s: str, abs_tol: str, rel_tol: str, cast: str) -> str:
    """SQL: whether the float8 columns ``p`` and ``s`` are within the tolerances ``abs_tol``
    and ``rel_tol`` (SQL values) of each other, ``math.isclose``'s rule; with ``cast`` (see
    ``Snapshot.fetchrow_wide``) every operand is read as numeric, the tolerances too: a
    numeric compared with a float8 is read as float8, where the difference of 1.7e308 and
    -1.7e308 overflows."""
    p, s = p + cast, s + cast
    return (f"abs({s} - {p}) <= greatest({abs_tol}{cast}, "
            f"{rel_tol}{cast} * greatest(abs({p}), abs({s})))")


def category_sql(value: str) -> str:
    """SQL: the jsonb ``value`` as a category's text (NULL when missing), whole numbers
    without a fractional part: ``1.0`` is ``1``, as ``reference.category_text`` writes a
    file's values, so that a category is the same whether a client or a training file wrote
    it as ``1`` or ``1.0``. A number written without a fraction (``scale`` 0, the common
    case) is taken as it is, without the comparison."""
    n = f"{value}::numeric"
    return (f"CASE WHEN jsonb_typeof({value}) = 'number' AND scale({n}) > 0 "
            f"AND {n} = trunc({n}) THEN trunc({n})::text "
            f"WHEN {value} IS NOT NULL AND {value} <> 'null'::jsonb THEN {value} #>> '{{}}' END")


def jsonpath_key(key: str) -> str:
    """``key`` as a jsonpath member accessor: ``.name`` or ``."odd key"``."""
    if _IDENT.match(key):
        return f".{key}"
    return '."' + key.replace("\\", "\\\\").replace('"', '\\"') + '"'


def feature_jsonpath(feature: FeatureConfig, request_format: str) -> str:
    """The jsonpath that yields a feature's value for each row (not used for V2 columns)."""
    if feature.path is not None:
        return feature.path
    if request_format == "instances":
        if isinstance(feature.column, int):
            return f"$.instances[*][{feature.column}]"
        return f"$.instances[*]{jsonpath_key(str(feature.column))}"
    raise ValueError("V2 features are read with feature_rows_sql")


def _v2_tensor(feature: FeatureConfig) -> str:
    if feature.input is None:
        return "$.inputs[0]"
    name = feature.input.replace("\\", "\\\\").replace('"', '\\"')
    return f'$.inputs[*] ? (@.name == "{name}")'


def feature_rows_sql(feature: FeatureConfig, request_format: str, body: str) -> str:
    """A subquery yielding ``(v, ord)``: the feature's value in each row of ``body``."""
    if feature.path is not None or request_format != "v2":
        path = literal(feature_jsonpath(feature, request_format))
        return (f"(SELECT f.v, f.ord FROM jsonb_path_query({body}, {path}::jsonpath) "
                "WITH ORDINALITY AS f(v, ord))")
    tensor = _v2_tensor(feature)
    column = feature.column if isinstance(feature.column, int) else 0
    ndim = literal(f"{tensor}.shape.size()")
    last = literal(f"{tensor}.shape[last]")
    data = literal(f"{tensor}.data[*][*]")
    # Row-major: flat and nested `data` flatten alike (lax mode unwraps one level per [*]);
    # a 1-D tensor is one column, a 2-D one has shape[last] columns.
    return (
        "(SELECT d.v, (d.k - 1) / x.ncol + 1 AS ord FROM "
        f"(SELECT CASE WHEN coalesce((jsonb_path_query_first({body}, {ndim}::jsonpath))::int, 1)"
        f" >= 2 THEN greatest((jsonb_path_query_first({body}, {last}::jsonpath))::int, 1)"
        " ELSE 1 END AS ncol) x, "
        f"jsonb_path_query({body}, {data}::jsonpath) WITH ORDINALITY AS d(v, k) "
        f"WHERE (d.k - 1) % x.ncol = {column})")


_TOKEN = re.compile(
    r'\.(?P<key>[A-Za-z_][A-Za-z0-9_]*)'
    r'|\."(?P<qkey>(?:[^"\\]|\\.)*)"'
    r'|\[(?P<index>\d+)\]'
    r'|(?P<all>\[\*\])'
    r'|(?P<star>\.\*)')


def ignore_regex(path: str, key: str = "compare.ignore") -> str:
    """A POSIX regex matching the flattened field paths (and their subtrees) under ``path``."""
    text = path.strip()
    if text.startswith("lax ") or text.startswith("strict "):
        text = text.split(" ", 1)[1].strip()
    if not text.startswith("$"):
        raise UsageError(f"{key}: {path!r} must start with '$' (e.g. '$.model_version')")
    out, pos = "^\\$", 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise UsageError(
                f"{key}: {path!r} is not a plain field path at {text[pos:]!r}; ignore supports "
                "'.key', '.\"key\"', '[0]', '[*]' and '.*' (no filters or methods)")
        if m.group("key") is not None:
            out += re.escape(jsonpath_key(m.group("key")))
        elif m.group("qkey") is not None:
            unquoted = re.sub(r"\\(.)", r"\1", m.group("qkey"))
            out += re.escape(jsonpath_key(unquoted))
        elif m.group("index") is not None:
            out += re.escape(f"[{m.group('index')}]")
        elif m.group("all") is not None:
            out += r"\[[0-9]+\]"
        else:
            out += r'\.([A-Za-z_][A-Za-z0-9_]*|"([^"\\]|\\.)*")'
        pos = m.end()
    return out + r"($|[.\[])"


def flatten_cte(source: str) -> str:
    """A recursive CTE body flattening ``source(id, side, doc)`` into leaves.

    Yields ``(id, side, path, field, v)``: ``path`` is the exact jsonpath of a leaf (a scalar,
    or an empty object/array), ``field`` the same with array indices written ``[*]``.
    """
    key = ("CASE WHEN e.key ~ '^[A-Za-z_][A-Za-z0-9_]*$' THEN '.' || e.key "
           "ELSE '.\"' || replace(replace(e.key, '\\', '\\\\'), '\"', '\\\"') || '\"' END")
    return f"""
    tree(id, side, path, field, v) AS (
        SELECT id, side, '$'::text, '$'::text, doc FROM {source}
        UNION ALL
        SELECT t.id, t.side, t.path || c.step, t.field || c.fstep, c.v
        FROM tree t
        CROSS JOIN LATERAL (
            SELECT {key} AS step, {key} AS fstep, e.value AS v
            FROM jsonb_each(CASE WHEN jsonb_typeof(t.v) = 'object' THEN t.v
                                 ELSE '{{}}'::jsonb END) e
            UNION ALL
            SELECT '[' || (a.i - 1) || ']', '[*]', a.value
            FROM jsonb_array_elements(CASE WHEN jsonb_typeof(t.v) = 'array' THEN t.v
                                           ELSE '[]'::jsonb END) WITH ORDINALITY a(value, i)
        ) c
    ),
    leaves AS (
        SELECT id, side, path, field, v FROM tree
        WHERE jsonb_typeof(v) NOT IN ('object', 'array') OR v IN ('{{}}'::jsonb, '[]'::jsonb)
    )"""
