"""A failed run changes no earlier file: for each kind of derived file the tools write, a second
write stopped midway (Ctrl-C while the bytes go out) leaves the earlier file byte for byte as it
was, still read back by its reader, and no temporary file. The training cache and the
checkpoints have their own tests (test_checks.py, test_robustness.py)."""
import argparse
import json
import os

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

import evaluation  # noqa: E402
import figures  # noqa: E402
import gallery_index  # noqa: E402
import onnx_export  # noqa: E402
import paper_results  # noqa: E402
import search  # noqa: E402
import training  # noqa: E402
import visualize  # noqa: E402
from inference import FeatureStore  # noqa: E402
from model import build_model  # noqa: E402


def interrupting(write_partial):
    """A stand-in for a writer: writes part of a file through write_partial(args), then raises
    KeyboardInterrupt, as a Ctrl-C in the middle of the write would."""
    def writer(*args, **kwargs):
        write_partial(args)
        raise KeyboardInterrupt
    return writer


def partial_json(args):
    """json.dump(obj, handle): half an object into the text handle."""
    args[1].write('{"partial": ')


def partial_to(position):
    """A writer whose argument at position is a path or a binary handle: a few bytes into it."""
    def write(args):
        target = args[position]
        if hasattr(target, 'write'):
            target.write(b'PK\x03\x04 partial')
        else:
            with open(target, 'wb') as handle:
                handle.write(b'PK\x03\x04 partial')
    return write


def results_file(path, version):
    evaluation.write_results(path, {'format': evaluation.RESULTS_FORMAT, 'version': version})


def features_file(path, version):
    store = FeatureStore()
    store.add('visible', ['a.jpg', 'b.jpg'], torch.full((2, 2, 1, 4), float(version)), [1, 2],
              [1, 1])
    store.save(path, {'version': version})


def index_file(path, version):
    gallery_index.write_index(path, {'version': version}, version, {'a.jpg': (1, 2)},
                              np.full((1, 4), version, dtype=np.float32), {})


def png_file(path, version):
    figure = plt.figure(figsize=(1, 1))
    figure.text(0.5, 0.5, str(version))
    try:
        figures.save_png(figure, path)
    finally:
        plt.close(figure)


def figure_numbers_file(path, version):
    def draw(numbers, png):
        png_file(png, version)
        return 100, 100
    visualize.write(os.path.dirname(path), 'numbers', {'version': version}, draw)


def args_file(path, version):
    training.save_args(argparse.Namespace(log_path=os.path.dirname(path), version=version),
                       'run')


def onnx_file(path, version):
    model = build_model('agw', 4, 'llcm', pretrained=None, arch='resnet18')
    onnx_export.export_onnx(model, {'img_h': 32, 'img_w': 16, 'method': 'agw', 'arch': 'resnet18',
                                    'dataset': 'llcm', 'epoch': version},
                            ('visible',), path)


def comparison_file(path, version):
    """reproduce.py's comparison (.md beside its .json), of no finished part, named by version."""
    comparison = paper_results.compare('llcm', 'deen', 'pool+feat', [], missing=[f'v{version}'])
    paper_results.write_comparison(comparison, os.path.dirname(path))


def search_file(path, version):
    """search.py's search.json (and search.png) of one query matched with itself."""
    folder = os.path.dirname(path)
    image = os.path.join(folder, 'query.png')
    Image.new('RGB', (16, 32), (version, 0, 0)).save(image)
    args = argparse.Namespace(out=folder, resume=f'v{version}.pth', gallery=folder,
                              query_modality='infrared', gallery_modality='visible',
                              fusion='pool+feat', topk=1)
    index = argparse.Namespace(paths=[image], index_file='index.npz', extracted=1, reused=0,
                               removed=0, unreadable=[])
    matches = [{'rank': 1, 'distance': -1.0, 'path': image}]
    search.write_outputs([{'query': image, 'matches': matches}], args, index, [])


def nothing_more(args):
    """The stand-in of a step after the temporary file is open: it writes nothing more."""


def reads_back(kind, path):
    """Whether the file at path is read back as a valid file of its kind."""
    if kind == 'results':
        return evaluation.read_results(path) is not None
    if kind == 'features':
        return FeatureStore.load(path)[1]['version'] == 1
    if kind == 'index':
        return gallery_index.read_index(path, {'version': 1})['features'] is not None
    if kind == 'png':
        with Image.open(path) as image:
            image.verify()
        return True
    if kind in ('figure_numbers', 'args'):
        with open(path) as handle:
            return json.load(handle)['version'] == 1
    if kind == 'search':
        with open(path) as handle:
            return json.load(handle)['checkpoint'] == 'v1.pth'
    if kind == 'comparison':
        with open(path) as handle:
            return 'v1' in handle.read()
    if kind == 'onnx':
        import onnx
        onnx.checker.check_model(onnx.load(path))
        return True
    raise ValueError(kind)


# kind: (file name, writer, (object, attribute) of the low-level write to interrupt, its stand-in)
KINDS = {
    'results': ('results.json', results_file, (json, 'dump'), partial_json),
    'features': ('features.pth', features_file, (torch, 'save'), partial_to(1)),
    'index': ('index.npz', index_file, (np, 'savez'), partial_to(0)),
    'png': ('figure.png', png_file, (Image.Image, 'save'), partial_to(1)),
    'figure_numbers': ('numbers.json', figure_numbers_file, (json, 'dump'), partial_json),
    'args': ('run_args.json', args_file, (json, 'dump'), partial_json),
    'onnx': ('model.onnx', onnx_file, (torch.onnx, 'export'), partial_to(2)),
    'search': ('search.json', search_file, (json, 'dump'), partial_json),
    'comparison': ('llcm_deen_comparison.md', comparison_file,
                   (paper_results, 'comparison_markdown'), nothing_more),
}


@pytest.mark.parametrize('kind', list(KINDS))
def test_an_interrupted_write_leaves_the_earlier_file_as_it_was(kind, tmp_path, monkeypatch):
    name, write, (owner, attribute), partial = KINDS[kind]
    path = str(tmp_path / name)
    write(path, 1)
    before, files = open(path, 'rb').read(), sorted(os.listdir(tmp_path))
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, interrupting(partial))
        with pytest.raises(KeyboardInterrupt):
            write(path, 2)
    assert open(path, 'rb').read() == before
    assert sorted(os.listdir(tmp_path)) == files  # no temporary file left
    assert reads_back(kind, path)
