"""End-to-end tests of train.py, test.py and pre_process_sysu.py on the synthetic folders in
the three real layouts: checkpoints, logs, caches, RegDB trials, released checkpoints."""
import json
import os

import numpy as np
import pytest
import torch

import data_loader
import pre_process_sysu
import evaluation
import inference
import test as test_script
import training
from data_manager import train_image_lists
from model import build_model, released_state_dict
from tiny_runs import epoch_losses, run_script, train_argv


@pytest.fixture(scope='module')
def llcm_run(llcm_root, tmp_path_factory):
    """Three tiny LLCM epochs of the released ResNet-50 DEEN, evaluated after each."""
    out = str(tmp_path_factory.mktemp('llcm_run'))
    argv = train_argv('llcm', llcm_root, out, '--arch', 'resnet50', '--epochs', 3, '--lr', 0.2,
                      '--warmup', 1)
    assert training.main(argv) == 0
    return out


def test_training_writes_checkpoints_log_args_and_the_loss_decreases(llcm_run):
    models = sorted(os.listdir(os.path.join(llcm_run, 'models')))
    assert models == ['llcm_deen_best.pth', 'llcm_deen_last.pth']
    logs = os.path.join(llcm_run, 'logs')
    assert json.load(open(os.path.join(logs, 'llcm_deen_args.json')))['dataset'] == 'llcm'
    losses = epoch_losses(os.path.join(logs, 'llcm_deen.log'))
    assert sorted(losses) == [0, 1, 2]
    assert losses[2] < losses[0]
    with open(os.path.join(logs, 'llcm_deen_history.jsonl')) as handle:
        history = [json.loads(line) for line in handle]
    assert [record['epoch'] for record in history] == [0, 1, 2]
    assert [record['losses']['loss'] for record in history] == pytest.approx(
        [losses[e] for e in range(3)], abs=1e-4)
    assert all(0 <= record['metrics']['rank1'] <= 1 and record['lr'] > 0 for record in history)
    last = torch.load(os.path.join(llcm_run, 'models', 'llcm_deen_last.pth'), weights_only=True)
    assert last['epoch'] == 2 and last['step'] == 0 and last['method'] == 'deen'
    assert 0.0 <= last['best_rank1'] <= 1.0


def test_test_script_prints_every_llcm_direction_and_writes_json(llcm_run, llcm_root, capsys):
    checkpoint = os.path.join(llcm_run, 'models', 'llcm_deen_best.pth')
    output = os.path.join(llcm_run, 'results.json')
    code = test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             checkpoint, '--device', 'cpu', '--workers', '0', '--trial', 'all',
                             '--output', output])
    printed = capsys.readouterr().out
    assert code == 0
    for direction in ('ir_to_vis', 'vis_to_ir', 'released_vis_to_ir'):
        assert f'llcm {direction}' in printed
    assert 'pool+feat' in printed and '0.1pool+0.9feat' in printed
    results = json.load(open(output))['results']
    mean, std, rank1_trials = results['ir_to_vis']['pool+feat']['Rank-1']
    assert len(rank1_trials) == 10 and all(0 <= r <= 1 for r in rank1_trials)
    assert mean == pytest.approx(np.mean(rank1_trials)) and std == pytest.approx(np.std(rank1_trials))


def test_test_script_decodes_each_image_once_for_all_trials(llcm_run, llcm_root):
    checkpoint = os.path.join(llcm_run, 'models', 'llcm_deen_best.pth')
    model, info = inference.load_trained_model(checkpoint, 'llcm', torch.device('cpu'))
    args = test_script.parse_args(['--dataset', 'llcm', '--resume', checkpoint, '--workers', '0'])
    args.img_h, args.img_w = info['img_h'], info['img_w']
    splits = evaluation.protocol_splits('llcm', str(llcm_root), range(10))
    _, store = evaluation.evaluate_splits(model, 'llcm', splits, args, torch.device('cpu'))
    distinct = {p for _, _, q, g in splits for lst in (q, g) for p in lst.paths}
    assert store.images == len(distinct)
    assert evaluation.separate_extraction_cost(splits) > len(distinct)


def test_cache_is_built_once_and_reused_without_decoding(llcm_root, tmp_path, monkeypatch):
    lists = train_image_lists('llcm', str(llcm_root))
    images, labels = data_loader.load_or_build_cache(lists['visible'], str(tmp_path), (16, 32), 1)
    assert images.shape == (len(lists['visible']), 32, 16, 3) and images.dtype == np.uint8
    assert (labels == lists['visible'].pids).all()

    def no_decoding(*args, **kwargs):
        raise AssertionError('a warm start decoded an image')

    monkeypatch.setattr(data_loader, 'read_image', no_decoding)
    again, _ = data_loader.load_or_build_cache(lists['visible'], str(tmp_path), (16, 32), 1)
    assert np.array_equal(np.asarray(again), np.asarray(images))
    with pytest.raises(AssertionError, match='decoded'):  # another size rebuilds
        data_loader.load_or_build_cache(lists['visible'], str(tmp_path), (16, 24), 1)


def test_cache_matches_a_direct_lanczos_resize(llcm_root, tmp_path):
    lists = train_image_lists('llcm', str(llcm_root))
    images, _ = data_loader.load_or_build_cache(lists['infrared'], str(tmp_path), (20, 40), 2)
    for index in (0, len(images) - 1):
        expected = np.asarray(data_loader.read_image(lists['infrared'].paths[index], (20, 40)))
        assert np.array_equal(images[index], expected)


def test_pre_process_sysu_writes_the_released_cache_files(sysu_root, tmp_path):
    assert pre_process_sysu.main(['--data-path', str(sysu_root), '--cache-dir', str(tmp_path),
                                  '--img_h', '32', '--img_w', '16', '--workers', '1']) == 0
    labels = np.load(tmp_path / 'train_rgb_resized_label.npy')
    assert np.load(tmp_path / 'train_rgb_resized_img.npy').shape[1:] == (32, 16, 3)
    assert set(labels.tolist()) == set(range(len(set(labels.tolist()))))
    assert set(np.load(tmp_path / 'train_ir_resized_label.npy').tolist()) == set(labels.tolist())


def test_sysu_trains_and_tests_both_search_modes(sysu_root, tmp_path, capsys):
    assert training.main(train_argv('sysu', sysu_root, str(tmp_path), '--epochs', 1,
                                 '--max-steps', 2)) == 0
    code = test_script.main(['--dataset', 'sysu', '--data-path', str(sysu_root), '--resume',
                             str(tmp_path / 'models' / 'sysu_deen_best.pth'), '--device', 'cpu',
                             '--workers', '0', '--trial', '0'])
    printed = capsys.readouterr().out
    assert code == 0 and 'sysu all ir_to_vis' in printed and 'sysu indoor ir_to_vis' in printed


def test_regdb_trains_the_selected_trial_and_tests_with_its_checkpoint(regdb_root, tmp_path, capsys):
    assert training.main(train_argv('regdb', regdb_root, str(tmp_path), '--trial', 3, '--epochs', 1,
                                 '--max-steps', 2)) == 0
    assert sorted(os.listdir(tmp_path / 'models')) == ['regdb_deen_trial3_best.pth',
                                                       'regdb_deen_trial3_last.pth']
    log = (tmp_path / 'logs' / 'regdb_deen_trial3.log').read_text()
    expected = len(train_image_lists('regdb', str(regdb_root), trial=3)['visible'])
    assert f'{expected} visible' in log
    template = str(tmp_path / 'models' / 'regdb_deen_trial{trial}_best.pth')
    code = test_script.main(['--dataset', 'regdb', '--data-path', str(regdb_root), '--resume',
                             template, '--trial', '3', '--device', 'cpu', '--workers', '0'])
    printed = capsys.readouterr().out
    assert code == 0 and 'regdb vis_to_ir' in printed and 'regdb ir_to_vis' in printed


def test_released_format_checkpoint_is_evaluated(llcm_root, tmp_path, capsys):
    num_classes = len(set(train_image_lists('llcm', str(llcm_root))['visible'].pids.tolist()))
    model = build_model('deen', num_classes, 'llcm')
    path = tmp_path / 'llcm_deen_p4_n6_lr_0.1_seed_0_best.t'
    torch.save({'net': released_state_dict(model.state_dict()), 'mAP': np.float64(0.4),
                'cmc': np.zeros(20), 'epoch': 40}, path)
    code = test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(path), '--device', 'cpu', '--workers', '0', '--trial', '0',
                             '--img_h', '64', '--img_w', '32'])
    assert code == 0 and 'llcm ir_to_vis' in capsys.readouterr().out


def test_demo_dataset_is_generated_in_the_llcm_layout_and_used(tmp_path):
    result = run_script('train.py', train_argv('demo', tmp_path / 'demo', str(tmp_path),
                                               '--epochs', 1, '--max-steps', 1, '--eval-every', 0))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / 'demo' / 'idx' / 'train_vis.txt').is_file()
    assert (tmp_path / 'models' / 'demo_deen_best.pth').is_file()


def test_lighter_trunk_with_adam_trains_and_test_py_rebuilds_it(llcm_root, tmp_path, capsys):
    assert training.main(train_argv('llcm', llcm_root, str(tmp_path), '--arch', 'resnet18', '--optim',
                                 'adam', '--lr', '1e-3', '--epochs', 1, '--max-steps', 2)) == 0
    checkpoint = tmp_path / 'models' / 'llcm_deen_best.pth'
    assert torch.load(checkpoint, weights_only=True)['arch'] == 'resnet18'
    code = test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', '0'])
    assert code == 0 and 'llcm ir_to_vis' in capsys.readouterr().out


@pytest.mark.parametrize('pretrained, body_scale', [('none', 1.0), ('imagenet', 0.1)])
@pytest.mark.parametrize('optim, kind', [('sgd', torch.optim.SGD), ('adam', torch.optim.Adam)])
def test_optimizer_trains_a_pretrained_trunk_at_a_tenth_of_the_head_rate(pretrained, body_scale,
                                                                         optim, kind):
    model = build_model('deen', 4, 'regdb', arch='resnet18')
    optimizer = training.build_optimizer(model, 0.5, optim, pretrained=pretrained != 'none')
    training.set_learning_rate(optimizer, 0.5)
    body, head = optimizer.param_groups
    assert isinstance(optimizer, kind)
    assert body['lr'] == pytest.approx(0.5 * body_scale) and head['lr'] == 0.5
    assert {id(p) for p in head['params']} == {id(model.bottleneck.weight), id(model.classifier.weight)}
    assert len(body['params']) + 2 == sum(p.requires_grad for p in model.parameters())


def test_demo_recipe_is_filled_in_and_flags_still_win():
    args = training.parse_args(['--dataset', 'demo'])
    assert (args.arch, args.optim, args.pretrained, args.eval_every) == ('resnet18', 'adam', 'none', 3)
    assert args.erasing is None and args.grayscale == 0.0
    args = training.parse_args(['--dataset', 'demo', '--arch', 'resnet50', '--eval-every', '1'])
    assert (args.arch, args.eval_every) == ('resnet50', 1)
    args = training.parse_args(['--dataset', 'llcm'])
    assert (args.arch, args.optim, args.lr, args.eval_every) == ('resnet50', 'sgd', 0.1, 1)
