"""Tests of rerank.py and test.py --rerank: the vectorised re-ranking equals the per-row reference
on random and degenerate cases and a hand-computed one, and test.py reports it beside the plain
numbers."""
import json
import math

import numpy as np
import pytest
import torch

import evaluation
import test as test_script
from eval_metrics import rank_metrics, reference_metrics
from inference import FUSIONS, FeatureStore, fused_distance
from rerank import distances_from_similarity, k_reciprocal_rerank, reference_rerank
from tiny_runs import seeded_checkpoint
from utils import UserError


def euclidean(features, num_q):
    """(q_g, q_q, g_g) float32 Euclidean distances of [N, D] features, the first num_q queries."""
    features = np.asarray(features, dtype=np.float64)
    distance = np.sqrt(((features[:, None] - features[None]) ** 2).sum(-1)).astype(np.float32)
    return distance[:num_q, num_q:], distance[:num_q, :num_q], distance[num_q:, num_q:]


def random_features(rng, kind):
    """(features [Q + G, D], Q) of one kind of random case:
    'continuous': Gaussian features; 'ties': points of a small integer grid (many equal distances);
    'duplicates': a few distinct features, each repeated many times (more than k1 + 1 copies);
    'small_gallery': a gallery of 1 to 5 images; 'few_rows': Q + G at most 8, below most k1;
    'shared_ids': queries and gallery drawn around a few identity centres (queries sharing ids)."""
    num_q, num_g, dims = int(rng.integers(1, 30)), int(rng.integers(1, 30)), int(rng.integers(1, 5))
    if kind == 'small_gallery':
        num_g = int(rng.integers(1, 6))
    if kind == 'few_rows':
        num_q, num_g = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    n = num_q + num_g
    if kind == 'ties':
        return rng.integers(0, 3, (n, dims)), num_q
    if kind == 'duplicates':
        distinct = rng.standard_normal((int(rng.integers(1, 4)), dims))
        return distinct[rng.integers(0, len(distinct), n)], num_q
    if kind == 'shared_ids':
        centres = 3 * rng.standard_normal((int(rng.integers(1, 5)), dims))
        return centres[rng.integers(0, len(centres), n)] + rng.standard_normal((n, dims)), num_q
    return rng.standard_normal((n, dims)), num_q


KINDS = ('continuous', 'ties', 'duplicates', 'small_gallery', 'few_rows', 'shared_ids')


@pytest.mark.parametrize('kind', KINDS)
def test_vectorised_equals_reference_on_random_cases(kind):
    rng = np.random.default_rng(len(kind))
    for _ in range(15):
        features, num_q = random_features(rng, kind)
        distances = euclidean(features, num_q)
        params = dict(k1=int(rng.integers(1, 30)), k2=int(rng.integers(1, 8)),
                      lambda_value=float(rng.random()))
        expected = reference_rerank(*distances, **params)
        actual = k_reciprocal_rerank(*distances, **params,
                                     chunk_elements=int(rng.integers(1, 400)))
        assert actual.shape == (num_q, len(features) - num_q) and actual.dtype == torch.float32
        np.testing.assert_allclose(actual.numpy(), expected, atol=1e-5, rtol=0)
        assert (actual >= -1e-6).all() and (actual <= 1 + 1e-6).all()


def test_standard_parameters_on_a_clustered_case():
    rng = np.random.default_rng(5)
    centres = 2 * rng.standard_normal((12, 16))
    features = centres[rng.integers(0, 12, 150)] + rng.standard_normal((150, 16))
    distances = euclidean(features, 60)
    actual = k_reciprocal_rerank(*[torch.from_numpy(d) for d in distances])  # k1=20, k2=6, 0.3
    np.testing.assert_allclose(actual.numpy(), reference_rerank(*distances), atol=1e-5, rtol=0)


def test_chunk_size_does_not_change_the_result():
    rng = np.random.default_rng(2)
    features, num_q = random_features(rng, 'ties')
    distances = euclidean(np.concatenate([features, features]), 2 * num_q)
    whole = k_reciprocal_rerank(*distances, k1=6, k2=3, chunk_elements=10**9)
    for chunk_elements in (1, 17, 300):
        assert torch.equal(k_reciprocal_rerank(*distances, k1=6, k2=3,
                                               chunk_elements=chunk_elements), whole)


def test_hand_computed_case_where_reciprocity_reorders_the_gallery():
    """Points on a line: query q at 0, gallery b at -1.05 and a, c, d at 1.0, 1.1, 1.3; k1=2,
    k2=1 (no expansion), lambda=0.3. Rows are divided by their largest squared distance (q: 1.3^2).
    N(q, 2) = {q, a, b}; a's three nearest are a, c, d, so R(q, 2) = {q, b}; R(b, 2) = {b, q};
    R(a, 2) = {a, c, d}, and so are R(c, 2) and R(d, 2). With h = 1 every R(., 1) is {itself} or
    within those sets, so the expansions add nothing new. V(q) and V(b) share the entries of q and
    b; a, c and d share nothing with q (Jaccard distance 1). So b, the farther of b and a, comes
    first after re-ranking."""
    query, gallery = np.array([[0.0]]), np.array([[-1.05], [1.0], [1.1], [1.3]])
    distances = euclidean(np.concatenate([query, gallery]), 1)
    original_q = np.array([1.05, 1.0, 1.1, 1.3]) ** 2 / 1.3 ** 2
    original_b = 1.05 ** 2 / 2.35 ** 2                       # b's row: b to q over b to d
    weight_q, weight_b = math.exp(-original_q[0]), math.exp(-original_b)
    v_q = np.array([1, weight_q]) / (1 + weight_q)            # V(q) over (q, b)
    v_b = np.array([weight_b, 1]) / (1 + weight_b)            # V(b) over (q, b)
    overlap = np.minimum(v_q, v_b).sum()
    jaccard = np.array([1 - overlap / (2 - overlap), 1, 1, 1])
    expected = 0.7 * jaccard + 0.3 * original_q
    for rerank in (k_reciprocal_rerank, reference_rerank):
        result = np.asarray(rerank(*distances, k1=2, k2=1, lambda_value=0.3))
        np.testing.assert_allclose(result[0], expected, atol=1e-6)
        assert np.argsort(distances[0][0])[0] == 1 and np.argsort(result[0])[0] == 0


def test_lambda_one_is_the_original_distance_and_lambda_zero_the_jaccard_distance():
    rng = np.random.default_rng(4)
    features, num_q = random_features(rng, 'shared_ids')
    distances = euclidean(features, num_q)
    squared = np.concatenate([distances[1], distances[0]], 1).astype(np.float64) ** 2
    original = (squared / squared.max(1, keepdims=True))[:, num_q:]
    np.testing.assert_allclose(k_reciprocal_rerank(*distances, lambda_value=1).numpy(), original,
                               atol=1e-6)
    jaccard = k_reciprocal_rerank(*distances, lambda_value=0).numpy()
    assert (jaccard >= 0).all() and (jaccard <= 1).all()
    np.testing.assert_allclose(k_reciprocal_rerank(*distances).numpy(),
                               0.7 * jaccard + 0.3 * original, atol=1e-6)


def test_invalid_parameters_and_distances_are_refused():
    distances = euclidean(np.random.default_rng(0).standard_normal((6, 2)), 2)
    for params, message in ((dict(k1=0), 'k1 must be a positive integer'),
                            (dict(k2=1.5), 'k2 must be a positive integer'),
                            (dict(lambda_value=1.5), r'lambda must be a number in \[0, 1\]')):
        with pytest.raises(ValueError, match=message):
            k_reciprocal_rerank(*distances, **params)
    with pytest.raises(ValueError, match='must be finite'):
        k_reciprocal_rerank(np.full_like(distances[0], np.nan), *distances[1:])
    with pytest.raises(ValueError, match='gallery-gallery 4 x 4'):
        k_reciprocal_rerank(distances[0], distances[1], distances[1])


def test_distances_from_fused_similarity_are_euclidean_in_the_weighted_feature_space():
    features = torch.nn.functional.normalize(torch.randn(9, 2, 3, 8), dim=-1)
    query, gallery = features[:4], features[4:]
    weights = FUSIONS['0.1pool+0.9feat']
    q_g, q_q, g_g = distances_from_similarity(
        *[-fused_distance(a, b, weights) for a, b in ((query, gallery), (query, query),
                                                      (gallery, gallery))])
    scaled = (features * torch.tensor(weights).sqrt().view(1, 2, 1, 1)).flatten(1)
    expected = torch.cdist(scaled.double(), scaled.double()).float()
    torch.testing.assert_close(q_g, expected[:4, 4:], atol=1e-3, rtol=0)
    torch.testing.assert_close(g_g, expected[4:, 4:], atol=1e-3, rtol=0)
    assert (torch.diagonal(q_q) == 0).all() and (torch.diagonal(g_g) == 0).all()


def test_metrics_run_on_reranked_distances_under_each_matching_rule():
    rng = np.random.default_rng(8)
    q_pids, g_pids = rng.integers(0, 6, 40), np.repeat(np.arange(6), 5)   # queries share ids
    q_camids, g_camids = rng.integers(1, 10, 40), rng.integers(1, 10, 30)
    centres = 2 * rng.standard_normal((6, 8))
    features = centres[np.concatenate([q_pids, g_pids])] + rng.standard_normal((70, 8))
    distances = euclidean(features, 40)
    reranked, expected = k_reciprocal_rerank(*distances), reference_rerank(*distances)
    for matching, identity_cmc in (('same_id_and_camera', True), ('cam3_ignores_cam2', True),
                                   ('none', False)):
        ids = (q_pids, g_pids, q_camids, g_camids, matching, identity_cmc)
        cmc, mean_ap, minp = rank_metrics(reranked, *ids)
        ref_cmc, ref_ap, ref_minp = reference_metrics(expected, *ids)
        np.testing.assert_allclose(cmc, ref_cmc, atol=1e-9)
        assert (mean_ap, minp) == pytest.approx((ref_ap, ref_minp), abs=1e-9)
        assert 0 < mean_ap <= 1 and 0 < minp <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_equals_reference():
    rng = np.random.default_rng(9)
    for kind in KINDS:
        features, num_q = random_features(rng, kind)
        distances = euclidean(features, num_q)
        actual = k_reciprocal_rerank(*[torch.from_numpy(d).to('cuda') for d in distances], k1=7)
        assert actual.device.type == 'cuda'
        np.testing.assert_allclose(actual.cpu().numpy(), reference_rerank(*distances, k1=7),
                                   atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# test.py --rerank

@pytest.fixture(scope='module')
def reranked_run(tmp_path_factory):
    """(folder, checkpoint of a seeded tiny LLCM model, results file, features file)."""
    folder = tmp_path_factory.mktemp('rerank')
    checkpoint = folder / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6, random_batchnorm=True)
    return folder, checkpoint, folder / 'results.json', folder / 'features.pt'


def test_test_script_prints_both_tables_and_stores_both(reranked_run, llcm_root, capsys):
    folder, checkpoint, output, features = reranked_run
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--output',
                             str(output), '--save-features', str(features), '--rerank',
                             '--k2', '3']) == 0
    printed = capsys.readouterr().out
    label = 're-ranked (k1=20, k2=3, lambda=0.3)'
    record = json.load(open(output))
    settings = ('ir_to_vis', 'vis_to_ir', 'released_vis_to_ir')
    for setting in settings:  # each re-ranked table follows its plain one
        plain = printed.index(f'llcm {setting}  (10 trials')
        assert printed.index(f'llcm {setting} {label}  (10 trials') > plain
    assert ('neighbour sets are drawn from the query set and the gallery together'
            in ' '.join(printed.split()))  # the footnote, wrapped
    assert record['reranked']['k1'] == 20 and record['reranked']['k2'] == 3
    assert record['reranked']['lambda'] == 0.3
    assert sorted(record['results']) == sorted(record['reranked']['results']) == sorted(settings)
    for setting in settings:
        for fusion in FUSIONS:
            assert len(record['reranked']['results'][setting][fusion]['mAP'][2]) == 10

    # the stored numbers are those of the reference re-ranking of the saved features, with LLCM's
    # matching rule applied afterwards
    store, _ = FeatureStore.load(str(features))
    splits = evaluation.protocol_splits('llcm', str(llcm_root), range(10))
    changed = False
    for name, trial, query, gallery in splits[:: 7]:
        for fusion, weights in FUSIONS.items():
            similarities = [-fused_distance(a, b, weights) for a, b in (
                (store.select(query), store.select(gallery)),
                (store.select(query), store.select(query)),
                (store.select(gallery), store.select(gallery)))]
            distmat = reference_rerank(*distances_from_similarity(*similarities), k2=3)
            cmc, mean_ap, minp = reference_metrics(distmat, query.pids, gallery.pids,
                                                   query.camids, gallery.camids,
                                                   'same_id_and_camera', True)
            stored = record['reranked']['results'][name][fusion]
            assert stored['Rank-1'][2][trial] == pytest.approx(cmc[0], abs=1e-9)
            assert stored['mAP'][2][trial] == pytest.approx(mean_ap, abs=1e-9)
            assert stored['mINP'][2][trial] == pytest.approx(minp, abs=1e-9)
            changed |= stored['mAP'][2][trial] != record['results'][name][fusion]['mAP'][2][trial]
    assert changed  # the re-ranked numbers are not the plain ones


@pytest.mark.parametrize('dataset, trial, settings', [
    ('sysu', '0', ['all ir_to_vis', 'indoor ir_to_vis']),
    ('regdb', '1', ['ir_to_vis', 'released_routing_ir_to_vis', 'released_routing_vis_to_ir',
                    'vis_to_ir']),
])
def test_test_script_reranks_every_setting_of_sysu_and_regdb(dataset, trial, settings, request,
                                                             tmp_path, capsys):
    root = request.getfixturevalue(f'{dataset}_root')
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, dataset, num_classes=4, random_batchnorm=True)
    output = tmp_path / 'results.json'
    assert test_script.main(['--dataset', dataset, '--data-path', str(root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', trial,
                             '--output', str(output), '--rerank', '--lambda', '0.5',
                             *(['--released-routing'] if dataset == 'regdb' else [])]) == 0
    printed = capsys.readouterr().out
    record = json.load(open(output))
    assert sorted(record['results']) == sorted(record['reranked']['results']) == settings
    for setting in settings:
        assert f'{dataset} {setting} re-ranked (k1=20, k2=6, lambda=0.5)  (1 trial' in printed
        for fusion in FUSIONS:
            rank1 = record['reranked']['results'][setting][fusion]['Rank-1'][2]
            assert len(rank1) == 1 and 0 <= rank1[0] <= 1


def test_test_script_without_rerank_stores_no_reranked_results(reranked_run, llcm_root, capsys):
    folder, checkpoint, _, _ = reranked_run
    output = folder / 'plain.json'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', '0',
                             '--output', str(output)]) == 0
    assert 're-ranked' not in capsys.readouterr().out
    assert 'reranked' not in json.load(open(output))


@pytest.mark.parametrize('argv, message', [
    (['--k1', '10'], '--k1 sets the re-ranking; add --rerank to use it.'),
    (['--k2', '3', '--lambda', '0.5'], '--k2, --lambda set the re-ranking; add --rerank'),
    (['--rerank', '--k1', '0'], '--k1 must be a positive integer, got 0.'),
    (['--rerank', '--k2', '-1'], '--k2 must be a positive integer, got -1.'),
    (['--rerank', '--lambda', '1.5'], '--lambda must be a number from 0 to 1, got 1.5.'),
])
def test_rerank_flags_are_checked_before_any_work(argv, message):
    with pytest.raises(UserError) as error:
        test_script.parse_args(['--resume', 'missing.pth', *argv])
    assert message in str(error.value)


def test_rerank_flags_default_to_the_papers_values():
    args = test_script.parse_args(['--resume', 'missing.pth', '--rerank'])
    assert (args.rerank, args.k1, args.k2, args.lambda_value) == (True, 20, 6, 0.3)
    assert evaluation.rerank_params(args) == {'k1': 20, 'k2': 6, 'lambda_value': 0.3}
