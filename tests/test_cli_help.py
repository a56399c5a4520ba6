"""Every command and every argument of the CLI says what it is in --help (prepare's dataset, --root and --verify,
demo's --epochs and --lr, eval's --subset, report's runs and import-dassl's --method used to show bare names)."""

import argparse

import pytest

from fastprompt.cli import build_parser


def _subcommands():
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    return [(name, helps.get(name), sub) for name, sub in commands.choices.items()]


@pytest.mark.parametrize("name, summary, command", _subcommands(), ids=[name for name, _, _ in _subcommands()])
def test_every_command_and_argument_has_help(name, summary, command):
    assert summary, f"fastprompt {name} has no one-line help"
    bare = [action.option_strings[0] if action.option_strings else action.dest for action in command._actions
            if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()]
    assert bare == [], f"fastprompt {name}: arguments with no help: {bare}"
    command.format_help()  # help strings with a stray % (argparse formats them) would raise here
