"""Shared pytest fixtures: tiny synthetic datasets in the three real layouts, each under a folder
whose path contains "cam" (a root that must not confuse camera parsing), built once per session."""
import pytest

from tools.synthetic_data import make_llcm, make_regdb, make_sysu


def _build(tmp_path_factory, name, maker):
    root = tmp_path_factory.mktemp('camdata') / name
    return root, maker(str(root))


@pytest.fixture(scope='session')
def _llcm(tmp_path_factory):
    return _build(tmp_path_factory, 'llcm', make_llcm)


@pytest.fixture(scope='session')
def _sysu(tmp_path_factory):
    return _build(tmp_path_factory, 'sysu', make_sysu)


@pytest.fixture(scope='session')
def _regdb(tmp_path_factory):
    return _build(tmp_path_factory, 'regdb', make_regdb)


@pytest.fixture(scope='session')
def llcm_root(_llcm):
    return _llcm[0]


@pytest.fixture(scope='session')
def llcm_summary(_llcm):
    return _llcm[1]


@pytest.fixture(scope='session')
def sysu_root(_sysu):
    return _sysu[0]


@pytest.fixture(scope='session')
def sysu_summary(_sysu):
    return _sysu[1]


@pytest.fixture(scope='session')
def regdb_root(_regdb):
    return _regdb[0]


@pytest.fixture(scope='session')
def regdb_summary(_regdb):
    return _regdb[1]
