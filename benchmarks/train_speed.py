"""Images per second of DEEN training and of test feature extraction for fp32 / bf16 / fp16,
channels-last on and off, and 1 vs N DDP processes; CUDA when available, CPU otherwise."""
import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from loss import build_criterion  # noqa: E402
from model import build_model  # noqa: E402
from train_step import PhaseTimer, synchronize, synthetic_batch, train_step  # noqa: E402

DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def make_autocast(device, precision):
    dtype = DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def training_images_per_second(model, device, precision, channels_last, shape, steps, warmup):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train()
    criterion = build_criterion('deen')
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9, nesterov=True)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == 'fp16')
    autocast = make_autocast(device, precision)
    batch = synthetic_batch(shape, device, memory_format)
    for _ in range(warmup):
        train_step(model, criterion, optimizer, batch, autocast, scaler, PhaseTimer(device))
    timer = PhaseTimer(device)
    for _ in range(steps):
        train_step(model, criterion, optimizer, batch, autocast, scaler, timer)
    return len(batch[2]) * steps / sum(timer.seconds.values())


def extraction_images_per_second(model, device, precision, channels_last, shape, batch, repeats):
    """Test-time extraction as test.py does it: each image with its flip, one modality."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).eval()
    images = torch.randn(batch, 3, shape[2], shape[3], device=device).to(memory_format=memory_format)
    autocast = make_autocast(device, precision)
    with torch.inference_mode():
        for iteration in range(repeats + 1):
            if iteration == 1:  # the first pass is warm-up
                synchronize(device)
                start = time.perf_counter()
            with autocast():
                model(infrared=torch.cat([images, images.flip(3)]))
    synchronize(device)
    return batch * repeats / (time.perf_counter() - start)


def ddp_worker(rank, world_size, port, args, results):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    cuda = torch.cuda.is_available() and args.device != 'cpu'
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group('nccl' if cuda else 'gloo', rank=rank, world_size=world_size)
    device = torch.device('cuda', rank) if cuda else torch.device('cpu')
    model = build_model('deen', 395, 'sysu').to(device)
    ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    rate = training_images_per_second(ddp, device, args.ddp_precision, args.channels_last_ddp,
                                      shape_of(args), args.steps, args.warmup)
    results[rank] = rate
    dist.destroy_process_group()


def shape_of(args):
    return (args.ids, args.per_id, args.img_h, args.img_w)


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--device', default='auto', help='auto, cpu or cuda')
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16', 'fp16'],
                        choices=list(DTYPES), help='precisions to time')
    parser.add_argument('--ids', type=int, default=6, help='identities per step (released 6)')
    parser.add_argument('--per-id', type=int, default=4, help='images per id and modality (released 4)')
    parser.add_argument('--img_h', type=int, default=384, help='input height')
    parser.add_argument('--img_w', type=int, default=144, help='input width')
    parser.add_argument('--test-batch', type=int, default=64, help='test images per forward pass')
    parser.add_argument('--steps', type=int, default=10, help='timed steps')
    parser.add_argument('--warmup', type=int, default=3, help='untimed warm-up steps')
    parser.add_argument('--processes', type=int, nargs='+', default=[1, 2], help='DDP process counts')
    parser.add_argument('--ddp-precision', default='fp32', choices=list(DTYPES),
                        help='precision of the 1-vs-N process comparison')
    parser.add_argument('--channels-last-ddp', action='store_true',
                        help='channels-last in the 1-vs-N process comparison')
    return parser


def main():
    args = build_parser().parse_args()
    device = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available()
                          else 'cpu' if args.device == 'auto' else args.device)
    where = torch.cuda.get_device_name(device) if device.type == 'cuda' else \
        f'CPU, {torch.get_num_threads()} threads'
    print(f'DEEN (395 ids) on {where}, torch {torch.__version__}; training batch '
          f'{args.ids}x{args.per_id}x2 of {args.img_h}x{args.img_w}; extraction batch {args.test_batch} + flips')
    print(f'{"precision":>9} {"channels":>9} {"train img/s":>12} {"extract img/s":>14}')
    baseline = None
    for precision in args.precisions:
        for channels_last in (False, True):
            torch.manual_seed(0)
            model = build_model('deen', 395, 'sysu').to(device)
            train_rate = training_images_per_second(model, device, precision, channels_last,
                                                    shape_of(args), args.steps, args.warmup)
            extract_rate = extraction_images_per_second(model, device, precision, channels_last,
                                                        shape_of(args), args.test_batch, args.steps)
            baseline = baseline or (train_rate, extract_rate)
            layout = 'last' if channels_last else 'first'
            print(f'{precision:>9} {layout:>9} {train_rate:>12.1f} {extract_rate:>14.1f}   '
                  f'(x{train_rate / baseline[0]:.2f} train, x{extract_rate / baseline[1]:.2f} extract vs fp32)')
    for world_size in args.processes:
        if device.type == 'cuda' and world_size > torch.cuda.device_count():
            print(f'{world_size} processes: skipped, {torch.cuda.device_count()} GPU(s)')
            continue
        results = mp.Manager().dict()
        port = 29500 + os.getpid() % 1000 + world_size
        mp.spawn(ddp_worker, args=(world_size, port, args, results), nprocs=world_size)
        total = sum(results.values())
        print(f'DDP {world_size} process(es), {args.ddp_precision}: {total:.1f} training img/s in all '
              f'({total / world_size:.1f} per process)')


if __name__ == '__main__':
    main()
