"""Build the SYSU-MM01 training cache in the dataset folder: every training image (train + val
ids) resized to 144x384 as uint8 arrays, labels relabelled 0..N-1."""
import argparse
import sys

from data_loader import load_or_build_cache
from data_manager import MODALITIES, train_image_lists
from utils import run_main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--data-path', default='data/SYSU-MM01', help='SYSU-MM01 root folder')
    parser.add_argument('--cache-dir', help='where to write the .npy files (default: --data-path)')
    parser.add_argument('--img_h', type=int, default=384)
    parser.add_argument('--img_w', type=int, default=144)
    parser.add_argument('--workers', type=int, default=4)
    args = parser.parse_args(argv)
    lists = train_image_lists('sysu', args.data_path)
    for modality in MODALITIES:
        images, labels = load_or_build_cache(lists[modality], args.cache_dir or args.data_path,
                                             (args.img_w, args.img_h), args.workers)
        print(f'{modality}: {len(labels)} images of {len(set(labels.tolist()))} identities, '
              f'array {images.shape}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
