"""Time to index a folder of small synthetic images with search.py's gallery index on CPU (from
scratch, unchanged, a few files changed) and to run one query against it with search.py (end to
end, and the query's own embedding and ranking)."""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from gallery_index import update_index  # noqa: E402
from inference import CHECKPOINT_FORMAT, ReIDModel, image_files, rank_gallery  # noqa: E402
from model import build_model  # noqa: E402
from tools.synthetic_data import image_rng, render_person  # noqa: E402

IMAGES_PER_FOLDER = 500
OLD = time.time() - 3600  # the folder's files predate the index (no file is re-read as racy)


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--images', type=int, default=10000, help='gallery images to generate')
    parser.add_argument('--size', type=int, nargs=2, default=(32, 64), metavar=('W', 'H'),
                        help='pixel size of the generated files')
    parser.add_argument('--arch', default='resnet18', help='trunk of the random-weight DEEN')
    parser.add_argument('--img_h', type=int, default=64, help='network input height')
    parser.add_argument('--img_w', type=int, default=32, help='network input width')
    parser.add_argument('--workers', type=int, default=2, help='data-loading processes')
    parser.add_argument('--test-batch', type=int, default=64, help='images per forward pass')
    parser.add_argument('--threads', type=int, default=2, help='PyTorch CPU threads')
    parser.add_argument('--changed', type=int, default=10, help='files rewritten before the '
                        'refresh')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def write_gallery(folder, count, size):
    """count synthetic people (10 images per identity, random cameras, visible) as JPEGs in
    sub-folders of IMAGES_PER_FOLDER, dated an hour ago."""
    paths = []
    for index in range(count):
        pid, camera = index // 10, 1 + index % 9
        path = os.path.join(folder, f'part{index // IMAGES_PER_FOLDER:03d}', f'{index:06d}.jpg')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        render_person(pid, camera, 'visible', index, image_rng(1, pid, camera, 'visible', index),
                      size).save(path, quality=92)
        os.utime(path, (OLD, OLD))
        paths.append(path)
    return paths


def write_checkpoint(path, args):
    """A random-weight DEEN in our checkpoint format (only speed is measured)."""
    torch.manual_seed(0)
    model = build_model('deen', 4, 'llcm', arch=args.arch)
    torch.save({'format': CHECKPOINT_FORMAT, 'dataset': 'llcm', 'method': 'deen',
                'arch': args.arch, 'num_classes': 4, 'img_h': args.img_h, 'img_w': args.img_w,
                'epoch': 0, 'model': model.state_dict()}, path)


def timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        gallery, checkpoint = os.path.join(scratch, 'gallery'), os.path.join(scratch, 'deen.pth')
        seconds, paths = timed(lambda: write_gallery(gallery, args.images, tuple(args.size)))
        print(f'generated {len(paths)} JPEGs of {args.size[0]}x{args.size[1]} in {seconds:.0f} s')
        write_checkpoint(checkpoint, args)
        model = ReIDModel.load(checkpoint, device='cpu', batch_size=args.test_batch,
                               workers=args.workers)
        index_dir = os.path.join(gallery, '.deen-index')

        def index():
            return update_index(model, checkpoint, gallery, image_files(gallery), 'visible',
                                index_dir, progress=True)

        rows = []
        for label in ('index from scratch', 'unchanged folder', f'{args.changed} files changed'):
            if label.endswith('changed'):
                for path in paths[:args.changed]:
                    render_person(1, 1, 'visible', 0, image_rng(2, 1, 1, 'visible', 0),
                                  tuple(args.size)).save(path)
                    os.utime(path, (OLD + 60, OLD + 60))
            seconds, result = timed(index)
            rows.append((label, seconds, result.extracted, result.reused))

        query = os.path.join(scratch, 'query.jpg')
        render_person(3, 2, 'infrared', 0, image_rng(3, 3, 2, 'infrared', 0),
                      tuple(args.size)).save(query)
        gallery_features = index().features

        def rank_one_query():
            return rank_gallery(model.embed([query], 'infrared'), gallery_features, topk=10)

        rank_one_query()  # warm-up
        query_seconds, _ = timed(rank_one_query)
        command = [sys.executable, os.path.join(REPO, 'search.py'), '--resume', checkpoint,
                   '--query', query, '--query-modality', 'infrared', '--gallery', gallery,
                   '--out', os.path.join(scratch, 'out'), '--device', 'cpu', '--workers',
                   str(args.workers)]
        environment = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        search_seconds, finished = timed(lambda: subprocess.run(
            command, check=True, capture_output=True, text=True, env=environment))
        extracted = re.search(r'\((\d+) extracted', finished.stdout).group(1)
        index_mb = sum(os.path.getsize(os.path.join(index_dir, n)) for n in os.listdir(index_dir))

    print(f'\nDEEN {args.arch} (random weights) at {args.img_h}x{args.img_w}, CPU, '
          f'{args.threads} PyTorch threads, {args.workers} loader workers, batch '
          f'{args.test_batch}; index file {index_mb / 2**20:.0f} MiB')
    print(f'{"":<24}{"seconds":>9}{"images/s":>10}{"decoded":>9}{"reused":>8}')
    for label, seconds, decoded, reused in rows:
        print(f'{label:<24}{seconds:>9.1f}{decoded / seconds:>10.0f}{decoded:>9}{reused:>8}')
    print(f'one query (embed + rank against {args.images}): {1000 * query_seconds:.0f} ms')
    print(f'search.py end to end, one query, indexed folder: {search_seconds:.1f} s '
          f'(process start, model and index load, query, JSON, PNG; {extracted} gallery images '
          f'extracted)')


if __name__ == '__main__':
    main()
