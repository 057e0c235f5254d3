"""Configuration error types.

Operators fix configs by reading error messages, usually in a terminal or a
CI log, so every problem is reported as a :class:`ConfigIssue` that names the
file, the line and the field, in the familiar ``FILE:LINE: FIELD: MESSAGE``
shape that editors and ``grep`` understand. All problems found in one pass are
collected into a single :class:`ConfigError` so an operator does not have to
fix one typo per restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ConfigError", "ConfigIssue"]


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a configuration source.

    ``line`` and ``column`` are 1-based; ``line`` is ``None`` when the problem
    has no single place in the file (for example a required top-level key that
    is missing, or a file that cannot be read). ``field`` is a dotted path
    such as ``users[1].extension``; it is empty for problems that concern the
    file as a whole (YAML syntax errors).
    """

    file: str
    line: int | None
    field: str
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        if self.field:
            return f"{where}: {self.field}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The configuration is unusable; ``issues`` lists every problem found.

    Raised instead of pydantic's ``ValidationError`` or ruamel's ``YAMLError``
    so callers (the CLI's ``check-config``, service start-up) handle exactly
    one exception type whose text is already fit for an operator.
    """

    def __init__(self, issues: Iterable[ConfigIssue]) -> None:
        self.issues: list[ConfigIssue] = list(issues)
        if not self.issues:
            raise ValueError("ConfigError needs at least one issue")
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)
