"""Cold and warm start-up of train.py on an LLCM-sized synthetic folder: seconds until the first
training step is done, without (cold: decode and cache every image) and with the cache (warm)."""
import argparse
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from data_manager import train_image_lists  # noqa: E402
from tools.synthetic_data import add_llcm_sized_args, llcm_sized_folder  # noqa: E402


def time_first_step(data_path, out, workers):
    """(wall seconds of `train.py` doing one step of one epoch (no evaluation), whether it built
    the cache, i.e. decoded training images)."""
    command = [sys.executable, os.path.join(REPO, 'train.py'), '--dataset', 'llcm', '--data-path',
               data_path, '--model_path', os.path.join(out, 'models'), '--log_path',
               os.path.join(out, 'logs'), '--cache-dir', os.path.join(out, 'cache'), '--pretrained',
               'none', '--img_h', '128', '--img_w', '64', '--epochs', '1', '--max-steps', '1',
               '--eval-every', '0', '--device', 'cpu', '--workers', str(workers)]
    start = time.perf_counter()
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return time.perf_counter() - start, 'caching visible images' in result.stderr


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    add_llcm_sized_args(parser)
    parser.add_argument('--workers', type=int, default=2, help='data-loading processes to compare')
    return parser


def main():
    args = build_parser().parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data_path = llcm_sized_folder(args, scratch, (64, 128))
        count = sum(len(images) for images in train_image_lists('llcm', data_path).values())
        cold, cold_decoded = time_first_step(data_path, scratch, args.workers)
        warm, warm_decoded = time_first_step(data_path, scratch, args.workers)
        print(f'{count} training images, 128x64, {args.workers} cache workers')
        print(f'cold start to first step done: {cold:.1f} s (decoded the images: {cold_decoded})')
        print(f'warm start to first step done: {warm:.1f} s (decoded the images: {warm_decoded})')


if __name__ == '__main__':
    main()
