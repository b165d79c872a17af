"""A parser for Google Ads Query Language (GAQL), as the Google Ads simulator needs it.

It follows the published grammar (SELECT, FROM, WHERE ... AND ..., ORDER BY, LIMIT, PARAMETERS)
and knows nothing about fields: it only checks syntax. Errors carry the name of the real
``QueryErrorEnum.QueryError`` value the API answers with and a message in the API's wording,
so the simulator can put them in a ``GoogleAdsFailure`` unchanged."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

DATE_FUNCTIONS = frozenset({
    "TODAY", "YESTERDAY", "LAST_7_DAYS", "LAST_14_DAYS", "LAST_30_DAYS", "LAST_BUSINESS_WEEK",
    "THIS_MONTH", "LAST_MONTH", "THIS_WEEK_SUN_TODAY", "THIS_WEEK_MON_TODAY",
    "LAST_WEEK_SUN_SAT", "LAST_WEEK_MON_SUN",
})
PARAMETERS = frozenset({"include_drafts", "omit_unselected_resource_names"})
KEYWORDS = frozenset({"SELECT", "FROM", "WHERE", "AND", "ORDER", "BY", "LIMIT", "PARAMETERS",
                      "ASC", "DESC"})

_FIELD_NAME = re.compile(r"[a-z][a-zA-Z0-9._]*\Z")
_RESOURCE_NAME = re.compile(r"[a-z][a-zA-Z0-9_]*\Z")
_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>-?[0-9]+(?:\.[0-9]+)?(?![A-Za-z0-9_.]))
  | (?P<word>[A-Za-z0-9_][A-Za-z0-9_.]*)
  | (?P<op>!=|>=|<=|=|>|<)
  | (?P<punct>[(),])
  | (?P<quote>['"])
  | (?P<other>[!-~])
""", re.VERBOSE)
_ESCAPES = {"\\": "\\", "'": "'", '"': '"'}


class GaqlError(Exception):
    """A query the API rejects: ``reason`` is the QueryError enum name."""

    def __init__(self, reason: str, message: str, trigger: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.trigger = trigger


@dataclass(frozen=True)
class Literal:
    """An unquoted word used as a value: an enum constant, TRUE / FALSE, a date function."""

    text: str


Scalar = str | int | float | Literal
Value = Scalar | tuple[Scalar, ...] | None


@dataclass(frozen=True)
class Condition:
    field: str
    operator: str  # "=", "!=", ">", ">=", "<", "<=", "IN", "NOT IN", "BETWEEN", "DURING", ...
    value: Value


@dataclass(frozen=True)
class Ordering:
    field: str
    descending: bool = False


@dataclass(frozen=True)
class Query:
    select: tuple[str, ...]
    resource: str
    where: tuple[Condition, ...] = ()
    order_by: tuple[Ordering, ...] = ()
    limit: int | None = None
    parameters: Mapping[str, bool] = field(default_factory=dict)

    def referenced(self) -> list[str]:
        """Every field named anywhere in the query, SELECT first."""
        return [*self.select, *(c.field for c in self.where), *(o.field for o in self.order_by)]


@dataclass(frozen=True)
class Token:
    kind: str  # word | number | string | op | punct | other
    text: str
    value: str | int | float


def parse(text: str) -> Query:
    """Parse one GAQL query; raise GaqlError with the API's reason when it is not valid."""
    return _Parser(list(tokenize(text))).query()


def tokenize(text: str) -> Iterator[Token]:
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            symbol = text[position]
            raise GaqlError("BAD_SYMBOL", f"Error in query: bad symbol '{symbol}'.", symbol)
        kind = match.lastgroup or ""
        if kind == "quote":
            token, position = _string(text, match.end(), match.group())
            yield token
            continue
        position = match.end()
        if kind == "space":
            continue
        raw = match.group()
        if kind == "number":
            yield Token(kind, raw, float(raw) if "." in raw else int(raw))
        else:
            yield Token(kind, raw, raw)


def _string(text: str, start: int, quote: str) -> tuple[Token, int]:
    chars: list[str] = []
    position = start
    while position < len(text):
        char = text[position]
        if char == quote:
            value = "".join(chars)
            return Token("string", text[start - 1:position + 1], value), position + 1
        if char == "\n":
            raise GaqlError("PROHIBITED_NEWLINE_IN_STRING",
                            "Error in query: newline characters are not allowed in strings.")
        if char == "\\":
            escaped = text[position + 1:position + 2]
            if escaped not in _ESCAPES:
                raise GaqlError("BAD_ESCAPE_SEQUENCE",
                                f"Error in query: invalid escape sequence '\\{escaped}'.")
            chars.append(_ESCAPES[escaped])
            position += 2
            continue
        chars.append(char)
        position += 1
    raise GaqlError("STRING_NOT_TERMINATED", "Error in query: string is not terminated.",
                    text[start - 1:])


class _Parser:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens
        self.position = 0

    # -- token helpers ---------------------------------------------------------------------
    def peek(self) -> Token | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def next(self) -> Token:
        token = self.peek()
        if token is None:
            raise GaqlError("UNEXPECTED_END_OF_QUERY", "Error in query: unexpected end of query.")
        self.position += 1
        return token

    def at_keyword(self, *words: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "word" and token.text.upper() in words

    def keyword(self, word: str, reason: str) -> None:
        if not self.at_keyword(word):
            token = self.peek()
            found = token.text if token else "end of query"
            raise GaqlError(reason, f"Error in query: expected {word}, found {found}.",
                            token.text if token else None)
        self.position += 1

    def punct(self, text: str) -> bool:
        token = self.peek()
        if token is not None and token.kind == "punct" and token.text == text:
            self.position += 1
            return True
        return False

    # -- clauses ---------------------------------------------------------------------------
    def query(self) -> Query:
        if not self.tokens:
            raise GaqlError("UNEXPECTED_END_OF_QUERY", "Error in query: unexpected end of query.")
        self.keyword("SELECT", "EXPECTED_SELECT")
        select = self.field_list("SELECT")
        self.keyword("FROM", "EXPECTED_FROM")
        resource = self.resource()
        where = self.where() if self.at_keyword("WHERE") else ()
        order_by = self.order_by() if self.at_keyword("ORDER") else ()
        limit = self.limit() if self.at_keyword("LIMIT") else None
        parameters = self.parameters() if self.at_keyword("PARAMETERS") else {}
        leftover = self.peek()
        if leftover is not None:
            raise GaqlError("UNEXPECTED_INPUT",
                            f"Error in query: unexpected input {leftover.text}.", leftover.text)
        return Query(select, resource, where, order_by, limit, parameters)

    def field_name(self, clause: str) -> str:
        token = self.next()
        if (token.kind != "word" or token.text.upper() in KEYWORDS
                or not _FIELD_NAME.match(token.text)):
            raise GaqlError("BAD_FIELD_NAME",
                            f"Error in {clause} clause: invalid field name '{token.text}'.",
                            token.text)
        return token.text

    def field_list(self, clause: str) -> tuple[str, ...]:
        fields = [self.field_name(clause)]
        while self.punct(","):
            fields.append(self.field_name(clause))
        return tuple(fields)

    def resource(self) -> str:
        token = self.next()
        if token.kind != "word" or not _RESOURCE_NAME.match(token.text):
            raise GaqlError("BAD_RESOURCE_TYPE_IN_FROM_CLAUSE",
                            f"Error in FROM clause: invalid resource name '{token.text}'.",
                            token.text)
        return token.text

    def where(self) -> tuple[Condition, ...]:
        self.position += 1
        conditions = [self.condition()]
        while self.at_keyword("AND"):
            self.position += 1
            conditions.append(self.condition())
        return tuple(conditions)

    def condition(self) -> Condition:
        name = self.field_name("WHERE")
        operator = self.operator()
        if operator == "BETWEEN":
            low = self.scalar("BETWEEN")
            self.keyword("AND", "EXPECTED_AND")
            return Condition(name, operator, (low, self.scalar("BETWEEN")))
        if operator in ("IS NULL", "IS NOT NULL"):
            return Condition(name, operator, None)
        if operator == "DURING":
            return Condition(name, operator, self.date_function())
        if operator in ("IN", "NOT IN") or operator.startswith("CONTAINS"):
            return Condition(name, operator, self.value_list())
        value = self.scalar(operator)
        if operator in ("LIKE", "NOT LIKE", "REGEXP_MATCH", "NOT REGEXP_MATCH") and not (
                isinstance(value, str)):
            raise GaqlError("INVALID_VALUE_WITH_LIKE_OPERATOR",
                            f"Error in WHERE clause: {operator} needs a string value.")
        return Condition(name, operator, value)

    def operator(self) -> str:
        token = self.next()
        if token.kind == "op":
            return token.text
        word = token.text.upper() if token.kind == "word" else ""
        follow = self.peek()
        second = follow.text.upper() if follow is not None and follow.kind == "word" else ""
        two_word = {("NOT", "IN"), ("NOT", "LIKE"), ("NOT", "REGEXP_MATCH"), ("IS", "NULL"),
                    ("CONTAINS", "ANY"), ("CONTAINS", "ALL"), ("CONTAINS", "NONE")}
        if (word, second) in two_word:
            self.position += 1
            return f"{word} {second}"
        if word == "IS" and second == "NOT":
            self.position += 1
            self.keyword("NULL", "BAD_OPERATOR")
            return "IS NOT NULL"
        if word in ("IN", "LIKE", "BETWEEN", "DURING", "REGEXP_MATCH"):
            return word
        raise GaqlError("BAD_OPERATOR", f"Error in WHERE clause: invalid operator '{token.text}'.",
                        token.text)

    def scalar(self, operator: str) -> Scalar:
        token = self.peek()
        if token is not None and token.kind == "punct" and token.text == "(":
            raise GaqlError("EXPECTED_SINGLE_VALUE",
                            f"Error in WHERE clause: operator {operator} expects a single value.")
        token = self.next()
        if token.kind in ("string", "number"):
            return token.value
        if token.kind == "word" and token.text.upper() not in ("AND", "ORDER", "LIMIT"):
            return Literal(token.text)
        reason = ("EXPECTED_VALUE_WITH_BETWEEN_OPERATOR" if operator == "BETWEEN"
                  else "BAD_VALUE")
        raise GaqlError(reason, f"Error in WHERE clause: invalid value '{token.text}'.",
                        token.text)

    def date_function(self) -> Literal:
        token = self.next()
        if token.kind != "word" or token.text.upper() not in DATE_FUNCTIONS:
            raise GaqlError("INVALID_VALUE_WITH_DURING_OPERATOR",
                            f"Invalid date literal supplied for DURING operator: {token.text}.",
                            token.text)
        return Literal(token.text.upper())

    def value_list(self) -> tuple[Scalar, ...]:
        if not self.punct("("):
            token = self.peek()
            raise GaqlError("EXPECTED_LIST", "Error in WHERE clause: expected a list of values.",
                            token.text if token else None)
        if self.punct(")"):
            raise GaqlError("PROHIBITED_EMPTY_LIST_IN_CONDITION",
                            "Error in WHERE clause: empty list in condition.")
        values = [self.scalar("IN")]
        while self.punct(","):
            values.append(self.scalar("IN"))
        if not self.punct(")"):
            token = self.next()
            raise GaqlError("UNEXPECTED_INPUT", f"Error in query: unexpected input {token.text}.",
                            token.text)
        if len({_value_kind(v) for v in values}) > 1:
            raise GaqlError("PROHIBITED_VALUE_COMBINATION_IN_LIST",
                            "Error in WHERE clause: list contains values of different types.")
        return tuple(values)

    def order_by(self) -> tuple[Ordering, ...]:
        self.position += 1
        self.keyword("BY", "EXPECTED_BY")
        orderings = [self.ordering()]
        while self.punct(","):
            orderings.append(self.ordering())
        return tuple(orderings)

    def ordering(self) -> Ordering:
        name = self.field_name("ORDER BY")
        if self.at_keyword("ASC", "DESC"):
            return Ordering(name, self.next().text.upper() == "DESC")
        return Ordering(name)

    def limit(self) -> int:
        self.position += 1
        token = self.next()
        if token.kind != "number" or not isinstance(token.value, int):
            raise GaqlError("BAD_LIMIT_VALUE",
                            f"Error in LIMIT clause: invalid value {token.text}.", token.text)
        if token.value < 1:
            raise GaqlError("LIMIT_VALUE_TOO_LOW", "Error in LIMIT clause: value must be > 0.",
                            token.text)
        return token.value

    def parameters(self) -> dict[str, bool]:
        self.position += 1
        parameters = {}
        while True:
            name = self.next()
            if name.kind != "word" or name.text not in PARAMETERS:
                raise GaqlError("BAD_PARAMETER_NAME",
                                f"Error in PARAMETERS clause: unknown parameter '{name.text}'.",
                                name.text)
            operator = self.next()
            if operator.text != "=":
                raise GaqlError("UNEXPECTED_INPUT",
                                f"Error in query: unexpected input {operator.text}.",
                                operator.text)
            value = self.next()
            if value.kind != "word" or value.text.lower() not in ("true", "false"):
                raise GaqlError("BAD_PARAMETER_VALUE",
                                f"Error in PARAMETERS clause: invalid value '{value.text}' "
                                f"for {name.text}.", value.text)
            parameters[name.text] = value.text.lower() == "true"
            if not self.punct(","):
                return parameters


def _value_kind(value: Scalar) -> str:
    if isinstance(value, Literal):
        return "literal"
    return "string" if isinstance(value, str) else "number"


def parse_date(value: object) -> dt.date:
    """A GAQL date: 'YYYY-MM-DD' or 'YYYYMMDD'."""
    text = value if isinstance(value, str) else ""
    for pattern in ("%Y-%m-%d", "%Y%m%d"):
        try:
            return dt.datetime.strptime(text, pattern).date()
        except ValueError:
            continue
    raise GaqlError("INVALID_DATE_FORMAT",
                    f"Invalid date format: {value!r}. Expected 'YYYY-MM-DD'.", str(value))


def date_range(function: str, today: dt.date) -> tuple[dt.date, dt.date]:
    """The days a DURING literal covers, ``today`` being the account's current date."""
    day = dt.timedelta(days=1)
    monday = today - dt.timedelta(days=today.weekday())
    sunday = today - dt.timedelta(days=(today.weekday() + 1) % 7)
    first_of_month = today.replace(day=1)
    ranges = {
        "TODAY": (today, today),
        "YESTERDAY": (today - day, today - day),
        "LAST_7_DAYS": (today - 7 * day, today - day),
        "LAST_14_DAYS": (today - 14 * day, today - day),
        "LAST_30_DAYS": (today - 30 * day, today - day),
        "THIS_MONTH": (first_of_month, today),
        "LAST_MONTH": ((first_of_month - day).replace(day=1), first_of_month - day),
        "THIS_WEEK_MON_TODAY": (monday, today),
        "THIS_WEEK_SUN_TODAY": (sunday, today),
        "LAST_WEEK_MON_SUN": (monday - 7 * day, monday - day),
        "LAST_WEEK_SUN_SAT": (sunday - 7 * day, sunday - day),
        "LAST_BUSINESS_WEEK": (monday - 7 * day, monday - 3 * day),
    }
    return ranges[function]
