"""The Python API (inference.ReIDModel, rank_gallery, image_files): the docs' example runs as
written, and its features and rankings are test.py's."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_manager import query_gallery
from inference import (FUSIONS, ReIDModel, extract_features, fused_distance, image_files,
                       rank_gallery)
from tiny_runs import REPO, seeded_checkpoint
from tools.docs_check import code_blocks, section
from tools.synthetic_data import make_llcm
from utils import UserError


def readme_api_example():
    """The python block of the "Python API" section of docs/search-export-api.md (the page the
    README links for it)."""
    with open(f'{REPO}/docs/search-export-api.md') as handle:
        blocks = code_blocks(section(handle.read(), '## Python API'))
    return next(body for language, body in blocks if language == 'python')


@pytest.fixture
def demo_folder(tmp_path, monkeypatch):
    """A working folder laid out as after the Quick start: a small random DEEN checkpoint at
    save_model/demo_deen_best.pth and synthetic LLCM-layout data in data/demo."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'save_model').mkdir()
    seeded_checkpoint(tmp_path / 'save_model' / 'demo_deen_best.pth', 'demo', 4,
                      random_batchnorm=True)
    make_llcm(str(tmp_path / 'data' / 'demo'), num_train_ids=2, num_test_ids=4, size=(16, 32))
    return tmp_path


def test_readme_example_runs_and_ranks_as_the_fused_distance_does(demo_folder):
    code = readme_api_example()
    assert len(code.strip().splitlines()) == 5
    names = {}
    exec(compile(code, 'docs/search-export-api.md', 'exec'), names)  # noqa: S102  (the docs' own code)

    order, distances, day, night = names['order'], names['distances'], names['day'], names['night']
    assert order.shape == distances.shape == (2, 5)
    assert torch.all(distances[:, 1:] >= distances[:, :-1])
    gallery = names['model'].embed(day, 'visible')
    expected = fused_distance(night, gallery, FUSIONS['pool+feat'])
    assert torch.equal(order, expected.argsort(dim=1, stable=True)[:, :5])
    assert torch.allclose(distances, expected.gather(1, order))


def test_embed_gives_test_py_features_for_paths_and_pil_images(demo_folder):
    model = ReIDModel.load('save_model/demo_deen_best.pth', device='cpu', batch_size=3)
    query, gallery = query_gallery('llcm', 'ir_to_vis', 'data/demo', 0)
    args = model.settings
    store = extract_features(model.model, [query, gallery], args, torch.device('cpu'))
    for image_list in (query, gallery):
        expected = store.select(image_list)
        assert torch.allclose(model.embed(image_list.paths, image_list.modality), expected,
                              atol=1e-6)
        pil = [Image.open(path) for path in image_list.paths[:4]]
        assert torch.allclose(model.embed(pil, image_list.modality), expected[:4], atol=1e-6)
    # the stems differ: the same images through the other stem give other features
    assert not torch.allclose(model.embed(query.paths, 'visible'), store.select(query), atol=1e-3)


def test_unreadable_images_are_skipped_or_refused(demo_folder):
    model = ReIDModel.load('save_model/demo_deen_best.pth', device='cpu')
    paths = image_files('data/demo/test_vis')[:3]
    with open('broken.jpg', 'wb') as handle:
        handle.write(b'not an image')
    skipped = []
    features = model.embed([paths[0], 'broken.jpg', paths[1], paths[2]], 'visible',
                           unreadable=skipped)
    assert skipped == [1] and torch.allclose(features, model.embed(paths, 'visible'), atol=1e-6)
    with pytest.raises(UserError, match='broken.jpg cannot be decoded'):
        model.embed(['broken.jpg'], 'visible')
    with pytest.raises(UserError, match="modality must be one of visible, infrared"):
        model.embed(paths, 'thermal')


def test_image_files_lists_images_recursively_skipping_hidden_ones(tmp_path):
    for name in ('b/2.PNG', 'a/1.jpg', 'a/deep/3.webp', 'notes.txt', '.cache/4.jpg', 'a/.5.jpg'):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b'')
    assert image_files(str(tmp_path)) == [str(tmp_path / name) for name in
                                          ('a/1.jpg', 'a/deep/3.webp', 'b/2.PNG')]


def test_rank_gallery_orders_ties_by_gallery_row_and_names_unknown_fusions():
    gallery = torch.zeros(4, 2, 1, 2)
    gallery[:, :, 0, 0] = torch.tensor([[0.5, 0.5], [1.0, 1.0], [0.5, 0.5], [0.0, 0.0]])
    query = torch.zeros(1, 2, 1, 2)
    query[0, :, 0, 0] = 1.0
    order, distances = rank_gallery(query, gallery, topk=3)
    assert order.tolist() == [[1, 0, 2]] and distances.tolist() == [[-2.0, -1.0, -1.0]]
    assert np.allclose(rank_gallery(query, gallery, '0.1pool+0.9feat')[1], [[-1, -.5, -.5, 0]])
    with pytest.raises(UserError, match='fusion must be one of pool\\+feat'):
        rank_gallery(query, gallery, 'max')
