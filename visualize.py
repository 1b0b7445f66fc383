"""Figures of a trained DEEN/AGW model on a test set (t-SNE, pair distances, rank lists, CMC) from
features extracted once or saved by test.py --save-features, and a run's training curves."""
import glob
import json
import os
import sys
import time

import numpy as np

import figures
from checks import (check_data_folder, check_device_flags, check_images_exist, check_integer,
                    check_network_input, check_output_folder, check_runtime_flags,
                    check_torch_file)
from corruption import (add_corruption_args, check_corrupted_modality, check_corruption_flags,
                        corrupted_rows, corrupted_trials, plan_of)
from data_manager import DATASETS, DEFAULT_DATA_PATHS, ImageList, dataset_facts, layout_of
from methods import fusion_names, get_method
from evaluation import evaluate_store, parse_trials, protocol_splits, resolve_dataset, search_modes
from inference import (FeatureStore, extract_features, fusion_weights,
                       inference_model, load_trained_model)
from utils import (UserError, add_image_size_args, add_runtime_args, fill_runtime_defaults, flag,
                   manual_parser, resolve_device, run_main, written_atomically)

FEATURE_PLOTS = ('tsne', 'distances', 'ranks', 'cmc')
PLOTS = FEATURE_PLOTS + ('curves',)


def build_parser():
    """visualize.py's flags, grouped as its --help shows them (docs/figures.md, Flags)."""
    parser = manual_parser(__doc__)
    parser.add_argument('plots', nargs='*', metavar='PLOT',
                        help=f'any of {", ".join(PLOTS)} (default: all of them; curves when '
                             f'--history is given)')
    source = parser.add_argument_group('model or features')
    source.add_argument('--resume', help='checkpoint (ours or released DEEN/AGW) to extract the '
                        'test features with')
    source.add_argument('--features', help='test features written by test.py --save-features '
                        '(no extraction, no --resume needed)')
    source.add_argument('--history', help='training curves: a run\'s '
                        '<log_path>/<name>_history.jsonl, or its log folder when it holds one')
    add_image_size_args(source)
    data = parser.add_argument_group('data and protocol')
    data.add_argument('--dataset', choices=DATASETS, help='dataset (default: the one the '
                      'checkpoint or the --features file names)')
    data.add_argument('--data-path', help='dataset root (default: the one the --features were '
                      'extracted from, else data/<name>)')
    data.add_argument('--cross-dataset', action='store_true', help='the checkpoint was trained '
                      'on other datasets: draw it with --dataset\'s protocol (docs/testing.md)')
    data.add_argument('--mode', default='all', choices=('all', 'indoor', 'both'),
                      help='SYSU-MM01 search mode(s)')
    data.add_argument('--trial', help='gallery trial(s) 0..9 or all (SYSU-MM01, LLCM; default: '
                      'all), or the checkpoint\'s RegDB split N (default: 1); rank lists use the '
                      'first')
    data.add_argument('--fusion', choices=fusion_names(),
                      help='the fused distance of the rank lists, distances and CMC, one the '
                      'checkpoint\'s method reports (default: its headline fusion, DEEN\'s '
                      'pool+feat); pool or feat: that feature alone, re-normalised (CAJ\'s own '
                      'columns)')
    plots = parser.add_argument_group('figures')
    plots.add_argument('--ids', type=int, nargs='+', help='t-SNE: these test identities '
                       '(default: --num-ids chosen at random)')
    plots.add_argument('--num-ids', type=int, default=10, help='t-SNE: identities drawn at random')
    plots.add_argument('--tsne-points', type=int, default=1500,
                       help='t-SNE: most points per panel (images drawn at random beyond it)')
    plots.add_argument('--queries', nargs='+', help='rank lists: these query images (paths as '
                       'in the dataset, or ending the path) instead of random ones')
    plots.add_argument('--num-queries', type=int, default=4,
                       help='rank lists: random queries per direction')
    plots.add_argument('--topk', type=int, default=10, help='rank lists: gallery images per query')
    plots.add_argument('--seed', type=int, default=0, help='random identities, queries, t-SNE')
    output = parser.add_argument_group('output')
    output.add_argument('--out', required=True, help='folder for the PNGs and their JSON numbers')
    add_corruption_args(parser)
    add_runtime_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    fill_runtime_defaults(args)
    check_flags(args)
    return args


def check_flags(args):
    """Flag errors a user can make, found before anything is loaded."""
    unknown = [plot for plot in args.plots if plot not in PLOTS]
    if unknown:
        raise UserError(f'unknown plot {unknown[0]!r}; expected any of {", ".join(PLOTS)}.')
    if not args.plots:
        args.plots = list(FEATURE_PLOTS) + (['curves'] if args.history else [])
    if 'curves' in args.plots and not args.history:
        raise UserError('the curves plot needs --history (a run\'s _history.jsonl file or its '
                        'log folder).')
    if args.features and args.resume:
        raise UserError('give --resume (extract the features) or --features (read them), not both.')
    if any(plot in FEATURE_PLOTS for plot in args.plots) and not (args.resume or args.features):
        raise UserError(f'the plots {", ".join(p for p in args.plots if p in FEATURE_PLOTS)} need '
                        f'--resume CHECKPOINT or --features FILE.')
    check_runtime_flags(args)
    if args.features and (args.corrupt or args.corruption):
        raise UserError(f'{flag("corrupt" if args.corrupt else "corruption")} corrupts the '
                        f'images features are extracted from; use it with --resume, not '
                        f'--features.')
    check_corruption_flags(args)
    for dest, minimum in (('num_ids', 2), ('tsne_points', 4), ('num_queries', 1), ('topk', 1)):
        check_integer(getattr(args, dest), dest, minimum)


def history_file(path):
    """The history file a --history value names: the file, or the one _history.jsonl in a folder."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f'--history {path} does not exist; expected a _history.jsonl file or the '
                        f'log folder of a training run.')
    found = sorted(glob.glob(os.path.join(glob.escape(path), '*_history.jsonl')))
    if len(found) != 1:
        names = ', '.join(os.path.basename(f) for f in found) or 'none'
        raise UserError(f'--history {path} holds {len(found)} _history.jsonl files ({names}); '
                        f'name the file of the run to draw.')
    return found[0]


# ----------------------------------------------------------------------------------------------
# Test features: the protocol's lists, then extracted or read

class TestSet:
    """The dataset, the protocol splits of the chosen trials and modes, and (load_features) the
    features of their images; the inputs are checked when it is built, before any extraction."""

    def __init__(self, args, device):
        meta = {}
        if args.features:
            self.store, meta = FeatureStore.load(args.features)
            extracted_on = meta.get('dataset')
            if args.dataset and extracted_on and layout_of(extracted_on) != layout_of(args.dataset):
                raise UserError(f'{args.features} holds {extracted_on} features; draw them with '
                                f'--dataset {extracted_on}.')
            args.dataset = args.dataset or extracted_on
            if args.dataset is None:
                raise UserError(f'{args.features} does not say which dataset it holds; pass --dataset.')
            args.data_path = args.data_path or meta.get('data_path')
            self.method = meta.get('method', 'deen')
        else:
            check_torch_file(args.resume, 'resume')
            note = resolve_dataset(args)
            if note:
                print(note)
        args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
        self.layout = layout_of(args.dataset)
        self.trials = corrupted_trials(args.corrupted, self.layout, self._trials(args.trial),
                                       args.trial or 'all')  # SYSU-MM01-C: trial 0
        check_data_folder(args.data_path, args.dataset)
        self.splits = protocol_splits(self.layout, args.data_path, self.trials,
                                      search_modes(args.mode))
        self.matching = dataset_facts(self.layout).matching
        if not args.features:
            check_images_exist(self.image_lists(), 'test')
            check_corrupted_modality(args.corrupted, self.image_lists(), args.dataset)
            model, info = load_trained_model(args.resume, args.dataset, device,
                                             cross_dataset=args.cross_dataset)
            args.img_h, args.img_w = args.img_h or info['img_h'], args.img_w or info['img_w']
            check_network_input(model, info['method'], args.img_h, args.img_w)
            self.model = inference_model(model, args)
            self.method = info['method']
        args.fusion = args.fusion or get_method(self.method).headline
        self.fusion = fusion_weights(args.fusion, self.method)  # a name of the method's fusions

    def _trials(self, trial):
        if self.layout != 'regdb':
            return parse_trials(trial or 'all', self.layout)
        trials = parse_trials(trial or '1', self.layout)
        if len(trials) > 1:
            raise UserError('visualize.py draws one RegDB split, the one the checkpoint was trained '
                            'on: pass --trial N.')
        return trials

    def image_lists(self):
        return [image_list for _, _, q, g in self.splits for image_list in (q, g)]

    def test_ids(self):
        return sorted({int(pid) for image_list in self.image_lists() for pid in image_list.pids})

    def first_trial_splits(self):
        """(setting, query, gallery) of the first chosen trial: what the rank lists show."""
        return [(name, q, g) for name, trial, q, g in self.splits if trial == self.trials[0]]

    def load_features(self, args, device):
        """Extract the features of every image of the splits (unless read from --features) and
        check that the store holds them all; then own_store: each image through its own
        modality's stem (RegDB's released routing also passes them through the other one), for
        the t-SNE and the pair distances."""
        if not args.features:
            self.store = extract_features(self.model, self.image_lists(), args, device,
                                          progress=True)
        for stem, features in self.store.features.items():
            self.store.features[stem] = features.float().to(device)
        labels = {}
        for image_list in self.image_lists():
            self.store.select(image_list)  # a UserError names an image the features lack
            if image_list.stem == image_list.modality:
                labels.setdefault(image_list.modality, {}).update(
                    zip(image_list.paths, zip(image_list.pids, image_list.camids)))
        self.own_store = FeatureStore()
        for modality, by_path in sorted(labels.items()):
            paths = sorted(by_path)
            own = ImageList(paths, np.array([by_path[p][0] for p in paths]),
                            np.array([by_path[p][1] for p in paths]), modality)
            self.own_store.add(modality, paths, self.store.select(own), own.pids, own.camids)


def resolve_queries(paths, test_set):
    """{setting: query rows} of the --queries paths (a path matches a query image whose path ends
    with it); every path must be a query of some setting of the first trial."""
    chosen, found = {}, set()
    for name, query, _ in test_set.first_trial_splits():
        for row, image in enumerate(query.paths):
            matched = [wanted for wanted in paths if _same_file(image, wanted)]
            if matched:
                chosen.setdefault(name, []).append(row)
                found.update(matched)
    missing = [p for p in paths if p not in found]
    if missing:
        raise UserError(f'--queries {missing[0]} is not a query image of any direction of trial '
                        f'{test_set.trials[0]}; expected a test image path of the dataset.')
    return chosen


def _same_file(image, wanted):
    """Whether a dataset image path is the --queries path `wanted` (equal, or ending with it)."""
    image, wanted = os.path.normpath(image), os.path.normpath(wanted)
    return image == wanted or image.endswith(os.sep + wanted) or (
        os.path.abspath(image) == os.path.abspath(wanted))


def tsne_ids(args, test_set):
    """The identities of the t-SNE: --ids (each a test identity), or --num-ids at random."""
    available = test_set.test_ids()
    if args.ids:
        unknown = sorted(set(args.ids) - set(available))
        if unknown:
            raise UserError(f'--ids {unknown[0]} is not a test identity of {args.dataset}; the '
                            f'test ids run from {available[0]} to {available[-1]}.')
        return sorted(set(args.ids))
    rng = np.random.default_rng([args.seed, 0])
    return sorted(rng.choice(available, min(args.num_ids, len(available)), replace=False).tolist())


# ----------------------------------------------------------------------------------------------
# The plots

def plot_tsne(args, test_set, ids):
    numbers = figures.tsne_numbers(test_set.own_store, ids, args.tsne_points, args.seed)
    written = write(args.out, 'tsne', numbers, figures.draw_tsne)
    drawn = ', '.join(f'{name} {panel["points"]} points' for name, panel in numbers['panels'].items())
    note = ('' if numbers['branches'] > 1 else
            '; one branch (AGW, or DEEN without DEE): no generated-embedding panel')
    return written + f': {len(ids)} ids with {numbers["images"]} images; drawn: {drawn}{note}'


def plot_distances(args, test_set):
    numbers = figures.pair_distance_statistics(test_set.own_store, test_set.fusion)
    numbers['fusion'] = args.fusion
    written = write(args.out, 'distances', numbers, figures.draw_distances)
    overlap = ', '.join(f'{group} {figures.percent(value)}'
                        for group, value in numbers['overlap'].items())
    pairs = sum(curve['pairs'] for curve in numbers['curves'].values())
    return written + f': {pairs:,} pairs; overlap of positive and negative distances: {overlap}'


def plot_rank_lists(args, test_set, chosen_queries):
    lines = []
    rng = np.random.default_rng([args.seed, 1])
    for name, query, gallery in test_set.first_trial_splits():
        if chosen_queries is not None:
            rows = chosen_queries.get(name)
            if not rows:
                continue
        else:
            rows = sorted(rng.choice(len(query), min(args.num_queries, len(query)),
                                     replace=False).tolist())
        numbers = {'setting': name, 'trial': test_set.trials[0], 'fusion': args.fusion,
                   'matching': test_set.matching, 'gallery_size': len(gallery), 'topk': args.topk,
                   'rows': figures.rank_list_numbers(test_set.store, query, gallery,
                                                     test_set.matching, test_set.fusion,
                                                     rows, args.topk)}
        drawn = numbers['rows']
        if args.corrupted:  # the images as they were tested
            numbers['corruption'] = args.corrupted.describe()
            drawn = corrupted_rows(numbers['rows'], plan_of(args).corruptor(
                test_set.image_lists()), os.path.join(args.out, 'corrupted_images'))
        title = (f'{args.dataset}{"-C" if args.corrupted else ""} {name}, gallery trial '
                 f'{test_set.trials[0]}: top {args.topk} of {len(gallery)} ({args.fusion}; green '
                 f'right id, red wrong{"; " + args.corrupted.tag() if args.corrupted else ""})')
        lines.append(write(args.out, 'ranks_' + name.replace(' ', '_'), numbers,
                           lambda n, path, drawn=drawn: figures.draw_rank_lists(drawn, path,
                                                                                title)))
    return '\n'.join(lines)


def plot_cmc(args, test_set):
    fusion = {args.fusion: test_set.fusion}
    results = evaluate_store(test_set.store, test_set.layout, test_set.splits, fusion)
    numbers = figures.cmc_numbers(results, test_set.trials, args.fusion)
    summary = ', '.join(f'{name} Rank-1 {100 * curve["mean"][0]:.2f}%'
                        for name, curve in numbers.items())
    return write(args.out, 'cmc', numbers, figures.draw_cmc) + f': {summary}'


def plot_training_curves(args, records):
    numbers = figures.training_curve_numbers(records)
    numbers['history'] = args.history
    return write(args.out, 'curves', numbers, figures.draw_training_curves) + \
        f': {len(numbers["epochs"])} epochs, {len(numbers["evaluated"]["epochs"])} evaluated'


def write(folder, name, numbers, draw):
    """Draw numbers into folder/name.png and write them to folder/name.json; a one-line note."""
    png, numbers_file = os.path.join(folder, name + '.png'), os.path.join(folder, name + '.json')
    width, height = draw(numbers, png)
    with written_atomically(numbers_file) as tmp, open(tmp, 'w') as handle:
        json.dump(numbers, handle)
    return f'{png} ({width}x{height}) and {os.path.basename(numbers_file)}'


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    records = figures.read_history(history_file(args.history)) if 'curves' in args.plots else None
    device = resolve_device(args)
    check_device_flags(args, device)
    test_set, ids, queries = None, None, None
    if any(plot in FEATURE_PLOTS for plot in args.plots):
        test_set = TestSet(args, device)
        ids = tsne_ids(args, test_set) if 'tsne' in args.plots else None
        queries = resolve_queries(args.queries, test_set) if args.queries else None
    check_output_folder(args.out, 'out', 'the figures')
    os.makedirs(args.out, exist_ok=True)
    if test_set is not None:
        start = time.perf_counter()
        test_set.load_features(args, device)
        print(f'features of {test_set.store.images} test images: '
              f'{"read from " + args.features if args.features else "extracted"} '
              f'({time.perf_counter() - start:.1f} s)')
    makers = {'tsne': lambda: plot_tsne(args, test_set, ids),
              'distances': lambda: plot_distances(args, test_set),
              'ranks': lambda: plot_rank_lists(args, test_set, queries),
              'cmc': lambda: plot_cmc(args, test_set),
              'curves': lambda: plot_training_curves(args, records)}
    for plot in PLOTS:
        if plot in args.plots:
            start = time.perf_counter()
            note = makers[plot]()
            print(f'{plot} ({time.perf_counter() - start:.1f} s): {note}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
