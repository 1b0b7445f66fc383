"""Cost of the up-front check that every training image of a cache to build decodes
(checks.check_images_decode) on an LLCM-sized synthetic folder, against the cache build's own
per-image work (decode and resize to 384x144) on the same images, one process each."""
import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from checks import check_images_decode  # noqa: E402
from data_loader import read_image  # noqa: E402
from data_manager import train_image_lists  # noqa: E402
from tools.synthetic_data import add_llcm_sized_args, llcm_sized_folder  # noqa: E402


def seconds(work):
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_llcm_sized_args(parser)
    parser.add_argument('--width', type=int, default=64, help='generated image width')
    parser.add_argument('--height', type=int, default=128, help='generated image height')
    return parser


def main():
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_path = llcm_sized_folder(args, scratch, (args.width, args.height))
        lists = list(train_image_lists('llcm', data_path).values())
        count = sum(len(image_list) for image_list in lists)
        check = seconds(lambda: check_images_decode(lists, 'training'))
        build = seconds(lambda: [read_image(path, (144, 384))
                                 for image_list in lists for path in image_list.paths])
        print(f'{count} training images of {args.width}x{args.height}, one process')
        print(f'up-front decode check: {check:.1f} s ({1e6 * check / count:.0f} us per image)')
        print(f'cache build decode + resize to 384x144: {build:.1f} s '
              f'({1e6 * build / count:.0f} us per image); '
              f'the check costs {check / build:.0%} of it')


if __name__ == '__main__':
    main()
