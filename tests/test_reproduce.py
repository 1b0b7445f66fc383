"""reproduce.py end to end on the synthetic folders with tiny settings (the demo, a RegDB layout
with two splits, a run killed mid-training), the published table, the provenance of every
checkpoint and results file, test.py without --dataset, and RegDB's released stem routing."""
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

import evaluation
import paper_results
import provenance
import reproduce
import test as test_script
import training
from data_manager import DATASET_FACTS, DIRECTION_PLANS, dataset_facts, query_gallery
from inference import embed_images, extract_features
from model import build_model, released_state_dict
from tiny_runs import REPO, TINY
from utils import load_checkpoint

# Tiny trainings: one epoch of two steps, evaluated at its end.
FAST = [*TINY, '--epochs', '1', '--max-steps', '2', '--eval-every', '1']
PROVENANCE_FIELDS = {'command', 'code', 'python', 'torch', 'torchvision', 'cuda', 'cudnn', 'device',
                     'gpu_model', 'gpus', 'processes', 'precision', 'deterministic', 'seed', 'time'}


def reproduce_argv(dataset, data_path, out, *extra):
    return ['--dataset', dataset, '--data-path', str(data_path), '--out', str(out),
            '--cache-dir', str(out / 'cache'), *map(str, extra)]


def comparison(out, dataset, method='deen'):
    with open(out / f'{dataset}_{method}_comparison.json') as handle:
        return json.load(handle)


def results_of(out, dataset, seed, name):
    with open(out / f'{dataset}_deen' / f'seed{seed}' / 'results' / f'{name}_test.json') as handle:
        return json.load(handle)


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory):
    """`reproduce.py --dataset demo --seeds 0 1` with tiny trainings; (out, printed output)."""
    out = tmp_path_factory.mktemp('demo_repro')
    argv = reproduce_argv('demo', out / 'demo', out, '--seeds', 0, 1, *FAST)
    code, printed = _run_in_process(argv)
    assert code == 0
    return out, printed


def _run_in_process(argv):
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        code = reproduce.main(argv)
    return code, buffer.getvalue()


def test_demo_reproduction_prints_and_writes_ours_as_mean_and_std_over_trials_and_seeds(demo_run):
    out, printed = demo_run
    table = comparison(out, 'demo')
    assert table['seeds'] == [0, 1] and table['parts_done'] == 2 and table['missing'] == []
    settings = [setting['setting'] for setting in table['settings']]
    assert settings == list(dataset_facts('demo').directions)
    records = [results_of(out, 'demo', seed, 'demo_deen') for seed in (0, 1)]
    for setting in table['settings']:
        for metric in ('Rank-1', 'mAP', 'mINP'):
            per_seed = [record['results'][setting['setting']]['pool+feat'][metric][2]
                        for record in records]
            values = 100 * np.array(per_seed[0] + per_seed[1])
            ours = setting['ours'][metric]
            assert len(ours['values']) == 20  # 2 seeds x 10 gallery trials
            assert ours['mean'] == pytest.approx(values.mean())
            assert ours['std'] == pytest.approx(values.std())
            assert ours['seed_std'] == pytest.approx(np.std([100 * np.mean(v) for v in per_seed]))
        assert setting['published'] == []  # nothing is published for the synthetic demo
        assert '10 gallery trials' in setting['protocol']
        assert setting['protocol'].endswith('fusion pool+feat')
    markdown = (out / 'demo_deen_comparison.md').read_text()
    assert markdown in printed
    assert 'single-shot' in markdown and 'what the released test.py calls "VIS to IR"' in markdown
    assert 'spread (std) of the 2 seed means' in markdown


def test_results_files_and_checkpoints_record_how_they_were_made(demo_run):
    out, _ = demo_run
    record = results_of(out, 'demo', 1, 'demo_deen')
    made = record['provenance']
    assert PROVENANCE_FIELDS <= set(made)
    assert made['processes'] == 1 and made['precision'] == 'fp32' and made['gpus'] == 0
    # run in this process: the command line recorded is this process's
    assert made['torch'] == torch.__version__ and made['command'] == shlex.join(sys.argv)
    assert len(made['code']['git_commit']) == 40 and isinstance(made['code']['git_modified'], bool)
    (model,) = record['models']
    assert model['seed'] == 1 and model['provenance']['seed'] == 1
    checkpoint = load_checkpoint(str(out / 'demo_deen' / 'seed1' / 'save_model' /
                                     'demo_deen_best.pth'))
    assert PROVENANCE_FIELDS <= set(checkpoint['provenance'])
    assert checkpoint['provenance']['seed'] == 1
    assert record['protocol']['trials'] == list(range(10))


def test_code_version_outside_a_git_checkout_has_no_commit(tmp_path):
    assert provenance.code_version(str(tmp_path))['git_commit'] is None


def test_test_py_takes_the_dataset_from_our_checkpoint_and_prints_the_provenance(demo_run, capsys):
    out, _ = demo_run
    output = out / 'again.json'
    code = test_script.main(['--resume', str(out / 'demo_deen' / 'seed0' / 'save_model' /
                                             'demo_deen_best.pth'),
                             '--data-path', str(out / 'demo'), '--device', 'cpu', '--workers', '0',
                             '--trial', '0', '--output', str(output)])
    printed = capsys.readouterr().out
    assert code == 0
    assert 'dataset demo: recorded in the checkpoint' in printed and 'demo ir_to_vis' in printed
    assert 'tested by:' in printed and 'trained by:' in printed and 'seed 0' in printed
    assert json.loads(output.read_text())['dataset'] == 'demo'


def test_test_py_names_a_released_checkpoints_dataset_from_its_class_count(regdb_root, tmp_path,
                                                                          capsys):
    model = build_model('deen', 206, 'regdb')
    path = tmp_path / 'regdb_deen_p4_n6_lr_0.1_seed_0_trial_1_best.t'
    torch.save({'net': released_state_dict(model.state_dict()), 'epoch': 3}, path)
    code = test_script.main(['--resume', str(path), '--data-path', str(regdb_root), '--trial', '1',
                             '--device', 'cpu', '--workers', '0', '--img_h', '64', '--img_w', '32',
                             '--released-routing'])
    printed = capsys.readouterr().out
    assert code == 0
    assert "dataset regdb: inferred from the released checkpoint's 206 classes" in printed
    for setting in DATASET_FACTS['regdb'].directions:
        assert f'regdb {setting}' in printed
    assert 'no provenance recorded' in printed


@pytest.fixture(scope='module')
def regdb_run(regdb_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('regdb_repro')
    code, printed = _run_in_process(reproduce_argv('regdb', regdb_root, out, '--trials', 1, 2,
                                                   *FAST))
    assert code == 0
    return out, printed


def test_regdb_two_splits_give_the_table_with_deltas_to_the_paper(regdb_run):
    out, printed = regdb_run
    table = comparison(out, 'regdb')
    assert table['trials'] == [1, 2] and table['seeds'] == [0]
    records = [results_of(out, 'regdb', 0, f'regdb_deen_trial{t}') for t in (1, 2)]
    by_setting = {setting['setting']: setting for setting in table['settings']}
    assert list(by_setting) == list(DATASET_FACTS['regdb'].directions)
    for name, published in (('vis_to_ir', {'Rank-1': 91.1, 'mAP': 85.1}),
                            ('ir_to_vis', {'Rank-1': 89.5, 'mAP': 83.4}),
                            ('released_routing_vis_to_ir', {'Rank-1': 91.1, 'mAP': 85.1})):
        setting = by_setting[name]
        (row,) = setting['published']
        assert row['source'] == 'paper' and row['metrics'] == published
        for metric, value in published.items():
            ours = 100 * np.mean([r['results'][name]['pool+feat'][metric][2][0] for r in records])
            assert setting['ours'][metric]['mean'] == pytest.approx(ours)
            assert row['delta'][metric] == pytest.approx(ours - value)
        assert setting['ours']['Rank-1']['seed_std'] is None
        assert '2 splits, each with its own model' in setting['protocol']
    assert "other modality's stem" in by_setting['released_routing_ir_to_vis']['protocol']
    assert f'{by_setting["vis_to_ir"]["published"][0]["delta"]["Rank-1"]:+.2f}' in printed
    assert 'paper' in table['sources']


def test_dry_run_lists_every_part_with_its_files_and_runs_nothing(tmp_path, capsys):
    out = tmp_path / 'out'
    code = reproduce.main(['--dataset', 'all', '--seeds', '0', '1', '--out', str(out), '--dry-run'])
    printed = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert 'plan: 24 part(s), 0 done, 24 to run' in printed  # (SYSU + 10 RegDB + LLCM) x 2 seeds
    assert '[24/24] llcm deen seed 1: train and test' in printed
    assert os.path.join(str(out), 'regdb_deen', 'seed0', 'results',
                        'regdb_deen_trial7_test.json') in printed


def test_flags_that_reproduce_sets_itself_are_refused():
    with pytest.raises(reproduce.UserError, match='use --seeds instead'):
        reproduce.parse_args(['--dataset', 'llcm', '--seed', '3'])
    with pytest.raises(reproduce.UserError, match='--trials selects RegDB splits'):
        reproduce.parse_args(['--dataset', 'llcm', '--trials', '1'])


def test_a_single_feature_is_compared_for_caj_only():
    args = reproduce.parse_args(['--dataset', 'llcm', '--method', 'caj', '--fusion', 'feat'])
    assert args.fusion == 'feat'
    with pytest.raises(reproduce.UserError, match='--fusion pool is reported for CAJ and LbA only'):
        reproduce.parse_args(['--dataset', 'llcm', '--fusion', 'pool'])


def _history_epochs(path):
    with open(path) as handle:
        return [json.loads(line)['epoch'] for line in handle]


def test_killed_mid_training_it_resumes_and_does_not_redo_finished_parts(regdb_root, tmp_path,
                                                                         monkeypatch, capsys):
    out = tmp_path / 'out'
    argv = reproduce_argv('regdb', regdb_root, out, '--trials', 1, 2, *TINY, '--epochs', 4,
                          '--max-steps', 1, '--eval-every', 0)
    second = out / 'regdb_deen' / 'seed0'
    history = second / 'log' / 'regdb_deen_trial2_history.jsonl'
    process = subprocess.Popen([sys.executable, os.path.join(REPO, 'reproduce.py'), *argv],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        while not (history.is_file() and history.read_text().strip()):  # split 2's first epoch
            assert process.poll() is None, 'reproduce.py ended before it could be killed'
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    first_results = second / 'results' / 'regdb_deen_trial1_test.json'
    finished_at = first_results.stat().st_mtime
    assert not (second / 'results' / 'regdb_deen_trial2_test.json').exists()

    assert reproduce.main([*argv, '--dry-run']) == 0
    plan = capsys.readouterr().out
    assert '[1/2] regdb deen seed 0 split 1: done' in plan
    assert '[2/2] regdb deen seed 0 split 2: resume training after' in plan

    assert reproduce.main([*argv, '--report']) == 0  # from the finished part only
    assert comparison(out, 'regdb')['parts_done'] == 1
    assert 'regdb deen seed 0 split 2 (resume training' in capsys.readouterr().out

    trainings = []
    monkeypatch.setattr(reproduce.training, 'main', _recording(reproduce.training.main, trainings))
    assert reproduce.main(argv) == 0
    assert len(trainings) == 1 and trainings[0][-2:] == ['--resume', 'last']
    assert trainings[0][trainings[0].index('--trial') + 1] == '2'
    assert first_results.stat().st_mtime == finished_at
    assert 'resumed' in (second / 'log' / 'regdb_deen_trial2.log').read_text()
    epochs = _history_epochs(history)
    assert epochs.count(0) == 1 and max(epochs) == 3
    assert comparison(out, 'regdb')['parts_done'] == 2


def _recording(function, calls):
    def recorded(argv):
        calls.append(list(argv))
        return function(argv)
    return recorded


def test_released_routing_passes_each_regdb_image_through_the_other_stem(regdb_root):
    own = query_gallery('regdb', 'vis_to_ir', str(regdb_root), 1)
    swapped = query_gallery('regdb', 'released_routing_vis_to_ir', str(regdb_root), 1)
    for mine, theirs in zip(own, swapped):
        assert theirs.paths == mine.paths and theirs.stem != mine.stem == mine.modality
    model = build_model('deen', 4, 'regdb', arch='resnet18').eval()
    with torch.no_grad():  # the two stems start as copies: make them differ
        model.infrared_stem.conv1.weight.mul_(-1)
    args = evaluation.parse_test_args(['--resume', 'x', '--workers', '0', '--img_h', '64',
                                       '--img_w', '32'])
    store = extract_features(model, [*own, *swapped], args, torch.device('cpu'))
    thermal = swapped[1]  # thermal gallery through the visible stem
    expected, _ = embed_images(model, 'visible', thermal.paths[:3], args, torch.device('cpu'))
    assert torch.allclose(store.select(thermal)[:3], expected, atol=1e-5)
    assert not torch.allclose(store.select(own[1])[:3], expected, atol=1e-3)


def test_separate_extraction_counts_what_the_released_script_decodes(llcm_root):
    splits = evaluation.protocol_splits('llcm', str(llcm_root), range(10))
    released = [s for s in splits if s[0] == 'released_vis_to_ir']
    every_visible = len(released[0][3])
    assert evaluation.separate_extraction_cost(released) == (
        every_visible + sum(len(query) for _, _, query, _ in released))  # gallery extracted once
    expected = 0
    for name in dataset_facts('llcm').directions:
        mine = [s for s in splits if s[0] == name]
        (_, query_draw), (_, gallery_draw) = DIRECTION_PLANS[name]
        for side, draw in ((2, query_draw), (3, gallery_draw)):
            expected += len(mine[0][side]) if draw == 'every' else sum(len(s[side]) for s in mine)
    assert evaluation.separate_extraction_cost(splits) == expected


def test_every_published_number_names_a_source_and_a_setting_we_test():
    for (method, dataset, setting), by_source in paper_results.PUBLISHED.items():
        assert method in training.RECIPES
        assert setting.split()[-1] in DATASET_FACTS[dataset].directions
        for source, numbers in by_source.items():
            assert source in paper_results.SOURCES
            assert set(numbers) <= set(paper_results.METRICS)
            assert all(0 < value < 100 for value in numbers.values())
    for ours, theirs in paper_results.PUBLISHED_AS.items():
        assert {ours, theirs} <= set(DATASET_FACTS['regdb'].directions)
    assert paper_results.published('deen', 'demo', 'ir_to_vis') == {}
