"""test.py on RegDB against the work of the released DEEN test script, end to end: on a
RegDB-layout synthetic folder, ten splits, each tested in both directions with one checkpoint
(copied per split). Ours: one `test.py --trial all` run (each test image decoded once per split
and passed once with its flip through its own stem; the vectorised metrics), and the same with
--released-routing (each image also through the other stem). Released: its work, re-enacted with
our network (this repository has none of its code): one run per direction (its --tvsearch), and
per split its checkpoint loaded, its training set decoded into memory (its RegDBData does that at
test time), the query and gallery decoded and passed twice (image, then its flip), the fused
distances of both fusions ranked by the per-query loop (eval_metrics.reference_metrics, the
released evaluation). Each side runs in its own process; the wall times and their ratio are
printed."""
import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import numpy as np  # noqa: E402
import torch  # noqa: E402

SPLITS = range(1, 11)


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__, epilog='e.g. python '
                                     'benchmarks/regdb_test.py --ids 412 --device cuda (the real '
                                     'RegDB: 412 identities, 10 images per modality)')
    parser.add_argument('--ids', type=int, default=412, help='identities of the synthetic folder '
                        '(half train, half test in each split)')
    parser.add_argument('--images', type=int, default=10, help='images per identity and modality')
    parser.add_argument('--arch', default='resnet50', help='trunk of the seeded DEEN checkpoint')
    parser.add_argument('--img_h', type=int, default=384, help='test image height')
    parser.add_argument('--img_w', type=int, default=144, help='test image width')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--workers', type=int, default=2, help='data-loading processes (both)')
    parser.add_argument('--test-batch', type=int, default=64, help='images per batch (both)')
    parser.add_argument('--released-run', nargs=2, metavar=('FOLDER', 'CHECKPOINT'),
                        help=argparse.SUPPRESS)  # the released side, in its own process
    return parser


def write_checkpoint(path, args, num_classes):
    """A checkpoint in our format of a seeded, untrained DEEN for RegDB."""
    from inference import CHECKPOINT_FORMAT
    from model import build_model
    torch.manual_seed(0)
    model = build_model('deen', num_classes, 'regdb', arch=args.arch)
    torch.save({'format': CHECKPOINT_FORMAT, 'dataset': 'regdb', 'method': 'deen',
                'arch': args.arch, 'num_classes': num_classes, 'img_h': args.img_h,
                'img_w': args.img_w, 'model': model.state_dict(), 'epoch': 0}, path)


def timed(command):
    """(wall seconds, CPU seconds: user + system) of a command run to its end; the CPU time
    stands where other jobs share the machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def released_run(args, folder, checkpoint):
    """The released script's work: two runs (one per direction), each over the ten splits."""
    from data_loader import TestImageSet, read_image
    from data_manager import query_gallery, train_image_lists
    from eval_metrics import reference_metrics
    from inference import load_trained_model
    device = torch.device(args.device)
    for direction in ('vis_to_ir', 'ir_to_vis'):
        for split in SPLITS:
            model, _ = load_trained_model(checkpoint, 'regdb', device)
            for image_list in train_image_lists('regdb', folder, trial=split).values():
                np.stack([read_image(path, (args.img_w, args.img_h)) for path in image_list.paths])
            query, gallery = query_gallery('regdb', direction, folder, split)
            features = [two_pass_features(model, lst, TestImageSet(lst.paths, args.img_h,
                                                                   args.img_w), args, device)
                        for lst in (query, gallery)]
            for weights in ((1.0, 1.0), (0.1, 0.9)):
                similarity = sum(w * q @ g.T for w, q, g in zip(weights, *features))
                reference_metrics(-similarity, query.pids, gallery.pids)


def two_pass_features(model, image_list, images, args, device):
    """(pooled, BNNeck) features [N, branches * D] as numpy, each image and its flip in two
    separate forward passes through its own stem, summed."""
    loader = torch.utils.data.DataLoader(images, batch_size=args.test_batch,
                                         num_workers=args.workers)
    pools, feats = [], []
    with torch.no_grad():
        for batch in loader:
            batch = batch.to(device)
            pool, feat = model(**{image_list.stem: batch})
            pool_flip, feat_flip = model(**{image_list.stem: batch.flip(3)})
            pools.append(regroup(pool + pool_flip, len(batch)))
            feats.append(regroup(feat + feat_flip, len(batch)))
    return np.concatenate(pools), np.concatenate(feats)


def regroup(features, count):
    """[branches * B, D] -> [B, branches * D] (the branches side by side, as concatenated)."""
    return features.reshape(-1, count, features.shape[1]).permute(1, 0, 2).reshape(
        count, -1).cpu().numpy()


def main():
    args = build_parser().parse_args()
    if args.released_run:
        released_run(args, *args.released_run)
        return
    from tools.synthetic_data import make_regdb
    with tempfile.TemporaryDirectory() as scratch:
        folder = os.path.join(scratch, 'regdb')
        start = time.perf_counter()
        make_regdb(folder, num_ids=args.ids, images_per_modality=args.images, size=(64, 128),
                   seed=0)
        print(f'generated {args.ids} ids x {args.images} images per modality in '
              f'{time.perf_counter() - start:.1f} s')
        checkpoint = os.path.join(scratch, 'regdb_deen_trial{trial}_best.pth')
        write_checkpoint(checkpoint.format(trial=1), args, num_classes=args.ids // 2)
        for split in SPLITS[1:]:
            os.symlink(checkpoint.format(trial=1), checkpoint.format(trial=split))
        test = [sys.executable, os.path.join(REPO, 'test.py'), '--dataset', 'regdb',
                '--data-path', folder, '--resume', checkpoint, '--trial', 'all', '--device',
                args.device, '--workers', str(args.workers), '--test-batch', str(args.test_batch),
                '--output', os.path.join(scratch, 'results.json')]
        ours = timed(test)
        routed = timed(test + ['--released-routing'])
        released = timed([sys.executable, os.path.abspath(__file__), *sys.argv[1:],
                          '--released-run', folder, checkpoint.format(trial=1)])
    print(f'{args.arch} {args.img_h}x{args.img_w} on {args.device}, {args.workers} workers, '
          f'torch {torch.__version__}, {torch.get_num_threads()} threads')
    print(f'{"":34}{"wall s":>9}{"CPU s":>9}')
    for name, (wall, cpu) in (('test.py (standard settings)', ours),
                              ('test.py --released-routing', routed),
                              ('released script\'s work (2 runs)', released)):
        print(f'{name:<34}{wall:9.1f}{cpu:9.1f}')
    print(f'ratio released / test.py: wall {released[0] / ours[0]:.1f}x, CPU '
          f'{released[1] / ours[1]:.1f}x (with --released-routing: wall '
          f'{released[0] / routed[0]:.1f}x, CPU {released[1] / routed[1]:.1f}x)')


if __name__ == '__main__':
    main()
