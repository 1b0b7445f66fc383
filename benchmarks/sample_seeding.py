"""Cost of exact resume in the input pipeline: one training sample (two images augmented) drawn
from its own stream (torch's CPU generator forked, seeded, restored: CrossModalTrainSet) against
the same draws made on the process's generator, in microseconds per sample; one thread."""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data_loader import CrossModalTrainSet, training_views  # noqa: E402


def microseconds_per_sample(draw, count):
    start = time.perf_counter()
    for index in range(count):
        draw(index)
    return (time.perf_counter() - start) / count * 1e6


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--img_h', type=int, default=384, help='input height')
    parser.add_argument('--img_w', type=int, default=144, help='input width')
    parser.add_argument('--samples', type=int, default=300, help='samples per timing')
    parser.add_argument('--repeats', type=int, default=7,
                        help='timed repetitions (the best or median is shown)')
    return parser


def main():
    args = build_parser().parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(64, args.img_h, args.img_w, 3), dtype=np.uint8)
    labels = np.arange(64) % 8
    dataset = CrossModalTrainSet((images, labels), (images, labels),
                                 training_views(args.img_h, args.img_w))

    def seeded(index):
        return dataset[(index % 64, (index * 7) % 64, index)]

    def unseeded(index):  # the same draws, made on the process's generator, nothing restored
        torch.default_generator.manual_seed(index)
        visible, infrared = dataset.views
        return (dataset.augment(visible, index % 64), dataset.augment(infrared, (index * 7) % 64),
                int(labels[index % 64]), int(labels[(index * 7) % 64]))

    def stream_only(index):  # what the own stream adds, without the augmentation
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(index)

    timings = {'seeded': [], 'unseeded': [], 'stream': []}
    for _ in range(args.repeats):  # interleaved, so that all see the same machine load
        timings['seeded'].append(microseconds_per_sample(seeded, args.samples))
        timings['unseeded'].append(microseconds_per_sample(unseeded, args.samples))
        timings['stream'].append(microseconds_per_sample(stream_only, args.samples))
    with_seed, without, stream = (statistics.median(timings[k])
                                  for k in ('seeded', 'unseeded', 'stream'))
    print(f'training sample {args.img_h}x{args.img_w} (2 images), median of {args.repeats} x '
          f'{args.samples} samples, 1 thread')
    print(f'  draws on the process generator: {without:8.1f} us/sample')
    print(f'  its own stream (fork, restore): {with_seed:8.1f} us/sample '
          f'({with_seed - without:+.1f} us, {100 * (with_seed / without - 1):+.1f}%)')
    print(f'  fork + seed + restore alone:    {stream:8.1f} us/sample '
          f'({100 * stream / without:.1f}% of the augmentation)')


if __name__ == '__main__':
    main()
