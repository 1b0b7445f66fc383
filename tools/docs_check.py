"""Checks that keep the docs (README.md, docs/*.md) true to the code: every command in a code
block invokes a script that exists with flags its argparse parser accepts, every relative link
and image resolves. Used by tests/test_docs.py; the parsers come from each script's build_parser()."""
import importlib.util
import pathlib
import re
import shlex
import sys

FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```', re.S | re.M)
COMMAND_LANGUAGES = ('', 'bash', 'sh', 'shell', 'console')  # blocks whose lines may be commands
INLINE_COMMAND = re.compile(r'`((?:python3?|\.venv/bin/python|torchrun) (?:[^`]+\.py|-m benchmarks\.)[^`]*)`')
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
SEPARATORS = ('&&', '||', ';', '|')
PYTHONS = ('python', 'python3')


def code_blocks(text):
    """[(language, body)] of the fenced code blocks of a markdown text."""
    return [(match.group(1).strip(), match.group(2)) for match in FENCE.finditer(text)]


def section(text, heading):
    """The text under a markdown heading line (e.g. '## Python API'), up to the next heading of
    the same or a higher level."""
    level = heading.split(' ', 1)[0]
    body = text.split(f'\n{heading}\n', 1)[1]
    return re.split(rf'\n#{{1,{len(level)}}} ', body, maxsplit=1)[0]


def commands(text):
    """The shell command lines of a markdown text: each logical line (backslash continuations
    joined, a leading '$ ' prompt dropped) of its bash/sh/console and plain code blocks, and the
    inline code spans that run one of our scripts."""
    found = []
    for language, body in code_blocks(text):
        if language in COMMAND_LANGUAGES:
            joined = re.sub(r'\\\n\s*', ' ', body)
            found += [line.strip().removeprefix('$ ') for line in joined.splitlines() if line.strip()]
    return found + INLINE_COMMAND.findall(text)


def is_python(token):
    return pathlib.PurePosixPath(token).name in PYTHONS


def script_invocations(command):
    """[(script path, its arguments)] for each run of one of our scripts in a command line:
    `python x.py ...`, `python -m benchmarks.x ...` and `torchrun [its own flags] x.py ...`
    (torchrun's flags are not the script's). Lines that are not shell (prose, tables) give []."""
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return []
    segments, current = [], []
    for token in tokens:
        if token in SEPARATORS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    return [run for segment in segments for run in [segment_invocation(segment)] if run]


def segment_invocation(tokens):
    """(script, arguments) of one simple command, or None when it runs none of our scripts."""
    for index, token in enumerate(tokens):
        if is_python(token):
            rest = tokens[index + 1:]
            if rest[:1] == ['-m'] and len(rest) > 1:
                module = rest[1]
                return (module.replace('.', '/') + '.py', rest[2:]) if '.' in module else None
            return (rest[0], rest[1:]) if rest and rest[0].endswith('.py') else None
        if pathlib.PurePosixPath(token).name == 'torchrun':
            scripts = [i for i, t in enumerate(tokens) if t.endswith('.py')]
            return (tokens[scripts[0]], tokens[scripts[0] + 1:]) if scripts else None
    return None


def flags_used(arguments):
    """The option strings in a script's arguments ('--lr=0.1' -> '--lr'; negative numbers are
    values, not flags)."""
    return [arg.split('=', 1)[0] for arg in arguments
            if arg.startswith('-') and not re.match(r'-\d', arg) and arg != '-']


def load_script(path):
    """Import a script or benchmark by its file path, with its folder first on sys.path as when
    it runs (without running it: each guards its main)."""
    name = 'docs_checked_' + re.sub(r'\W', '_', str(path))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(pathlib.Path(path).parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.pop(0)
    return module


def accepted_flags(module):
    """Every option string of a script: its build_parser()'s, and those of the parsers whose
    flags it passes on (EXTRA_PARSERS, e.g. reproduce.py passes train.py's)."""
    parsers = [module.build_parser()] + [build() for build in getattr(module, 'EXTRA_PARSERS', ())]
    return {option for parser in parsers for option in parser._option_string_actions}


def command_problems(text, repo, where='', load=load_script):
    """One sentence per script that does not exist or flag that its script does not accept, for
    every command of a markdown text (paths relative to the repository root `repo`)."""
    problems, flags_of = [], {}
    for command in commands(text):
        for script, arguments in script_invocations(command):
            path = pathlib.Path(repo) / script
            if not path.is_file():
                problems.append(f'{where}: {script} does not exist (in: {command})')
                continue
            if script not in flags_of:
                flags_of[script] = accepted_flags(load(path))
            problems += [f'{where}: {flag} is not a flag of {script} (in: {command})'
                         for flag in flags_used(arguments) if flag not in flags_of[script]]
    return problems


def link_problems(text, folder, where=''):
    """One sentence per relative link or image path of a markdown text that does not resolve
    from `folder` (the file's own folder); anchors are not checked."""
    problems = []
    for target in LINK.findall(text):
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue
        path = target.split('#', 1)[0]
        if not (pathlib.Path(folder) / path).exists():
            problems.append(f'{where}: link {target} does not resolve')
    return problems
