"""Speed of the vectorised ranking metrics against the per-query reference loop and one argsort,
on random LLCM-, SYSU-MM01- and RegDB-sized test sets (CPU, and CUDA if present)."""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from eval_metrics import rank_metrics, reference_metrics  # noqa: E402

# name -> (queries, gallery, test ids, query cameras, gallery cameras, matching, identity CMC)
CASES = {
    'llcm': (7166, 3000, 351, (1, 2, 4, 5, 6, 7, 8, 9), tuple(range(1, 10)),
             'same_id_and_camera', True),
    'sysu': (3803, 301, 96, (3, 6), (1, 2, 4, 5), 'cam3_ignores_cam2', True),
    'regdb': (2060, 2060, 206, (2,), (1,), 'none', False),
}


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     epilog='run from the repository root: '
                                            'python -m benchmarks.eval_speed')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES),
                        help='which test-set sizes to time')
    parser.add_argument('--repeats', type=int, default=3,
                        help='timed runs of the vectorised metrics and argsort (the best is shown)')
    parser.add_argument('--no-reference', action='store_true', help='skip the slow reference loop')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random data')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def make_case(name, rng):
    """Distances, ids and cameras shaped like the dataset's test set: every gallery id/camera pair
    at most once, queries spread over the test ids, and same-id pairs a little closer."""
    num_q, num_g, num_ids, q_cameras, g_cameras, matching, identity_cmc = CASES[name]
    pairs = np.array([(pid, cam) for pid in range(num_ids) for cam in g_cameras])
    if len(pairs) >= num_g:
        pairs = pairs[np.sort(rng.choice(len(pairs), num_g, replace=False))]
    else:  # RegDB: ten images of each id from its single camera
        pairs = np.repeat(pairs, -(-num_g // len(pairs)), axis=0)[:num_g]
    g_pids, g_camids = pairs[:, 0], pairs[:, 1]
    q_pids = np.sort(rng.integers(0, num_ids, num_q))
    q_camids = rng.choice(q_cameras, num_q)
    distmat = rng.random((num_q, num_g), dtype=np.float32)
    distmat -= 0.3 * (q_pids[:, None] == g_pids[None, :])
    return (distmat, q_pids, g_pids, q_camids, g_camids), dict(matching=matching,
                                                                identity_cmc=identity_cmc)


def best_time(function, repeats, device):
    """Least wall time of `repeats` calls (after one warm-up call), and the last result."""
    result, times = function(), []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = function()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def max_difference(first, second):
    return max(float(np.abs(first[0] - second[0]).max()), abs(first[1] - second[1]),
               abs(first[2] - second[2]))


def measure(name, device, rng, args):
    arrays, protocol = make_case(name, rng)
    distmat = torch.from_numpy(arrays[0]).to(device)
    ids = [torch.from_numpy(values).to(device) for values in arrays[1:]]
    sort_s, _ = best_time(lambda: torch.argsort(distmat, dim=1, stable=True), args.repeats, device)
    fast_s, fast = best_time(lambda: rank_metrics(distmat, *ids, **protocol), args.repeats, device)
    num_q, num_g = arrays[0].shape
    row = {'case': name, 'device': device.type, 'size': f'{num_q}x{num_g}',
           'argsort': sort_s, 'vectorised': fast_s, 'reference': None, 'diff': None,
           'rank1': fast[0][0], 'mAP': fast[1]}
    if not args.no_reference:
        start = time.perf_counter()
        slow = reference_metrics(*arrays, **protocol)
        row['reference'] = time.perf_counter() - start
        row['diff'] = max_difference(fast, slow)
    return row


def print_table(rows):
    header = (f'{"case":<6} {"device":<6} {"Q x G":>10} {"argsort s":>10} {"vector s":>9} '
              f'{"vec/sort":>8} {"ref loop s":>10} {"ref/vec":>8} {"max |diff|":>11} '
              f'{"R1":>6} {"mAP":>6}')
    print(header)
    print('-' * len(header))
    for row in rows:
        reference = f'{row["reference"]:10.3f}' if row['reference'] is not None else f'{"-":>10}'
        speedup = (f'{row["reference"] / row["vectorised"]:7.1f}x' if row['reference'] is not None
                   else f'{"-":>8}')
        diff = f'{row["diff"]:11.1e}' if row['diff'] is not None else f'{"-":>11}'
        print(f'{row["case"]:<6} {row["device"]:<6} {row["size"]:>10} {row["argsort"]:10.3f} '
              f'{row["vectorised"]:9.3f} {row["vectorised"] / row["argsort"]:7.2f}x {reference} '
              f'{speedup} {diff} {row["rank1"]:6.3f} {row["mAP"]:6.3f}')


def main(argv=None):
    args = parse_args(argv)
    devices = [torch.device('cpu')] + ([torch.device('cuda')] if torch.cuda.is_available() else [])
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU threads'
          + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else ''))
    rows = [measure(name, device, np.random.default_rng(args.seed), args)
            for device in devices for name in args.cases]
    print_table(rows)


if __name__ == '__main__':
    main()
