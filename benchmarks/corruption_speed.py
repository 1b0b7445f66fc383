"""Time to corrupt test images (corruption.py, test.py --corrupt): each corruption at every
severity on CIL's 144x288 images, then CIL's mixed set over the visible test images of a dataset
folder (the demo by default), with an estimate for LLCM's 8,680 visible test images; one process,
no network, no cache; CPU time of the process (steady on a busy machine)."""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import corruption  # noqa: E402
from data_manager import DEFAULT_DATA_PATHS, query_gallery  # noqa: E402
from tools.synthetic_data import make_demo_dataset  # noqa: E402

LLCM_VISIBLE_TEST_IMAGES = 8680


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-path', default=DEFAULT_DATA_PATHS['demo'],
                        help='an LLCM-layout folder (made as the demo when missing)')
    parser.add_argument('--images', type=int, default=4,
                        help='images per corruption and severity in the per-corruption timing')
    parser.add_argument('--seed', type=int, default=0, help='the corruption seed')
    return parser


def per_corruption(images, seed):
    """{corruption: mean seconds per image over every severity and image}."""
    seconds = {}
    for name in corruption.CORRUPTIONS:
        start, count = time.process_time(), 0
        for severity in corruption.SEVERITIES:
            for number, image in enumerate(images):
                corruption.corrupt_array(image, name, severity,
                                         np.random.SeedSequence([seed, number, severity]))
                count += 1
        seconds[name] = (time.process_time() - start) / count
    return seconds


def main():
    args = build_parser().parse_args()
    if not os.path.isdir(args.data_path):
        make_demo_dataset(args.data_path)
    corruption.check_library()
    visible = query_gallery('llcm', 'vis_to_ir', args.data_path, 0)[0]
    images = [np.asarray(corruption.Image.open(path).convert('RGB').resize(
        corruption.CIL_SIZE, corruption.Image.Resampling.LANCZOS))
        for path in visible.paths[:args.images]]
    corruption.library()  # loaded once, outside the timings
    print(f'corruption of 144x288 images, CPU time of one process ({os.cpu_count()} CPU cores)')
    seconds = per_corruption(images, args.seed)
    for name, value in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f'  {name:<18} {1000 * value:8.1f} ms per image')
    expected = float(np.mean(list(seconds.values())))
    print(f'  mean over the 20 (the mixed set\'s expected cost): {1000 * expected:.1f} ms per '
          f'image')
    plan = corruption.Plan(corruption.Setting(None, None, args.seed, 'visible', None))
    start = time.process_time()
    corruptor = plan.corruptor([visible])
    keyed = time.process_time() - start
    start = time.process_time()
    for path in visible.paths:
        corruptor.image(path)
    made = time.process_time() - start
    print(f'mixed set of {args.data_path}: {len(visible)} visible test images, keys and draws '
          f'{keyed:.2f} s, decoding and corrupting {made:.1f} s ({1000 * made / len(visible):.0f} '
          f'ms per image)')
    print(f'LLCM estimate ({LLCM_VISIBLE_TEST_IMAGES} visible test images): '
          f'{LLCM_VISIBLE_TEST_IMAGES * made / len(visible) / 60:.1f} min in one process at this '
          f'rate; the grid (every cell once): '
          f'{LLCM_VISIBLE_TEST_IMAGES * expected * 100 / 3600:.1f} h')


if __name__ == '__main__':
    main()
