"""Helpers for tests that run train.py and test.py on the synthetic folders: the tiny CPU
configuration, in-process and subprocess launches, and reading losses back from the log."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough for a CPU: ResNet-18 trunk (checkpoints of 99 MB instead of 330 MB), 64x32
# input, 2 ids x 2 images per modality, no pretrained weights. A run that needs the released
# ResNet-50 passes '--arch', 'resnet50' among its extra arguments (the last value wins).
TINY = ['--arch', 'resnet18', '--pretrained', 'none', '--img_h', '64', '--img_w', '32',
        '--batch-size', '2', '--num_pos', '2', '--workers', '0', '--test-batch', '32',
        '--device', 'cpu']


def train_argv(dataset, data_path, out_dir, *extra):
    """Arguments of a tiny training run writing checkpoints, logs and cache under out_dir."""
    return ['--dataset', dataset, '--data-path', str(data_path), '--model_path',
            os.path.join(out_dir, 'models'), '--log_path', os.path.join(out_dir, 'logs'),
            '--cache-dir', os.path.join(out_dir, 'cache'), *TINY, *map(str, extra)]


def run_script(script, argv, env=None, **kwargs):
    """Run a top-level script in a fresh interpreter; returns the CompletedProcess."""
    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, argv)],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=600, **kwargs)


def epoch_losses(log_file):
    """{epoch: mean total loss} from a train.py log (the last line of an epoch wins)."""
    with open(log_file) as handle:
        found = re.findall(r' epoch (\d+) lr \S+ loss ([-\d.naif]+)', handle.read())
    return {int(epoch): float(loss) for epoch, loss in found}
