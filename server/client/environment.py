"""Options of the client commands (tail, health, group, consume) from environment variables.

Every option can also be given as ``ORDER_GATEWAY_`` and its long name in capitals, ``-``
as ``_`` (``--tls-ca``: ``ORDER_GATEWAY_TLS_CA``); a flag wins over the variable. A
variable's value is parsed by the flag's own type, so it is refused as the flag would be,
named by both; a repeatable option takes a comma-separated list, a switch the spellings
``serve``'s switches take (``true``, ``1``, ``yes``, ``on``, ``false``, …).

``serve``, ``migrate``, ``verify`` and ``backup`` read their variables through the
settings model instead (``server.config``), and leave this off.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

VARIABLE_PREFIX = "ORDER_GATEWAY_"

SWITCH = TypeAdapter(bool)
"""How pydantic, and so ``serve``, reads a switch from a variable."""

ENVIRONMENT_HELP = (
    f"Every option can also be set by its environment variable, {VARIABLE_PREFIX} and the "
    f"option's name in capitals, - as _ ({VARIABLE_PREFIX}TLS_CA for --tls-ca); an option "
    "given here wins over the variable. A repeatable option's variable takes a "
    "comma-separated list; a switch's true or false (also 1/0, yes/no, on/off)."
)


def option_variable(action: argparse.Action) -> str | None:
    """The variable that sets ``action``'s option: ``ORDER_GATEWAY_TLS_CA`` for
    ``--tls-ca``; None for a positional argument or ``--help``."""
    long = [name for name in action.option_strings if name.startswith("--")]
    if not long or isinstance(action, argparse._HelpAction):
        return None
    return VARIABLE_PREFIX + long[0].removeprefix("--").replace("-", "_").upper()


class _FromVariable:
    """The default of an option whose variable is set, until the command line is parsed:
    still this object afterwards, no flag replaced it, and the variable's value counts."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text  # as --help shows a default


_NOT_GIVEN: Any = object()
"""The default of an option while the command line is parsed, when its rival's variable
is set: still this object afterwards, the option was not given as a flag."""


class _Repeated(argparse._AppendAction):
    """``action="append"`` whose first flag replaces the default (a variable's list)
    rather than adding to it: a flag wins over the variable."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        given = [] if items is None or items is self.default else list(items)
        setattr(namespace, self.dest, [*given, values])


class EnvironmentParser(argparse.ArgumentParser):
    """A parser whose options, once ``read_environment`` turned it on, also come from
    their variables (``option_variable``). Its sub-commands' parsers are of this class
    too, and off until turned on: ``serve``'s options come from the settings."""

    options_from_environment = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviated options (--insec for --insecure): a prefix that is unique today
        # would change meaning, or fail, once an option sharing it is added. Here, the
        # sub-commands' parsers being of this class, it holds for all of them.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.register("action", "append", _Repeated)

    # typeshed declares it as overloads on the namespace's class; one signature does here.
    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if not self.options_from_environment:
            return super().parse_known_args(args, namespace)
        variables = self._variables_set()
        rivals = self._rivals_of(variables)
        saved = {action: (action.default, action.required) for action in [*variables, *rivals]}
        for action, text in variables.items():
            action.default = _FromVariable(text)
            action.required = False  # the variable gives it
        for action in rivals:
            # Told apart from a flag given with the default's value (--after 0).
            action.default = _NOT_GIVEN
        try:
            parsed, extras = super().parse_known_args(args, namespace)
        finally:
            for action, (default, required) in saved.items():
                action.default, action.required = default, required
        flagged: set[argparse.Action] = set()
        for action in rivals:
            if getattr(parsed, action.dest, None) is _NOT_GIVEN:
                setattr(parsed, action.dest, action.default)
            else:
                flagged.add(action)
        from_variables = {
            action: text
            for action, text in variables.items()
            if isinstance(getattr(parsed, action.dest, None), _FromVariable)
        }
        # Options whose flag replaced their variable's value were given as flags too.
        flagged |= variables.keys() - from_variables.keys()
        for action in self._rivals_given(from_variables, flagged):
            # A flag wins over the variable of an option it excludes too (--after over
            # ORDER_GATEWAY_FROM_END): both would reach the server.
            setattr(parsed, action.dest, saved[action][0])
            del from_variables[action]
        for action, text in from_variables.items():
            setattr(parsed, action.dest, self._variable_value(action, text))
        return parsed, extras

    def _rivals_of(self, variables: dict[argparse.Action, str]) -> list[argparse.Action]:
        """The options without a variable set that exclude one with a variable set."""
        return [
            action
            for group in self._mutually_exclusive_groups
            if any(a in variables for a in group._group_actions)
            for action in group._group_actions
            if action not in variables
        ]

    def _rivals_given(
        self, from_variables: dict[argparse.Action, str], flagged: set[argparse.Action]
    ) -> list[argparse.Action]:
        """The options set by variables whose mutually exclusive rival was given as a
        flag (is in ``flagged``); two such options both set by variables are a usage
        error, as two flags are."""
        overridden: list[argparse.Action] = []
        for group in self._mutually_exclusive_groups:
            by_variable = [a for a in group._group_actions if a in from_variables]
            if not by_variable:
                continue
            if any(a in flagged for a in group._group_actions):
                overridden += by_variable
                continue
            # A switch's variable set to false (ORDER_GATEWAY_FROM_END=off) asks for
            # nothing; one whose value is no switch value is refused as such, first.
            asking = [
                a
                for a in by_variable
                if a.nargs != 0 or self._variable_value(a, from_variables[a]) != a.default
            ]
            if len(asking) > 1:
                first, second = asking[:2]
                self.error(
                    f"argument {'/'.join(first.option_strings)} ({option_variable(first)}):"
                    f" not allowed with argument {'/'.join(second.option_strings)}"
                    f" ({option_variable(second)})"
                )
        return overridden

    def _variables_set(self) -> dict[argparse.Action, str]:
        """Each option whose variable is set, with the variable's value."""
        return {
            action: os.environ[name]
            for action in self._actions
            if (name := option_variable(action)) is not None and name in os.environ
        }

    def _variable_value(self, action: argparse.Action, text: str) -> Any:
        """``text`` parsed as the option's flag would be; a bad one is a usage error
        naming the option and its variable (exit 2)."""
        try:
            if action.nargs == 0:
                return action.const if SWITCH.validate_python(text) else action.default
            if isinstance(action, argparse._AppendAction):
                items = [item.strip() for item in text.split(",")]
                return [self._flag_value(action, item) for item in items if item]
            return self._flag_value(action, text)
        except ValidationError:
            message = "not a switch value: true or false (also 1/0, yes/no, on/off, t/f, y/n)"
        except argparse.ArgumentError as error:
            message = error.message
        option = "/".join(action.option_strings)
        self.error(f"argument {option} ({option_variable(action)}): {message}")

    def _flag_value(self, action: argparse.Action, text: str) -> Any:
        value = self._get_value(action, text)
        self._check_value(action, value)
        return value


def read_environment(parser: EnvironmentParser) -> None:
    """Let ``parser``'s options, and those of its sub-commands, come from variables too,
    and say so in their help."""
    parser.options_from_environment = True
    parser.epilog = ENVIRONMENT_HELP
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                read_environment(command)
        elif (name := option_variable(action)) is not None and action.help:
            action.help += f" [{name}]"
