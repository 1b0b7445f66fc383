"""Tests of tools/synthetic_data.py: the three layouts match DATASETS.md and their summaries,
generation is deterministic and the demo written once, and the drawn identities are learnable."""
import inspect
import itertools
import os
import re

import numpy as np
import pytest
from PIL import Image

from tools import synthetic_data as sd

LLCM_NAME = re.compile(r'^(train|test)_(vis|nir)/cam(\d)/(\d{4})/\4_c0\3_s\d{6}_f\d{4}_\2\.jpg$')
REGDB_NAME = re.compile(
    r'^(Visible|Thermal)/(\d+)/(male|female)_(front|back)_([vt])_\d{5}_\2\.bmp$')


def read_index(path):
    with open(path) as handle:
        return [(line.split()[0], int(line.split()[1])) for line in handle if line.strip()]


def read_ids(path):
    with open(path) as handle:
        return [int(token) for token in handle.read().strip().split(',')]


def folders(root, prefix=''):
    """{camera: {pid}} of the camN/PPPP folders under root/prefix."""
    base = os.path.join(root, prefix)
    found = {}
    for name in os.listdir(base):
        if re.fullmatch(r'cam\d', name):
            found[int(name[3:])] = {int(pid) for pid in os.listdir(os.path.join(base, name))}
    return found


def by_id(cams):
    """{camera: {pid}} -> {pid: [cameras]}."""
    out = {}
    for camera, pids in cams.items():
        for pid in pids:
            out.setdefault(pid, []).append(camera)
    return {pid: sorted(c) for pid, c in out.items()}


def pixels(image):
    return np.asarray(image, dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# LLCM

def test_llcm_training_index_lists_existing_files_with_labels_in_id_order(llcm_root, llcm_summary):
    labels = llcm_summary['train_labels']
    assert sorted(labels.values()) == list(range(len(llcm_summary['train_ids'])))
    for tag, modality in (('vis', 'visible'), ('nir', 'infrared')):
        entries = read_index(llcm_root / 'idx' / f'train_{tag}.txt')
        assert len(entries) == llcm_summary['counts']['train'][modality]
        for relative, label in entries:
            match = LLCM_NAME.match(relative)
            assert match and match.group(1) == 'train' and match.group(2) == tag, relative
            assert (llcm_root / relative).is_file()
            assert labels[int(match.group(4))] == label
        assert {int(LLCM_NAME.match(r).group(4)) for r, _ in entries} == set(labels)


def test_llcm_test_folders_match_the_summary_and_have_no_nir_cam3(llcm_root, llcm_summary):
    test_ids = llcm_summary['test_ids']
    assert read_ids(llcm_root / 'idx' / 'test_id.txt') == test_ids
    assert not set(test_ids) & set(llcm_summary['train_ids'])
    for tag, modality in (('vis', 'visible'), ('nir', 'infrared')):
        cams = folders(llcm_root, f'test_{tag}')
        assert set(cams) <= set(sd.LLCM_CAMERAS[modality])
        assert by_id(cams) == {pid: llcm_summary['cameras'][modality][pid] for pid in test_ids}
        train_cams = folders(llcm_root, f'train_{tag}')
        assert set(train_cams) <= set(sd.LLCM_CAMERAS[modality])
    assert 3 not in folders(llcm_root, 'test_nir') and 3 not in folders(llcm_root, 'train_nir')
    assert 3 in folders(llcm_root, 'test_vis') or 3 in folders(llcm_root, 'train_vis')


def test_llcm_ids_are_in_both_modalities_not_all_cameras_and_share_a_camera(llcm_summary):
    cameras = llcm_summary['cameras']
    for pid in llcm_summary['train_ids'] + llcm_summary['test_ids']:
        assert cameras['visible'][pid] and cameras['infrared'][pid]
    assert any(len(c) < 9 for c in cameras['visible'].values())
    first = llcm_summary['test_ids'][0]
    assert first in llcm_summary['same_camera_ids']
    assert set(cameras['visible'][first]) & set(cameras['infrared'][first])


def test_llcm_nir_images_have_equal_channels(llcm_root):
    relative, _ = read_index(llcm_root / 'idx' / 'train_nir.txt')[0]
    image = pixels(Image.open(llcm_root / relative))
    assert image.shape[2] == 3
    assert np.abs(image[..., 0] - image[..., 1]).max() <= 3  # JPEG rounding only
    relative, _ = read_index(llcm_root / 'idx' / 'train_vis.txt')[0]
    visible = pixels(Image.open(llcm_root / relative))
    assert np.abs(visible[..., 0] - visible[..., 1]).max() > 10


# ----------------------------------------------------------------------------------------------
# SYSU-MM01

def test_sysu_id_files_folders_and_names(sysu_root, sysu_summary):
    splits = {name: read_ids(sysu_root / 'exp' / f'{name}_id.txt')
              for name in ('train', 'val', 'test')}
    assert splits == {name: sysu_summary[f'{name}_ids'] for name in splits}
    everyone = sorted(itertools.chain(*splits.values()))
    assert len(set(everyone)) == len(everyone)
    assert everyone[-1] - everyone[0] + 1 > len(everyone)  # not contiguous
    with open(sysu_root / 'exp' / 'train_id.txt') as handle:
        assert not handle.read().startswith('0')  # ids written without zero padding
    cams = folders(sysu_root)
    assert set(cams) == {1, 2, 3, 4, 5, 6}
    on_disk = by_id(cams)
    for pid in everyone:
        cameras = sysu_summary['cameras']
        expected = sorted(cameras['visible'][pid] + cameras['infrared'][pid])
        assert on_disk[pid] == expected
        for camera in expected:
            names = sorted(os.listdir(sysu_root / f'cam{camera}' / f'{pid:04d}'))
            assert names == [f'{k + 1:04d}.jpg' for k in range(sysu_summary['images_per_camera'])]


def test_sysu_cameras_cover_the_search_modes_and_the_cam3_rule(sysu_summary):
    visible, infrared = sysu_summary['cameras']['visible'], sysu_summary['cameras']['infrared']
    for pid in visible:
        assert set(visible[pid]) <= {1, 2, 4, 5} and set(infrared[pid]) <= {3, 6}
        assert visible[pid] and infrared[pid]
    assert any(len(visible[pid]) < 4 for pid in visible)  # some ids miss some cameras
    for pid in sysu_summary['test_ids']:
        assert set(visible[pid]) & {1, 2} and set(visible[pid]) & {4, 5}
    assert any(3 in infrared[pid] and 2 in visible[pid] for pid in sysu_summary['test_ids'])


# ----------------------------------------------------------------------------------------------
# RegDB

def test_regdb_trials_split_ids_in_halves_with_ordered_labels(regdb_root, regdb_summary):
    ids = regdb_summary['ids']
    n = regdb_summary['images_per_modality']
    for trial in range(1, 11):
        halves = {}
        for part, modality in itertools.product(('train', 'test'), ('visible', 'thermal')):
            entries = read_index(regdb_root / 'idx' / f'{part}_{modality}_{trial}.txt')
            tag = 'v' if modality == 'visible' else 't'
            pids = []
            for relative, label in entries:
                match = REGDB_NAME.match(relative)
                assert match and match.group(5) == tag, relative
                assert (regdb_root / relative).is_file()
                pids.append(int(match.group(2)))
            order = sorted(set(pids))
            assert [label for _, label in entries] == [order.index(pid) for pid in pids]
            assert len(entries) == n * len(order)
            assert halves.setdefault(part, set(order)) == set(order)  # visible ids == thermal ids
        assert not halves['train'] & halves['test'] and halves['train'] | halves['test'] == set(ids)
        assert len(halves['train']) == len(ids) // 2
        assert sorted(halves['train']) == regdb_summary['trials'][trial]['train']


def test_regdb_trials_differ_and_thermal_files_twin_the_visible(regdb_root, regdb_summary):
    splits = {tuple(regdb_summary['trials'][t]['train']) for t in range(1, 11)}
    assert len(splits) == 10
    for pid in regdb_summary['ids']:
        files = regdb_summary['files']
        visible, thermal = files['visible'][pid], files['thermal'][pid]
        assert [p.replace('Visible/', 'Thermal/').replace('_v_', '_t_') for p in visible] == thermal
        on_disk = sorted(os.listdir(regdb_root / 'Visible' / str(pid)))
        assert on_disk == sorted(os.path.basename(p) for p in visible)


# ----------------------------------------------------------------------------------------------
# Determinism and the demo

def contents(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob('*') if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = sd.make_llcm(tmp_path / 'a', num_train_ids=2, num_test_ids=2, seed=5)
    second = sd.make_llcm(tmp_path / 'b', num_train_ids=2, num_test_ids=2, seed=5)
    other = sd.make_llcm(tmp_path / 'c', num_train_ids=2, num_test_ids=2, seed=6)
    assert first == second
    image = read_index(tmp_path / 'a' / 'idx' / 'train_nir.txt')[0][0]
    assert (tmp_path / 'a' / image).read_bytes() == (tmp_path / 'b' / image).read_bytes()
    assert contents(tmp_path / 'a') == contents(tmp_path / 'b')
    assert other != first and contents(tmp_path / 'c') != contents(tmp_path / 'a')


def test_a_custom_renderer_is_called_with_the_documented_arguments(tmp_path):
    calls = []

    def render(pid, camera, modality, index, rng, size):
        calls.append((pid, camera, modality, index, size))
        return Image.new('RGB', size, (pid, camera, index))

    summary = sd.make_sysu(tmp_path / 'sysu', render=render, size=(8, 16))
    assert len(calls) == sum(sum(c.values()) for c in summary['counts'].values())
    assert {c[2] for c in calls} == {'visible', 'infrared'}
    pid, camera, modality, index, size = calls[0]
    path = tmp_path / 'sysu' / f'cam{camera}' / f'{pid:04d}' / f'{index + 1:04d}.jpg'
    saved = pixels(Image.open(path))
    assert saved.shape == (16, 8, 3) and abs(saved[..., 0].mean() - pid) < 4


def test_demo_dataset_is_written_once(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, 'DEMO_CONFIG', dict(num_train_ids=3, num_test_ids=2, size=(8, 16)))
    root = sd.make_demo_dataset(tmp_path / 'demo')
    assert root == tmp_path / 'demo' and (root / sd.DEMO_MARKER).is_file()
    index = root / 'idx' / 'train_vis.txt'
    stamps = {p: p.stat().st_mtime_ns for p in (index, root / sd.DEMO_MARKER)}
    os.utime(index, ns=(1, 1))  # a rewrite would change this
    assert sd.make_demo_dataset(str(root)) == root
    assert index.stat().st_mtime_ns == 1
    assert (root / sd.DEMO_MARKER).stat().st_mtime_ns == stamps[root / sd.DEMO_MARKER]


def test_an_interrupted_demo_is_written_again(tmp_path, monkeypatch):
    monkeypatch.setattr(sd, 'DEMO_CONFIG', dict(num_train_ids=3, num_test_ids=2, size=(8, 16)))
    stale = tmp_path / 'demo' / 'train_vis' / 'cam1' / '9999' / 'stale.jpg'
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b'')
    root = sd.make_demo_dataset(tmp_path / 'demo')
    assert not stale.exists() and (root / sd.DEMO_MARKER).is_file()
    assert all((root / p).is_file() for p, _ in read_index(root / 'idx' / 'train_nir.txt'))


def test_demo_config_is_an_llcm_dataset_with_enough_identities_per_batch_and_test():
    config = sd.DEMO_CONFIG
    # Rank-20 can only fall short of 100% with well over 20 test identities
    assert config['num_train_ids'] >= 16 and config['num_test_ids'] >= 60
    assert set(config) <= set(inspect.signature(sd.make_llcm).parameters)


# ----------------------------------------------------------------------------------------------
# The renderer

def render(pid, camera, modality, index=0, seed=0, stream=None, size=(32, 64)):
    rng = sd.image_rng(seed, pid, *(stream or (camera, modality)), index)
    return pixels(sd.render_person(pid, camera, modality, index, rng, size))


def test_infrared_is_not_the_grey_of_the_visible_image():
    """Same pose and scene (one random stream) in both modalities: across identities, the
    brightness of the shirt in NIR does not follow its visible grey level."""
    grey, nir = [], []
    for pid in range(1, 61):
        visible = render(pid, 1, 'visible', stream=(1, 'visible'))
        infrared = render(pid, 1, 'infrared', stream=(1, 'visible'))
        assert np.array_equal(infrared[..., 0], infrared[..., 2])
        torso = (slice(19, 29), slice(13, 19))
        grey.append((visible[torso] @ np.array([0.299, 0.587, 0.114])).mean())
        nir.append(infrared[torso][..., 0].mean())
    assert abs(np.corrcoef(grey, nir)[0, 1]) < 0.5
    darkest, brightest = np.argsort(grey)[:10], np.argsort(grey)[-10:]
    assert max(np.array(nir)[darkest]) > min(np.array(nir)[brightest])  # dark clothes, bright NIR


def test_low_light_cameras_are_darker_than_the_others():
    dark = np.mean([render(pid, sd.LOW_LIGHT_CAMERAS[0], 'visible').mean() for pid in range(1, 9)])
    lit = np.mean([render(pid, 1, 'visible').mean() for pid in range(1, 9)])
    assert dark < 0.5 * lit


def test_distinct_identities_differ_in_the_same_pose_and_scene():
    for modality in ('visible', 'infrared'):
        images = [render(pid, 1, modality, stream=(1, 'visible')) for pid in range(1, 11)]
        for a, b in itertools.combinations(images, 2):
            assert np.abs(a - b).mean() > 8  # the scene and the noise are the same


def profile(image):
    """A crude, pose-tolerant descriptor: mean colour of 16 bands of the central columns."""
    h, w = image.shape[:2]
    strip = image[:, w * 3 // 8: w * 5 // 8].mean(axis=1).reshape(16, h // 16, -1).mean(axis=1)
    return (strip - strip.mean()).ravel()


@pytest.mark.parametrize('modality', ['visible', 'infrared'])
def test_identities_are_recognisable_across_cameras(modality):
    """Nearest neighbour on a crude descriptor across two cameras beats chance (1/20) by far."""
    ids = range(1, 21)
    query = np.stack([profile(render(pid, 1, modality, index=0)) for pid in ids])
    gallery = np.stack([profile(render(pid, 4, modality, index=1)) for pid in ids])
    distances = ((query[:, None] - gallery[None]) ** 2).sum(-1)
    assert (distances.argmin(axis=1) == np.arange(len(ids))).mean() >= 0.3


def test_render_person_returns_the_requested_size_in_every_modality():
    for modality in ('visible', 'infrared', 'thermal'):
        image = sd.render_person(3, 2, modality, 0, np.random.default_rng(0), (16, 32))
        assert image.size == (16, 32) and image.mode == 'RGB'
    with pytest.raises(ValueError):
        sd.render_person(3, 2, 'ultraviolet', 0, np.random.default_rng(0), (16, 32))


def test_nir_brightness_is_set_by_the_dye_not_by_the_visible_brightness():
    """A colour fixes its NIR reflectance up to a small material deviation (so the mapping can
    be learnt from training ids), but dark dyes can be bright in NIR and light ones dark."""
    def luma(rgb):
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    def nir(rgb, seed=0):
        return sd.nir_reflectance(rgb, np.random.default_rng(seed))

    assert np.std([nir((150, 20, 20), seed) for seed in range(50)]) < 0.1
    assert nir((90, 0, 0)) > 0.65 and luma((90, 0, 0)) < 30        # dark red: bright in NIR
    assert nir((0, 255, 255)) < 0.3 and luma((0, 255, 255)) > 170  # light cyan: dark in NIR
    rng = np.random.default_rng(0)
    colours = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(200)]
    assert abs(np.corrcoef([luma(c) for c in colours], [nir(c) for c in colours])[0, 1]) < 0.5
