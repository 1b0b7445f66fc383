"""search.py on a synthetic gallery folder with a model whose features are the images' colours:
the query's identity ranks first, unreadable files are skipped, and the gallery index is reused
(no image decoded) or refreshed (only changed and new files decoded) as the files change."""
import json
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data_loader
import figures
import inference
import search
from gallery_index import DEFAULT_INDEX_FOLDER
from utils import run_main

# Identity -> clothing colour; after ImageNet normalisation their mean pixels point in clearly
# different directions, so the colour model ranks an identity's images first.
COLOURS = {1: (220, 30, 30), 2: (30, 200, 40), 3: (40, 40, 230), 4: (235, 235, 235),
           5: (20, 20, 20)}
FORMATS = ('.jpg', '.png', '.bmp')
HOUR_AGO = time.time() - 3600  # files older than the index's scan: no racy re-read


class ColourNet(torch.nn.Module):
    """A stand-in for DEEN whose one embedding is an image's mean (normalised) colour: images of
    the same colour are nearest neighbours, whatever the stem."""
    num_branches, embed_dim = 1, 3

    def forward(self, visible=None, infrared=None):
        images = visible if visible is not None else infrared
        colour = F.normalize(images.mean((2, 3)), dim=1)
        return colour, colour


@pytest.fixture
def colour_model(monkeypatch, tmp_path):
    """A checkpoint file whose loading gives ColourNet (16x8 inputs); returns its path."""
    checkpoint = tmp_path / 'colour.pth'
    checkpoint.write_bytes(b'weights')
    info = {'method': 'colour', 'arch': 'none', 'img_h': 16, 'img_w': 8, 'num_classes': 5}
    monkeypatch.setattr(inference, 'load_trained_model',
                        lambda path, dataset=None, device='cpu': (ColourNet().eval(), info))
    return checkpoint


@pytest.fixture
def decoded(monkeypatch):
    """The image files decoded for features (data_loader.read_image calls), in order."""
    paths = []
    original = data_loader.read_image

    def counting(path, size=None):
        paths.append(str(path))
        return original(path, size)

    monkeypatch.setattr(data_loader, 'read_image', counting)
    return paths


def write_person(path, pid, seed):
    """A 20x40 image of identity pid's colour with noise, in the format of its suffix."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[pid]) + rng.normal(0, 12, (40, 20, 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    os.utime(path, (HOUR_AGO, HOUR_AGO))
    return path


@pytest.fixture
def folders(tmp_path):
    """(gallery, queries): 5 identities x 3 images in nested folders and three formats, a
    broken .jpg and a text file; query images of identities 2 and 4 and a broken .png."""
    gallery = tmp_path / 'gallery'
    for pid in COLOURS:
        for index, suffix in enumerate(FORMATS):
            write_person(gallery / f'person{pid}' / f'view{index}' / f'{pid}_{index}{suffix}',
                         pid, seed=10 * pid + index)
    (gallery / 'broken.jpg').write_bytes(b'not a jpeg')
    (gallery / 'notes.txt').write_text('not an image')
    queries = tmp_path / 'queries'
    for pid in (2, 4):
        write_person(queries / f'night_{pid}.png', pid, seed=100 + pid)
    (queries / 'broken.png').write_bytes(b'\x89PNG truncated')
    for broken in (gallery / 'broken.jpg', queries / 'broken.png'):
        os.utime(broken, (HOUR_AGO, HOUR_AGO))
    return gallery, queries


def run_search(checkpoint, gallery, queries, out, *extra):
    code = run_main(lambda: search.main(['--resume', str(checkpoint), '--query', str(queries),
                                         '--query-modality', 'infrared', '--gallery', str(gallery),
                                         '--out', str(out), '--topk', '3', '--device', 'cpu',
                                         '--workers', '0', *map(str, extra)]))
    assert code == 0
    with open(out / 'search.json') as handle:
        return json.load(handle)


def gallery_decodes(decoded, gallery):
    return sorted(os.path.relpath(p, gallery) for p in decoded if p.startswith(str(gallery)))


def test_search_ranks_the_query_identity_first_and_skips_unreadable_files(
        colour_model, folders, tmp_path, capsys):
    gallery, queries = folders
    result = run_search(colour_model, gallery, queries, tmp_path / 'out')
    printed = capsys.readouterr().out

    assert [os.path.basename(r['query']) for r in result['results']] == ['night_2.png',
                                                                         'night_4.png']
    for entry, pid in zip(result['results'], (2, 4)):
        matches = entry['matches']
        assert [m['rank'] for m in matches] == [1, 2, 3]
        assert all(f'person{pid}' in m['path'] for m in matches)  # all three images of the id
        assert [m['distance'] for m in matches] == sorted(m['distance'] for m in matches)
        assert matches[0]['path'] in printed
    assert result['gallery_images'] == 15 and result['gallery_modality'] == 'visible'
    assert result['unreadable'] == {'gallery': [str(gallery / 'broken.jpg')],
                                    'query': [str(queries / 'broken.png')]}
    assert f'skipped 1 unreadable gallery file(s): {gallery / "broken.jpg"}' in printed
    assert f'skipped 1 unreadable query file(s): {queries / "broken.png"}' in printed

    rows = [{'query': r['query'], 'gallery': r['matches']} for r in result['results']]
    title = 'infrared -> visible, pool+feat, top 3'
    with Image.open(tmp_path / 'out' / 'search.png') as png:
        assert png.size == figures.rank_list_size(rows, title)


def test_the_gallery_index_is_reused_then_refreshed_for_changed_files_only(
        colour_model, folders, decoded, tmp_path):
    gallery, queries = folders
    everything = sorted(os.path.relpath(p, gallery) for p in inference.image_files(gallery))
    first = run_search(colour_model, gallery, queries, tmp_path / 'out')
    assert gallery_decodes(decoded, gallery) == everything  # the broken file was tried too
    assert first['index']['extracted'] == 15

    decoded.clear()
    second = run_search(colour_model, gallery, queries, tmp_path / 'out')
    assert gallery_decodes(decoded, gallery) == []  # no gallery image decoded
    assert second['index'] == dict(first['index'], extracted=0, reused=15)
    assert second['results'] == first['results']
    assert second['unreadable'] == first['unreadable']  # remembered, not retried

    # person1's first view now shows identity 4; one file removed, one added
    changed = write_person(gallery / 'person1' / 'view0' / '1_0.jpg', 4, seed=7)
    os.utime(changed, (HOUR_AGO + 60, HOUR_AGO + 60))
    os.remove(gallery / 'person3' / 'view2' / '3_2.bmp')
    write_person(gallery / 'person5' / 'view3' / '5_3.png', 5, seed=8)
    decoded.clear()
    third = run_search(colour_model, gallery, queries, tmp_path / 'out', '--topk', 4)
    assert gallery_decodes(decoded, gallery) == [os.path.join('person1', 'view0', '1_0.jpg'),
                                                 os.path.join('person5', 'view3', '5_3.png')]
    assert third['index'] == dict(first['index'], extracted=2, reused=13, removed=1)
    identity4 = {m['path'] for m in third['results'][1]['matches']}
    assert identity4 == {str(p) for p in gallery.glob('person4/*/*')} | {str(changed)}
    assert all('3_2.bmp' not in m['path'] for r in third['results'] for m in r['matches'])

    os.utime(colour_model)  # a rewritten checkpoint invalidates every feature
    decoded.clear()
    fourth = run_search(colour_model, gallery, queries, tmp_path / 'out')
    assert len(gallery_decodes(decoded, gallery)) == 16 and fourth['index']['extracted'] == 15
    assert len(os.listdir(gallery / DEFAULT_INDEX_FOLDER)) == 1  # replaced, not added


def test_files_written_just_before_a_scan_are_read_again(colour_model, folders, decoded,
                                                         tmp_path):
    gallery, queries = folders
    fresh = write_person(gallery / 'person2' / 'new.png', 2, seed=9)
    os.utime(fresh)  # modified now: its mtime may not change with a second write this second
    run_search(colour_model, gallery, queries, tmp_path / 'out')
    decoded.clear()
    run_search(colour_model, gallery, queries, tmp_path / 'out')
    assert gallery_decodes(decoded, gallery) == [os.path.join('person2', 'new.png')]


def test_a_damaged_index_file_is_rebuilt(colour_model, folders, decoded, tmp_path):
    gallery, queries = folders
    first = run_search(colour_model, gallery, queries, tmp_path / 'out')
    with open(first['index']['file'], 'wb') as handle:
        handle.write(b'PK\x03\x04 damaged')
    decoded.clear()
    second = run_search(colour_model, gallery, queries, tmp_path / 'out')
    assert len(gallery_decodes(decoded, gallery)) == 16
    assert second['results'] == first['results']


def test_user_errors_are_found_before_the_model_is_loaded(monkeypatch, folders, tmp_path, capsys):
    gallery, queries = folders
    monkeypatch.setattr(inference, 'load_trained_model', pytest.fail)
    empty = tmp_path / 'empty'
    empty.mkdir()
    cases = [(['--gallery', str(gallery / 'missing'), '--query', str(queries)],
              f'--gallery {gallery / "missing"} is not a folder'),
             (['--gallery', str(empty), '--query', str(queries)],
              f'--gallery {empty} holds no image files'),
             (['--gallery', str(gallery), '--query', str(tmp_path / 'nope.jpg')],
              f'--query {tmp_path / "nope.jpg"} does not exist'),
             (['--gallery', str(gallery), '--query', str(empty)],
              f'--query {empty} holds no image files'),
             (['--gallery', str(gallery), '--query', str(queries), '--topk', '0'],
              '--topk must be a positive integer')]
    for argv, expected in cases:
        code = run_main(lambda: search.main(['--resume', str(tmp_path / 'any.pth'),
                                             '--query-modality', 'visible', *argv]))
        assert code == 2 and expected in capsys.readouterr().err
