"""export.py on a small random DEEN (ResNet-18 trunk, 64x32): the ONNX graph gives PyTorch's
test features for both modalities at batch sizes other than the exported one, fp16 stays close,
a graph that does not match is refused, and missing ONNX packages are named."""
import contextlib
import io
import shutil
import sys

import numpy as np
import pytest
import torch

import export
import onnx_export
from inference import embed_batch, load_trained_model
from tiny_runs import seeded_checkpoint
from utils import UserError, run_main

SIZE = (64, 32)


def tiny_checkpoint(path, seed=0):
    seeded_checkpoint(path, 'llcm', 4, seed=seed, img_h=SIZE[0], img_w=SIZE[1],
                      random_batchnorm=True)
    return path


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    for package in onnx_export.ONNX_PACKAGES:  # optional: the README's test command installs them
        pytest.importorskip(package)
    return tiny_checkpoint(tmp_path_factory.mktemp('export') / 'tiny.pth')


@pytest.fixture(scope='module')
def both_graph(checkpoint):
    """(path, printed output) of the graph of both stems export.py wrote for the checkpoint."""
    path, printed = checkpoint.parent / 'both.onnx', io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = export.main(['--resume', str(checkpoint), '--modality', 'both', '--out', str(path)])
    assert code == 0
    return path, printed.getvalue()


def pytorch_features(checkpoint, modality, images):
    model, _ = load_trained_model(str(checkpoint), device='cpu')
    with torch.inference_mode():
        return embed_batch(model, modality, images).numpy()


def random_images(batch, seed):
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_both_modalities_match_pytorch_at_other_batch_sizes(checkpoint, both_graph):
    both_graph, printed = both_graph
    assert 'onnxruntime vs PyTorch on random inputs (batch 3): max |difference|' in printed
    assert 'onnxruntime vs PyTorch on synthetic images: max |difference|' in printed
    session = onnx_export.onnx_session(str(both_graph))
    assert [i.name for i in session.get_inputs()] == ['visible', 'infrared']
    assert all(isinstance(i.shape[0], str) for i in session.get_inputs())  # a dynamic batch
    visible, infrared = random_images(5, seed=1), random_images(1, seed=2)  # exported at 2
    got = session.run(None, {'visible': visible.numpy(), 'infrared': infrared.numpy()})
    for output, modality, images in zip(got, ('visible', 'infrared'), (visible, infrared)):
        expected = pytorch_features(checkpoint, modality, images)
        assert output.shape == expected.shape == (len(images), 2, 3, 512)
        assert np.abs(output - expected).max() < 1e-4
    # one modality of the graph of both: an empty batch for the other
    empty, alone = session.run(None, {'visible': np.zeros((0, 3, *SIZE), np.float32),
                                      'infrared': infrared.numpy()})
    assert empty.shape == (0, 2, 3, 512) and np.array_equal(alone, got[1])


def test_fp16_graph_of_one_stem_stays_close_to_pytorch(checkpoint):
    path = checkpoint.parent / 'infrared16.onnx'
    assert export.main(['--resume', str(checkpoint), '--modality', 'infrared', '--fp16',
                        '--out', str(path)]) == 0
    images = random_images(4, seed=3)
    (got,) = onnx_export.onnx_features(onnx_export.onnx_session(str(path)), ('infrared',), [images])
    assert got.dtype == np.float32
    assert np.abs(got - pytorch_features(checkpoint, 'infrared', images)).max() < 1e-2
    # the infrared stem, not the visible one: those features are further away than the tolerance
    assert np.abs(got - pytorch_features(checkpoint, 'visible', images)).max() > 1e-1
    assert path.stat().st_size < 0.6 * checkpoint.stat().st_size  # float16 weights


def test_a_graph_that_differs_from_pytorch_fails_and_is_removed(checkpoint, both_graph,
                                                               monkeypatch, tmp_path):
    other = tiny_checkpoint(tmp_path / 'other.pth', seed=1)
    # the export of `other` writes the graph of `checkpoint`: the check must catch it
    monkeypatch.setattr(export, 'export_onnx', lambda model, info, modalities, path, *rest:
                        shutil.copy(both_graph[0], path))
    out = tmp_path / 'wrong.onnx'
    with pytest.raises(onnx_export.ExportMismatch, match='differ from PyTorch'):
        export.main(['--resume', str(other), '--out', str(out)])
    assert not out.exists()


def test_missing_onnx_packages_are_named_before_anything_is_loaded(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import onnxruntime raises ImportError
    with pytest.raises(UserError, match='pip install onnx onnxruntime onnxscript'):
        onnx_export.require_onnx()
    code = run_main(lambda: export.main(['--resume', str(tmp_path / 'missing.pth')]))
    error = capsys.readouterr().err
    assert code == 2 and 'pip install onnx onnxruntime onnxscript' in error
    assert len(error.strip().splitlines()) == 1
