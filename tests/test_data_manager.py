"""Tests of data_manager on tiny folders in the real SYSU-MM01, LLCM and RegDB layouts: files, ids,
cameras, the seeded random galleries, every direction, training lists and the user errors."""
import os
import random
import re

import numpy as np
import pytest

import data_manager
from data_manager import (ImageList, process_gallery_llcm, process_gallery_sysu,
                          process_query_llcm, process_query_sysu, process_test_regdb,
                          query_gallery, train_image_lists)
from utils import UserError

# Files per (id, camera) of the tiny folders. Every data root has "cam" in its path (cam5_data/
# SYSU-MM01; the LLCM root is itself named cam8), which a parser reading "cam" off the whole path
# would take for a camera.
SYSU_TRAIN_IDS, SYSU_VAL_IDS, SYSU_TEST_IDS = (1, 2), (3,), (6, 4)   # test_id.txt is unsorted
SYSU_TEST_FILES = {(4, 1): 3, (4, 2): 2, (4, 3): 4, (4, 4): 12, (4, 6): 1,  # id 4 has no cam5
                   (6, 1): 5, (6, 2): 4, (6, 3): 2, (6, 4): 3, (6, 5): 6, (6, 6): 3}
LLCM_TEST_IDS = (9, 7)
LLCM_TEST_FILES = {  # (modality folder, id, camera): files; test_nir has no cam3 by protocol
    **{('test_vis', 7, cam): 2 + cam % 3 for cam in range(1, 10)},
    **{('test_vis', 9, cam): 3 for cam in (1, 3, 8)},
    **{('test_nir', 7, cam): 3 for cam in (1, 2, 4, 9)},
    **{('test_nir', 9, cam): 1 + cam % 4 for cam in (2, 5, 6, 7, 8)},
}
LLCM_TRAIN = {  # original label -> ((visible cameras), (infrared cameras)), one image each
    12: ((1, 5), (2,)), 30: ((3,), (1, 4)), 21: ((2,), (2, 6))}


def touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, 'w').close()


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as handle:
        handle.write(text)


def make_sysu(root, train_ids=SYSU_TRAIN_IDS, val_ids=SYSU_VAL_IDS, infrared_only=()):
    for pid in [*train_ids, *val_ids]:
        for cam in range(1, 7):
            if cam in (3, 6) or pid not in infrared_only:
                for number in (2, 1):
                    touch(f'{root}/cam{cam}/{pid:04d}/{number:04d}.jpg')
    for (pid, cam), count in SYSU_TEST_FILES.items():
        for number in reversed(range(1, count + 1)):
            touch(f'{root}/cam{cam}/{pid:04d}/{number:04d}.jpg')
    touch(f'{root}/cam1/0005/0001.jpg')  # an id in no list
    write(f'{root}/exp/train_id.txt', ','.join(map(str, train_ids)))
    write(f'{root}/exp/val_id.txt', ','.join(map(str, val_ids)))
    write(f'{root}/exp/test_id.txt', ','.join(map(str, SYSU_TEST_IDS)) + '\n')
    return root


def make_llcm(root):
    for (folder, pid, cam), count in LLCM_TEST_FILES.items():
        for number in range(count, 0, -1):
            name = f'{pid:04d}_c{cam:02d}_s{number:06d}_f0001.jpg'
            touch(f'{root}/{folder}/cam{cam}/{pid:04d}/{name}')
    touch(f'{root}/test_nir/cam3/0007/0007_c03_s000001_f0001.jpg')  # outside the protocol
    write(f'{root}/idx/test_id.txt', ','.join(map(str, LLCM_TEST_IDS)))
    for position, suffix in enumerate(('vis', 'nir')):
        lines = [f'train_{suffix}/cam{cam}/{label:04d}/{label:04d}_c{cam:02d}_{suffix}.jpg {label}'
                 for label, cameras in LLCM_TRAIN.items() for cam in cameras[position]]
        write(f'{root}/idx/train_{suffix}.txt', '\n'.join(lines) + '\n')
    return root


def regdb_lines(kind, modality, trial):
    """Two ids of five images per trial: train ids 2t, 2t+1 and test ids 100+2t, 101+2t."""
    folder, letter = ('Visible', 'v') if modality == 'visible' else ('Thermal', 't')
    first = 2 * trial + (100 if kind == 'test' else 0)
    return [f'{folder}/{pid + 1}/male_front_{letter}_{pid * 10 + shot:05d}_{pid + 1}.bmp {pid}'
            for pid in (first, first + 1) for shot in range(5)]


def make_regdb(root, trials=(1, 2)):
    for trial in trials:
        for kind in ('train', 'test'):
            for modality in ('visible', 'thermal'):
                lines = regdb_lines(kind, modality, trial)
                write(f'{root}/idx/{kind}_{modality}_{trial}.txt', '\n'.join(lines) + '\n')
    return root


@pytest.fixture(scope='module')
def sysu(tmp_path_factory):
    return make_sysu(str(tmp_path_factory.mktemp('cam5_data') / 'SYSU-MM01'))


@pytest.fixture(scope='module')
def llcm(tmp_path_factory):
    return make_llcm(str(tmp_path_factory.mktemp('cam2_data') / 'cam8'))


@pytest.fixture(scope='module')
def regdb(tmp_path_factory):
    return make_regdb(str(tmp_path_factory.mktemp('cam1_data') / 'RegDB'))


def folder_files(root, folder, pid, cam):
    """The files of one id/camera folder, sorted by name, as the protocol lists them."""
    directory = os.path.join(root, folder, f'cam{cam}', f'{pid:04d}')
    return sorted(os.path.join(directory, name) for name in os.listdir(directory))


def protocol_gallery(root, folder, ids, cameras, trial, multi_shot=False):
    """DATASETS.md's rule written out again: random.seed(trial), ids ascending, cameras in order,
    random.choice (random.sample of 10 for multi-shot) of the sorted paths of existing folders."""
    random.seed(trial)
    paths = []
    for pid in sorted(ids):
        for cam in cameras:
            if os.path.isdir(os.path.join(root, folder, f'cam{cam}', f'{pid:04d}')):
                files = folder_files(root, folder, pid, cam)
                if not multi_shot:
                    paths.append(random.choice(files))
                else:
                    paths.extend(random.sample(files, 10) if len(files) > 10 else files)
    return paths


def camera_and_id_of(path):
    """(camera, id) read from the camN/PPPP folders that hold the file."""
    cam_folder, id_folder = path.split(os.sep)[-3:-1]
    return int(cam_folder[3:]), int(id_folder)


def assert_consistent(image_list, modality):
    """pids/camids are int64 arrays agreeing with the folders of each path."""
    assert isinstance(image_list, ImageList) and image_list.modality == modality
    assert image_list.pids.dtype == np.int64 and image_list.camids.dtype == np.int64
    assert len(image_list) == len(image_list.pids) == len(image_list.camids) > 0
    folders = [camera_and_id_of(path) for path in image_list.paths]
    assert [cam for cam, _ in folders] == image_list.camids.tolist()
    assert [pid for _, pid in folders] == image_list.pids.tolist()


# ----------------------------------------------------------------------------------------------
# SYSU-MM01

def test_sysu_query_is_every_infrared_test_image(sysu):
    query, _ = query_gallery('sysu', 'ir_to_vis', sysu, trial=0)
    expected = [f'{sysu}/cam{cam}/{pid:04d}/{number:04d}.jpg' for pid in (4, 6) for cam in (3, 6)
                for number in range(1, SYSU_TEST_FILES[pid, cam] + 1)]
    assert query.paths == expected
    assert_consistent(query, 'infrared')
    assert set(query.camids.tolist()) == {3, 6}
    assert np.array_equal(process_query_sysu(sysu, mode='indoor')[1], query.pids)


@pytest.mark.parametrize('trial', [0, 1, 7])
def test_sysu_gallery_follows_the_seeded_protocol(sysu, trial):
    _, gallery = query_gallery('sysu', 'ir_to_vis', sysu, trial)
    assert gallery.paths == protocol_gallery(sysu, '', SYSU_TEST_IDS, (1, 2, 4, 5), trial)
    assert_consistent(gallery, 'visible')
    pairs = list(zip(gallery.pids.tolist(), gallery.camids.tolist()))
    assert pairs == [(4, 1), (4, 2), (4, 4), (6, 1), (6, 2), (6, 4), (6, 5)]  # id 4 has no cam5


def test_sysu_galleries_depend_on_the_trial_only(sysu):
    state = random.getstate()
    first = process_gallery_sysu(sysu, trial=0)[0]
    assert random.getstate() == state  # the global random stream is left alone
    assert process_gallery_sysu(sysu, trial=0)[0] == first
    assert process_gallery_sysu(sysu, trial=1)[0] != first


def test_sysu_indoor_gallery_uses_cameras_1_and_2(sysu):
    paths, pids, camids = process_gallery_sysu(sysu, mode='indoor', trial=3)
    assert paths == protocol_gallery(sysu, '', SYSU_TEST_IDS, (1, 2), 3)
    assert list(zip(pids.tolist(), camids.tolist())) == [(4, 1), (4, 2), (6, 1), (6, 2)]
    _, gallery = query_gallery('sysu', 'ir_to_vis', sysu, 3, mode='indoor')
    assert gallery.paths == paths


def test_sysu_multi_shot_takes_ten_per_id_and_camera(sysu):
    _, gallery = query_gallery('sysu', 'ir_to_vis', sysu, 2, multi_shot=True)
    assert gallery.paths == protocol_gallery(sysu, '', SYSU_TEST_IDS, (1, 2, 4, 5), 2, True)
    counts = {pair: 0 for pair in zip(gallery.pids.tolist(), gallery.camids.tolist())}
    for pair in zip(gallery.pids.tolist(), gallery.camids.tolist()):
        counts[pair] += 1
    assert counts[4, 4] == 10 and counts[4, 1] == 3 and counts[6, 5] == 6
    assert len(set(gallery.paths)) == len(gallery.paths)
    assert process_gallery_sysu(sysu, trial=2, multi_shot=True)[0] == gallery.paths


def test_sysu_process_functions_match_query_gallery(sysu):
    query, gallery = query_gallery('sysu', 'ir_to_vis', sysu, 5)
    for image_list, result in ((query, process_query_sysu(sysu)),
                               (gallery, process_gallery_sysu(sysu, trial=5))):
        paths, pids, camids = result
        assert paths == image_list.paths
        assert np.array_equal(pids, image_list.pids) and np.array_equal(camids, image_list.camids)


def test_sysu_training_lists_relabel_train_and_val_ids(sysu):
    lists = train_image_lists('sysu', sysu)
    for modality, cameras in (('visible', {1, 2, 4, 5}), ('infrared', {3, 6})):
        image_list = lists[modality]
        assert image_list.modality == modality
        assert set(image_list.camids.tolist()) == cameras
        per_id = 2 * len(cameras)  # two files per camera
        assert image_list.pids.tolist() == [label for label in (0, 1, 2) for _ in range(per_id)]
        originals = [camera_and_id_of(path)[1] for path in image_list.paths]
        assert originals == [pid for pid in (1, 2, 3) for _ in range(per_id)]
    first_files = ['cam1/0001/0001.jpg', 'cam1/0001/0002.jpg', 'cam2/0001/0001.jpg']
    assert lists['visible'].paths[:3] == [f'{sysu}/{name}' for name in first_files]


def test_sysu_training_id_without_visible_images_is_a_user_error(tmp_path):
    root = make_sysu(str(tmp_path / 'cam_sysu'), train_ids=(1, 2, 8), infrared_only=(8,))
    with pytest.raises(UserError, match=r'SYSU-MM01 training ids 8 appear in only one modality'):
        train_image_lists('sysu', root)


def test_sysu_missing_test_id_file_is_a_user_error(tmp_path):
    root = make_sysu(str(tmp_path / 'sysu'))
    os.remove(f'{root}/exp/test_id.txt')
    expected = re.escape(f'{root}/exp/test_id.txt') + ' does not exist.*cam1..cam6'
    with pytest.raises(UserError, match=expected):
        query_gallery('sysu', 'ir_to_vis', root, 0)


def test_test_ids_without_folders_give_a_user_error(tmp_path):
    root = make_sysu(str(tmp_path / 'sysu'))
    write(f'{root}/exp/test_id.txt', '77,78')
    with pytest.raises(UserError, match='no infrared test images found'):
        process_query_sysu(root)


# ----------------------------------------------------------------------------------------------
# LLCM

NIR_CAMERAS, VIS_CAMERAS = (1, 2, 4, 5, 6, 7, 8, 9), tuple(range(1, 10))


def every_image(root, folder, cameras):
    return [path for pid in sorted(LLCM_TEST_IDS) for cam in cameras
            if (folder, pid, cam) in LLCM_TEST_FILES
            for path in folder_files(root, folder, pid, cam)]


@pytest.mark.parametrize('trial', [0, 4])
def test_llcm_ir_to_vis(llcm, trial):
    query, gallery = query_gallery('llcm', 'ir_to_vis', llcm, trial)
    assert query.paths == every_image(llcm, 'test_nir', NIR_CAMERAS)
    assert 3 not in query.camids.tolist()  # the stray test_nir/cam3 folder is not read
    assert gallery.paths == protocol_gallery(llcm, 'test_vis', LLCM_TEST_IDS, VIS_CAMERAS, trial)
    assert_consistent(query, 'infrared')
    assert_consistent(gallery, 'visible')
    assert len(gallery) == 12 and gallery.pids.tolist() == [7] * 9 + [9] * 3


@pytest.mark.parametrize('trial', [0, 4])
def test_llcm_vis_to_ir(llcm, trial):
    query, gallery = query_gallery('llcm', 'vis_to_ir', llcm, trial)
    assert query.paths == every_image(llcm, 'test_vis', VIS_CAMERAS)
    assert gallery.paths == protocol_gallery(llcm, 'test_nir', LLCM_TEST_IDS, NIR_CAMERAS, trial)
    assert_consistent(query, 'visible')
    assert_consistent(gallery, 'infrared')
    assert list(zip(gallery.pids.tolist(), gallery.camids.tolist())) == [
        (7, 1), (7, 2), (7, 4), (7, 9), (9, 2), (9, 5), (9, 6), (9, 7), (9, 8)]


def test_llcm_released_vis_to_ir_ranks_every_visible_image_with_sampled_nir_queries(llcm):
    query, gallery = query_gallery('llcm', 'released_vis_to_ir', llcm, 3)
    assert query.paths == protocol_gallery(llcm, 'test_nir', LLCM_TEST_IDS, NIR_CAMERAS, 3)
    assert query.modality == 'infrared' and gallery.modality == 'visible'
    assert gallery.paths == every_image(llcm, 'test_vis', VIS_CAMERAS)
    assert query.paths == process_gallery_llcm(llcm, mode=2, trial=3)[0]
    assert gallery.paths == process_query_llcm(llcm, mode=1)[0]


def test_llcm_galleries_differ_between_trials_and_repeat_within_one(llcm):
    first = process_gallery_llcm(llcm, mode=1, trial=0)
    assert process_gallery_llcm(llcm, mode=1, trial=0)[0] == first[0]
    assert process_gallery_llcm(llcm, mode=1, trial=1)[0] != first[0]
    assert np.array_equal(process_query_llcm(llcm, mode=2)[2],
                          query_gallery('llcm', 'ir_to_vis', llcm, 0)[0].camids)


def test_demo_is_llcm(llcm):
    demo = query_gallery('demo', 'vis_to_ir', llcm, 2)
    real = query_gallery('llcm', 'vis_to_ir', llcm, 2)
    assert [lst.paths for lst in demo] == [lst.paths for lst in real]


def test_llcm_training_lists_share_one_ascending_relabelling(llcm):
    lists = train_image_lists('llcm', llcm)
    visible, infrared = lists['visible'], lists['infrared']
    # original labels 12, 21, 30 -> 0, 1, 2 in both modalities, in index-file order
    assert visible.pids.tolist() == [0, 0, 2, 1] and visible.camids.tolist() == [1, 5, 3, 2]
    assert infrared.pids.tolist() == [0, 2, 2, 1, 1] and infrared.camids.tolist() == [2, 1, 4, 2, 6]
    assert visible.paths[0] == f'{llcm}/train_vis/cam1/0012/0012_c01_vis.jpg'
    assert (visible.modality, infrared.modality) == ('visible', 'infrared')


def test_llcm_training_id_in_one_modality_is_a_user_error(tmp_path):
    root = make_llcm(str(tmp_path / 'llcm'))
    with open(f'{root}/idx/train_nir.txt', 'a') as handle:
        handle.write('train_nir/cam2/0044/0044_c02_nir.jpg 44\n')
    with pytest.raises(UserError, match='LLCM training ids 44 appear in only one modality'):
        train_image_lists('llcm', root)


def test_llcm_index_line_without_camera_folder_is_a_user_error(tmp_path):
    root = make_llcm(str(tmp_path / 'cam4'))
    write(f'{root}/idx/train_vis.txt', 'train_vis/0012/a.jpg 12\n')
    with pytest.raises(UserError, match='line 1 of .*train_vis.txt .* has no camN folder'):
        train_image_lists('llcm', root)


def test_llcm_unknown_mode_is_a_user_error(llcm):
    with pytest.raises(UserError, match='expected 1 .visible. or 2'):
        process_query_llcm(llcm, mode=3)


# ----------------------------------------------------------------------------------------------
# RegDB

def regdb_paths(root, kind, modality, trial):
    return [os.path.join(root, line.split()[0]) for line in regdb_lines(kind, modality, trial)]


@pytest.mark.parametrize('trial', [1, 2])
def test_regdb_both_directions_use_the_trial_split(regdb, trial):
    query, gallery = query_gallery('regdb', 'vis_to_ir', regdb, trial)
    assert query.paths == regdb_paths(regdb, 'test', 'visible', trial)
    assert gallery.paths == regdb_paths(regdb, 'test', 'thermal', trial)
    test_ids = [100 + 2 * trial] * 5 + [101 + 2 * trial] * 5
    assert query.pids.tolist() == gallery.pids.tolist() == test_ids
    assert set(query.camids.tolist()) == {1} and set(gallery.camids.tolist()) == {2}
    assert (query.modality, gallery.modality) == ('visible', 'infrared')
    reverse_query, reverse_gallery = query_gallery('regdb', 'ir_to_vis', regdb, trial)
    assert reverse_query.paths == gallery.paths and reverse_gallery.paths == query.paths


def test_regdb_process_test_matches_the_index_file(regdb):
    paths, pids, camids = process_test_regdb(regdb, trial=2, modal='thermal')
    assert paths == regdb_paths(regdb, 'test', 'thermal', 2)
    assert paths[0] == f'{regdb}/Thermal/105/male_front_t_01040_105.bmp'
    assert pids.dtype == np.int64 and pids.tolist() == [104] * 5 + [105] * 5
    assert camids.tolist() == [2] * 10


def test_regdb_training_lists_relabel_the_trial_ids(regdb):
    lists = train_image_lists('regdb', regdb, trial=2)
    assert lists['visible'].paths == regdb_paths(regdb, 'train', 'visible', 2)
    assert lists['visible'].pids.tolist() == lists['infrared'].pids.tolist() == [0] * 5 + [1] * 5
    assert set(lists['infrared'].camids.tolist()) == {2}


@pytest.mark.parametrize('trial', [0, 11, 'x'])
def test_regdb_trial_outside_1_to_10_is_a_user_error(regdb, trial):
    with pytest.raises(UserError, match='RegDB trial .* expected a split number 1..10'):
        query_gallery('regdb', 'vis_to_ir', regdb, trial)


def test_regdb_missing_split_file_is_a_user_error(regdb):
    with pytest.raises(UserError, match=re.escape(f'{regdb}/idx/test_visible_3.txt does not')):
        process_test_regdb(regdb, trial=3, modal='visible')
    with pytest.raises(UserError, match=re.escape(f'{regdb}/idx/train_visible_4.txt does not')):
        train_image_lists('regdb', regdb, trial=4)


def test_regdb_malformed_index_line_is_a_user_error(tmp_path):
    root = make_regdb(str(tmp_path / 'regdb'), trials=(1,))
    write(f'{root}/idx/test_thermal_1.txt', 'Thermal/1/a.bmp\n')
    with pytest.raises(UserError, match="line 1 of .*test_thermal_1.txt .*'relative/path label'"):
        process_test_regdb(root, 1, 'thermal')


# ----------------------------------------------------------------------------------------------
# Errors shared by every dataset

def test_missing_data_root_names_the_path_and_layout(tmp_path):
    missing = str(tmp_path / 'nowhere')
    for dataset, layout in (('sysu', 'cam1..cam6'), ('llcm', 'test_vis'), ('regdb', 'Visible/')):
        expected = re.escape(f'data root {missing} does not exist') + '.*' + re.escape(layout)
        with pytest.raises(UserError, match=expected):
            query_gallery(dataset, data_manager.dataset_facts(dataset).directions[0], missing, 1)
        with pytest.raises(UserError, match=re.escape(f'data root {missing} does not exist')):
            train_image_lists(dataset, missing)


@pytest.mark.parametrize('call, message', [
    (lambda root: query_gallery('market', 'ir_to_vis', root, 0), "unknown dataset 'market'"),
    (lambda root: query_gallery('sysu', 'vis_to_ir', root, 0), "unknown direction 'vis_to_ir'"),
    (lambda root: query_gallery('sysu', 'ir_to_vis', root, 0, mode='outdoor'),
     "unknown search mode 'outdoor'"),
    (lambda root: process_gallery_sysu(root, mode='outdoor'), "unknown search mode 'outdoor'"),
    (lambda root: query_gallery('llcm', 'ir_to_vis', root, 0, mode='indoor'),
     "unknown search mode 'indoor' for LLCM"),
    (lambda root: query_gallery('regdb', 'vis_to_ir', root, 1, multi_shot=True),
     'multi-shot galleries exist for SYSU-MM01 and LLCM'),
    (lambda root: process_test_regdb(root, 1, 'infrared'), "unknown RegDB modality 'infrared'"),
])
def test_bad_arguments_are_user_errors(sysu, call, message):
    with pytest.raises(UserError, match=message):
        call(sysu)
