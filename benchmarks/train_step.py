"""Benchmark: seconds per training step (forward, all losses, backward, SGD step) of DEEN or AGW on a
synthetic batch at the released or a small shape, and the share of the step taken by the losses."""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loss import build_criterion  # noqa: E402
from model import build_model  # noqa: E402

# identities per batch, images per identity and modality, image height, width
SHAPES = {'released': (6, 4, 384, 144), 'small': (2, 2, 96, 48)}
CLASSES = {'sysu': 395, 'llcm': 713, 'regdb': 206}


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n  python benchmarks/train_step.py --shape small --steps 3\n'
               '  python benchmarks/train_step.py --device cuda --shape released --amp bf16 --channels-last')
    parser.add_argument('--device', default='auto', help='auto (cuda when available), cpu or cuda')
    parser.add_argument('--shape', choices=sorted(SHAPES), default='small',
                        help='batch shape: the released one or a small one')
    parser.add_argument('--steps', type=int, default=3, help='timed steps')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps first')
    parser.add_argument('--method', choices=['deen', 'agw'], default='deen',
                        help='network (DEEN or AGW)')
    parser.add_argument('--dataset', choices=sorted(CLASSES), default='sysu',
                        help='dataset whose class count the classifier has')
    parser.add_argument('--amp', choices=['off', 'bf16', 'fp16'], default='off',
                        help='mixed precision of the step')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def resolve_device(name):
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    return torch.device(name)


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def synthetic_batch(shape, device, memory_format):
    """Random images [P*K, 3, H, W] per modality and labels [visible; infrared] (P ids x K each)."""
    ids, per_id, height, width = shape
    labels = torch.arange(ids).repeat_interleave(per_id)
    visible, infrared = (torch.randn(ids * per_id, 3, height, width).to(device, memory_format=memory_format)
                         for _ in range(2))
    return visible, infrared, torch.cat([labels, labels]).to(device)


class PhaseTimer:
    """Wall-clock seconds per named phase, synchronising the device at each boundary."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        synchronize(device)
        self.last = time.perf_counter()

    def mark(self, phase):
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self.last
        self.last = now


def train_step(model, criterion, optimizer, batch, autocast, scaler, timer):
    visible, infrared, labels = batch
    with autocast():
        out = model(visible=visible, infrared=infrared)
        timer.mark('forward')
        loss, _ = criterion(out, labels)
        timer.mark('losses')
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    timer.mark('backward')
    scaler.step(optimizer)
    scaler.update()
    timer.mark('optimizer')
    return out


def time_losses_alone(criterion, out, labels, autocast, device, repeats=5):
    """Seconds of the criterion's forward + backward on (detached) model outputs."""
    fields = {name: (value.detach().requires_grad_() if torch.is_tensor(value) and value.is_floating_point()
                     else value) for name, value in out._asdict().items()}
    detached = type(out)(**fields)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        with autocast():
            loss, _ = criterion(detached, labels)
        loss.backward()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model(args.method, CLASSES[args.dataset], args.dataset).to(device)
    model.to(memory_format=memory_format).train()
    criterion = build_criterion(args.method)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(args.amp)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    batch = synthetic_batch(SHAPES[args.shape], device, memory_format)
    for _ in range(args.warmup):
        train_step(model, criterion, optimizer, batch, autocast, scaler, PhaseTimer(device))
    timer = PhaseTimer(device)
    for _ in range(args.steps):
        out = train_step(model, criterion, optimizer, batch, autocast, scaler, timer)
    per_step = {phase: seconds / args.steps for phase, seconds in timer.seconds.items()}
    step = sum(per_step.values())
    losses_alone = time_losses_alone(criterion, out, batch[2], autocast, device)

    ids, per_id, height, width = SHAPES[args.shape]
    where = (torch.cuda.get_device_name(device) if device.type == 'cuda'
             else f'cpu, {torch.get_num_threads()} threads')
    print(f'{args.method} ({args.dataset}, {CLASSES[args.dataset]} ids) on {where}; '
          f'torch {torch.__version__}; amp {args.amp}; channels_last {args.channels_last}')
    print(f'batch {args.shape}: {ids} ids x {per_id} images x 2 modalities = {2 * ids * per_id} '
          f'images of {height}x{width}; {args.steps} timed steps after {args.warmup} warm-up')
    print(f'step: {step:.4f} s/step  (' + ', '.join(f'{phase} {seconds:.4f}'
                                                    for phase, seconds in per_step.items()) + ')')
    print(f'losses: forward {per_step["losses"]:.4f} s = {100 * per_step["losses"] / step:.2f}% of the '
          f'step; forward + backward alone {losses_alone:.4f} s = {100 * losses_alone / step:.2f}%')
    if device.type == 'cuda':
        print(f'peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB')


if __name__ == '__main__':
    main()
