"""Training on several datasets and testing on another: the merged identity space (fixed offsets,
recorded), the sampler over the union, a two-source training (synthetic SYSU-MM01 + RegDB) tested
with the LLCM protocol through test.py, exact resume of such a run, the refusals (one sentence,
before any cache or model), reproduce.py's cross-dataset and transfer plans, and RegDB's test
numbers unchanged by testing its released routing only on request."""
import json
import os
import signal

import numpy as np
import pytest
import torch

import reproduce
import test as test_script
import training
from data_manager import (SOURCE_ORDER, Source, merged_train_image_lists, source_records,
                          source_train_image_lists, train_image_lists)
from tiny_runs import TINY, at_criterion_call, seeded_checkpoint
from utils import IdentitySampler, UserError, load_checkpoint

STEPS = ['--epochs', 1, '--max-steps', 2]


def sources_argv(sysu_root, regdb_root, out, *extra):
    """A tiny training on synthetic SYSU-MM01 + RegDB writing under out."""
    return ['--sources', f'sysu:{sysu_root}', f'regdb:{regdb_root}',
            '--model_path', os.path.join(out, 'models'), '--log_path', os.path.join(out, 'logs'),
            '--cache-dir', os.path.join(out, 'cache'), *TINY, *map(str, extra)]


def all_sources(sysu_root, regdb_root, llcm_root, order=('llcm', 'sysu', 'regdb')):
    roots = {'sysu': str(sysu_root), 'regdb': str(regdb_root), 'llcm': str(llcm_root)}
    return [Source(name, roots[name], 3 if name == 'regdb' else 1) for name in order]


def test_merged_identity_space_is_disjoint_with_recorded_offsets_and_each_source_intact(
        sysu_root, regdb_root, llcm_root):
    parts = source_train_image_lists(all_sources(sysu_root, regdb_root, llcm_root))
    assert [part.source.dataset for part in parts] == list(SOURCE_ORDER)  # whatever order named
    merged = merged_train_image_lists(parts)
    records = source_records(parts)
    offset = 0
    for part, record in zip(parts, records):
        own = train_image_lists(part.source.dataset, part.source.data_path, trial=part.source.trial)
        assert record == {'dataset': part.source.dataset, 'data_path': part.source.data_path,
                          'trial': 3 if part.source.dataset == 'regdb' else None,
                          'identities': int(own['visible'].pids.max()) + 1, 'offset': offset}
        for modality, image_list in merged.items():
            rows = [image_list.paths.index(path) for path in own[modality].paths]
            assert np.array_equal(image_list.pids[rows] - offset, own[modality].pids)
            assert image_list.pids[rows].min() >= offset
            assert image_list.pids[rows].max() < offset + record['identities']
        offset += record['identities']
    assert offset == records[-1]['offset'] + records[-1]['identities']
    assert sorted(set(merged['visible'].pids)) == list(range(offset))  # every id, disjoint


def test_identity_sampler_over_the_union_draws_from_every_source(sysu_root, regdb_root, llcm_root):
    parts = source_train_image_lists(all_sources(sysu_root, regdb_root, llcm_root))
    merged = merged_train_image_lists(parts)
    sampler = IdentitySampler(merged['visible'].pids, merged['infrared'].pids, 2, 2, seed=0)
    drawn = {int(merged['visible'].pids[visible]) for visible, _, _ in sampler}
    for part in parts:
        assert drawn & set(range(part.offset, part.offset + part.identities)), part.source.dataset


@pytest.fixture(scope='module')
def two_sources(sysu_root, regdb_root, tmp_path_factory):
    """A finished tiny training on SYSU-MM01 + RegDB: (out folder, its best checkpoint)."""
    out = str(tmp_path_factory.mktemp('two_sources'))
    assert training.main(sources_argv(sysu_root, regdb_root, out, *STEPS)) == 0
    return out, os.path.join(out, 'models', 'regdb+sysu_deen_trial1_best.pth')


def test_two_source_checkpoint_records_every_source_its_identities_and_offset(two_sources,
                                                                               sysu_root,
                                                                               regdb_root):
    out, best = two_sources
    state = load_checkpoint(best)
    regdb = train_image_lists('regdb', str(regdb_root), trial=1)
    sysu = train_image_lists('sysu', str(sysu_root))
    regdb_ids, sysu_ids = (int(lists['visible'].pids.max()) + 1 for lists in (regdb, sysu))
    assert state['dataset'] == 'regdb+sysu'
    assert state['sources'] == [
        {'dataset': 'regdb', 'data_path': str(regdb_root), 'trial': 1, 'identities': regdb_ids,
         'offset': 0},
        {'dataset': 'sysu', 'data_path': str(sysu_root), 'trial': None, 'identities': sysu_ids,
         'offset': regdb_ids}]
    assert state['num_classes'] == regdb_ids + sysu_ids
    assert state['best_epoch'] == -1 and state['args']['eval_every'] == 0  # no target seen
    for name in ('regdb', 'sysu'):  # each source's cache in its own folder
        assert os.path.isfile(os.path.join(out, 'cache', name, 'train_rgb_resized_img.npy'))


def test_two_source_checkpoint_tested_with_the_llcm_protocol(two_sources, llcm_root, tmp_path,
                                                             capsys):
    _, best = two_sources
    output = tmp_path / 'results.json'
    argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', best, '--device',
            'cpu', '--workers', '0', '--output', str(output)]
    assert test_script.main(argv + ['--cross-dataset']) == 0
    printed = capsys.readouterr().out
    record = json.load(open(output))
    assert sorted(record['results']) == ['ir_to_vis', 'released_vis_to_ir', 'vis_to_ir']
    assert record['protocol']['trials'] == list(range(10))
    crossed = record['cross_dataset']
    assert crossed['tested_on'] == 'llcm' and crossed['classifier'] == 'unused'
    (trained,) = crossed['trained_on']
    assert trained['dataset'] == 'regdb+sysu'
    assert [source['dataset'] for source in trained['sources']] == ['regdb', 'sysu']
    assert printed.startswith('cross-dataset test: trained on RegDB (split 1, ')
    assert 'SYSU-MM01 (' in printed.splitlines()[0] and 'LLCM protocol' in printed.splitlines()[0]


def test_an_in_domain_test_has_no_cross_dataset_record(regdb_root, tmp_path, capsys):
    checkpoint = tmp_path / 'regdb.pth'
    seeded_checkpoint(checkpoint, 'regdb', num_classes=4)
    output = tmp_path / 'results.json'
    assert test_script.main(['--resume', str(checkpoint), '--data-path', str(regdb_root),
                             '--trial', '1', '--device', 'cpu', '--workers', '0',
                             '--output', str(output)]) == 0
    assert json.load(open(output))['cross_dataset'] is None
    assert 'cross-dataset' not in capsys.readouterr().out


@pytest.mark.parametrize('extra, message', [
    ([], 'was trained on regdb+sysu; add --cross-dataset to test it with the LLCM protocol.'),
])
def test_another_datasets_checkpoint_is_refused_without_cross_dataset(two_sources, llcm_root,
                                                                      extra, message):
    _, best = two_sources
    with pytest.raises(UserError, match=message.replace('+', r'\+').replace('.', r'\.')):
        test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', best,
                          '--device', 'cpu', *extra])


def test_a_checkpoint_of_several_datasets_names_no_protocol(two_sources):
    _, best = two_sources
    with pytest.raises(UserError, match='--dataset NAME --cross-dataset'):
        test_script.main(['--resume', best, '--device', 'cpu'])


def test_the_regdb_network_is_built_from_the_checkpoint_not_the_target(llcm_root, tmp_path):
    """DEEN's RegDB network has no fourth stage: tested on LLCM it is still that network."""
    checkpoint = tmp_path / 'regdb.pth'
    seeded_checkpoint(checkpoint, 'regdb', num_classes=4)
    from inference import load_trained_model
    model, info = load_trained_model(str(checkpoint), 'llcm', cross_dataset=True)
    assert model.regdb and info['dataset'] == 'regdb'
    with pytest.raises(UserError, match='--dataset regdb, or add --cross-dataset'):
        load_trained_model(str(checkpoint), 'llcm')


def test_tools_accept_a_checkpoint_of_several_datasets(two_sources):
    from inference import ReIDModel
    _, best = two_sources
    model = ReIDModel.load(best, device='cpu')
    assert model.info['dataset'] == 'regdb+sysu' and len(model.info['sources']) == 2


def test_a_trunk_the_target_image_size_does_not_fit_is_refused(two_sources, llcm_root, tmp_path):
    _, best = two_sources
    with pytest.raises(UserError, match=r'^--img_h 4 x --img_w 2 does not fit'):
        test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', best,
                          '--device', 'cpu', '--cross-dataset', '--img_h', '4', '--img_w', '2',
                          '--output', str(tmp_path / 'r.json')])
    assert not (tmp_path / 'r.json').exists()


def test_resume_of_a_multi_source_run_gives_the_uninterrupted_weights(sysu_root, regdb_root,
                                                                      tmp_path, monkeypatch):
    run = ['--epochs', 2, '--max-steps', 2]
    straight, stopped = str(tmp_path / 'straight'), str(tmp_path / 'stopped')
    assert training.main(sources_argv(sysu_root, regdb_root, straight, *run)) == 0
    argv = sources_argv(sysu_root, regdb_root, stopped, *run)
    with monkeypatch.context() as patch:  # SIGTERM during the 3rd step (epoch 1, step 0)
        at_criterion_call(patch, 3, lambda loss, parts: (os.kill(os.getpid(), signal.SIGTERM),
                                                          (loss, parts))[1])
        assert training.main(argv) == 130
    assert training.main(argv + ['--resume', 'last']) == 0
    name = 'regdb+sysu_deen_trial1_last.pth'
    first, second = (load_checkpoint(os.path.join(out, 'models', name))['model']
                     for out in (straight, stopped))
    for key, tensor in first.items():
        assert torch.equal(tensor, second[key]), key


@pytest.mark.parametrize('sources, extra, message', [
    (['sysu', 'sysu'], [], 'training dataset sysu is named twice; name each dataset once.'),
    (['sysu', 'market'], [], "unknown dataset 'market'"),
    (['sysu:{missing}', 'regdb:{regdb}'], [], '--sources sysu: {missing} does not exist'),
    (['sysu:{regdb}', 'regdb:{regdb}'], [], 'expected .* in the SYSU-MM01 layout'),
    (['sysu:{sysu}', 'regdb:{regdb}'], ['--trial', '11'], '--trial must be a RegDB split 1..10'),
    (['sysu:{sysu}', 'regdb:{regdb}'], ['--trial', 'all'], 'trains on one RegDB split'),
    (['sysu:{sysu}'], [], '--sources needs two or more datasets'),
    (['sysu:{sysu}', 'regdb:{regdb}'], ['--eval-every', '1'],
     'has no target unless --eval-dataset'),
])
def test_bad_sources_are_refused_in_one_sentence_before_any_cache(sources, extra, message,
                                                                   sysu_root, regdb_root,
                                                                   tmp_path):
    roots = {'sysu': sysu_root, 'regdb': regdb_root, 'missing': tmp_path / 'missing'}
    given = [text.format(**roots) for text in sources]
    argv = ['--sources', *given, '--model_path', str(tmp_path / 'models'), '--log_path',
            str(tmp_path / 'logs'), '--cache-dir', str(tmp_path / 'cache'), *TINY, *extra]
    with pytest.raises(UserError, match=message.format(**roots)) as refused:
        training.main(argv)
    assert str(refused.value).count('. ') == 0 and str(refused.value).endswith('.')
    assert not (tmp_path / 'cache').exists() and not (tmp_path / 'models').exists()


@pytest.mark.parametrize('table, trainings, tests', [('cross-dataset', 3, 3), ('transfer', 3, 9)])
def test_reproduce_dry_run_lists_every_run_and_writes_nothing(table, trainings, tests, tmp_path,
                                                              capsys):
    out = tmp_path / 'out'
    assert reproduce.main(['--table', table, '--method', 'caj', '--seeds', '0', '1', '--out',
                           str(out), '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert f'plan: {2 * trainings} training(s), {2 * tests} test(s)' in printed
    assert printed.count('      trains  --recipe l2rw') == 2 * trainings
    assert printed.count('      test on ') == 2 * tests
    if table == 'cross-dataset':
        for sources in ('--sources regdb:data/RegDB sysu:data/SYSU-MM01',
                        '--sources regdb:data/RegDB llcm:data/LLCM',
                        '--sources sysu:data/SYSU-MM01 llcm:data/LLCM'):
            assert sources in printed
    assert not out.exists()


def test_regdb_numbers_are_the_same_with_and_without_the_released_routing(regdb_root, tmp_path):
    checkpoint = tmp_path / 'regdb.pth'
    seeded_checkpoint(checkpoint, 'regdb', num_classes=4, random_batchnorm=True)
    records = {}
    for routing in (False, True):
        output = tmp_path / f'{routing}.json'
        assert test_script.main(['--resume', str(checkpoint), '--data-path', str(regdb_root),
                                 '--trial', '2', '--device', 'cpu', '--workers', '0',
                                 '--output', str(output),
                                 *(['--released-routing'] if routing else [])]) == 0
        records[routing] = json.load(open(output))
    plain, routed = records[False], records[True]
    assert sorted(plain['results']) == ['ir_to_vis', 'vis_to_ir']
    assert sorted(routed['results']) == ['ir_to_vis', 'released_routing_ir_to_vis',
                                         'released_routing_vis_to_ir', 'vis_to_ir']
    for setting, by_fusion in plain['results'].items():
        assert by_fusion == routed['results'][setting]
    assert 2 * plain['counts']['images'] == routed['counts']['images']
    assert 2 * plain['counts']['forward_passes'] == routed['counts']['forward_passes']


@pytest.mark.parametrize('argv, expected', [
    (['--sources', 'regdb', 'sysu'], dict(epochs=151, eval_every=0, erasing=(0.02, 0.4))),
    (['--sources', 'regdb', 'sysu', '--recipe', 'l2rw'],
     dict(epochs=30, eval_every=0, erasing=(0.2, 0.8))),
    (['--dataset', 'llcm', '--recipe', 'l2rw'], dict(epochs=30, eval_every=0, erasing=(0.2, 0.8))),
    (['--dataset', 'llcm', '--method', 'caj', '--recipe', 'l2rw'],
     dict(epochs=30, adp_square=0, erasing=(0.02, 0.4))),
    (['--sources', 'llcm', 'sysu', '--recipe', 'l2rw', '--epochs', '5'], dict(epochs=5)),
    (['--sources', 'llcm', 'sysu', '--eval-dataset', 'regdb:/r'],
     dict(eval_every=1, eval_dataset='regdb', data_path='/r')),
])
def test_the_recipe_rule_of_several_datasets_and_l2rw(argv, expected):
    args = training.parse_args(argv)
    for name, value in expected.items():
        assert getattr(args, name) == value, name


def test_regdb_as_a_target_is_tested_on_every_split_with_one_model(regdb_root, tmp_path):
    checkpoint = tmp_path / 'sysu.pth'
    seeded_checkpoint(checkpoint, 'sysu', num_classes=6)
    output = tmp_path / 'results.json'
    assert test_script.main(['--dataset', 'regdb', '--data-path', str(regdb_root), '--resume',
                             str(checkpoint), '--cross-dataset', '--device', 'cpu', '--workers',
                             '0', '--output', str(output)]) == 0
    record = json.load(open(output))
    assert record['protocol']['trials'] == list(range(1, 11))
    assert '10 splits, one model' in record['protocol']['settings']['ir_to_vis']
    assert len(record['cross_dataset']['trained_on']) == 1
    assert record['cross_dataset']['trained_on'][0]['sources'] == [{'dataset': 'sysu'}]


def test_visualize_draws_a_checkpoint_of_several_datasets_with_the_targets_protocol(
        two_sources, llcm_root, tmp_path):
    import visualize
    _, best = two_sources
    argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', best, '--out',
            str(tmp_path / 'out'), '--device', 'cpu', '--trial', '0', 'cmc']
    with pytest.raises(UserError, match='add --cross-dataset'):
        visualize.main(argv)
    assert visualize.main(argv + ['--cross-dataset']) == 0
    assert any(name.endswith('.png') for name in os.listdir(tmp_path / 'out'))


def test_reproduce_cross_dataset_runs_resumes_and_reports_beside_l2rw(sysu_root, regdb_root,
                                                                      llcm_root, tmp_path,
                                                                      capsys):
    out = tmp_path / 'out'
    argv = ['--table', 'cross-dataset', '--out', str(out), '--roots', f'sysu:{sysu_root}',
            f'regdb:{regdb_root}', f'llcm:{llcm_root}', *TINY, '--epochs', '1', '--max-steps', '1']
    assert reproduce.main(argv) == 0
    capsys.readouterr()
    assert reproduce.main(argv) == 0  # everything done: nothing trained or tested again
    assert capsys.readouterr().out.count(': done, skipped') == 3
    table = json.load(open(out / 'cross-dataset' / 'deen_cross_dataset.json'))
    by_protocol = {row['protocol']: row for row in table['rows']}
    assert list(by_protocol) == ['R+S→L', 'R+L→S', 'L+S→R']
    row = by_protocol['L+S→R']
    assert row['published'] == {'Rank-1': 19.42, 'mAP': 19.44} and row['seeds'] == [0]
    results = json.load(open(out / 'cross-dataset' / 'deen' / 'sysu+llcm' / 'seed0' / 'results'
                             / 'sysu+llcm_deen_on_regdb_test.json'))
    assert results['protocol']['trials'] == list(range(1, 11))  # one model, every RegDB split
    ours = results['results']['ir_to_vis']['pool+feat']
    assert row['ours']['Rank-1'] == pytest.approx(100 * np.mean(ours['Rank-1'][2]))
    assert 'L2RW' in (out / 'cross-dataset' / 'deen_cross_dataset.md').read_text()


def test_reproduce_transfer_report_draws_the_matrix_with_its_numbers(tmp_path):
    out = tmp_path / 'out'
    assert reproduce.main(['--table', 'transfer', '--out', str(out), '--report']) == 0
    numbers = json.load(open(out / 'transfer' / 'deen_transfer.json'))
    assert numbers['sources'] == numbers['targets'] == list(SOURCE_ORDER)
    assert numbers['cells'] == [[None] * 3] * 3  # nothing run yet
    assert (out / 'transfer' / 'deen_transfer.png').stat().st_size > 0


def test_released_routing_is_refused_outside_regdb(llcm_root, tmp_path):
    checkpoint = tmp_path / 'llcm.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6)
    with pytest.raises(UserError, match='LLCM has no such setting, drop it.'):
        test_script.main(['--resume', str(checkpoint), '--data-path', str(llcm_root),
                          '--device', 'cpu', '--released-routing'])
