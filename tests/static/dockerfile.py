"""A small Dockerfile reader: enough of the format to check ours statically.

It joins continuation lines, drops comments and parser directives, splits each
instruction into keyword, flags and arguments, and reads the JSON (exec) form.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field

_FLAG = re.compile(r"--([a-z-]+)(?:=(\S+))?\s+")


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    rest: str
    line: int

    @property
    def words(self) -> list[str]:
        """The arguments: the JSON array of the exec form, else shell-style words."""
        if self.rest.startswith("["):
            words = json.loads(self.rest)
            if not all(isinstance(word, str) for word in words):
                raise ValueError(f"line {self.line}: {self.keyword} has a non-string in its JSON form")
            return words
        return shlex.split(self.rest)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """ENV KEY=VALUE pairs, later ones winning, $VAR references left as written."""
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in instruction.words:
                key, sep, value = word.partition("=")
                if not sep:
                    raise ValueError(f"line {instruction.line}: use ENV KEY=VALUE, not the legacy form")
                values[key] = value
        return values


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        lines.append((start, pending + stripped))
        pending = ""
    if pending:
        raise ValueError("the Dockerfile ends inside a continued line")
    return lines


def parse(text: str) -> list[Stage]:
    stages: list[Stage] = []
    for number, line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip() + " "
        flags: dict[str, str] = {}
        while match := _FLAG.match(rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end():]
        instruction = Instruction(keyword, flags, rest.strip(), number)
        if keyword == "FROM":
            words = instruction.words
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif not stages:
            raise ValueError(f"line {number}: {keyword} before the first FROM")
        stages[-1].instructions.append(instruction)
    return stages
