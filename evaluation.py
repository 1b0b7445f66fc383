"""The test protocols of SYSU-MM01, RegDB and LLCM run on a model: every setting's query/gallery
splits, one feature extraction for all trials, the metrics per fusion, summaries and tables, and
test.py's whole run (flags, results file with its provenance) for test.py and reproduce.py."""
import json
import os
import textwrap

import numpy as np

from checks import (check_data_folder, check_device_flags, check_images_exist, check_integer,
                    check_network_input, check_output_folder, check_runtime_flags,
                    check_torch_file)
from corruption import (add_corruption_args, check_corrupted_modality, check_corruption_flags,
                        corrupted_trials, header, plan_of)
from data_manager import (DATASETS, DEFAULT_DATA_PATHS, DIRECTION_PLANS, OTHER_STEM_DIRECTIONS,
                          dataset_facts, layout_of, query_gallery)
from eval_metrics import evaluate
from inference import (FUSIONS, checkpoint_dataset, extract_features, fused_distance,
                       inference_model, load_trained_model, method_fusions)
from methods import find_fusion
from provenance import format_provenance, run_provenance
from rerank import K1, K2, LAMBDA, distances_from_similarity, k_reciprocal_rerank
from sources import check_inferred_dataset, cross_dataset_header, cross_dataset_record
from utils import (UserError, add_image_size_args, add_runtime_args, fill_runtime_defaults,
                   load_checkpoint, manual_parser, written_atomically)

RESULTS_FORMAT = 'deen-vireid-results'

RANKS = (1, 5, 10, 20)


def protocol_splits(layout, data_path, trials, modes=('all',), multi_shot=False, directions=None):
    """[(setting name, trial, query, gallery)] for every direction (default: all of the
    dataset's; tested_directions) and SYSU mode, and trial."""
    splits = []
    for direction in directions or dataset_facts(layout).directions:
        for mode in (modes if layout == 'sysu' else ('all',)):
            name = f'{mode} {direction}' if layout == 'sysu' else direction
            for trial in trials:
                query, gallery = query_gallery(layout, direction, data_path, trial, mode=mode,
                                               multi_shot=multi_shot)
                splits.append((name, trial, query, gallery))
    return splits


def tested_directions(layout, released_routing=False):
    """The directions test.py evaluates: the dataset's, RegDB's released routing (each image
    through the other stem: a second pass of every image) only with --released-routing."""
    return tuple(direction for direction in dataset_facts(layout).directions
                 if released_routing or direction not in OTHER_STEM_DIRECTIONS)


def evaluate_store(store, layout, splits, fusions=FUSIONS):
    """{setting: {fusion: [(cmc, mAP, mINP) per trial]}} of splits on extracted features."""
    results = {}
    for name, _, query, gallery in splits:
        query_features, gallery_features = store.select(query), store.select(gallery)
        for fusion, weights in fusions.items():
            distmat = fused_distance(query_features, gallery_features, weights)
            results.setdefault(name, {}).setdefault(fusion, []).append(
                evaluate(layout, distmat, query, gallery))
    return results


def evaluate_splits(model, layout, splits, args, device, ctx=None, fusions=FUSIONS):
    """Extract once, then {setting: {fusion: [(cmc, mAP, mINP) per trial]}} plus the store."""
    store = extract_features(model, [lst for _, _, q, g in splits for lst in (q, g)], args,
                             device, ctx)
    return evaluate_store(store, layout, splits, fusions), store


def selection_rank1(model, layout, data_path, trial, mode, args, device, ctx=None,
                    fusion='pool+feat'):
    """The model-selection metric of METHOD.md: Rank-1 of IR->VIS (SYSU-MM01, LLCM) or VIS->IR
    (RegDB) on the first gallery trial (RegDB: the run's own split), under the method's headline
    fusion (the name of args.method's fusion; DEEN: pool+feat)."""
    direction, query, gallery = selection_split(layout, data_path, trial, mode)
    fusions = {fusion: find_fusion(fusion, getattr(args, 'method', 'deen'))}
    results, _ = evaluate_splits(model, layout, [(direction, 0, query, gallery)], args, device,
                                 ctx, fusions=fusions)
    cmc, mean_ap, minp = results[direction][fusion][0]
    return {'direction': direction, 'rank1': float(cmc[0]), 'mAP': float(mean_ap), 'mINP': float(minp)}


def selection_split(layout, data_path, trial, mode):
    """(direction, query, gallery) that selection_rank1 evaluates during training."""
    direction = 'vis_to_ir' if layout == 'regdb' else 'ir_to_vis'
    query, gallery = query_gallery(layout, direction, data_path,
                                   trial if layout == 'regdb' else 0, mode=mode)
    return direction, query, gallery


def summarise(per_trial):
    """[(cmc, mAP, mINP)] over trials -> {metric: (mean, std, values)} for Rank-1/5/10/20, mAP,
    mINP."""
    columns = {}
    for rank in RANKS:
        values = [cmc[min(rank, len(cmc)) - 1] for cmc, _, _ in per_trial]
        columns[f'Rank-{rank}'] = values
    columns['mAP'] = [m for _, m, _ in per_trial]
    columns['mINP'] = [m for _, _, m in per_trial]
    return {name: (float(np.mean(v)), float(np.std(v)), [float(x) for x in v])
            for name, v in columns.items()}


def summarise_settings(results):
    """{setting: {fusion: [(cmc, mAP, mINP) per trial]}} -> {setting: {fusion: summarise(...)}}."""
    return {name: {fusion: summarise(values) for fusion, values in by_fusion.items()}
            for name, by_fusion in results.items()}


def format_table(name, by_fusion, trials):
    """A printable table of one setting: a row per fusion, mean ± std in % per metric."""
    header = f'{name}  ({trials} trial{"s" if trials > 1 else ""}, mean ± std, %)'
    lines = [header, f'  {"fusion":<16}' + ''.join(f'{c:>16}' for c in
                                                    [f'Rank-{r}' for r in RANKS] + ['mAP', 'mINP'])]
    for fusion, summary in by_fusion.items():
        cells = ''.join(f'{100 * mean:>9.2f} ± {100 * std:4.2f}' for mean, std, _ in summary.values())
        lines.append(f'  {fusion:<16}{cells}')
    return '\n'.join(lines)


def checkpoint_for_trial(path, trial):
    """RegDB tests split T with the model trained on split T: '{trial}' in a path is replaced."""
    return path.replace('{trial}', str(trial))


def parse_trials(trial, layout):
    """The trials of a --trial value ('all' or one number) for a dataset layout."""
    allowed = list(dataset_facts(layout).test_trials)
    if trial == 'all':
        return allowed
    if not str(trial).lstrip('-').isdigit() or int(trial) not in allowed:
        raise UserError(f'--trial for {layout} must be one of {allowed[0]}..{allowed[-1]} or "all", '
                        f'got {trial!r}.')
    return [int(trial)]


def trial_groups(args, layout):
    """The trials tested with one model each: RegDB one split per model ({trial} in --resume;
    a cross-dataset test may test every split with one model, as L2RW does), SYSU-MM01 and LLCM
    all gallery trials with the one model."""
    trials = corrupted_trials(getattr(args, 'corrupted', None), layout,
                              parse_trials(args.trial, layout), args.trial)
    if layout != 'regdb':
        return [trials]
    if len(trials) > 1 and '{trial}' not in args.resume and not args.cross_dataset:
        raise UserError('RegDB tests each split with the model trained on it: put {trial} in '
                        '--resume (e.g. save_model/regdb_deen_trial{trial}_best.pth) or pass --trial N.')
    if len(trials) > 1 and args.save_features and '{trial}' not in args.save_features:
        raise UserError('each RegDB split has its own model and features: put {trial} in '
                        '--save-features or pass --trial N.')
    return [[t] for t in trials]


def run_protocol(args, device, ctx):
    """Evaluate every setting of args.dataset with the checkpoint(s) of args.resume; returns
    ({setting: {fusion: summary}}, counts of images and forward passes, [per checkpoint: path,
    trials, method, arch, epoch, seed, provenance], the summaries of the re-ranked distances
    with args.rerank ({} without)). With args.save_features the extracted features are written
    there."""
    layout = layout_of(args.dataset)
    modes = search_modes(args.mode)
    results, counts = {}, {'images': 0, 'forward_passes': 0, 'separate_extraction_images': 0}
    reranked = {}  # the same for the re-ranked distances (--rerank)
    models = []
    for group in trial_groups(args, layout):
        path = checkpoint_for_trial(args.resume, group[0])
        model, info = load_trained_model(path, args.dataset, device,
                                         cross_dataset=args.cross_dataset)
        models.append({'checkpoint': path, 'trials': list(group), 'trained_on': info['dataset'],
                       'sources': info['sources'],
                       **{key: info[key] for key in ('method', 'arch', 'epoch', 'seed',
                                                     'provenance')}})
        args.img_h, args.img_w = args.img_h or info['img_h'], args.img_w or info['img_w']
        check_network_input(model, info['method'], args.img_h, args.img_w)  # before any image
        model = inference_model(model, args)
        splits = protocol_splits(layout, args.data_path, group, modes, args.multi_shot,
                                 tested_directions(layout, args.released_routing))
        fusions = method_fusions(info['method'])
        trial_results, store = evaluate_splits(model, layout, splits, args, device, ctx, fusions)
        for name, by_fusion in trial_results.items():
            for fusion, values in by_fusion.items():
                results.setdefault(name, {}).setdefault(fusion, []).extend(values)
        if args.rerank:
            for name, by_fusion in evaluate_store_reranked(store, layout, splits,
                                                           rerank_params(args), fusions).items():
                for fusion, values in by_fusion.items():
                    reranked.setdefault(name, {}).setdefault(fusion, []).extend(values)
        counts['images'] += store.images
        counts['forward_passes'] += store.forward_passes
        counts['separate_extraction_images'] += separate_extraction_cost(splits)
        if args.save_features and ctx.is_main:
            store.save(checkpoint_for_trial(args.save_features, group[0]),
                       {'dataset': args.dataset, 'data_path': args.data_path, 'checkpoint': path,
                        'method': info['method'], 'img_h': args.img_h, 'img_w': args.img_w,
                        'corrupted': args.corrupted.describe() if args.corrupted else None})
    return summarise_settings(results), counts, models, summarise_settings(reranked)


def search_modes(mode):
    """The SYSU-MM01 search modes of a --mode value ('both' = all and indoor)."""
    return ('all', 'indoor') if mode == 'both' else (mode,)


def setting_direction(name):
    """The direction (DIRECTION_PLANS key) of a setting name ('all ir_to_vis' -> 'ir_to_vis')."""
    return name.split()[-1]


def separate_extraction_cost(splits):
    """Images the released scripts decode when run once per setting: the side of a direction that
    holds every test image of its modality is extracted once (per setting and model), a sampled
    side once per trial. (The released_vis_to_ir gallery, all visible images, is extracted once:
    it is that script's query set.)"""
    total, counted = 0, set()
    for name, trial, query, gallery in splits:
        plan = DIRECTION_PLANS[setting_direction(name)]
        for side, (image_list, (_, draw)) in enumerate(zip((query, gallery), plan)):
            key = (name, side, None if draw == 'every' else trial)
            if key not in counted:
                counted.add(key)
                total += len(image_list)
    return total


# ----------------------------------------------------------------------------------------------
# test.py's run: flags, dataset from the checkpoint, results file with provenance, tables

def add_test_args(parser):
    """The flags of the test protocol, in the groups of test.py's --help: test.py's, and what
    reproduce.py passes to its tests."""
    data = parser.add_argument_group('data and protocol')
    data.add_argument('--dataset', choices=DATASETS, help='dataset (default: the one the '
                      'checkpoint records (ours), or that a released checkpoint\'s class count names '
                      '(395 SYSU-MM01, 206 RegDB, 713 LLCM))')
    data.add_argument('--data-path', help='dataset root (default: data/<name>)')
    data.add_argument('--mode', default='both', choices=('all', 'indoor', 'both'),
                      help='SYSU-MM01 search mode(s)')
    data.add_argument('--trial', default='all', help='RegDB split 1..10 or all; SYSU-MM01, LLCM: '
                      'gallery trial 0..9 or all')
    data.add_argument('--multi-shot', action='store_true',
                      help='SYSU-MM01 multi-shot gallery (10 images per identity and camera)')
    data.add_argument('--released-routing', action='store_true',
                      help='RegDB: also the released test script\'s routing (each image through '
                      'the other modality\'s stem; a second pass of every image)')
    data.add_argument('--cross-dataset', action='store_true',
                      help='test a checkpoint trained on other datasets with --dataset\'s '
                      'protocol (the classifier is unused)')
    model = parser.add_argument_group('model')
    model.add_argument('--resume', required=True, help='checkpoint file; for RegDB put {trial} in '
                       'the path to use each split\'s own model')
    add_image_size_args(model)
    output = parser.add_argument_group('output')
    output.add_argument('--output', help='JSON results file (default: next to the checkpoint)')
    output.add_argument('--save-features', help='also write the extracted test features (with '
                        'paths, ids, cameras, modality) to this torch file; RegDB: put {trial} '
                        'in it')
    add_rerank_args(parser)
    add_corruption_args(parser)
    add_runtime_args(parser)


def build_test_parser(description=None):
    """test.py's parser (its --help)."""
    parser = manual_parser(description)
    add_test_args(parser)
    return parser


def parse_test_args(argv=None, description=None):
    """test.py's arguments (runtime defaults filled in; dataset and data path may stay unset
    until resolve_dataset reads the checkpoint)."""
    args = build_test_parser(description).parse_args(argv)
    fill_runtime_defaults(args)
    check_runtime_flags(args)
    check_rerank_flags(args)
    check_corruption_flags(args)
    if args.dataset:
        args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
    return args


def resolve_dataset(args):
    """Without --dataset, take the dataset from the checkpoint (of the first trial tested), then
    the default data path; returns a sentence saying how the dataset was told, or None."""
    note = None
    if args.dataset is None:
        path = checkpoint_for_trial(args.resume, args.trial if str(args.trial).isdigit() else 1)
        args.dataset, how = checkpoint_dataset(load_checkpoint(path), path, required=True)
        check_inferred_dataset(args.dataset, path)
        note = f'dataset {args.dataset}: {how} (pass --dataset to override)'
    args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
    return note


def run_test(args, device, ctx):
    """test.py's whole run: resolve the dataset, run the protocol, and on the main process print
    the tables, write the results file (default: beside the checkpoint) and print its provenance.
    Returns the results record (None on the other processes)."""
    check_device_flags(args, device)
    note = resolve_dataset(args)
    if note and ctx.is_main:
        print(note)
    check_test_inputs(args)
    summaries, counts, models, reranked = run_protocol(args, device, ctx)
    if not ctx.is_main:
        return None
    crossed = cross_dataset_record(args.dataset, models)
    if crossed:
        print(cross_dataset_header(crossed) + '\n')
    label = args.dataset
    if args.corrupted:
        print(header(args.corrupted, layout_of(args.dataset)) + '\n')
        label = f'{args.dataset}-C ({args.corrupted.tag()})'
    print(format_results(label, summaries, reranked, rerank_params(args)))
    print(f'{counts["images"]} distinct test images, each passed once with its flip '
          f'({counts["forward_passes"]} batches); running the released script once per setting '
          f'would decode {counts["separate_extraction_images"]} images.')
    record = results_record(args, summaries, counts, models, run_provenance(args, ctx, device))
    record['cross_dataset'] = crossed
    if args.corrupted:
        record['corruption'] = plan_of(args).record(args.data_path)
    if args.rerank:
        record['reranked'] = {**rerank_record(rerank_params(args)), 'results': reranked}
    output = results_path(args)
    write_results(output, record)
    print(format_provenance(record['provenance'],
                            [(model['checkpoint'], model['provenance']) for model in models]))
    print(f'results written to {output}')
    return record


def check_test_inputs(args):
    """Before a model is loaded or an image decoded: the data folder, every test split of every
    trial tested (index files, folders, images), the checkpoint of each RegDB split, and the
    folders the results and features go to."""
    layout = layout_of(args.dataset)
    if args.released_routing and layout != 'regdb':
        raise UserError(f'--released-routing routes RegDB\'s test images as the released script '
                        f'does; {dataset_facts(layout).title} has no such setting, drop it.')
    check_data_folder(args.data_path, args.dataset)
    for group in trial_groups(args, layout):
        check_torch_file(checkpoint_for_trial(args.resume, group[0]), 'resume')
        splits = protocol_splits(layout, args.data_path, group, search_modes(args.mode),
                                 args.multi_shot, tested_directions(layout, args.released_routing))
        check_images_exist([lst for _, _, query, gallery in splits for lst in (query, gallery)],
                           'test')
        check_corrupted_modality(args.corrupted, [lst for _, _, query, gallery in splits
                                                  for lst in (query, gallery)], args.dataset)
        if args.save_features:
            check_output_folder(os.path.dirname(os.path.abspath(
                checkpoint_for_trial(args.save_features, group[0]))), 'save_features', 'features')
    check_output_folder(os.path.dirname(os.path.abspath(results_path(args))), 'output',
                        'the results file')
    if args.corrupted and args.corrupted.cache_dir:
        check_output_folder(args.corrupted.cache_dir, 'corrupt_cache', 'the corrupted images')


def results_record(args, summaries, counts, models, made):
    """The results file's content: what was tested and how (protocol, checkpoints with their
    training provenance, this run's provenance), the summaries and the extraction counts."""
    layout = layout_of(args.dataset)
    trials = sorted({t for model in models for t in model['trials']})
    one_model = len({model['checkpoint'] for model in models}) < len(trials)  # cross-dataset RegDB
    protocol = {'trials': trials, 'multi_shot': bool(args.multi_shot), 'img_h': args.img_h,
                'img_w': args.img_w,
                'fusions': {name: fusion_record(w) for model in models
                            for name, w in method_fusions(model['method']).items()},
                'settings': {name: describe_setting(layout, name, len(trials), args.multi_shot,
                                                    one_model=one_model)
                             for name in summaries}}
    return {'format': RESULTS_FORMAT, 'dataset': args.dataset, 'data_path': args.data_path,
            'checkpoint': args.resume, 'protocol': protocol, 'results': summaries,
            'counts': counts, 'models': models, 'provenance': made}


def fusion_record(fusion):
    """A fusion as the results file records it: its weights, or a callable's description."""
    return getattr(fusion, '__doc__', None) or repr(fusion) if callable(fusion) else list(fusion)


def results_path(args):
    """--output, or <checkpoint without extension>_test.json ({trial} removed) beside it
    (corrupted: <checkpoint>_<corruption tag>_test.json)."""
    stem = os.path.splitext(checkpoint_for_trial(args.resume, 'all'))[0]
    corrupted = getattr(args, 'corrupted', None)
    return args.output or stem + (f'_{corrupted.tag()}' if corrupted else '') + '_test.json'


def write_results(path, record):
    """Write a results record (or any JSON-able dict) atomically: no reader sees half a file, and
    a failed write leaves the earlier file as it was."""
    with written_atomically(path) as tmp, open(tmp, 'w') as handle:
        json.dump(record, handle, indent=2)


def read_results(path):
    """A results record written by write_results, or None when the file is missing or unreadable."""
    try:
        with open(path) as handle:
            record = json.load(handle)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get('format') == RESULTS_FORMAT else None


def format_results(dataset, summaries, reranked=None, params=None):
    """The printable tables of every setting (a row per fusion); with reranked (summaries of the
    re-ranked distances, made with params) each setting's re-ranked table follows its plain one,
    and a footnote says how they were re-ranked."""
    tables = []
    for name, by_fusion in summaries.items():
        trials = len(next(iter(by_fusion.values()))['mAP'][2])
        tables.append(format_table(f'{dataset} {name}', by_fusion, trials) + '\n')
        if reranked:
            tables.append(format_table(f'{dataset} {name} {rerank_label(params)}', reranked[name],
                                       trials) + '\n')
    if reranked:
        tables.append(rerank_footnote(params) + '\n')
    return '\n'.join(tables)


MODALITY_NAMES = {'visible': ('VIS', 'visible'), 'infrared': ('IR', 'infrared')}
RELEASED_NAMES = {'released_vis_to_ir': ' (what the released test.py calls "VIS to IR")'}


def describe_setting(layout, name, trials, multi_shot=False, fusion=None, one_model=False):
    """The exact protocol of a setting in words: direction, search mode, what query and gallery
    hold (single- or multi-shot), the stems, the trials and (when given) the fusion; one_model:
    RegDB's splits were tested with one model (a cross-dataset test), not each with its own."""
    facts = dataset_facts(layout)
    direction = setting_direction(name)
    (query_modality, query_draw), (gallery_modality, gallery_draw) = DIRECTION_PLANS[direction]
    parts = [f'{MODALITY_NAMES[query_modality][0]}→{MODALITY_NAMES[gallery_modality][0]}'
             + RELEASED_NAMES.get(direction, '')]
    mode = name.split()[0] if layout == 'sysu' else 'all'
    if layout == 'sysu':
        parts.append(f'{mode}-search')
    for role, modality, draw in (('query', query_modality, query_draw),
                                 ('gallery', gallery_modality, gallery_draw)):
        parts.append(f'{role}: {_describe_side(modality, draw, multi_shot, facts, mode)}')
    if direction in OTHER_STEM_DIRECTIONS:
        parts.append('each image through the other modality\'s stem (released test.py)')
    if facts.trials is not None:
        models = 'one model' if one_model else 'each with its own model'
        parts.append(f'{trials} split{"s" if trials != 1 else ""}, {models}')
    else:
        parts.append(f'{trials} gallery trial{"s" if trials != 1 else ""}')
    if fusion:
        parts.append(f'fusion {fusion}')
    return '; '.join(parts)


def _describe_side(modality, draw, multi_shot, facts, mode):
    noun = MODALITY_NAMES[modality][1]
    if draw == 'every' or facts.test_index is not None:
        return f'every {noun} test image'
    cameras = facts.indoor_cameras if modality == 'visible' and mode == 'indoor' else \
        facts.cameras[modality]
    shots = '10 random images' if multi_shot else 'one random image'
    return (f'{shots} per identity and {noun} camera {", ".join(map(str, cameras))} '
            f'({"multi" if multi_shot else "single"}-shot)')


# ----------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (test.py --rerank): the re-ranked numbers go beside the plain ones

def add_rerank_args(parser):
    """The "re-ranking" group: --rerank and its parameters (the paper's values by default)."""
    parser = parser.add_argument_group('re-ranking', 'k-reciprocal re-ranking (docs/testing.md)')
    parser.add_argument('--rerank', action='store_true', help='also report every setting after '
                        'k-reciprocal re-ranking (Zhong et al., CVPR 2017), in tables of its own')
    parser.add_argument('--k1', type=int, help=f're-ranking: k of the k-reciprocal neighbours '
                        f'(default: {K1})')
    parser.add_argument('--k2', type=int, help=f're-ranking: neighbours averaged by the local '
                        f'query expansion, 1: none (default: {K2})')
    parser.add_argument('--lambda', type=float, dest='lambda_value', help=f're-ranking: weight '
                        f'of the original distance beside the Jaccard distance (default: {LAMBDA})')


def check_rerank_flags(args):
    """--k1, --k2 and --lambda come with --rerank and are valid; fills in their defaults."""
    given = [name for name, dest in (('--k1', 'k1'), ('--k2', 'k2'), ('--lambda', 'lambda_value'))
             if getattr(args, dest) is not None]
    if given and not args.rerank:
        raise UserError(f'{", ".join(given)} set{"s" if len(given) == 1 else ""} the re-ranking; '
                        f'add --rerank to use it.')
    check_integer(args.k1, 'k1', 1)
    check_integer(args.k2, 'k2', 1)
    if args.lambda_value is not None and not 0 <= args.lambda_value <= 1:
        raise UserError(f'--lambda must be a number from 0 to 1, got {args.lambda_value}.')
    args.k1 = K1 if args.k1 is None else args.k1
    args.k2 = K2 if args.k2 is None else args.k2
    args.lambda_value = LAMBDA if args.lambda_value is None else args.lambda_value


def rerank_params(args):
    """The keyword arguments of rerank.k_reciprocal_rerank that the flags give."""
    return {'k1': args.k1, 'k2': args.k2, 'lambda_value': args.lambda_value}


def evaluate_store_reranked(store, layout, splits, params, fusions=FUSIONS):
    """{setting: {fusion: [(cmc, mAP, mINP) per trial]}} of splits on extracted features, each
    fused distance re-ranked with params (the dataset's matching rule applied afterwards, as for
    the plain distances). The similarities of an image set with itself are computed once per
    setting and fusion: a query set of every test image is the same in all ten trials."""
    results, known = {}, {}

    def self_similarity(images, fusion):
        key = (images.modality, tuple(images.paths), fusion)
        if key not in known:
            features = store.select(images)
            known[key] = -fused_distance(features, features, fusions[fusion])
        return known[key]

    for name, _, query, gallery in splits:
        if name not in results:
            known.clear()  # one setting's [N, N] matrices at a time
        for fusion, weights in fusions.items():
            cross = -fused_distance(store.select(query), store.select(gallery), weights)
            distances = distances_from_similarity(cross, self_similarity(query, fusion),
                                                  self_similarity(gallery, fusion))
            results.setdefault(name, {}).setdefault(fusion, []).append(
                evaluate(layout, k_reciprocal_rerank(*distances, **params), query, gallery))
    return results


def rerank_label(params):
    """'re-ranked (k1=20, k2=6, lambda=0.3)': the title of the re-ranked tables."""
    return f're-ranked (k1={params["k1"]}, k2={params["k2"]}, lambda={params["lambda_value"]:g})'


def rerank_footnote(params):
    """What the re-ranked tables are, under them (lines of at most 100 characters)."""
    text = (f'{rerank_label(params)}: k-reciprocal re-ranking (Zhong et al., CVPR 2017) of each '
            f'fused distance, the original distance being the Euclidean distance in the fused '
            f'feature space. The neighbour sets are drawn from the query set and the gallery '
            f'together (the standard use): each query\'s re-ranked distances depend on the other '
            f'queries\' own neighbours, not only on the gallery.')
    return textwrap.fill(text, 100)


def rerank_record(params):
    """How the re-ranked results in the results file were made."""
    return {'k1': params['k1'], 'k2': params['k2'], 'lambda': params['lambda_value'],
            'neighbours': 'query set and gallery together (the standard use)',
            'original_distance': 'Euclidean distance in the fused feature space, '
                                 'sqrt(s(i,i) + s(j,j) - 2 s(i,j)) of the fused similarity s'}
