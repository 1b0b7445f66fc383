"""Speed and peak memory of the vectorised k-reciprocal re-ranking against the per-row numpy
reference (the published code's algorithm) on random LLCM-sized features, on CPU and CUDA.

Each measurement runs in a fresh process that loads the same distances: its peak memory is the
rise of the process's peak resident size (VmHWM, reset before the call) over its size with the
inputs loaded; on CUDA, the rise of torch's peak allocated memory."""
import argparse
import multiprocessing
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from rerank import K1, K2, LAMBDA, k_reciprocal_rerank, reference_rerank  # noqa: E402

# name -> (queries, gallery, what it stands for); LLCM's test set has 351 identities
CASES = {
    'llcm': (7166, 3000, 'LLCM IR->VIS: every NIR test image vs one VIS image per id and camera'),
    'llcm_released': (694, 8680, 'released "VIS to IR": single-shot NIR queries vs all VIS images'),
    'llcm_every': (8680, 7166, 'every VIS test image vs every NIR test image (memory at 16k rows)'),
}
DEFAULT_CASES = ('llcm', 'llcm_released')
TEST_IDS = 351


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     epilog='run from the repository root: '
                                            'python -m benchmarks.rerank_speed')
    parser.add_argument('--cases', nargs='+', default=list(DEFAULT_CASES), choices=list(CASES),
                        help='which test-set sizes to time')
    parser.add_argument('--scale', type=float, default=1.0,
                        help='multiply the query and gallery counts (e.g. 0.2 for a quick run)')
    parser.add_argument('--dims', type=int, default=2048, help='feature dimensions')
    parser.add_argument('--threads', type=int, default=1, help='CPU threads (torch and numpy)')
    parser.add_argument('--no-reference', action='store_true', help='skip the slow numpy loop')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random data')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def make_distances(num_q, num_g, dims, rng):
    """Euclidean distances (q_g, q_q, g_g), float32, of L2-normalised random features spread
    around one random centre per identity (so that neighbours share identities)."""
    centres = rng.standard_normal((TEST_IDS, dims), dtype=np.float32)
    ids = rng.integers(0, TEST_IDS, num_q + num_g)
    features = torch.from_numpy(centres[ids] + rng.standard_normal((num_q + num_g, dims),
                                                                   dtype=np.float32))
    features = torch.nn.functional.normalize(features, dim=1)
    distance = torch.cdist(features, features).numpy()
    return (distance[:num_q, num_q:], distance[:num_q, :num_q], distance[num_q:, num_q:])


def peak_resident_bytes():
    with open('/proc/self/status') as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith('VmHWM'))


def current_resident_bytes():
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def measure(inputs_file, output_file, implementation, device, threads):
    """In a fresh process: (seconds, peak bytes above the loaded inputs) of one re-ranking, whose
    result is written to output_file."""
    torch.set_num_threads(threads)
    with np.load(inputs_file) as stored:
        inputs = [stored[name] for name in ('q_g', 'q_q', 'g_g')]
    device = torch.device(device)
    if implementation == 'reference':
        run = lambda: reference_rerank(*inputs, K1, K2, LAMBDA)  # noqa: E731
    else:
        inputs = [torch.from_numpy(x).to(device) for x in inputs]
        # warm up (lazy library loading, kernels) on a small problem, so that it is not counted
        k_reciprocal_rerank(inputs[0][:64, :64], inputs[1][:64, :64], inputs[2][:64, :64])
        run = lambda: k_reciprocal_rerank(*inputs, K1, K2, LAMBDA)  # noqa: E731
    if device.type == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as clear:
            clear.write('5')  # reset VmHWM to the current resident size
        base = current_resident_bytes()
    start = time.perf_counter()
    result = run()
    if device.type == 'cuda':
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == 'cuda'
            else peak_resident_bytes()) - base
    np.save(output_file, result.cpu().numpy() if torch.is_tensor(result) else result)
    return seconds, peak


def in_fresh_process(*args):
    with multiprocessing.get_context('spawn').Pool(1) as pool:
        return pool.apply(measure, args)


def run_case(name, args, folder):
    num_q, num_g, _ = CASES[name]
    num_q, num_g = max(1, round(num_q * args.scale)), max(1, round(num_g * args.scale))
    inputs_file = os.path.join(folder, f'{name}_inputs.npz')
    q_g, q_q, g_g = make_distances(num_q, num_g, args.dims, np.random.default_rng(args.seed))
    np.savez(inputs_file, q_g=q_g, q_q=q_q, g_g=g_g)
    plans = [('vectorised', 'cpu')] + ([('vectorised', 'cuda')] if torch.cuda.is_available()
                                       else [])
    if not args.no_reference:
        plans.append(('reference', 'cpu'))
    rows = []
    for implementation, device in plans:
        output_file = os.path.join(folder, f'{name}_{implementation}_{device}.npy')
        seconds, peak = in_fresh_process(inputs_file, output_file, implementation, device,
                                         args.threads)
        rows.append({'case': name, 'size': f'{num_q}x{num_g}', 'implementation': implementation,
                     'device': device, 'seconds': seconds, 'peak': peak, 'file': output_file})
    compare(rows, q_g.shape)
    return rows


def compare(rows, shape):
    """Add, to every row, its largest difference from the reference (or from the CPU run) and the
    share of queries whose whole gallery ranking is the same."""
    baseline = next((row for row in rows if row['implementation'] == 'reference'), rows[0])
    expected = np.load(baseline['file'])
    expected_order = np.argsort(expected, axis=1, kind='stable')
    for row in rows:
        result = np.load(row['file'])
        assert result.shape == shape
        row['diff'] = float(np.abs(result - expected).max())
        row['same_order'] = float((np.argsort(result, axis=1, kind='stable')
                                   == expected_order).all(1).mean())
        row['baseline'] = baseline


def print_table(rows):
    header = (f'{"case":<14} {"Q x G":>10} {"implementation":<15} {"device":<6} {"seconds":>9} '
              f'{"speed-up":>9} {"peak MB":>9} {"max |diff|":>11} {"same order":>10}')
    print(header)
    print('-' * len(header))
    for row in rows:
        baseline = row['baseline']
        speedup = (f'{baseline["seconds"] / row["seconds"]:8.1f}x'
                   if baseline['implementation'] == 'reference' else f'{"-":>9}')
        print(f'{row["case"]:<14} {row["size"]:>10} {row["implementation"]:<15} '
              f'{row["device"]:<6} {row["seconds"]:9.2f} {speedup} {row["peak"] / 2**20:9.0f} '
              f'{row["diff"]:11.1e} {100 * row["same_order"]:9.2f}%')


def main(argv=None):
    args = parse_args(argv)
    os.environ['OMP_NUM_THREADS'] = str(args.threads)  # numpy's and torch's threads in the children
    torch.set_num_threads(args.threads)
    print(f'torch {torch.__version__}, numpy {np.__version__}, {args.threads} CPU thread'
          f'{"s" if args.threads != 1 else ""}'
          + (f', {torch.cuda.get_device_name()}' if torch.cuda.is_available() else '')
          + f'; k1={K1}, k2={K2}, lambda={LAMBDA}; {args.dims}-dim features, {TEST_IDS} ids')
    for name in args.cases:
        print(f'{name}: {CASES[name][2]}')
    rows = []
    with tempfile.TemporaryDirectory(prefix='rerank_speed_') as folder:
        for name in args.cases:
            rows += run_case(name, args, folder)
    print_table(rows)


if __name__ == '__main__':
    main()
