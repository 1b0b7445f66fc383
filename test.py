"""Evaluate trained DEEN/AGW checkpoints (ours or released) with the full protocols of SYSU-MM01,
RegDB and LLCM: every distinct test image passes through the network once, all trials reuse it."""
import argparse
import contextlib
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from data_loader import TestImageSet
from data_manager import DATASETS, DEFAULT_DATA_PATHS, dataset_facts, layout_of, query_gallery
from eval_metrics import evaluate
from model import build_model, load_model_weights
from utils import DistContext, UserError, init_distributed, load_checkpoint, run_main

# Weights of (pooled, BNNeck) embeddings in the similarity (METHOD.md "Test-time features").
FUSIONS = {'pool+feat': (1.0, 1.0), '0.1pool+0.9feat': (0.1, 0.9)}
METHOD_IMAGE_SIZE = {'deen': (384, 144), 'agw': (288, 144)}
RANKS = (1, 5, 10, 20)


# ----------------------------------------------------------------------------------------------
# Runtime flags shared with train.py

def add_runtime_args(parser):
    """Device, precision and input-pipeline flags common to train.py and test.py."""
    parser.add_argument('--gpu', type=int, help='CUDA device index (same as --device cuda:N)')
    parser.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--workers', type=int, help='data-loading processes (default: 4, fewer on machines '
                        'with fewer cores)')
    parser.add_argument('--test-batch', type=int, help='test images per forward pass (default 64)')
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                        help='mixed precision (autocast; fp16 adds a gradient scaler)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms (bit-reproducible on CPU, cuDNN-deterministic on GPU)')


def default_workers():
    """Data-loading processes when --workers is unset: 4, or as many as the cores this process
    may use when there are fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return min(4, cores or 1)


def fill_runtime_defaults(args):
    """Unset --workers and --test-batch of train.py and test.py take their defaults."""
    args.workers = default_workers() if args.workers is None else args.workers
    args.test_batch = args.test_batch or 64


def resolve_device(args):
    """--device wins, then --gpu, then CUDA if available, else CPU; a missing GPU is an error."""
    name = args.device or (f'cuda:{args.gpu}' if args.gpu is not None else None)
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device must be cpu, cuda or cuda:N, got {name!r}.') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'{name} was requested but PyTorch sees no CUDA GPU; use --device cpu.')
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f'{name} was requested but only {torch.cuda.device_count()} GPU(s) exist.')
    return device


def setup_runtime(args):
    """(device, distributed context): under torchrun each process takes the GPU of its local rank."""
    device = resolve_device(args)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == 'cuda':
        device = torch.device('cuda', ctx.local_rank)
        torch.cuda.set_device(device)
    return device, ctx


def autocast_context(device, amp):
    """torch.autocast for --amp bf16|fp16, a no-op for off."""
    if amp == 'off':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


# ----------------------------------------------------------------------------------------------
# Features

class FeatureStore:
    """Test features of distinct images: per modality a path -> row index and a tensor
    [N, 2, branches, D] holding the flip-summed L2-normalised (pooled, BNNeck) embeddings."""

    def __init__(self):
        self.rows, self.features = {}, {}
        self.images, self.forward_passes = 0, 0

    def select(self, image_list):
        rows = self.rows[image_list.modality]
        return self.features[image_list.modality][[rows[p] for p in image_list.paths]]


def extract_features(model, image_lists, args, device, ctx=None):
    """Pass each distinct image of image_lists (and its horizontal flip, in the same batch)
    through the network once; under torchrun each process takes every world_size-th image and
    the results are gathered on all processes."""
    ctx = ctx or DistContext()
    store = FeatureStore()
    model.eval()
    for modality in sorted({lst.modality for lst in image_lists}):
        paths = sorted({p for lst in image_lists if lst.modality == modality for p in lst.paths})
        mine = paths[ctx.rank::ctx.world_size]
        features, passes = _extract(model, modality, mine, args, device)
        store.rows[modality] = {p: i for i, p in enumerate(paths)}
        store.features[modality] = _gather_strided(features, len(paths), ctx)
        store.images += len(paths)
        store.forward_passes += passes * ctx.world_size
    return store


def _extract(model, modality, paths, args, device):
    loader = torch.utils.data.DataLoader(TestImageSet(paths, args.img_h, args.img_w),
                                         batch_size=args.test_batch, num_workers=args.workers,
                                         pin_memory=device.type == 'cuda')
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    branches = model.num_branches
    chunks = []
    with torch.inference_mode():
        for images in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast_context(device, args.amp):
                pool, feat = model(**{modality: torch.cat([images, images.flip(3)])})
            both = torch.stack([pool.float(), feat.float()], dim=1)     # [k*2B, 2, D]
            both = both.reshape(branches, 2, len(images), 2, -1).sum(1)  # [k, B, 2, D], flips summed
            chunks.append(both.permute(1, 2, 0, 3))                      # [B, 2, k, D]
    if not chunks:
        return torch.zeros(0, 2, branches, model.embed_dim, device=device), 0
    return torch.cat(chunks), len(chunks)


def _gather_strided(features, total, ctx):
    """Reassemble rows [rank::world_size] from every process into one [total, ...] tensor."""
    if not ctx.enabled:
        return features
    per_rank = -(-total // ctx.world_size)
    padded = features.new_zeros((per_rank,) + features.shape[1:])
    padded[:len(features)] = features
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded.contiguous())
    full = features.new_empty((total,) + features.shape[1:])
    for rank, part in enumerate(gathered):
        count = len(range(rank, total, ctx.world_size))
        full[rank::ctx.world_size] = part[:count]
    return full


def fused_distance(query_features, gallery_features, weights):
    """Negative fused similarity: sum over branches of w_pool*<pool> + w_feat*<feat>."""
    scale = query_features.new_tensor(weights).view(1, 2, 1, 1)
    return -(query_features * scale).flatten(1) @ gallery_features.flatten(1).T


# ----------------------------------------------------------------------------------------------
# Protocols

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


def evaluate_splits(model, layout, splits, args, device, ctx=None, fusions=FUSIONS):
    """Extract once, then {setting: {fusion: [(cmc, mAP, mINP) per trial]}} plus the store."""
    store = extract_features(model, [lst for _, _, q, g in splits for lst in (q, g)], args,
                             device, ctx)
    results = {}
    for name, _, query, gallery in splits:
        query_features, gallery_features = store.select(query), store.select(gallery)
        for fusion, weights in fusions.items():
            distmat = fused_distance(query_features, gallery_features, weights)
            results.setdefault(name, {}).setdefault(fusion, []).append(
                evaluate(layout, distmat, query, gallery))
    return results, store


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
    """[(cmc, mAP, mINP)] over trials -> {metric: (mean, std)} for Rank-1/5/10/20, mAP, mINP."""
    columns = {}
    for rank in RANKS:
        values = [cmc[min(rank, len(cmc)) - 1] for cmc, _, _ in per_trial]
        columns[f'Rank-{rank}'] = values
    columns['mAP'] = [m for _, m, _ in per_trial]
    columns['mINP'] = [m for _, _, m in per_trial]
    return {name: (float(np.mean(v)), float(np.std(v)), [float(x) for x in v])
            for name, v in columns.items()}


def format_table(name, by_fusion, trials):
    header = f'{name}  ({trials} trial{"s" if trials > 1 else ""}, mean ± std, %)'
    lines = [header, f'  {"fusion":<16}' + ''.join(f'{c:>16}' for c in
                                                    [f'Rank-{r}' for r in RANKS] + ['mAP', 'mINP'])]
    for fusion, summary in by_fusion.items():
        cells = ''.join(f'{100 * mean:>9.2f} ± {100 * std:4.2f}' for mean, std, _ in summary.values())
        lines.append(f'  {fusion:<16}{cells}')
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def load_trained_model(path, dataset, device):
    """Build the network a checkpoint (ours or released) describes and load its weights.
    Returns (model, info) with info holding method, image size and training dataset."""
    state = load_checkpoint(path)
    if state.get('format') == 'deen-vireid':
        if layout_of(state['dataset']) != layout_of(dataset):
            raise UserError(f'checkpoint {path} was trained on {state["dataset"]}; test it with '
                            f'--dataset {state["dataset"]}.')
        info = {'method': state['method'], 'arch': state.get('arch', 'resnet50'),
                'img_h': state['img_h'], 'img_w': state['img_w'],
                'num_classes': state['num_classes'], 'epoch': state['epoch']}
        weights = state['model']
    else:  # released DEEN .t file: {'net': state_dict, 'epoch', 'mAP', ...}
        weights = state.get('net', state)
        if 'classifier.weight' not in weights:
            raise UserError(f'checkpoint {path} holds no DEEN/AGW weights (no classifier.weight).')
        height, width = METHOD_IMAGE_SIZE['deen']
        info = {'method': 'deen', 'arch': 'resnet50', 'img_h': height, 'img_w': width,
                'num_classes': int(weights['classifier.weight'].shape[0]),
                'epoch': state.get('epoch')}
    model = build_model(info['method'], info['num_classes'], dataset, pretrained=None,
                        arch=info['arch'])
    load_model_weights(model, weights)
    return model.to(device), info


def checkpoint_for_trial(resume, trial):
    """RegDB tests split T with the model trained on split T: '{trial}' in --resume is replaced."""
    return resume.replace('{trial}', str(trial))


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--dataset', default='llcm', choices=DATASETS)
    parser.add_argument('--data-path', help='dataset root (default: data/<name>)')
    parser.add_argument('--resume', required=True, help='checkpoint file; for RegDB put {trial} '
                        'in the path to use each split\'s own model')
    parser.add_argument('--mode', default='both', choices=('all', 'indoor', 'both'),
                        help='SYSU-MM01 search mode(s)')
    parser.add_argument('--trial', default='all', help='RegDB split 1..10 or all; SYSU/LLCM: '
                        'gallery trial 0..9 or all')
    parser.add_argument('--multi-shot', action='store_true', help='SYSU-MM01 multi-shot gallery (10 per id and camera)')
    parser.add_argument('--img_h', type=int, help='default: the checkpoint\'s')
    parser.add_argument('--img_w', type=int, help='default: the checkpoint\'s')
    parser.add_argument('--output', help='JSON results file (default: next to the checkpoint)')
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    fill_runtime_defaults(args)
    args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
    return args


def parse_trials(args, layout):
    allowed = list(dataset_facts(layout).test_trials)
    if args.trial == 'all':
        return allowed
    if not args.trial.lstrip('-').isdigit() or int(args.trial) not in allowed:
        raise UserError(f'--trial for {layout} must be one of {allowed[0]}..{allowed[-1]} or "all", '
                        f'got {args.trial!r}.')
    return [int(args.trial)]


def run_tests(args, device, ctx):
    """Evaluate every setting; returns {setting: {fusion: summary}} and prints the tables."""
    layout = layout_of(args.dataset)
    trials = parse_trials(args, layout)
    modes = ('all', 'indoor') if args.mode == 'both' else (args.mode,)
    if layout == 'regdb' and len(trials) > 1 and '{trial}' not in args.resume:
        raise UserError('RegDB tests each split with the model trained on it: put {trial} in '
                        '--resume (e.g. save_model/regdb_deen_trial{trial}_best.pth) or pass --trial N.')
    # RegDB: one model per split; SYSU-MM01 and LLCM: one model, all gallery trials at once.
    groups = [[t] for t in trials] if layout == 'regdb' else [trials]
    results, counts = {}, {'images': 0, 'forward_passes': 0, 'separate_extraction_images': 0}
    for group in groups:
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
    summaries = {name: {fusion: summarise(values) for fusion, values in by_fusion.items()}
                 for name, by_fusion in results.items()}
    return summaries, counts


def separate_extraction_cost(splits):
    """Images the released scripts decode: every query set once per setting, every trial's gallery."""
    queries = {(name, len(q)) for name, _, q, _ in splits}
    return sum(n for _, n in queries) + sum(len(g) for _, _, _, g in splits)


def main(argv=None):
    args = parse_args(argv)
    device, ctx = setup_runtime(args)
    summaries, counts = run_tests(args, device, ctx)
    if not ctx.is_main:
        return 0
    for name, by_fusion in summaries.items():
        trials = len(next(iter(by_fusion.values()))['mAP'][2])
        print(format_table(f'{args.dataset} {name}', by_fusion, trials) + '\n')
    print(f'{counts["images"]} distinct test images, each passed once with its flip '
          f'({counts["forward_passes"]} batches); extracting each trial\'s gallery separately '
          f'would decode {counts["separate_extraction_images"]} images.')
    output = args.output or os.path.splitext(checkpoint_for_trial(args.resume, 'all'))[0] + '_test.json'
    with open(output, 'w') as handle:
        json.dump({'dataset': args.dataset, 'checkpoint': args.resume, 'results': summaries,
                   'counts': counts}, handle, indent=2)
    print(f'results written to {output}')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
