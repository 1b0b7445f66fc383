"""Docs that cannot go stale: every command in README.md and docs/*.md runs a script that exists
with flags its parser accepts, every relative link and image resolves, and every tool's --help
groups its flags; the checkers themselves fail on a made-up flag and a broken link."""
import glob
import os

import pytest

from tiny_runs import REPO
from tools.docs_check import (accepted_flags, command_problems, commands, link_problems,
                              load_script, script_invocations)

DOCS = ['README.md'] + sorted(os.path.relpath(path, REPO)
                              for path in glob.glob(os.path.join(REPO, 'docs', '*.md')))
TOOLS = ['train.py', 'test.py', 'reproduce.py', 'visualize.py', 'search.py', 'export.py',
         'pre_process_sysu.py']
BENCHMARKS = sorted(os.path.relpath(path, REPO)
                    for path in glob.glob(os.path.join(REPO, 'benchmarks', '*.py')))


def read(relative):
    with open(os.path.join(REPO, relative)) as handle:
        return handle.read()


def test_the_docs_pages_are_there():
    assert {'docs/training.md', 'docs/testing.md', 'docs/reproducing.md', 'docs/figures.md',
            'docs/search-export-api.md', 'docs/datasets.md', 'docs/benchmarks.md'} <= set(DOCS)


@pytest.mark.parametrize('page', DOCS)
def test_every_command_uses_existing_scripts_and_flags(page):
    text = read(page)
    assert command_problems(text, REPO, where=page) == []


@pytest.mark.parametrize('page', DOCS)
def test_every_relative_link_and_image_resolves(page):
    text = read(page)
    assert link_problems(text, os.path.dirname(os.path.join(REPO, page)), where=page) == []


def test_the_checker_reads_the_commands_of_every_tool():
    """The docs test sees a command of each of the six daily tools (it is not vacuous)."""
    scripts = {script for page in DOCS for command in commands(read(page))
               for script, _ in script_invocations(command)}
    assert {'train.py', 'test.py', 'reproduce.py', 'visualize.py', 'search.py',
            'export.py'} <= scripts


def test_ci_runs_the_readme_test_command():
    ci_command = read('.ci/run').strip().splitlines()[-1]
    assert ci_command.startswith('python3 -m venv') and f'\n{ci_command}\n' in read('README.md')


MADE_UP = '''Some text.

```bash
python train.py --dataset demo --no-such-flag 3     # a flag train.py does not have
torchrun --nproc_per_node=2 test.py --resume x.pth --rerank --k3 4
python -m benchmarks.rerank_speed --scale 0.2
python missing_tool.py --help
```

![a figure](docs/figures/no_such.png) and [a page](docs/training.md#flags), [web](https://x.org).
'''


def test_the_checkers_report_a_made_up_flag_a_missing_script_and_a_broken_link():
    problems = command_problems(MADE_UP, REPO, where='made-up.md')
    assert len(problems) == 3
    assert '--no-such-flag is not a flag of train.py' in problems[0]
    assert '--k3 is not a flag of test.py' in problems[1]  # --nproc_per_node is torchrun's
    assert 'missing_tool.py does not exist' in problems[2]
    links = link_problems(MADE_UP, REPO, where='made-up.md')
    assert links == ['made-up.md: link docs/figures/no_such.png does not resolve']


def test_reproduce_accepts_the_train_flags_it_passes_on():
    flags = accepted_flags(load_script(os.path.join(REPO, 'reproduce.py')))
    assert {'--seeds', '--dry-run', '--epochs', '--amp'} <= flags


@pytest.mark.parametrize('tool', TOOLS)
def test_help_groups_every_flag_and_explains_it(tool):
    """--help reads like a manual page: every flag in a named group (not the catch-all
    "options"), with a line of help."""
    parser = load_script(os.path.join(REPO, tool)).build_parser()
    ungrouped = [action.option_strings for action in parser._optionals._group_actions
                 if action.option_strings != ['-h', '--help']]
    unexplained = [action.option_strings or action.dest for action in parser._actions
                   if not action.help]
    assert ungrouped == [] and unexplained == []


@pytest.mark.parametrize('benchmark', BENCHMARKS)
def test_every_benchmark_explains_its_flags(benchmark):
    parser = load_script(os.path.join(REPO, benchmark)).build_parser()
    assert [action.dest for action in parser._actions if not action.help] == []
