"""Export a trained checkpoint (any method) to ONNX (one modality's stem, or both in one graph) with
test.py's features as output, and check the file against PyTorch with onnxruntime right away."""
import os
import sys

import torch

from checks import check_output_folder
from data_manager import MODALITIES
from inference import add_checkpoint_args, image_paths, load_trained_model
from onnx_export import (EXAMPLE_BATCH, OPSET, TOLERANCE, ExportMismatch, export_onnx, image_batch,
                         io_names, require_onnx, verify_export)
from tools.synthetic_data import image_rng, render_person
from utils import manual_parser, run_main

SYNTHETIC_CHECK_IMAGES = 5  # people drawn per modality when no --images are given
RANDOM_CHECK_BATCH = EXAMPLE_BATCH + 1  # random inputs: a batch size the export did not trace


def build_parser():
    """export.py's flags, grouped as its --help shows them (docs/search-export-api.md)."""
    parser = manual_parser(__doc__)
    model = parser.add_argument_group('model')
    add_checkpoint_args(model)
    graph = parser.add_argument_group('graph')
    graph.add_argument('--modality', default='both', choices=(*MODALITIES, 'both'),
                       help='the stem(s) in the graph: one input per modality')
    graph.add_argument('--fp16', action='store_true', help='float16 weights and arithmetic '
                       '(inputs and outputs stay float32)')
    graph.add_argument('--opset', type=int, default=OPSET, help='ONNX opset')
    output = parser.add_argument_group('output and check')
    output.add_argument('--out', help='ONNX file (default: the checkpoint\'s path with '
                        '_<modality>.onnx)')
    output.add_argument('--images', nargs='+', metavar='PATH',
                        help='image files or folders to check the export on (default: synthetic '
                             'people drawn at the model\'s size)')
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    args.out = args.out or f'{os.path.splitext(args.resume)[0]}_{args.modality}.onnx'
    return args


def real_image_checks(paths, modalities, info):
    """One normalised batch per modality: the --images files through every stem, or synthetic
    people of that modality drawn by tools/synthetic_data."""
    size = (info['img_w'], info['img_h'])
    if paths:
        batch = image_batch(paths, *reversed(size))
        return [batch] * len(modalities)
    return [image_batch([render_person(pid, 1, modality, 0, image_rng(0, pid, 1, modality, 0), size)
                         for pid in range(SYNTHETIC_CHECK_IMAGES)], *reversed(size))
            for modality in modalities]


def main(argv=None):
    args = parse_args(argv)
    require_onnx()
    paths = image_paths(args.images, 'images') if args.images else []
    folder = os.path.dirname(os.path.abspath(args.out))
    check_output_folder(folder, 'out', 'the ONNX file')
    os.makedirs(folder, exist_ok=True)
    model, info = load_trained_model(args.resume, args.dataset, torch.device('cpu'))
    modalities = MODALITIES if args.modality == 'both' else (args.modality,)

    export_onnx(model, info, modalities, args.out, args.fp16, args.opset)
    inputs, outputs = io_names(modalities)
    print(f'wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB, opset {args.opset}): '
          f'inputs {", ".join(inputs)} float32 [batch, 3, {info["img_h"]}, {info["img_w"]}] -> '
          f'outputs {", ".join(outputs)} float32 [batch, 2, {model.num_branches}, '
          f'{model.embed_dim}]')

    generator = torch.Generator().manual_seed(0)
    checks = {
        f'random inputs (batch {RANDOM_CHECK_BATCH})':
            [torch.randn(RANDOM_CHECK_BATCH, 3, info['img_h'], info['img_w'], generator=generator)
             for _ in modalities],
        f'{"--images" if paths else "synthetic"} images':
            real_image_checks(paths, modalities, info),
    }
    try:
        differences = verify_export(model, args.out, modalities, args.fp16, checks)
    except ExportMismatch:
        os.remove(args.out)
        print(f'removed {args.out}: its features do not match PyTorch\'s', file=sys.stderr)
        raise
    for name, difference in differences.items():
        print(f'onnxruntime vs PyTorch on {name}: max |difference| {difference:.2e}')
    print(f'verified: every feature within {TOLERANCE[args.fp16]:g} of PyTorch\'s (fp32)')
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
