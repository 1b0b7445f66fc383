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


def seeded_checkpoint(path, dataset, num_classes, method='deen', seed=0, img_h=64, img_w=32,
                      random_batchnorm=False):
    """Write a checkpoint in our format of an untrained, seeded ResNet-18 model (no training run);
    returns the model in eval mode. random_batchnorm: see randomise_batchnorm."""
    import torch
    from inference import CHECKPOINT_FORMAT
    from model import build_model
    torch.manual_seed(seed)
    model = build_model(method, num_classes, dataset, arch='resnet18')
    if random_batchnorm:
        randomise_batchnorm(model, seed)
    torch.save({'format': CHECKPOINT_FORMAT, 'dataset': dataset, 'method': method,
                'arch': 'resnet18', 'num_classes': num_classes, 'img_h': img_h, 'img_w': img_w,
                'model': model.state_dict(), 'epoch': 0}, path)
    return model.eval()


def randomise_batchnorm(model, seed=0):
    """Random statistics and affines for every BatchNorm, the zero-initialised ones closing the
    residual and attention branches included, so that no block is the identity in eval mode."""
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.weight.copy_(torch.empty(shape).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
                module.running_var.copy_(torch.empty(shape).uniform_(0.5, 1.5, generator=generator))
    return model


def at_criterion_call(monkeypatch, call, act):
    """Make train.py's criterion pass its `call`-th result (1-based) through act(loss, parts),
    which returns the (loss, parts) the training step gets."""
    import torch
    import training
    build = training.build_criterion

    def wrapped(*args, **kwargs):
        criterion, calls = build(*args, **kwargs), []
        if isinstance(criterion, torch.nn.Module):  # keeps its state and epoch hooks (DART)
            def hook(module, inputs, result):
                calls.append(1)
                return act(*result) if len(calls) == call else result
            criterion.register_forward_hook(hook)
            return criterion

        def compute(output, labels):
            calls.append(1)
            result = criterion(output, labels)
            return act(*result) if len(calls) == call else result
        return compute

    monkeypatch.setattr(training, 'build_criterion', wrapped)


def poison_loss_at(monkeypatch, call):
    """Make train.py's criterion return a NaN loss at its `call`-th call (1-based)."""
    at_criterion_call(monkeypatch, call, lambda loss, parts: (loss * float('nan'), parts))
