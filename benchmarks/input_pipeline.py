"""Throughput of the training input pipeline alone (cache -> augmentation -> batches), in images
per second, for several worker counts; no network. Compare with a GPU's training images/s."""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_loader import CrossModalTrainSet, training_views  # noqa: E402
from utils import IdentitySampler  # noqa: E402


def synthetic_cache(folder, count, height, width, num_ids, seed):
    """A memory-mapped uint8 cache like the real one, with random content and labels."""
    rng = np.random.default_rng(seed)
    path = os.path.join(folder, f'images{seed}.npy')
    images = np.lib.format.open_memmap(path, mode='w+', dtype=np.uint8, shape=(count, height, width, 3))
    images[:] = rng.integers(0, 256, size=images.shape, dtype=np.uint8)
    images.flush()
    return np.load(path, mmap_mode='r'), np.arange(count) % num_ids


def images_per_second(dataset, sampler, batch, workers, seconds):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler,
                                         num_workers=workers, persistent_workers=workers > 0)
    iterator, images = iter(loader), 0
    next(iterator)  # start-up of the workers is not throughput
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            visible, infrared, _, _ = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            continue
        images += len(visible) + len(infrared)
    return images / (time.perf_counter() - start)


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--images', type=int, default=2000, help='images per modality')
    parser.add_argument('--img_h', type=int, default=384, help='input height')
    parser.add_argument('--img_w', type=int, default=144, help='input width')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2],
                        help='data-loading processes to compare')
    parser.add_argument('--seconds', type=float, default=10.0,
                        help='seconds each worker count runs')
    return parser


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        caches = [synthetic_cache(folder, args.images, args.img_h, args.img_w, 100, s) for s in (0, 1)]
        dataset = CrossModalTrainSet(*caches, training_views(args.img_h, args.img_w))
        sampler = IdentitySampler(caches[0][1], caches[1][1], num_ids=6, num_pos=4)
        print(f'input pipeline, {args.img_h}x{args.img_w}, batch 6x4x2, {os.cpu_count()} CPU cores')
        print(f'{"workers":>8} {"images/s":>10} {"per worker":>11}')
        for workers in args.workers:
            rate = images_per_second(dataset, sampler, 24, workers, args.seconds)
            print(f'{workers:>8} {rate:>10.0f} {rate / max(workers, 1):>11.0f}')


if __name__ == '__main__':
    main()
