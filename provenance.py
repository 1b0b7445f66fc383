"""Where a result came from: the command line, the code version (git commit and whether tracked
files were modified), PyTorch / torchvision / CUDA / cuDNN versions, GPUs, processes, precision
and seed; recorded in every checkpoint and results file and printed under test.py's tables."""
import os
import platform
import shlex
import subprocess
import sys
import time

import torch
import torchvision

from utils import __version__

REPO = os.path.dirname(os.path.abspath(__file__))
PRECISIONS = {'off': 'fp32', 'bf16': 'bf16 autocast', 'fp16': 'fp16 autocast'}


def run_provenance(args, ctx, device):
    """How this process runs: a JSON-able, weights-only-loadable dict. args gives amp,
    deterministic and (training) seed; ctx the process count; device the GPU used."""
    cuda = device.type == 'cuda'
    return {
        'command': shlex.join(sys.argv),
        'code': code_version(),
        'python': platform.python_version(),
        'torch': str(torch.__version__),  # a str subclass that weights-only loading refuses
        'torchvision': str(torchvision.__version__),
        'cuda': torch.version.cuda and str(torch.version.cuda),
        'cudnn': torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        'device': str(device),
        'gpu_model': str(torch.cuda.get_device_name(device)) if cuda else None,
        'gpus': ctx.world_size if cuda else 0,
        'processes': ctx.world_size,
        'precision': PRECISIONS[args.amp],
        'deterministic': bool(getattr(args, 'deterministic', False)),
        'seed': getattr(args, 'seed', None),
        'time': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
    }


def code_version(repo=REPO):
    """{'version', 'git_commit', 'git_modified'}: the package version, and when the code runs from
    a git checkout its HEAD commit and whether tracked files differ from it (None otherwise)."""
    found = {'version': __version__, 'git_commit': None, 'git_modified': None}
    commit = _git(repo, 'rev-parse', 'HEAD')
    if commit:
        status = _git(repo, 'status', '--porcelain', '--untracked-files=no')
        found.update(git_commit=commit, git_modified=None if status is None else bool(status))
    return found


def _git(repo, *command):
    """Stripped stdout of a git command in repo; None when git is missing or the command fails."""
    try:
        result = subprocess.run(['git', '-C', repo, *command], capture_output=True, text=True,
                                timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def describe_code(code):
    """'1.0.0, git 1294e56 (modified)' / '1.0.0, not a git checkout'."""
    if not code or not code.get('git_commit'):
        return f'{(code or {}).get("version", "?")}, not a git checkout'
    state = {True: ' (modified)', False: '', None: ' (state unknown)'}[code.get('git_modified')]
    return f'{code["version"]}, git {code["git_commit"][:10]}{state}'


def describe_environment(record):
    """One line: libraries, GPUs, processes, precision, seed of a run_provenance() dict."""
    gpus = (f'{record["gpus"]}x {record["gpu_model"]}' if record.get('gpus') else
            f'no GPU ({record.get("device")})')
    cudnn = record.get('cudnn') or 'none'
    seed = '' if record.get('seed') is None else f', seed {record["seed"]}'
    return (f'torch {record["torch"]}, torchvision {record["torchvision"]}, CUDA '
            f'{record.get("cuda") or "none"}, cuDNN {cudnn}; {gpus}; {record["processes"]} '
            f'process(es), {record["precision"]}{seed}')


def format_provenance(record, trained=()):
    """Lines for a results record's provenance (how the test ran) and, per checkpoint in
    `trained` ((path, provenance or None)), how it was trained."""
    lines = [f'tested by: {record["command"]}',
             f'  code {describe_code(record["code"])}; {describe_environment(record)}']
    for path, made in trained:
        if made is None:
            lines.append(f'checkpoint {path}: no provenance recorded (released or older)')
            continue
        lines += [f'checkpoint {path} trained by: {made["command"]}',
                  f'  code {describe_code(made["code"])}; {describe_environment(made)}']
    return '\n'.join(lines)
