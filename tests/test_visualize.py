"""Tests of visualize.py and figures.py on the synthetic folders with a seeded tiny model: the PNGs,
and the numbers behind each figure against a direct computation (evaluation ranking, brute-force
pair distances, scikit-learn t-SNE, test.py's CMC, the history file)."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.manifold import TSNE

import figures
import test as test_script
import visualize
from data_manager import query_gallery
from evaluation import protocol_splits
from inference import FUSIONS, FeatureStore, extract_features, fused_distance
from tiny_runs import seeded_checkpoint
from utils import UserError

WEIGHTS = FUSIONS['pool+feat']
HISTORY = [  # epoch 1 was run twice (a resume): its second line wins
    {'epoch': 0, 'lr': 0.01, 'losses': {'loss': 9.0, 'id': 5.0}, 'metrics': None},
    {'epoch': 1, 'lr': 0.02, 'losses': {'loss': 8.0, 'id': 4.5},
     'metrics': {'direction': 'ir_to_vis', 'rank1': 0.1, 'mAP': 0.2, 'mINP': 0.05, 'seconds': 1}},
    {'epoch': 1, 'lr': 0.03, 'losses': {'loss': 7.0, 'id': 4.0},
     'metrics': {'direction': 'ir_to_vis', 'rank1': 0.3, 'mAP': 0.4, 'mINP': 0.15, 'seconds': 1}},
    {'epoch': 2, 'lr': 0.003, 'losses': {'loss': 6.0, 'id': 3.0}, 'metrics': None},
]


@pytest.fixture(scope='module')
def tiny(llcm_root, tmp_path_factory):
    """A seeded DEEN checkpoint for the tiny LLCM folder, its model and a work folder."""
    folder = tmp_path_factory.mktemp('visualize')
    checkpoint = folder / 'tiny.pth'
    return checkpoint, seeded_checkpoint(checkpoint, 'llcm', num_classes=6), folder


@pytest.fixture(scope='module')
def direct_store(tiny, llcm_root):
    """Features of every image of the ten LLCM trials, extracted here without visualize.py."""
    _, model, _ = tiny
    args = test_script.parse_args(['--resume', 'unused', '--workers', '0'])
    args.img_h, args.img_w = 64, 32
    lists = [lst for _, _, q, g in protocol_splits('llcm', str(llcm_root), range(10))
             for lst in (q, g)]
    return extract_features(model, lists, args, torch.device('cpu'))


def shared_camera_queries(llcm_root, summary):
    """A sampled NIR and a VIS test image of an id seen by both modalities in one camera: their
    trial-0 galleries hold an image the LLCM rule ignores."""
    pid = summary['same_camera_ids'][0]
    camera = sorted(set(summary['cameras']['visible'][pid]) & set(summary['cameras']['infrared'][pid]))[0]
    sampled_nir = query_gallery('llcm', 'released_vis_to_ir', str(llcm_root), 0)[0]
    visible = query_gallery('llcm', 'vis_to_ir', str(llcm_root), 0)[0]
    return [next(p for p, i, c in zip(lst.paths, lst.pids, lst.camids) if i == pid and c == camera)
            for lst in (sampled_nir, visible)]


@pytest.fixture(scope='module')
def drawn(tiny, llcm_root, llcm_summary):
    """visualize.py with every plot: 3 random ids in the t-SNE (24 points at most), the whole
    gallery for two chosen queries, the training curves of HISTORY."""
    checkpoint, _, folder = tiny
    history = folder / 'logs' / 'llcm_deen_history.jsonl'
    history.parent.mkdir()
    history.write_text(''.join(json.dumps(record) + '\n' for record in HISTORY))
    out = folder / 'figures'
    argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', str(checkpoint),
            '--out', str(out), '--device', 'cpu', '--workers', '0', '--num-ids', '3',
            '--tsne-points', '24', '--topk', '100', '--seed', '3', '--history',
            str(history.parent), '--queries', *shared_camera_queries(llcm_root, llcm_summary)]
    assert visualize.main(argv) == 0
    return out


def numbers(folder, name):
    with open(os.path.join(folder, name + '.json')) as handle:
        return json.load(handle)


RANK_LISTS = ('ranks_ir_to_vis', 'ranks_vis_to_ir', 'ranks_released_vis_to_ir')


def test_every_png_has_its_size_and_is_not_blank(drawn):
    expected = {'tsne': figures.figure_size(2), 'distances': figures.figure_size(2),
                'cmc': figures.figure_size(1), 'curves': figures.figure_size(3)}
    for name in RANK_LISTS:
        rows = numbers(drawn, name)['rows']
        expected[name] = figures.rank_list_size(rows, title='a title')
        assert expected[name][0] > 10 * figures.CELL_W  # the whole gallery is drawn
    assert sorted(os.listdir(drawn)) == sorted(f'{name}.{ext}' for name in expected
                                               for ext in ('png', 'json'))
    for name, size in expected.items():
        image = Image.open(os.path.join(drawn, name + '.png'))
        assert image.size == size, name
        pixels = np.asarray(image.convert('RGB')).reshape(-1, 3).astype(np.int64)
        assert len(np.unique(pixels @ [1 << 16, 1 << 8, 1])) > 20, name  # distinct colours
        assert (pixels.min(1) < 200).mean() > 0.01, name  # more than a white page


def test_rank_lists_are_the_evaluation_ranking_after_the_matching_rule(drawn, direct_store,
                                                                       llcm_root):
    ignored_somewhere = 0
    for name in RANK_LISTS:
        shown = numbers(drawn, name)
        assert shown['matching'] == 'same_id_and_camera' and shown['trial'] == 0
        query, gallery = query_gallery('llcm', name[len('ranks_'):], str(llcm_root), 0)
        assert shown['gallery_size'] == len(gallery) and len(shown['rows']) == 1
        for row in shown['rows']:
            index = query.paths.index(row['query'])
            pid, camid = query.pids[index], query.camids[index]
            distances = fused_distance(direct_store.select(query)[index:index + 1],
                                       direct_store.select(gallery), WEIGHTS)[0].numpy()
            ignored = (gallery.pids == pid) & (gallery.camids == camid)  # LLCM's rule
            expected = [g for g in np.argsort(distances, kind='stable') if not ignored[g]][:100]
            ignored_somewhere += ignored.sum()
            entries = row['gallery']
            assert [e['index'] for e in entries] == expected
            assert [e['path'] for e in entries] == [gallery.paths[g] for g in expected]
            assert [e['rank'] for e in entries] == list(range(1, len(expected) + 1))
            assert [e['correct'] for e in entries] == [bool(gallery.pids[g] == pid) for g in expected]
            assert [e['distance'] for e in entries] == pytest.approx(distances[expected], abs=1e-4)
    assert ignored_somewhere >= 2  # the chosen queries do exercise the rule


def test_pair_distance_statistics_equal_a_brute_force_count(drawn, direct_store):
    shown = numbers(drawn, 'distances')
    edges = np.asarray(shown['bin_edges'])
    features = {m: direct_store.features[m] for m in ('visible', 'infrared')}
    pids = direct_store.pids

    def fused(first, second):
        return fused_distance(features[first], features[second], WEIGHTS).double().numpy()

    assert edges[0] == -edges[-1] == -4 * 3 * sum(WEIGHTS)  # what fused distances can reach
    groups = {'cross-modality': (fused('visible', 'infrared'),
                                 pids['visible'][:, None] == pids['infrared'][None, :],
                                 np.ones((len(pids['visible']), len(pids['infrared'])), bool))}
    for m in features:
        groups[m] = (fused(m, m), pids[m][:, None] == pids[m][None, :],
                     np.triu(np.ones((len(pids[m]),) * 2, bool), 1))  # each pair i < j once
    for group, (distances, same_id, pairs) in groups.items():
        for kind, chosen in (('positive', same_id & pairs), ('negative', ~same_id & pairs)):
            values, curve = distances[chosen], shown['curves'][f'{group} {kind}']
            assert curve['pairs'] == len(values) > 0
            assert curve['mean'] == pytest.approx(values.mean(), abs=1e-5)
            assert curve['std'] == pytest.approx(values.std(), abs=1e-5)
            near_an_edge = (np.abs(values[:, None] - edges[None, :]) < 1e-4).sum()
            difference = np.cumsum(np.asarray(curve['counts']) - np.histogram(values, edges)[0])
            assert np.abs(difference).max() <= near_an_edge
        plot_edges = edges[shown['plot_bins']]
        positive = np.histogram(distances[same_id & pairs], plot_edges)[0]
        negative = np.histogram(distances[~same_id & pairs], plot_edges)[0]
        assert shown['overlap'][group] == pytest.approx(
            np.minimum(positive / positive.sum(), negative / negative.sum()).sum(), abs=1e-3)
    assert 0 < shown['overlap']['cross-modality'] < 1


def test_chunked_distance_statistics_equal_one_block(direct_store):
    whole = figures.pair_distance_statistics(direct_store, WEIGHTS, chunk_elements=1 << 30)
    blocks = figures.pair_distance_statistics(direct_store, WEIGHTS, chunk_elements=50)
    for name, curve in whole['curves'].items():
        assert blocks['curves'][name]['counts'] == curve['counts']
        assert blocks['curves'][name]['mean'] == pytest.approx(curve['mean'], abs=1e-5)


def test_tsne_shows_the_chosen_identities_capped_and_equals_a_direct_tsne(drawn, direct_store):
    shown = numbers(drawn, 'tsne')
    ids = shown['ids']
    assert len(ids) == 3 and shown['branches'] == 3
    images = {(m, p) for m in direct_store.paths
              for p, pid in zip(direct_store.paths[m], direct_store.pids[m]) if pid in ids}
    assert shown['images'] == len(images) > 24
    original, branches = shown['panels']['original'], shown['panels']['branches']
    assert original['points'] == len(original['x']) == 24  # capped by --tsne-points
    assert branches['points'] == 24 and sorted(set(branches['branch'])) == [0, 1, 2]
    drawn_images = set(zip(original['modality'], original['path']))
    assert drawn_images <= images and set(zip(branches['modality'], branches['path'])) <= drawn_images
    assert set(original['pid']) <= set(ids)
    features = torch.stack([direct_store.features[m][direct_store.rows[m][p], 1, 0]
                            for m, p in zip(original['modality'], original['path'])])
    expected = TSNE(n_components=2, perplexity=original['perplexity'], init='pca',
                    random_state=3).fit_transform(torch.nn.functional.normalize(features).numpy())
    assert np.allclose(np.stack([original['x'], original['y']], 1), expected, atol=1e-3)


def test_cmc_has_test_py_numbers_and_saved_features_give_the_same_figures(drawn, tiny, llcm_root):
    checkpoint, _, folder = tiny
    results, features = folder / 'results.json', folder / 'features.pt'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--output',
                             str(results), '--save-features', str(features)]) == 0
    reported = json.loads(results.read_text())['results']
    shown = numbers(drawn, 'cmc')
    assert sorted(shown) == sorted(reported)
    for setting, curve in shown.items():
        assert curve['trials'] == list(range(10)) and len(curve['cmc']) == 10
        for rank in (1, 5, 10, 20):
            column = min(rank, len(curve['mean'])) - 1
            assert curve['mean'][column] == pytest.approx(
                reported[setting]['pool+feat'][f'Rank-{rank}'][0], abs=1e-9)
        assert np.mean(curve['mAP']) == pytest.approx(reported[setting]['pool+feat']['mAP'][0])

    again = folder / 'from_features'
    assert visualize.main(['--dataset', 'llcm', '--features', str(features), '--out', str(again),
                           '--num-queries', '2', 'cmc', 'ranks']) == 0
    for setting, curve in numbers(again, 'cmc').items():
        assert np.allclose(curve['cmc'], shown[setting]['cmc'], atol=1e-9)
        assert curve['mAP'] == pytest.approx(shown[setting]['mAP'], abs=1e-9)
    rows = numbers(again, 'ranks_ir_to_vis')['rows']
    assert len(rows) == 2 and len(rows[0]['gallery']) == 10  # random queries, default --topk


def test_training_curves_take_the_last_line_of_each_epoch(drawn):
    shown = numbers(drawn, 'curves')
    assert shown['epochs'] == [0, 1, 2]
    assert shown['lr'] == [0.01, 0.03, 0.003]
    assert shown['losses'] == {'id': [5.0, 4.0, 3.0], 'loss': [9.0, 7.0, 6.0]}
    assert shown['evaluated'] == {'epochs': [1], 'direction': 'ir_to_vis', 'rank1': [0.3],
                                  'mAP': [0.4], 'mINP': [0.15]}


def test_sysu_cam3_queries_never_see_cam2(sysu_root, tmp_path):
    checkpoint = tmp_path / 'sysu.pth'
    seeded_checkpoint(checkpoint, 'sysu', num_classes=6)
    query, gallery = query_gallery('sysu', 'ir_to_vis', str(sysu_root), 0)
    chosen = [query.paths[list(query.camids).index(camera)] for camera in (3, 6)]
    assert visualize.main(['--dataset', 'sysu', '--data-path', str(sysu_root), '--resume',
                           str(checkpoint), '--out', str(tmp_path), '--device', 'cpu',
                           '--workers', '0', '--trial', '0', '--topk', '100', 'ranks',
                           '--queries', *chosen]) == 0
    cam3, cam6 = numbers(tmp_path, 'ranks_all_ir_to_vis')['rows']
    cam2 = int((gallery.camids == 2).sum())
    assert cam2 > 0 and (cam3['camid'], cam6['camid']) == (3, 6)
    assert 2 not in {e['camid'] for e in cam3['gallery']} and len(cam3['gallery']) == len(gallery) - cam2
    assert len(cam6['gallery']) == len(gallery)


def test_regdb_pairs_take_each_image_through_its_own_stem(regdb_root, tmp_path):
    checkpoint = tmp_path / 'regdb.pth'
    model = seeded_checkpoint(checkpoint, 'regdb', num_classes=4)
    assert visualize.main(['--data-path', str(regdb_root), '--resume', str(checkpoint), '--out',
                           str(tmp_path), '--device', 'cpu', '--workers', '0', 'distances']) == 0
    shown = numbers(tmp_path, 'distances')['curves']
    visible, infrared = query_gallery('regdb', 'vis_to_ir', str(regdb_root), 1)
    args = test_script.parse_args(['--resume', 'unused', '--workers', '0'])
    args.img_h, args.img_w = 64, 32
    own = extract_features(model, [visible, infrared], args, torch.device('cpu'))
    distances = fused_distance(own.select(visible), own.select(infrared), WEIGHTS).numpy()
    same_id = visible.pids[:, None] == infrared.pids[None, :]
    for kind, chosen in (('positive', same_id), ('negative', ~same_id)):
        assert shown[f'cross-modality {kind}']['pairs'] == chosen.sum()
        assert shown[f'cross-modality {kind}']['mean'] == pytest.approx(distances[chosen].mean(),
                                                                        abs=1e-4)
    assert shown['visible positive']['pairs'] + shown['visible negative']['pairs'] == \
        len(visible) * (len(visible) - 1) // 2


def test_rank_list_frames_are_green_red_or_grey(llcm_root, tmp_path):
    images = sorted(str(p) for p in llcm_root.glob('test_vis/*/*/*'))[:4]
    rows = [{'query': images[0], 'caption': 'query', 'gallery': [
        {'path': path, 'distance': 0.5, 'rank': rank, 'correct': correct}
        for rank, (path, correct) in enumerate(zip(images[1:], (True, False, None)), 1)]}]
    size = figures.draw_rank_lists(rows, tmp_path / 'ranks.png', title='frames')
    image = np.asarray(Image.open(tmp_path / 'ranks.png').convert('RGB')).astype(int)
    assert image.shape[1::-1] == size == figures.rank_list_size(rows, 'frames')
    middle = figures.PAD + figures.TITLE + figures.CELL_H // 2
    for column, colour in enumerate((figures.QUERY_COLOUR, *figures.FRAME_COLOURS.values())):
        left = figures.PAD + (figures.GAP if column else 0) + column * (figures.CELL_W + figures.PAD)
        expected = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert np.abs(image[middle, left + 1] - expected).max() < 30, column


def test_one_branch_features_draw_the_original_panel_only(tmp_path):
    store = FeatureStore()
    generator = torch.Generator().manual_seed(0)
    for modality in ('visible', 'infrared'):
        pids = np.repeat(np.arange(4), 5)
        store.add(modality, [f'{modality}/{i}.jpg' for i in range(20)],
                  torch.randn(20, 2, 1, 16, generator=generator), pids, np.ones(20))
    shown = figures.tsne_numbers(store, [0, 1, 2], max_points=100, seed=0)
    assert list(shown['panels']) == ['original'] and shown['panels']['original']['points'] == 30
    assert figures.draw_tsne(shown, tmp_path / 'tsne.png') == figures.figure_size(1)
    assert Image.open(tmp_path / 'tsne.png').size == figures.figure_size(1)


@pytest.mark.parametrize('extra, message', [
    (['tsne', 'pictures'], "unknown plot 'pictures'"),
    (['curves'], 'the curves plot needs --history'),
    (['--topk', '0'], '--topk must be a positive integer, got 0'),
    (['--tsne-points', '2'], '--tsne-points must be an integer of at least 4'),
    (['--ids', '9999'], '--ids 9999 is not a test identity'),
    (['--queries', 'test_nir/cam1/9999/none.jpg'], 'is not a query image of any direction'),
    (['--history', 'no/such/folder', 'curves'], '--history no/such/folder does not exist'),
    (['--features', 'x.pt'], 'not both'),
])
def test_user_errors_are_found_before_any_extraction(extra, message, tiny, llcm_root, monkeypatch):
    checkpoint, _, folder = tiny

    def no_extraction(*args, **kwargs):
        raise AssertionError('features were extracted before the error was found')

    monkeypatch.setattr(visualize, 'extract_features', no_extraction)
    with pytest.raises(UserError, match=message):
        visualize.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                        str(checkpoint), '--out', str(folder / 'errors'), '--device', 'cpu',
                        '--workers', '0', *extra])
    assert not (folder / 'errors').exists()


def test_features_of_another_dataset_and_regdb_trials_are_refused(tiny, regdb_root, tmp_path):
    store = FeatureStore()
    store.add('visible', ['a.jpg'], torch.zeros(1, 2, 3, 4), [1], [1])
    store.save(tmp_path / 'llcm.pt', {'dataset': 'llcm', 'data_path': 'data/LLCM'})
    with pytest.raises(UserError, match='holds llcm features; draw them with --dataset llcm'):
        visualize.main(['--dataset', 'sysu', '--features', str(tmp_path / 'llcm.pt'), '--out',
                        str(tmp_path / 'out')])
    checkpoint = tmp_path / 'regdb.pth'
    seeded_checkpoint(checkpoint, 'regdb', num_classes=4)
    with pytest.raises(UserError, match='draws one RegDB split'):
        visualize.main(['--dataset', 'regdb', '--data-path', str(regdb_root), '--resume',
                        str(checkpoint), '--out', str(tmp_path / 'out'), '--trial', 'all',
                        '--device', 'cpu'])
