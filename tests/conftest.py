"""Shared pytest fixtures: tiny synthetic SYSU-MM01, LLCM and RegDB folders in the real layouts
(built once per session under a path containing "cam") and the summaries of what they hold."""
import pytest

from tools.synthetic_data import make_llcm, make_regdb, make_sysu

TINY = (16, 32)  # (w, h) of the images: each folder is written in well under a second

# What each folder holds (the docstrings of the make_* functions say which ids and cameras):
LLCM_TINY = dict(num_train_ids=6, num_test_ids=5, images_per_camera=2, size=TINY, seed=0)
SYSU_TINY = dict(num_train_ids=4, num_val_ids=2, num_test_ids=4, images_per_camera=2, size=TINY,
                 seed=0)
REGDB_TINY = dict(num_ids=8, images_per_modality=10, size=TINY, seed=0)


def _build(tmp_path_factory, name, maker, options):
    # the word "cam" in the root's own path must not confuse camera parsing
    root = tmp_path_factory.mktemp('camdata') / name
    return root, maker(str(root), **options)


@pytest.fixture(scope='session')
def _llcm(tmp_path_factory):
    return _build(tmp_path_factory, 'llcm', make_llcm, LLCM_TINY)


@pytest.fixture(scope='session')
def _sysu(tmp_path_factory):
    return _build(tmp_path_factory, 'sysu', make_sysu, SYSU_TINY)


@pytest.fixture(scope='session')
def _regdb(tmp_path_factory):
    return _build(tmp_path_factory, 'regdb', make_regdb, REGDB_TINY)


@pytest.fixture(scope='session')
def llcm_root(_llcm):
    """pathlib.Path of an LLCM-layout folder: 6 train + 5 test ids (see make_llcm)."""
    return _llcm[0]


@pytest.fixture(scope='session')
def llcm_summary(_llcm):
    return _llcm[1]


@pytest.fixture(scope='session')
def sysu_root(_sysu):
    """pathlib.Path of a SYSU-MM01-layout folder: 4 train, 2 val, 4 test ids (see make_sysu)."""
    return _sysu[0]


@pytest.fixture(scope='session')
def sysu_summary(_sysu):
    return _sysu[1]


@pytest.fixture(scope='session')
def regdb_root(_regdb):
    """pathlib.Path of a RegDB-layout folder: 8 ids x 10 + 10 images, trials 1-10 of 4/4 ids."""
    return _regdb[0]


@pytest.fixture(scope='session')
def regdb_summary(_regdb):
    return _regdb[1]
