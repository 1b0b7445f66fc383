"""Time of each visualize.py figure (numbers and drawing) on random features of LLCM's test-set
size: 8,680 visible + 7,166 infrared images of 351 ids, [N, 2, branches, 2048] like DEEN's."""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import figures  # noqa: E402
from data_manager import ImageList, dataset_facts  # noqa: E402
from evaluation import evaluate_store  # noqa: E402
from inference import FUSIONS, FeatureStore  # noqa: E402

IMAGES = {'visible': 8680, 'infrared': 7166}
IDS = 351
PLOTS = ('tsne', 'distances', 'ranks', 'cmc')
DIRECTION_LISTS = {'ir_to_vis': ('infrared', 'visible'), 'vis_to_ir': ('visible', 'infrared')}


def build_parser():
    """The flags of this benchmark (its --help)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     epilog='run from the repository root: '
                                            'python -m benchmarks.visualize_speed')
    parser.add_argument('--branches', type=int, default=3, help='3 (DEEN) or 1 (AGW)')
    parser.add_argument('--dim', type=int, default=2048, help='feature width per branch')
    parser.add_argument('--trials', type=int, default=10, help='gallery trials of the CMC')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--plots', nargs='+', default=list(PLOTS), choices=PLOTS,
                        help='figures to time')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random data')
    return parser


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def random_store(branches, dim, folder, rng, device):
    """Features near one random centre per id (flip-summed unit vectors, norm about 2), ids spread
    over the cameras of LLCM; paths under folder (files written only where a figure shows them)."""
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    centres = torch.randn(IDS, 2, branches, dim, generator=generator)
    store = FeatureStore()
    for modality, count in IMAGES.items():
        pids = np.sort(rng.integers(0, IDS, count))
        camids = rng.choice(dataset_facts('llcm').cameras[modality], count)
        features = centres[pids] + 6 * torch.randn(count, 2, branches, dim, generator=generator)
        features = 2 * torch.nn.functional.normalize(features, dim=-1)
        store.add(modality, [os.path.join(folder, modality, f'{i:05d}.png') for i in range(count)],
                  features.to(device), pids, camids)
    return store


def protocol_lists(store, trials, rng):
    """[(setting, trial, query, gallery)]: every image of one modality against one random image
    per id and camera of the other, as LLCM's two directions."""
    splits = []
    for direction, (query_modality, gallery_modality) in DIRECTION_LISTS.items():
        query = as_list(store, query_modality, np.arange(len(store.paths[query_modality])))
        pids, camids = store.pids[gallery_modality], store.camids[gallery_modality]
        for trial in range(trials):
            order = rng.permutation(len(pids))
            _, first = np.unique(pids[order] * 100 + camids[order], return_index=True)
            splits.append((direction, trial, query, as_list(store, gallery_modality, np.sort(order[first]))))
    return splits


def as_list(store, modality, rows):
    return ImageList([store.paths[modality][r] for r in rows], store.pids[modality][rows],
                     store.camids[modality][rows], modality)


def write_placeholder_images(rows):
    for row in rows:
        for path in [row['query']] + [entry['path'] for entry in row['gallery']]:
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.new('RGB', (64, 128), (90, 110, 130)).save(path)


def timed(label, function):
    """Run function; print its wall time and this process's CPU time (on a machine shared with
    other work the CPU time is what one idle core would take, with one thread)."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    print(f'{label:<48} {time.perf_counter() - start:7.2f} s wall {time.process_time() - cpu:7.2f} s CPU',
          flush=True)
    return result


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    device = torch.device(args.device)
    weights = FUSIONS['pool+feat']
    print(f'{IMAGES["visible"]} visible + {IMAGES["infrared"]} infrared random features '
          f'[N, 2, {args.branches}, {args.dim}], {IDS} ids, {device}, '
          f'{torch.get_num_threads()} threads')
    with tempfile.TemporaryDirectory() as folder:
        store = timed('random features', lambda: random_store(args.branches, args.dim, folder, rng,
                                                              device))
        if 'tsne' in args.plots:
            ids = sorted(rng.choice(IDS, 10, replace=False).tolist())
            tsne = timed('t-SNE numbers (10 ids, 1500 points at most)',
                         lambda: figures.tsne_numbers(store, ids, 1500, args.seed))
            timed('t-SNE drawing', lambda: figures.draw_tsne(tsne, os.path.join(folder, 'tsne.png')))
            print('  points: ' + ', '.join(f'{n} {p["points"]}' for n, p in tsne['panels'].items()))
        if 'distances' in args.plots:
            distances = timed('distance numbers (all pairs, chunked)',
                              lambda: figures.pair_distance_statistics(store, weights))
            timed('distance drawing', lambda: figures.draw_distances(
                distances, os.path.join(folder, 'distances.png')))
            pairs = sum(curve['pairs'] for curve in distances['curves'].values())
            print(f'  {pairs:,} pairs; overlap ' + ', '.join(
                f'{group} {figures.percent(value)}' for group, value in distances['overlap'].items()))
        splits = protocol_lists(store, args.trials, rng)
        for direction in DIRECTION_LISTS if 'ranks' in args.plots else ():
            query, gallery = next((q, g) for name, _, q, g in splits if name == direction)
            rows = timed(f'rank-list numbers {direction} (4 queries, top 10)',
                         lambda: figures.rank_list_numbers(store, query, gallery, 'same_id_and_camera',
                                                           weights, [0, 1000, 3000, 6000], 10))
            write_placeholder_images(rows)
            timed(f'rank-list drawing {direction}', lambda: figures.draw_rank_lists(
                rows, os.path.join(folder, f'ranks_{direction}.png'), title=direction))
        if 'cmc' not in args.plots:
            return
        results = timed(f'CMC numbers ({len(DIRECTION_LISTS)} directions x {args.trials} trials)',
                        lambda: evaluate_store(store, 'llcm', splits, {'pool+feat': weights}))
        cmc = figures.cmc_numbers(results, list(range(args.trials)), 'pool+feat')
        timed('CMC drawing', lambda: figures.draw_cmc(cmc, os.path.join(folder, 'cmc.png')))


if __name__ == '__main__':
    main()
