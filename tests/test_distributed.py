"""Scale-out tests on CPU: two torchrun processes (gloo) train in lock-step on disjoint identities,
only rank 0 writes, the result tests; bf16 autocast trains and tests."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import evaluation
import inference
import test as test_script
import training
from tiny_runs import REPO, epoch_losses, train_argv
from utils import load_checkpoint


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def ddp_run(llcm_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 2, '--max-steps', 2)
    command = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
               '--master_addr=127.0.0.1', f'--master_port={free_port()}',
               os.path.join(REPO, 'tests', 'ddp_probe.py'), *map(str, argv)]
    env = dict(os.environ, PROBE_OUT=str(out), OMP_NUM_THREADS='1')
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.load(open(out / f'probe_rank{rank}.json')) for rank in range(2)]
    return out, records


def test_both_processes_hold_identical_weights_after_every_step(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert len(rank0['weights']) == 4  # 2 epochs x 2 steps
    assert rank0['weights'] == rank1['weights']
    assert len(set(rank0['weights'])) == 4  # and the weights did change


def test_processes_cover_the_batch_plan_without_overlap(ddp_run):
    _, (rank0, rank1) = ddp_run
    plan = rank0['plan']
    assert plan == rank1['plan']
    for step in range(2):  # first epoch
        ids0, ids1 = set(rank0['ids'][step]), set(rank1['ids'][step])
        assert not ids0 & ids1
        assert ids0 | ids1 == set(plan[step])


def test_only_rank_zero_writes_files_and_the_result_tests(ddp_run, llcm_root, capsys):
    out, _ = ddp_run
    written = sorted(os.path.relpath(os.path.join(folder, name), out)
                     for folder, _, names in os.walk(out) for name in names
                     if not name.startswith('probe_rank') and 'tensorboard' not in folder
                     and 'cache' not in folder)
    assert written == ['logs/llcm_deen.log', 'logs/llcm_deen_args.json', 'logs/llcm_deen_history.jsonl',
                       'models/llcm_deen_best.pth', 'models/llcm_deen_last.pth']
    log = (out / 'logs' / 'llcm_deen.log').read_text()
    assert log.count('llcm_deen epoch 1 ') == 1 and 'x2' in log
    checkpoint = str(out / 'models' / 'llcm_deen_best.pth')
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             checkpoint, '--device', 'cpu', '--workers', '0', '--trial', '0']) == 0
    assert 'llcm ir_to_vis' in capsys.readouterr().out


def test_sharded_extraction_during_training_matches_one_process(ddp_run, llcm_root):
    out, _ = ddp_run
    state = load_checkpoint(str(out / 'models' / 'llcm_deen_last.pth'))
    model, _ = inference.load_trained_model(str(out / 'models' / 'llcm_deen_last.pth'), 'llcm',
                                              torch.device('cpu'))
    args = training.parse_args(train_argv('llcm', llcm_root, str(out)))
    single = evaluation.selection_rank1(model, 'llcm', str(llcm_root), 1, 'all', args,
                                         torch.device('cpu'))
    assert single['mAP'] == pytest.approx(state['metrics']['mAP'], abs=1e-5)


def test_bf16_autocast_on_cpu_trains_and_tests(llcm_root, tmp_path, capsys):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 3, '--lr', 0.2, '--warmup', 1,
                      '--amp', 'bf16', '--eval-every', 0, '--channels-last')
    assert training.main(argv) == 0
    losses = epoch_losses(tmp_path / 'logs' / 'llcm_deen.log')
    assert losses[2] < losses[0]
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(tmp_path / 'models' / 'llcm_deen_best.pth'), '--device', 'cpu',
                             '--workers', '0', '--trial', '0', '--amp', 'bf16']) == 0
    assert 'llcm ir_to_vis' in capsys.readouterr().out
