"""Search a folder of your own images with a trained DEEN/AGW checkpoint: rank every gallery image
for each query image of the other modality, print the top-k, write JSON and a rank-list PNG."""
import json
import os
import sys

import figures
from checks import check_device_flags, check_integer, check_output_folder, check_runtime_flags
from data_manager import MODALITIES
from gallery_index import DEFAULT_INDEX_FOLDER, update_index
from inference import (IMAGE_EXTENSIONS, ReIDModel, add_checkpoint_args, fusion_weights,
                       image_files, image_paths, rank_gallery)
from methods import METHODS, fusion_names
from utils import (UserError, add_image_size_args, add_runtime_args, fill_runtime_defaults,
                   manual_parser, resolve_device, run_main, written_atomically)

MAX_DRAWN_QUERIES = 20  # rows of the rank-list PNG; the JSON holds every query
NAMED_SKIPPED = 3       # unreadable files named in the message; the JSON lists all


def build_parser():
    """search.py's flags, grouped as its --help shows them (docs/search-export-api.md)."""
    parser = manual_parser(__doc__)
    model = parser.add_argument_group('model')
    add_checkpoint_args(model)
    add_image_size_args(model)
    images = parser.add_argument_group('query and gallery')
    images.add_argument('--query', required=True, nargs='+', metavar='PATH',
                        help='query image files and/or folders of them (searched recursively)')
    images.add_argument('--query-modality', required=True, choices=MODALITIES,
                        help='the modality of the query images')
    images.add_argument('--gallery', required=True, metavar='DIR',
                        help='folder of gallery images (searched recursively)')
    images.add_argument('--gallery-modality', choices=MODALITIES,
                        help='the modality of the gallery images (default: the other one '
                        'than --query-modality)')
    images.add_argument('--index-dir', help=f'where the gallery\'s features are cached (default: '
                        f'<gallery>/{DEFAULT_INDEX_FOLDER})')
    ranking = parser.add_argument_group('ranking and output')
    ranking.add_argument('--fusion', choices=fusion_names(),
                         help='the fused distance of test.py to rank by, one the checkpoint\'s '
                         'method reports (default: its headline fusion, DEEN\'s pool+feat; pool, '
                         'feat: one feature alone, re-normalised, as CAJ tests)')
    ranking.add_argument('--topk', type=int, default=10, help='gallery images shown per query')
    ranking.add_argument('--out', default='search_results', metavar='DIR',
                         help='folder for search.json and search.png')
    add_runtime_args(parser)
    return parser


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    fill_runtime_defaults(args)
    check_runtime_flags(args)
    check_integer(args.topk, 'topk', 1)
    args.gallery_modality = args.gallery_modality or next(
        m for m in MODALITIES if m != args.query_modality)
    args.index_dir = args.index_dir or os.path.join(args.gallery, DEFAULT_INDEX_FOLDER)
    return args


def gallery_files(folder):
    if not os.path.isdir(folder):
        raise UserError(f'--gallery {folder} is not a folder; expected a folder of images.')
    files = image_files(folder)
    if not files:
        raise UserError(f'--gallery {folder} holds no image files ({", ".join(IMAGE_EXTENSIONS)}).')
    return files


def skipped_message(paths, what):
    """One line saying how many files were skipped as unreadable, naming the first few."""
    named = ', '.join(paths[:NAMED_SKIPPED])
    more = f' and {len(paths) - NAMED_SKIPPED} more' if len(paths) > NAMED_SKIPPED else ''
    return f'skipped {len(paths)} unreadable {what} file(s): {named}{more}'


def main(argv=None):
    args = parse_args(argv)
    queries = image_paths(args.query, 'query')
    gallery = gallery_files(args.gallery)
    check_output_folder(args.index_dir, 'index_dir', 'the gallery index')
    check_output_folder(args.out, 'out', 'the search results')
    device = resolve_device(args)
    check_device_flags(args, device)
    model = ReIDModel.load(args.resume, args.dataset, device, img_h=args.img_h,
                           img_w=args.img_w, batch_size=args.test_batch, workers=args.workers,
                           amp=args.amp, channels_last=args.channels_last, compile=args.compile)
    method = METHODS.get(model.info['method'])  # None: a network of no registered method
    args.fusion = args.fusion or (method.headline if method else 'pool+feat')
    fusion_weights(args.fusion, method)  # a fusion the method lacks: refused before extraction

    index = update_index(model, args.resume, args.gallery, gallery, args.gallery_modality,
                         args.index_dir, progress=True)
    print(f'gallery {args.gallery}: {len(index.paths)} {args.gallery_modality} images '
          f'({index.extracted} extracted, {index.reused} read from {index.index_file}, '
          f'{index.removed} removed from it)')
    if index.unreadable:
        print(skipped_message(index.unreadable, 'gallery'))
    if not index.paths:
        raise UserError(f'--gallery {args.gallery} holds no readable image.')

    failed = []
    query_features = model.embed(queries, args.query_modality, unreadable=failed)
    failed = set(failed)
    unreadable_queries = [queries[i] for i in sorted(failed)]
    queries = [path for i, path in enumerate(queries) if i not in failed]
    if unreadable_queries:
        print(skipped_message(unreadable_queries, 'query'))
    if not queries:
        raise UserError('no --query image could be read.')

    order, distances = rank_gallery(query_features, index.features, args.fusion, args.topk,
                                    method)
    results = [{'query': query, 'matches': [
        {'rank': rank + 1, 'path': index.paths[row], 'distance': float(distance)}
        for rank, (row, distance) in enumerate(zip(rows.tolist(), dists.tolist()))]}
        for query, rows, dists in zip(queries, order, distances)]
    print_results(results, args)
    write_outputs(results, args, index, unreadable_queries)
    return 0


def print_results(results, args):
    for number, result in enumerate(results, 1):
        print(f'\nquery {number}/{len(results)} ({args.query_modality}): {result["query"]}')
        for match in result['matches']:
            print(f'  {match["rank"]:>3}  {match["distance"]:9.4f}  {match["path"]}')


def write_outputs(results, args, index, unreadable_queries):
    """search.json (every query's top-k, the settings, the counts and every skipped file) and
    search.png (the rank lists of the first MAX_DRAWN_QUERIES queries)."""
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = (os.path.join(args.out, name) for name in ('search.json', 'search.png'))
    with written_atomically(json_path) as tmp, open(tmp, 'w') as handle:
        json.dump({'checkpoint': args.resume, 'gallery': args.gallery,
                   'query_modality': args.query_modality,
                   'gallery_modality': args.gallery_modality, 'fusion': args.fusion,
                   'topk': args.topk, 'distance': 'negative fused similarity (smaller is closer)',
                   'gallery_images': len(index.paths),
                   'index': {'file': index.index_file, 'extracted': index.extracted,
                             'reused': index.reused, 'removed': index.removed},
                   'unreadable': {'gallery': index.unreadable, 'query': unreadable_queries},
                   'results': results}, handle, indent=2)
    rows = [{'query': result['query'], 'caption': os.path.basename(result['query']),
             'gallery': [dict(match, correct=None) for match in result['matches']]}
            for result in results[:MAX_DRAWN_QUERIES]]
    figures.draw_rank_lists(rows, png_path, title=f'{args.query_modality} -> '
                            f'{args.gallery_modality}, {args.fusion}, top {args.topk}')
    drawn = '' if len(results) <= MAX_DRAWN_QUERIES else f' (first {MAX_DRAWN_QUERIES} queries)'
    print(f'\nresults written to {json_path} and {png_path}{drawn}')


if __name__ == '__main__':
    sys.exit(run_main(main))
