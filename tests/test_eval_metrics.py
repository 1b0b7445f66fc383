"""Tests of eval_metrics: the vectorised metrics equal the per-query reference, and both give the
hand-computed answers of small cases for each protocol rule."""
import numpy as np
import pytest
import torch

from data_manager import ImageList
from eval_metrics import (eval_llcm, eval_regdb, eval_sysu, evaluate, rank_metrics,
                          reference_metrics)

PROTOCOLS = {  # dataset -> (matching rule, identity-level CMC, camera numbers drawn)
    'sysu': ('cam3_ignores_cam2', True, (1, 2, 3, 4, 5, 6)),
    'llcm': ('same_id_and_camera', True, tuple(range(1, 10))),
    'regdb': ('none', False, (1, 2)),
}
EVAL_FUNCTIONS = {
    'sysu': eval_sysu,
    'llcm': eval_llcm,
    'regdb': lambda distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20:
        eval_regdb(distmat, q_pids, g_pids, max_rank=max_rank),
}


def random_case(rng, dataset, ties):
    """A random ranking problem with duplicate ids, queries whose id is not in the gallery,
    galleries of 1 to 60 images and, when ties, many equal distances; at least one query has a
    match that its matching rule keeps."""
    cameras = PROTOCOLS[dataset][2]
    while True:
        num_q, num_g, num_ids = rng.integers(1, 40), rng.integers(1, 60), rng.integers(1, 12)
        g_pids = rng.integers(0, num_ids, num_g) * 7 + 100
        q_pids = rng.integers(0, num_ids + 3, num_q) * 7 + 100   # some ids have no gallery image
        q_camids, g_camids = rng.choice(cameras, num_q), rng.choice(cameras, num_g)
        distmat = (rng.integers(0, 4, (num_q, num_g)) if ties
                   else rng.standard_normal((num_q, num_g))).astype(np.float32)
        try:
            expected = reference(dataset, distmat, q_pids, g_pids, q_camids, g_camids)
        except ValueError:  # no query has a match: draw again
            continue
        return (distmat, q_pids, g_pids, q_camids, g_camids), expected


def reference(dataset, distmat, q_pids, g_pids, q_camids, g_camids, max_rank=20):
    matching, identity_cmc, _ = PROTOCOLS[dataset]
    return reference_metrics(distmat, q_pids, g_pids, q_camids, g_camids, matching, identity_cmc,
                             max_rank)


def assert_same_metrics(actual, expected, tolerance=1e-6):
    cmc, mean_ap, mean_inp = actual
    assert isinstance(cmc, np.ndarray) and cmc.shape == expected[0].shape
    assert isinstance(mean_ap, float) and isinstance(mean_inp, float)
    np.testing.assert_allclose(cmc, expected[0], atol=tolerance, rtol=0)
    assert mean_ap == pytest.approx(expected[1], abs=tolerance)
    assert mean_inp == pytest.approx(expected[2], abs=tolerance)


# ----------------------------------------------------------------------------------------------
# Vectorised == reference

@pytest.mark.parametrize('dataset', sorted(PROTOCOLS))
@pytest.mark.parametrize('ties', [False, True])
def test_vectorised_equals_reference_on_random_cases(dataset, ties):
    rng = np.random.default_rng([len(dataset), ties])
    for _ in range(40):
        args, expected = random_case(rng, dataset, ties)
        actual = EVAL_FUNCTIONS[dataset](*args)
        assert_same_metrics(actual, expected)
        assert len(actual[0]) == min(20, args[0].shape[1])
        assert 0 <= actual[1] <= 1 and 0 < actual[2] <= 1


@pytest.mark.parametrize('dataset', sorted(PROTOCOLS))
def test_chunked_equals_unchunked(dataset):
    rng = np.random.default_rng(7)
    matching, identity_cmc, _ = PROTOCOLS[dataset]
    for _ in range(10):
        args, _ = random_case(rng, dataset, ties=True)
        whole = rank_metrics(*args, matching, identity_cmc, chunk_elements=10**9)
        for chunk_elements in (1, 2 * args[0].shape[1] + 1, 100):
            assert_same_metrics(rank_metrics(*args, matching, identity_cmc,
                                             chunk_elements=chunk_elements), whole, 1e-12)


def test_torch_and_numpy_inputs_agree():
    args, expected = random_case(np.random.default_rng(3), 'sysu', ties=True)
    as_tensors = [torch.from_numpy(np.asarray(value)) for value in args]
    assert_same_metrics(eval_sysu(*as_tensors), expected)
    assert_same_metrics(eval_sysu(as_tensors[0].double(), *args[1:]), expected)
    assert_same_metrics(eval_sysu(args[0], *[list(value) for value in args[1:]]), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_reference():
    rng = np.random.default_rng(11)
    for dataset in PROTOCOLS:
        args, expected = random_case(rng, dataset, ties=True)
        distmat = torch.from_numpy(args[0]).to('cuda')
        assert_same_metrics(EVAL_FUNCTIONS[dataset](distmat, *args[1:]), expected)


def test_max_rank_is_capped_by_gallery_size():
    distmat = np.array([[0.3, 0.1, 0.2]])                  # ranked gallery ids: 2, 3, 1
    cmc, _, _ = eval_regdb(distmat, [1], [1, 2, 3], max_rank=20)
    np.testing.assert_array_equal(cmc, [0, 0, 1])
    cmc, _, _ = eval_regdb(distmat, [2], [1, 2, 3], max_rank=2)
    np.testing.assert_array_equal(cmc, [1, 1])


# ----------------------------------------------------------------------------------------------
# Hand-computed cases (each checked on the vectorised and the reference implementation)

def both(dataset, distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=20):
    q_camids = np.ones(len(q_pids), int) if q_camids is None else q_camids
    g_camids = np.ones(len(g_pids), int) if g_camids is None else g_camids
    args = (np.asarray(distmat, dtype=np.float32), np.asarray(q_pids), np.asarray(g_pids),
            np.asarray(q_camids), np.asarray(g_camids))
    expected = reference(dataset, *args, max_rank=max_rank)
    actual = EVAL_FUNCTIONS[dataset](*args, max_rank=max_rank)
    assert_same_metrics(actual, expected, 1e-12)
    return actual


def test_identity_level_cmc_differs_from_image_level():
    # ranked gallery ids: 5 5 5 7 -> images put id 7 at rank 4, distinct ids at rank 2
    distmat, q_pids, g_pids = [[0.1, 0.2, 0.3, 0.4]], [7], [5, 5, 5, 7]
    image_cmc, _, _ = both('regdb', distmat, q_pids, g_pids)
    identity_cmc, _, _ = both('llcm', distmat, q_pids, g_pids, [1], [2, 2, 2, 2])
    np.testing.assert_array_equal(image_cmc, [0, 0, 0, 1])
    np.testing.assert_array_equal(identity_cmc, [0, 1, 1, 1])


def test_identity_rank1_counts_the_first_distinct_id_only():
    # two queries: id 5 (first image) and id 7 behind two other ids with repeated images
    distmat = [[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]]
    g_pids = [5, 5, 6, 6, 7]
    cmc, _, _ = both('sysu', distmat, [5, 7], g_pids, [6, 6], [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(cmc, [0.5, 0.5, 1, 1, 1])


def test_map_by_hand():
    # query 1: matches at positions 1 and 3 -> AP = (1/1 + 2/3) / 2 = 5/6
    # query 2: one match at position 4 -> AP = 1/4
    distmat = [[0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4]]
    _, mean_ap, _ = both('regdb', distmat, [1, 2], [1, 3, 1, 2])
    assert mean_ap == pytest.approx((5 / 6 + 1 / 4) / 2)


def test_minp_by_hand():
    # query 1: matches at positions 2 and 5 -> INP = 2 / 5; query 2: one match at 3 -> INP = 1 / 3
    distmat = [[0.1, 0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5]]
    _, _, mean_inp = both('regdb', distmat, [1, 3], [2, 1, 3, 4, 1])
    assert mean_inp == pytest.approx((2 / 5 + 1 / 3) / 2)


def test_sysu_cam3_query_ignores_cam2_gallery():
    # the closest image is the right id but from cam2: a cam3 query skips it, a cam6 one does not
    distmat = [[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]]
    g_pids, g_camids = [1, 2, 1], [2, 1, 4]
    cmc, mean_ap, _ = both('sysu', distmat[:1], [1], g_pids, [3], g_camids)
    np.testing.assert_array_equal(cmc, [0, 1, 1])          # ranked ids after the rule: 2, 1
    assert mean_ap == pytest.approx(1 / 2)
    cmc, mean_ap, _ = both('sysu', distmat[1:], [1], g_pids, [6], g_camids)
    np.testing.assert_array_equal(cmc, [1, 1, 1])
    assert mean_ap == pytest.approx((1 + 2 / 3) / 2)


def test_llcm_ignores_same_id_and_same_camera_only():
    # gallery: (id 1, cam 4) ignored for a cam-4 query of id 1; (id 2, cam 4) and (id 1, cam 5) kept
    distmat = [[0.1, 0.2, 0.3]]
    cmc, mean_ap, mean_inp = both('llcm', distmat, [1], [1, 2, 1], [4], [4, 4, 5])
    np.testing.assert_array_equal(cmc, [0, 1, 1])
    assert mean_ap == pytest.approx(1 / 2) and mean_inp == pytest.approx(1 / 2)


def test_query_without_match_adds_zero_but_not_to_the_divisor():
    # query 2 (id 9) has no gallery match: CMC and mAP average over query 1 only
    distmat = [[0.1, 0.2], [0.1, 0.2]]
    for dataset in PROTOCOLS:
        cmc, mean_ap, mean_inp = both(dataset, distmat, [1, 9], [1, 2], [1, 1], [2, 2])
        np.testing.assert_array_equal(cmc, [1, 1])
        assert mean_ap == 1 and mean_inp == 1


def test_query_whose_only_match_is_ignored_is_not_valid():
    # the cam3 query's only match is on cam2, so only the cam6 query counts
    distmat = [[0.2, 0.1], [0.2, 0.1]]
    cmc, mean_ap, _ = both('sysu', distmat, [1, 1], [1, 2], [3, 6], [2, 1])
    np.testing.assert_array_equal(cmc, [0, 1])
    assert mean_ap == pytest.approx(1 / 2)


def test_ties_keep_gallery_order():
    # equal distances: the stable sort ranks the earlier gallery image first
    cmc, _, _ = both('regdb', [[0.5, 0.5, 0.5]], [2], [1, 2, 2])
    np.testing.assert_array_equal(cmc, [0, 1, 1])
    cmc, _, _ = both('regdb', [[0.5, 0.5, 0.5]], [1], [1, 2, 2])
    np.testing.assert_array_equal(cmc, [1, 1, 1])


def test_no_valid_query_is_an_error():
    with pytest.raises(ValueError, match='no query'):
        eval_regdb(np.zeros((2, 2)), [1, 1], [2, 3])


def test_evaluate_dispatches_on_the_dataset():
    args, _ = random_case(np.random.default_rng(5), 'sysu', ties=True)
    distmat, q_pids, g_pids, q_camids, g_camids = args
    query = ImageList([''] * len(q_pids), q_pids, q_camids, 'infrared')
    gallery = ImageList([''] * len(g_pids), g_pids, g_camids, 'visible')
    for dataset, protocol in (('sysu', 'sysu'), ('llcm', 'llcm'), ('demo', 'llcm'),
                              ('regdb', 'regdb')):
        assert_same_metrics(evaluate(dataset, distmat, query, gallery),
                            reference(protocol, *args), 1e-12)
