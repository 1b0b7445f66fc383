"""Evaluate trained DEEN/AGW checkpoints (ours or released) with the full protocols of SYSU-MM01,
RegDB and LLCM: every distinct test image passes through the network once, all trials reuse it."""
import argparse
import json
import os
import sys

from data_manager import DATASETS, DEFAULT_DATA_PATHS
from evaluation import checkpoint_for_trial, format_table, run_protocol
from utils import add_runtime_args, fill_runtime_defaults, run_main, setup_runtime


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
    parser.add_argument('--save-features', help='also write the extracted test features (with paths, '
                        'ids, cameras, modality) to this torch file; RegDB: put {trial} in it')
    add_runtime_args(parser)
    args = parser.parse_args(argv)
    fill_runtime_defaults(args)
    args.data_path = args.data_path or DEFAULT_DATA_PATHS[args.dataset]
    return args


def main(argv=None):
    args = parse_args(argv)
    device, ctx = setup_runtime(args)
    summaries, counts = run_protocol(args, device, ctx)
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
