"""The test protocols of SYSU-MM01, RegDB and LLCM run on a model: every setting's query/gallery
splits, one feature extraction for all trials, the metrics per fusion, summaries and tables."""
import numpy as np
import torch

from data_manager import dataset_facts, layout_of, query_gallery
from eval_metrics import evaluate
from inference import FUSIONS, extract_features, fused_distance, load_trained_model
from utils import UserError

RANKS = (1, 5, 10, 20)


def protocol_splits(layout, data_path, trials, modes=('all',), multi_shot=False):
    """[(setting name, trial, query, gallery)] for every direction (and SYSU mode) and trial."""
    splits = []
    for direction in dataset_facts(layout).directions:
        for mode in (modes if layout == 'sysu' else ('all',)):
            name = f'{mode} {direction}' if layout == 'sysu' else direction
            for trial in trials:
                query, gallery = query_gallery(layout, direction, data_path, trial, mode=mode,
                                               multi_shot=multi_shot)
                splits.append((name, trial, query, gallery))
    return splits


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


def selection_rank1(model, layout, data_path, trial, mode, args, device, ctx=None):
    """The model-selection metric of METHOD.md: fused Rank-1 of IR->VIS (SYSU-MM01, LLCM) or
    VIS->IR (RegDB) on the first gallery trial (RegDB: the run's own split)."""
    direction = 'vis_to_ir' if layout == 'regdb' else 'ir_to_vis'
    query, gallery = query_gallery(layout, direction, data_path,
                                   trial if layout == 'regdb' else 0, mode=mode)
    results, _ = evaluate_splits(model, layout, [(direction, 0, query, gallery)], args, device,
                                 ctx, fusions={'pool+feat': FUSIONS['pool+feat']})
    cmc, mean_ap, minp = results[direction]['pool+feat'][0]
    return {'direction': direction, 'rank1': float(cmc[0]), 'mAP': float(mean_ap), 'mINP': float(minp)}


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
    """The trials tested with one model each: RegDB one split per model ({trial} in --resume),
    SYSU-MM01 and LLCM all gallery trials with the one model."""
    trials = parse_trials(args.trial, layout)
    if layout != 'regdb':
        return [trials]
    if len(trials) > 1 and '{trial}' not in args.resume:
        raise UserError('RegDB tests each split with the model trained on it: put {trial} in '
                        '--resume (e.g. save_model/regdb_deen_trial{trial}_best.pth) or pass --trial N.')
    if len(trials) > 1 and args.save_features and '{trial}' not in args.save_features:
        raise UserError('each RegDB split has its own model and features: put {trial} in '
                        '--save-features or pass --trial N.')
    return [[t] for t in trials]


def run_protocol(args, device, ctx):
    """Evaluate every setting of args.dataset with the checkpoint(s) of args.resume; returns
    ({setting: {fusion: summary}}, counts of images and forward passes). With args.save_features
    the extracted features are written there."""
    layout = layout_of(args.dataset)
    modes = ('all', 'indoor') if args.mode == 'both' else (args.mode,)
    results, counts = {}, {'images': 0, 'forward_passes': 0, 'separate_extraction_images': 0}
    for group in trial_groups(args, layout):
        path = checkpoint_for_trial(args.resume, group[0])
        model, info = load_trained_model(path, args.dataset, device)
        args.img_h, args.img_w = args.img_h or info['img_h'], args.img_w or info['img_w']
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        splits = protocol_splits(layout, args.data_path, group, modes, args.multi_shot)
        trial_results, store = evaluate_splits(model, layout, splits, args, device, ctx)
        for name, by_fusion in trial_results.items():
            for fusion, values in by_fusion.items():
                results.setdefault(name, {}).setdefault(fusion, []).extend(values)
        counts['images'] += store.images
        counts['forward_passes'] += store.forward_passes
        counts['separate_extraction_images'] += separate_extraction_cost(splits)
        if args.save_features and ctx.is_main:
            store.save(checkpoint_for_trial(args.save_features, group[0]),
                       {'dataset': args.dataset, 'data_path': args.data_path, 'checkpoint': path,
                        'method': info['method'], 'img_h': args.img_h, 'img_w': args.img_w})
    summaries = {name: {fusion: summarise(values) for fusion, values in by_fusion.items()}
                 for name, by_fusion in results.items()}
    return summaries, counts


def separate_extraction_cost(splits):
    """Images the released scripts decode: every query set once per setting, every trial's gallery."""
    queries = {(name, len(q)) for name, _, q, _ in splits}
    return sum(n for _, n in queries) + sum(len(g) for _, _, _, g in splits)
