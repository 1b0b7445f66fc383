"""What --compile costs and gains in test-time feature extraction: seconds of the first batch per
modality (torch.compile's compilation) and images per second afterwards, eager vs compiled, with
the largest difference between their features; CUDA when available, CPU otherwise."""
import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checks import compile_toolchain_missing  # noqa: E402
from inference import embed_batch, inference_model  # noqa: E402
from model import build_model  # noqa: E402
from train_step import synchronize  # noqa: E402


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def extraction(model, images, device, repeats):
    """({modality: features}, {modality: first-batch seconds}, images per second afterwards)."""
    features, first, steady = {}, {}, 0.0
    with torch.inference_mode():
        for modality in ('visible', 'infrared'):
            features[modality], first[modality] = timed(lambda: embed_batch(model, modality, images))
            synchronize(device)
            _, seconds = timed(lambda: [embed_batch(model, modality, images) for _ in range(repeats)]
                               + [synchronize(device)])
            steady += seconds
    return features, first, 2 * repeats * len(images) / steady


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--arch', default='resnet18', choices=('resnet18', 'resnet34', 'resnet50'),
                        help='ResNet trunk')
    parser.add_argument('--img_h', type=int, default=64, help='input height')
    parser.add_argument('--img_w', type=int, default=32, help='input width')
    parser.add_argument('--batch', type=int, default=8, help='test images per batch (each with its flip)')
    parser.add_argument('--repeats', type=int, default=5,
                        help='timed repetitions (the best or median is shown)')
    return parser


def main():
    args = build_parser().parse_args()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    missing = compile_toolchain_missing(device)
    if missing:
        sys.exit(f'torch.compile on {device.type} needs {missing}')
    torch.manual_seed(0)
    model = build_model('deen', 6, 'llcm', arch=args.arch).to(device).eval()
    images = torch.randn(args.batch, 3, args.img_h, args.img_w, device=device)
    print(f'DEEN {args.arch}, {args.batch} images of {args.img_h}x{args.img_w} (+ flips) per batch, '
          f'{device.type}, {torch.get_num_threads()} threads')
    eager, _, eager_speed = extraction(model, images, device, args.repeats)
    compiled_model = inference_model(model, SimpleNamespace(channels_last=False, compile=True))
    compiled, first, compiled_speed = extraction(compiled_model, images, device, args.repeats)
    difference = max((eager[m] - compiled[m]).abs().max().item() for m in eager)
    print(f'eager:    {eager_speed:.1f} images/s')
    print(f'compiled: {compiled_speed:.1f} images/s after compiling for '
          + ', '.join(f'{m} {s:.1f} s' for m, s in first.items()))
    print(f'largest feature difference: {difference:.2e}')


if __name__ == '__main__':
    main()
