"""Training on several datasets and testing on another (docs/training.md "Several datasets",
docs/testing.md "Cross-dataset tests"): train.py's --sources, --eval-dataset and --recipe flags,
the per-dataset recipe rule and L2RW's named recipe, the sources' training lists, caches and
checkpoint record; and what test.py and the tools ask of a checkpoint tested on a dataset it
was not trained on (the refusal, the header and the results record)."""
import os

import numpy as np

from data_loader import load_or_build_cache
from data_manager import (DATASETS, DEFAULT_DATA_PATHS, MODALITIES, SOURCE_ORDER, Source,
                          SourceLists, dataset_facts, layout_of, merged_train_image_lists,
                          ordered_sources, source_records, source_train_image_lists,
                          train_image_lists)
from utils import UserError, flag

SEPARATOR = '+'  # joins the sources' names into the run's dataset name: 'regdb+sysu'
# L2RW's settings (CVPR 2025, Joey623/L2RW, its ES/*/train.py), on top of the method's recipe:
# 30 epochs, the last epoch is the result (no evaluation), SYSU-MM01's random erasing for every
# source; CAJ trains with AGW's weighted regularised triplet instead of its squared ADP one.
L2RW_SETTINGS = dict(epochs=30, eval_every=0)
L2RW_METHOD_SETTINGS = {'caj': dict(adp_square=0)}
L2RW_OVERRIDES_OF = 'sysu'  # whose per-dataset overrides (erasing) every source takes
RECIPES = ('method', 'l2rw')


def add_source_args(parser):
    """train.py's "several datasets" group: --sources, --eval-dataset and --recipe."""
    group = parser.add_argument_group('several datasets', 'train on two or more datasets, test '
                                      'on another (docs/training.md)')
    group.add_argument('--sources', nargs='+', metavar='NAME[:PATH]',
                       help=f'train on these datasets ({", ".join(SOURCE_ORDER)}; two or more, '
                       f'instead of --dataset), their identities merged in the order '
                       f'{", ".join(SOURCE_ORDER)}; PATH: its root (default: data/<name>); '
                       f'RegDB trains on split --trial')
    group.add_argument('--eval-dataset', metavar='NAME[:PATH]',
                       help='with --sources: the dataset whose first trial selects the best '
                       'epoch (default: none, no evaluation, the last epoch is the result)')
    group.add_argument('--recipe', choices=RECIPES, default='method',
                       help="method: the method's recipe with the dataset's overrides (several "
                       "datasets: none); l2rw: L2RW's (30 epochs, no evaluation, SYSU-MM01's "
                       "overrides for every dataset, CAJ with the WRT triplet)")


def several(args):
    """Whether the run trains on several datasets (--sources)."""
    return bool(getattr(args, 'sources', None))


def parse_source(text, dest, choices):
    """(name, path or None) of a NAME[:PATH] value of --dest; NAME one of choices."""
    name, _, path = text.partition(':')
    if name not in choices:
        raise UserError(f'{flag(dest)} {text}: unknown dataset {name!r}; expected one of '
                        f'{", ".join(choices)}.')
    return name, path or None


def resolve_sources(args):
    """Before the recipe fills the flags: with --sources, the sources in merge order as
    args.source_specs, the run's dataset name 'a+b' as args.dataset, the evaluation target
    (--eval-dataset) as args.eval_dataset and args.data_path (None: no evaluation)."""
    if not several(args):
        if getattr(args, 'eval_dataset', None):
            raise UserError(f'{flag("eval_dataset")} chooses what a run on several datasets '
                            f'evaluates; one --dataset evaluates on itself, so drop it or pass '
                            f'{flag("sources")}.')
        return
    if args.data_path:
        raise UserError(f'{flag("data_path")} is the root of --dataset; with {flag("sources")} '
                        f'give each dataset its root as NAME:PATH.')
    parsed = [parse_source(text, 'sources', SOURCE_ORDER) for text in args.sources]
    if len(parsed) < 2:
        raise UserError(f'{flag("sources")} needs two or more datasets; train on one with '
                        f'{flag("dataset")} {parsed[0][0]}.')
    if any(name == 'regdb' for name, _ in parsed) and args.trial == 'all':
        raise UserError(f'{flag("trial")} all trains ten RegDB runs; a run on several datasets '
                        f'trains on one RegDB split: pass {flag("trial")} N (1..10).')
    trial = int(args.trial) if str(args.trial).isdigit() else 1
    ordered = ordered_sources([Source(name, path or DEFAULT_DATA_PATHS[name],
                                      trial if name == 'regdb' else 1) for name, path in parsed])
    args.source_specs = [{'dataset': s.dataset, 'data_path': s.data_path, 'trial': s.trial}
                         for s in ordered]
    args.dataset = SEPARATOR.join(source.dataset for source in ordered)
    args.eval_dataset, args.data_path = _evaluation_target(args)


def _evaluation_target(args):
    """(dataset, root) of --eval-dataset, or (None, None); an explicit --eval-every without it
    is refused (no target would be evaluated)."""
    if not args.eval_dataset:
        if args.eval_every:
            raise UserError(f'{flag("eval_every")} {args.eval_every} evaluates during training, '
                            f'but a run on several datasets has no target unless '
                            f'{flag("eval_dataset")} NAME[:PATH] names one.')
        return None, None
    name, path = parse_source(args.eval_dataset, 'eval_dataset', DATASETS)
    return name, path or DEFAULT_DATA_PATHS[name]


def recipe_overrides(args, method):
    """What goes on top of a method's recipe (a methods.base.Method) where the dataset's own
    overrides do not apply (the documented rule): --recipe l2rw, SYSU-MM01's overrides for every
    dataset and L2RW's settings; several datasets, none, and no evaluation unless --eval-dataset."""
    if args.recipe == 'l2rw':
        return {**method.dataset_recipes.get(L2RW_OVERRIDES_OF, {}), **L2RW_SETTINGS,
                **L2RW_METHOD_SETTINGS.get(args.method, {})}
    return {} if args.eval_dataset else {'eval_every': 0}


def fill_paths(args):
    """--data-path and --cache-dir of one dataset (defaults: data/<name>, the data folder); a run
    on several keeps --cache-dir unset (each source caches in its own root) or as given (each
    source in its own subfolder of it)."""
    if several(args):
        return
    args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
    args.cache_dir = args.cache_dir or args.data_path


# ----------------------------------------------------------------------------------------------
# The sources of a run: their lists, data folders, caches and checkpoint record

def training_lists(args, trial):
    """([SourceLists], merged {'visible', 'infrared'} ImageLists) of the run's training set: one
    dataset's own lists, or the sources' merged by data_manager's fixed offsets."""
    if several(args):
        parts = source_lists_of(args, trial)
    else:
        lists = train_image_lists(layout_of(args.dataset), args.data_path, trial=trial)
        parts = [SourceLists(Source(layout_of(args.dataset), args.data_path, trial), lists,
                             int(lists['visible'].pids.max()) + 1, 0)]
    return parts, merged_train_image_lists(parts)


def source_lists_of(args, trial):
    """[SourceLists] of --sources (RegDB on split `trial`)."""
    return source_train_image_lists([Source(spec['dataset'], spec['data_path'],
                                            trial if spec['dataset'] == 'regdb' else 1)
                                     for spec in args.source_specs])


def recorded_sources(args, parts):
    """The checkpoint's 'sources' (data_manager.source_records), None for one dataset."""
    return source_records(parts) if several(args) else None


def evaluation_layout(args):
    """The layout evaluated during training: the dataset's, the --eval-dataset's, or None."""
    if several(args):
        return layout_of(args.eval_dataset) if args.eval_dataset else None
    return layout_of(args.dataset)


def check_data_folders(args, check_data_folder):
    """Every source's root is a folder (its layout is checked when its lists are read), and the
    evaluation's when there is one; check_data_folder: checks.check_data_folder."""
    if not several(args):
        check_data_folder(args.data_path, args.dataset)
        return
    for spec in args.source_specs:
        path, facts = spec['data_path'], dataset_facts(spec['dataset'])
        if not os.path.isdir(path):
            problem = 'is a file' if os.path.exists(path) else 'does not exist'
            raise UserError(f'{flag("sources")} {spec["dataset"]}: {path} {problem}; expected the '
                            f'{facts.title} folder with {facts.layout}.')
    if args.eval_dataset:
        check_data_folder(args.data_path, args.eval_dataset)


def cache_dir_of(args, part):
    """Where a source's training cache lives: --cache-dir (one dataset), else
    --cache-dir/<name>, else the source's root."""
    if not several(args):
        return args.cache_dir
    if args.cache_dir:
        return os.path.join(args.cache_dir, part.source.dataset)
    return part.source.data_path


def load_source_caches(args, parts, size, builds, workers, barrier):
    """[visible cache, infrared cache] (images, labels) of the run: each source's own cache (the
    one a run on that dataset alone uses) built by this process where `builds`, then after
    barrier() read back and joined, labels raised by the source's offset."""
    if builds:
        for part in parts:
            for modality in MODALITIES:
                load_or_build_cache(part.lists[modality], cache_dir_of(args, part), size, workers)
    barrier()
    caches = []
    for modality in MODALITIES:
        read = [load_or_build_cache(part.lists[modality], cache_dir_of(args, part), size,
                                    show_progress=False) for part in parts]
        caches.append(read[0] if len(read) == 1 else joined_cache(read, parts))
    return caches


def joined_cache(caches, parts):
    """(images, labels) of several sources' caches: the images indexed without a copy, the
    labels raised by each source's offset."""
    images = JoinedImages([images for images, _ in caches])
    labels = np.concatenate([labels + part.offset for (_, labels), part in zip(caches, parts)])
    return images, labels


class JoinedImages:
    """Several memory-mapped image arrays indexed as one along their first axis."""

    def __init__(self, arrays):
        self.arrays = list(arrays)
        self.starts = np.cumsum([0] + [len(array) for array in self.arrays])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.starts, index, side='right')) - 1
        return self.arrays[part][index - self.starts[part]]


# ----------------------------------------------------------------------------------------------
# Testing on another dataset

def trained_datasets(name):
    """The datasets a checkpoint's recorded dataset name covers ('regdb+sysu' -> regdb, sysu)."""
    return name.split(SEPARATOR)


def is_cross_dataset(trained_on, dataset):
    """Whether testing on `dataset` a checkpoint trained on `trained_on` (a dataset or 'a+b') is
    a cross-dataset test: anything but one dataset of the same layout (demo is LLCM's)."""
    if trained_on is None or trained_on == dataset:  # unknown (a released checkpoint whose
        return False                                 # class count names none), or its own
    names = trained_datasets(trained_on)
    return len(names) > 1 or layout_of(names[0]) != layout_of(dataset)


def check_tested_dataset(trained_on, dataset, path, cross_dataset):
    """A checkpoint of ours tested on `dataset`: another dataset only with --cross-dataset, and
    --cross-dataset only on another dataset."""
    cross = is_cross_dataset(trained_on, dataset)
    if cross and not cross_dataset:
        names = trained_datasets(trained_on)
        same = f'test it with --dataset {trained_on}, or ' if len(names) == 1 else ''
        raise UserError(f'checkpoint {path} was trained on {trained_on}; {same}add '
                        f'--cross-dataset to test it with the {dataset_facts(dataset).title} '
                        f'protocol.')
    if cross_dataset and not cross:
        raise UserError(f'--cross-dataset tests a checkpoint on a dataset it was not trained on, '
                        f'but {path} was trained on {trained_on}; drop --cross-dataset.')


def check_inferred_dataset(trained_on, path):
    """test.py without --dataset: a checkpoint of several datasets names no test protocol."""
    names = trained_datasets(trained_on)
    if len(names) > 1:
        raise UserError(f'checkpoint {path} was trained on several datasets ({trained_on}); pass '
                        f'--dataset NAME --cross-dataset to test it with NAME\'s protocol.')


def cross_dataset_record(dataset, models):
    """The results file's 'cross_dataset' entry of a test on `dataset` (None when every model
    tested was trained on it): the target and each checkpoint's sources."""
    crossed = list({model['checkpoint']: model for model in models
                    if is_cross_dataset(model['trained_on'], dataset)}.values())
    if not crossed:
        return None
    return {'tested_on': dataset, 'protocol': dataset_facts(dataset).title,
            'classifier': 'unused',
            'trained_on': [{'checkpoint': model['checkpoint'], 'dataset': model['trained_on'],
                            'sources': model['sources'] or [{'dataset': model['trained_on']}]}
                           for model in crossed]}


def cross_dataset_header(record):
    """One line above the tables: what the cross-dataset test trained on and tests with."""
    trained = '; '.join(' + '.join(describe_source(source) for source in entry['sources'])
                        for entry in record['trained_on'])
    return (f'cross-dataset test: trained on {trained}; tested with the {record["protocol"]} '
            f'protocol (the identity classifier is unused)')


def describe_source(source):
    """'RegDB (split 1, 206 identities, offset 0)' of a recorded source."""
    facts = dataset_facts(source['dataset'])
    details = [f'split {source["trial"]}'] if source.get('trial') else []
    if 'identities' in source:
        details += [f'{source["identities"]} identities', f'offset {source["offset"]}']
    return facts.title + (f' ({", ".join(details)})' if details else '')
