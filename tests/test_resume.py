"""Exact resume at any step: the data pipeline's draws are functions of the sampler's position,
so a run stopped by SIGTERM inside an epoch and resumed gives the weights and losses of the
uninterrupted run bit for bit, with and without data-loading workers; an epoch is saved before
its evaluation, and a resumed run evaluates it first."""
import json
import os
import signal

import numpy as np
import pytest
import torch

import data_loader
import training
from data_manager import train_image_lists
from tiny_runs import at_criterion_call, train_argv
from utils import IdentitySampler, load_checkpoint, run_main

# 2 epochs of 3 steps; the SIGTERM arrives during the 5th step (epoch 1, step 1)
RUN = ['--epochs', 2, '--max-steps', 3, '--eval-every', 0]
SIGTERM_AT_CALL = 5


def sigterm_during_call(monkeypatch, call):
    """Make the criterion's call number `call` send this process a real SIGTERM."""
    def signal_self(loss, parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss, parts
    at_criterion_call(monkeypatch, call, signal_self)


def history(out):
    with open(os.path.join(out, 'logs', 'llcm_deen_history.jsonl')) as handle:
        return [json.loads(line) for line in handle]


def last_checkpoint(out):
    return load_checkpoint(os.path.join(out, 'models', 'llcm_deen_last.pth'))


@pytest.fixture(scope='module')
def uninterrupted(llcm_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('straight'))
    assert training.main(train_argv('llcm', llcm_root, out, *RUN)) == 0
    return out


@pytest.mark.parametrize('workers', [0, 2])
def test_resume_after_sigterm_inside_an_epoch_is_bit_exact(uninterrupted, llcm_root, tmp_path,
                                                           monkeypatch, workers, capsys):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN, '--workers', workers)
    with monkeypatch.context() as patch:
        sigterm_during_call(patch, SIGTERM_AT_CALL)
        assert training.main(argv) == 130
    assert '--resume' in capsys.readouterr().err
    stopped = last_checkpoint(out)
    assert (stopped['epoch'], stopped['step']) == (1, 2)  # inside epoch 1, after its 2nd step
    assert stopped['sampler']['epoch'] == 1 and stopped['sampler']['batch'] == 2
    assert training.main(argv + ['--resume', 'last']) == 0
    expected, actual = last_checkpoint(uninterrupted), last_checkpoint(out)
    assert (actual['epoch'], actual['step']) == (1, 0)
    assert all(torch.equal(expected['model'][k], actual['model'][k]) for k in expected['model'])
    assert expected['optimizer']['state'].keys() == actual['optimizer']['state'].keys()
    for key, state in expected['optimizer']['state'].items():
        assert torch.equal(state['momentum_buffer'], actual['optimizer']['state'][key]['momentum_buffer'])
    straight, resumed = history(uninterrupted), history(out)
    assert [r['epoch'] for r in resumed] == [0, 1]
    assert [r['losses'] for r in resumed] == [r['losses'] for r in straight]  # exact floats


def test_resume_after_an_epoch_is_bit_exact(uninterrupted, llcm_root, tmp_path):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN)
    at_one = argv[:argv.index('--epochs')] + ['--epochs', '1'] + argv[argv.index('--epochs') + 2:]
    assert training.main(at_one) == 0
    assert training.main(argv + ['--resume', 'last']) == 0
    expected, actual = last_checkpoint(uninterrupted)['model'], last_checkpoint(out)['model']
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert [r['losses'] for r in history(out)] == [r['losses'] for r in history(uninterrupted)]


def test_samples_depend_on_their_seed_only_and_leave_the_process_rng_alone(llcm_root, tmp_path):
    lists = train_image_lists('llcm', str(llcm_root))
    caches = [data_loader.load_or_build_cache(lists[m], str(tmp_path), (32, 64), 1, False)
              for m in ('visible', 'infrared')]
    dataset = data_loader.CrossModalTrainSet(*caches, data_loader.training_views(64, 32, (0.02, 0.4), 0.5, 2))
    torch.manual_seed(1)
    before = torch.get_rng_state()
    first = dataset[(3, 4, 12345)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(99)  # another process state: the same sample
    again = dataset[(3, 4, 12345)]
    other = dataset[(3, 4, 54321)]
    assert all(torch.equal(a, b) for a, b in zip(first[:2], again[:2]))
    assert not torch.equal(first[0], other[0])


def test_sample_seeds_are_a_function_of_the_global_position():
    visible, infrared = np.repeat(np.arange(8), 4), np.repeat(np.arange(8), 3)
    sampler = IdentitySampler(visible, infrared, num_ids=2, num_pos=2, seed=3)
    sampler.set_epoch(5)
    seeds = [seed for _, _, seed in sampler]
    assert len(set(seeds)) == len(seeds)  # every sample of the epoch its own draws
    sampler.set_epoch(5, start=2)
    assert [seed for _, _, seed in sampler] == seeds[2 * 4:]  # a resume draws what it would have
    sampler.set_epoch(6)
    assert not set(seed for _, _, seed in sampler) & set(seeds)
    ranks = [IdentitySampler(visible, infrared, 2, 2, seed=3, world_size=2, rank=r) for r in (0, 1)]
    for rank in ranks:
        rank.set_epoch(5)
    assert [seed for _, _, seed in ranks[1]][:4] == seeds[4:8]  # rank 1 draws batch 1's seeds
    state = sampler.state_dict(6, 1)
    assert state == {'seed': 3, 'epoch': 6, 'batch': 1, 'batches_per_epoch': sampler.batches,
                     'world_size': 1, 'num_ids': 2, 'num_pos': 2}


def test_an_epoch_is_saved_before_its_evaluation_and_evaluated_on_resume(llcm_root, tmp_path,
                                                                       monkeypatch, capsys):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, '--epochs', 1, '--max-steps', 2)
    evaluate = training.selection_rank1

    def vanished(*args, **kwargs):
        raise training.UserError('the test images went away mid-run.')

    monkeypatch.setattr(training, 'selection_rank1', vanished)
    assert run_main(lambda: training.main(argv)) == 2
    assert 'went away' in capsys.readouterr().err
    saved = last_checkpoint(out)
    assert (saved['epoch'], saved['step']) == (0, 0)  # the epoch's training is kept
    assert saved['evaluation_pending']['epoch'] == 0
    assert not os.path.exists(os.path.join(out, 'models', 'llcm_deen_best.pth'))
    trained = saved['model']
    monkeypatch.setattr(training, 'selection_rank1', evaluate)
    assert training.main(argv + ['--resume', 'last']) == 0  # nothing left to train: evaluates
    records = history(out)
    assert [r['epoch'] for r in records] == [0] and records[0]['metrics']['rank1'] >= 0
    assert records[0]['losses'] == saved['evaluation_pending']['losses']
    best = load_checkpoint(os.path.join(out, 'models', 'llcm_deen_best.pth'))
    assert best['best_epoch'] == 0 and best['metrics']['rank1'] == records[0]['metrics']['rank1']
    assert all(torch.equal(trained[k], best['model'][k]) for k in trained)  # no step retrained
    assert last_checkpoint(out)['evaluation_pending'] is None


def test_a_changed_batch_plan_restarts_the_interrupted_epoch_and_says_so(llcm_root, tmp_path,
                                                                        monkeypatch):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN)
    with monkeypatch.context() as patch:
        sigterm_during_call(patch, 2)
        assert training.main(argv) == 130
    assert last_checkpoint(out)['sampler']['batch'] == 2
    assert training.main(argv + ['--num_pos', '3', '--resume', 'last']) == 0
    with open(os.path.join(out, 'logs', 'llcm_deen.log')) as handle:
        log = handle.read()
    assert 'epoch 0 restarts from its first batch: --num_pos (2 -> 3) changed since ' in log
    assert [r['epoch'] for r in history(out)] == [0, 1]
    assert (last_checkpoint(out)['epoch'], last_checkpoint(out)['step']) == (1, 0)


@pytest.mark.parametrize('resume, hint', [
    ([], 'continue with the same command plus --resume {last}'),
    (['--resume', 'auto'], 'the same command continues it')])
def test_the_interrupt_message_says_what_continues_for_the_flags_given(llcm_root, tmp_path,
                                                                       monkeypatch, capsys,
                                                                       resume, hint):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 1, '--max-steps', 2,
                      '--eval-every', 0, *resume)
    with monkeypatch.context() as patch:
        sigterm_during_call(patch, 1)
        assert training.main(argv) == 130
    last = os.path.join(tmp_path, 'models', 'llcm_deen_last.pth')
    assert f'interrupted: saved {last}; ' + hint.format(last=last) in capsys.readouterr().err
    continued = argv + (['--resume', last] if not resume else [])
    assert training.main(continued) == 0
    finished = last_checkpoint(str(tmp_path))
    assert (finished['epoch'], finished['step']) == (0, 0)
