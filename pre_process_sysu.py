"""Build the SYSU-MM01 training cache in the dataset folder: every training image (train + val
ids) resized to 144x384 as uint8 arrays, labels relabelled 0..N-1."""
import sys

from checks import check_cache_build, check_data_folder, check_integer
from data_loader import load_or_build_cache
from data_manager import MODALITIES, train_image_lists
from utils import manual_parser, run_main


def build_parser():
    """pre_process_sysu.py's flags (its --help; docs/datasets.md)."""
    parser = manual_parser(__doc__)
    data = parser.add_argument_group('data')
    data.add_argument('--data-path', default='data/SYSU-MM01', help='SYSU-MM01 root folder')
    data.add_argument('--img_h', type=int, default=384, help='cached image height')
    data.add_argument('--img_w', type=int, default=144, help='cached image width')
    output = parser.add_argument_group('output and runtime')
    output.add_argument('--cache-dir', help='where to write the .npy files (default: --data-path)')
    output.add_argument('--workers', type=int, default=4, help='image-decoding processes')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.cache_dir = args.cache_dir or args.data_path
    for dest in ('img_h', 'img_w'):
        check_integer(getattr(args, dest), dest, 1)
    check_integer(args.workers, 'workers', 0)
    check_data_folder(args.data_path, 'sysu')
    lists = train_image_lists('sysu', args.data_path)
    size = (args.img_w, args.img_h)
    check_cache_build([lists[m] for m in MODALITIES], args.cache_dir, size)
    for modality in MODALITIES:
        images, labels = load_or_build_cache(lists[modality], args.cache_dir, size, args.workers)
        print(f'{modality}: {len(labels)} images of {len(set(labels.tolist()))} identities, '
              f'array {images.shape}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
