"""ONNX Runtime against PyTorch on CPU: images per second of the exported graph and of the
PyTorch network computing the same features (flip test-time augmentation included in both), for a
random-weight DEEN (ResNet-50, 384x144 by default) exported with export.py's code."""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import build_model  # noqa: E402
from onnx_export import (export_onnx, onnx_features, onnx_session, require_onnx,  # noqa: E402
                         torch_features)


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--method', default='deen', choices=('deen', 'agw'),
                        help='network (DEEN or AGW)')
    parser.add_argument('--arch', default='resnet50', help='ResNet trunk')
    parser.add_argument('--img_h', type=int, default=384, help='input height')
    parser.add_argument('--img_w', type=int, default=144, help='input width')
    parser.add_argument('--batch', type=int, default=8, help='images per call')
    parser.add_argument('--repeats', type=int, default=3, help='timed calls of each (median)')
    parser.add_argument('--threads', type=int, default=2, help='CPU threads of both runtimes')
    parser.add_argument('--fp16', action='store_true', help='time a float16 graph')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def median_seconds(function, repeats):
    """Median wall time of `repeats` calls after one warm-up call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    require_onnx()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.method, 713, 'llcm', arch=args.arch).eval()
    info = {'method': args.method, 'arch': args.arch, 'img_h': args.img_h, 'img_w': args.img_w}
    modalities = ('infrared',)
    images = [torch.randn(args.batch, 3, args.img_h, args.img_w)]
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, 'model.onnx')
        start = time.perf_counter()
        export_onnx(model, info, modalities, path, fp16=args.fp16)
        export_seconds = time.perf_counter() - start
        session = onnx_session(path, threads=args.threads)
        difference = np.abs(onnx_features(session, modalities, images)[0]
                            - torch_features(model, modalities, images)[0]).max()
        seconds = {
            'PyTorch (eager, fp32)': median_seconds(
                lambda: torch_features(model, modalities, images), args.repeats),
            f'ONNX Runtime ({"fp16" if args.fp16 else "fp32"})': median_seconds(
                lambda: onnx_features(session, modalities, images), args.repeats),
        }
    print(f'{args.method.upper()} {args.arch} at {args.img_h}x{args.img_w}, random weights, batch '
          f'{args.batch} (+ its flips), {args.threads} CPU threads each, median of '
          f'{args.repeats} calls after a warm-up; onnxruntime {onnx_version()}, torch '
          f'{torch.__version__}')
    print(f'export {export_seconds:.0f} s; max |ONNX - PyTorch| {difference:.1e}')
    for name, value in seconds.items():
        print(f'  {name:<24}{args.batch / value:8.2f} images/s  ({value:.2f} s per call)')


def onnx_version():
    import onnxruntime
    return onnxruntime.__version__


if __name__ == '__main__':
    main()
