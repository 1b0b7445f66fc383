"""User-facing text: every flag a message names is one a script's parser accepts, spelled as it
spells it (utils.flag is the one place that knows the spellings), and an error never shares a
line with a progress bar."""
import argparse
import ast
import glob
import importlib
import os
import re

import pytest
from tqdm import tqdm

from tiny_runs import REPO
from utils import UNDERSCORE_FLAGS, UserError, flag, run_main

FLAG = re.compile(r'(?<![\w-])--[a-z][a-z0-9_-]*')


class ParserCaptured(Exception):
    """Raised in place of parsing, carrying the parser a script built."""


def script_modules():
    """The top-level scripts (files with a __main__ block), plus training.py whose main train.py
    runs."""
    names = []
    for path in sorted(glob.glob(os.path.join(REPO, '*.py'))):
        with open(path) as handle:
            if "__name__ == '__main__'" in handle.read():
                names.append(os.path.basename(path)[:-3])
    return names + ['training']


@pytest.fixture(scope='module')
def parsers():
    """{script: its argparse parser}, captured as each script's main() parses its arguments."""
    captured, original = {}, argparse.ArgumentParser.parse_known_args

    def capture(parser, *args, **kwargs):
        raise ParserCaptured(parser)

    argparse.ArgumentParser.parse_known_args = capture
    try:
        for name in script_modules():
            module = importlib.import_module(name)
            if not hasattr(module, 'main'):
                continue
            try:
                module.main([])
            except ParserCaptured as found:
                captured[name] = found.args[0]
            except TypeError:  # a main() without argv
                continue
    finally:
        argparse.ArgumentParser.parse_known_args = original
    assert {'train', 'test', 'pre_process_sysu', 'training'} <= set(captured)
    return captured


def accepted_flags(parsers):
    return {option for parser in parsers.values() for action in parser._actions
            for option in action.option_strings if option.startswith('--')}


def source_files():
    files = glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, 'tools', '*.py'))
    return sorted(files)


def message_texts(tree):
    """The string pieces of every error raised and every message printed or logged."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, 'id', '')
            if name.endswith(('Error', 'Diverged')) or name in ('print', 'warning', 'info', 'error'):
                for part in ast.walk(node):
                    if isinstance(part, ast.Constant) and isinstance(part.value, str):
                        yield part.value


def flag_calls(tree):
    """The dests passed to utils.flag(...) as literals."""
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'flag' and node.args
                and isinstance(node.args[0], ast.Constant)):
            yield node.args[0].value


def test_flag_spells_dests_as_the_parsers_do(parsers):
    assert (flag('img_h'), flag('num_pos'), flag('batch_size'), flag('data_path')) == (
        '--img_h', '--num_pos', '--batch-size', '--data-path')
    for name, parser in parsers.items():
        for action in parser._actions:
            longs = [o for o in action.option_strings if o.startswith('--')]
            if longs and action.dest != 'help':
                assert flag(action.dest) in longs, (name, action.dest, longs)
    every_option = accepted_flags(parsers)
    assert all(flag(dest) in every_option for dest in UNDERSCORE_FLAGS)


def test_every_flag_a_message_names_is_accepted_by_a_parser(parsers):
    accepted = accepted_flags(parsers)
    named, seen = [], 0
    for path in source_files():
        with open(path) as handle:
            tree = ast.parse(handle.read())
        for text in message_texts(tree):
            named += [(os.path.basename(path), found) for found in FLAG.findall(text)]
        for dest in flag_calls(tree):
            seen += 1
            named.append((os.path.basename(path), flag(dest)))
    assert seen >= 10 and len(named) >= 30  # the scan finds the messages it is meant to check
    wrong = sorted({(where, name) for where, name in named if name not in accepted})
    assert not wrong, f'messages name flags no parser accepts: {wrong}'


def test_the_scan_would_catch_a_misspelt_flag(parsers):
    tree = ast.parse("raise UserError(f'use --img-h {x} or {flag(\"num_pos\")}')")
    found = [f for text in message_texts(tree) for f in FLAG.findall(text)]
    assert found == ['--img-h'] and '--img-h' not in accepted_flags(parsers)
    assert list(flag_calls(tree)) == ['num_pos']


def test_an_error_starts_its_own_line_after_a_progress_bar(capsys):
    def failing_main():
        bar = tqdm(total=10, desc='epoch 0', leave=False)
        bar.update(3)
        raise UserError('something the user can fix.')

    assert run_main(failing_main) == 2
    err = capsys.readouterr().err
    before, _, after = err.partition('error: ')
    assert after.startswith('something the user can fix.')
    assert 'epoch 0' in before and before.endswith(('\r', '\n'))
