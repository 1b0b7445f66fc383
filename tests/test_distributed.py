"""Scale-out tests on CPU: two torchrun processes (gloo) train in lock-step on the batches of one
plan, only rank 0 writes, the result tests; a worker SIGKILLed under torchrun --max-restarts is
restarted and the run resumes by itself (--resume auto), and so does the group of two launchers
one of which dies and is started again; a run stopped inside an epoch resumes on
another process count and trains every planned batch exactly once; two launchers (two "nodes")
build one training cache each in folders of their own, and refuse a checkpoint folder they do not
share; bf16 autocast trains and tests."""
import collections
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data_loader
import ddp_probe
import evaluation
import inference
import test as test_script
import training
from data_manager import train_image_lists
from tiny_runs import REPO, epoch_losses, train_argv
from utils import IdentitySampler, load_checkpoint

PROBE = os.path.join(REPO, 'tests', 'ddp_probe.py')


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def torchrun_command(script_argv, nproc=2, nnodes=1, port=None, restarts=0, static=False):
    """A torchrun launch with c10d rendezvous on localhost, as on a cluster; static=True: the
    static rendezvous of one node (--master-addr / --master-port), as the README gives it."""
    port = port or free_port()
    rendezvous = (['--master-addr=127.0.0.1', f'--master-port={port}'] if static else
                  ['--rdzv-backend=c10d', f'--rdzv-endpoint=localhost:{port}'])
    return [sys.executable, '-m', 'torch.distributed.run', f'--nnodes={nnodes}',
            f'--nproc_per_node={nproc}', *rendezvous, f'--max-restarts={restarts}',
            '--monitor-interval=0.5', *map(str, script_argv)]


def run_probe(out, argv, restarts=0, static=False, **env):
    """train.py under tests/ddp_probe.py on two processes; returns (completed process, records
    of each rank)."""
    # TMPDIR: torchrun's own scratch folders go with the test's, not into /tmp
    env = dict(os.environ, PROBE_OUT=str(out), OMP_NUM_THREADS='1', TMPDIR=str(out), **env)
    command = torchrun_command([PROBE, *argv], restarts=restarts, static=static)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    records = [json.load(open(out / f'probe_rank{rank}.json')) for rank in range(2)
               if (out / f'probe_rank{rank}.json').exists()]
    return result, records


def run_probed_in_process(argv, **env):
    """train.py in this process (one process), recorded like tests/ddp_probe.py; returns
    (exit status, records)."""
    records = ddp_probe.new_records()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.setattr(training.Trainer, '__init__',
                      ddp_probe.instrumented_init(records, training.Trainer.__init__))
        dataset = data_loader.CrossModalTrainSet
        patch.setattr(dataset, '__getitem__', ddp_probe.recording_getitem(records, dataset.__getitem__))
        code = training.main(argv)
    return code, records


@pytest.fixture(scope='module')
def ddp_run(llcm_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddp')
    result, records = run_probe(out, train_argv('llcm', llcm_root, str(out), '--epochs', 2,
                                                '--max-steps', 2))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, records


def test_both_processes_hold_identical_weights_after_every_step(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert len(rank0['weights']) == 4  # 2 epochs x 2 steps
    assert rank0['weights'] == rank1['weights']
    assert len(set(rank0['weights'])) == 4  # and the weights did change


def test_processes_cover_the_batch_plan(ddp_run):
    """Rank r trains global batch s*2 + r at step s: the plan is the one a single process draws,
    so a resume on another process count can continue it (IdentitySampler)."""
    _, (rank0, rank1) = ddp_run
    plan = rank0['plan']
    assert plan == rank1['plan']
    for step in range(2):  # first epoch
        assert rank0['ids'][step] == sorted(plan[2 * step])
        assert rank1['ids'][step] == sorted(plan[2 * step + 1])


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
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 3, '--lr', 0.05, '--warmup', 1,
                      '--amp', 'bf16', '--eval-every', 0, '--channels-last')
    assert training.main(argv) == 0
    losses = epoch_losses(tmp_path / 'logs' / 'llcm_deen.log')
    assert losses[2] < losses[0]
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(tmp_path / 'models' / 'llcm_deen_best.pth'), '--device', 'cpu',
                             '--workers', '0', '--trial', '0', '--amp', 'bf16']) == 0
    assert 'llcm ir_to_vis' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# Elastic restarts and resumes on another process count

@pytest.fixture(scope='module')
def killed_and_restarted(llcm_root, tmp_path_factory):
    """ddp_run's command plus --resume auto under torchrun --max-restarts 1, whose rank 1 is
    SIGKILLed during its 3rd step (epoch 1, step 0) in the first attempt. As the README says:
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, without which the c10d rendezvous hands the restarted
    group the store of the first attempt, whose stale addresses make it fail or hang."""
    out = tmp_path_factory.mktemp('elastic')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 2, '--max-steps', 2, '--resume', 'auto')
    result, records = run_probe(out, argv, restarts=1, PROBE_SIGNAL='KILL@3', PROBE_SIGNAL_RANK='1',
                                TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    return out, result, records


@pytest.fixture(scope='module')
def killed_on_one_node(llcm_root, tmp_path_factory):
    """The README's single-node restart: the static rendezvous (--master-addr / --master-port),
    no TORCH_DISABLE_SHARE_RDZV_TCP_STORE, --resume auto; rank 0 is SIGKILLed in its 4th step
    (inside epoch 1) and joins the restarted group late, so that rank 1 reads the launcher's
    store before rank 0 publishes its new address there (what failed with torch's own store;
    the static rendezvous shares that store whatever TORCH_DISABLE_SHARE_RDZV_TCP_STORE says)."""
    out = tmp_path_factory.mktemp('static')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 2, '--max-steps', 2, '--resume', 'auto')
    result, records = run_probe(out, argv, restarts=1, static=True, PROBE_SIGNAL='KILL@4',
                                PROBE_SIGNAL_RANK='0', PROBE_LATE_RANK='0')
    return out, result, records


def wait_for_listener(port, process, timeout=120):
    """Return once something accepts connections on 127.0.0.1:port (process must stay alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        with socket.socket() as sock:
            if sock.connect_ex(('127.0.0.1', port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f'nothing listens on port {port} after {timeout} s')


@pytest.fixture(scope='module')
def node_died_and_replaced(llcm_root, tmp_path_factory):
    """The cluster command on two "nodes" (two launchers of one process each, --nnodes=2, c10d,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, --max-restarts=1, --resume auto); node 0 hosts the
    rendezvous. In its 4th step (inside epoch 1) node 1 dies: its launcher and its worker are
    SIGKILLed. The same command started again on node 1, as a scheduler replaces a node, joins the
    group that node 0 restarts (once torch's keep-alive has declared the dead node gone)."""
    out = tmp_path_factory.mktemp('dead_node')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 2, '--max-steps', 2, '--resume', 'auto')
    port = free_port()
    env = dict(os.environ, PROBE_OUT=str(out), OMP_NUM_THREADS='1', TMPDIR=str(out),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1')
    command = torchrun_command([PROBE, *argv], nproc=1, nnodes=2, port=port, restarts=1)

    def launch(**extra):
        return subprocess.Popen(command, cwd=REPO, env=dict(env, **extra), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    host = launch()
    wait_for_listener(port, host)  # node 0's launcher holds the rendezvous store
    dying = launch(PROBE_SIGNAL='NODE@4', PROBE_SIGNAL_RANK='any')
    _, died = dying.communicate(timeout=300)
    assert dying.returncode == -signal.SIGKILL, died[-3000:]
    replaced = launch()
    outputs = [process.communicate(timeout=300) for process in (host, replaced)]
    result = subprocess.CompletedProcess(command, host.returncode or replaced.returncode,
                                         stderr=''.join(err for _, err in outputs))
    records = [json.load(open(out / f'probe_rank{rank}.json')) for rank in range(2)
               if (out / f'probe_rank{rank}.json').exists()]
    return out, result, records


@pytest.mark.parametrize('launch', ['killed_and_restarted', 'killed_on_one_node',
                                    'node_died_and_replaced'])
def test_a_killed_worker_is_restarted_and_the_run_resumes_by_itself(launch, request, ddp_run):
    out, result, records = request.getfixturevalue(launch)
    assert result.returncode == 0 and len(records) == 2, result.stderr[-3000:]
    rank0, rank1 = records
    log = (out / 'logs' / 'llcm_deen.log').read_text()
    assert log.count('llcm_deen on cpu x2') == 2  # the first attempt and the restarted one
    assert '--resume auto: no ' in log  # the first attempt started afresh
    assert log.count('resumed ') == 1 and '(after epoch 0)' in log  # the restart continued
    history = [json.loads(line) for line in open(out / 'logs' / 'llcm_deen_history.jsonl')]
    assert [record['epoch'] for record in history] == [0, 1]
    assert all(record['metrics'] is not None for record in history)
    # the restarted group trained epoch 1 (2 steps) and ends as the uninterrupted run did
    assert len(rank0['weights']) == 2 and rank0['weights'] == rank1['weights']
    assert rank0['weights'][-1] == ddp_run[1][0]['weights'][-1]
    last = load_checkpoint(str(out / 'models' / 'llcm_deen_last.pth'))
    expected = load_checkpoint(str(ddp_run[0] / 'models' / 'llcm_deen_last.pth'))
    assert (last['epoch'], last['step']) == (1, 0)
    assert all(torch.equal(expected['model'][k], last['model'][k]) for k in expected['model'])
    for key in ('rank1', 'mAP', 'mINP'):
        assert last['metrics'][key] == expected['metrics'][key]


def sample_batches(seeds, llcm_root):
    """(B, [the global batch of epoch 0 that each recorded sample seed belongs to])."""
    lists = train_image_lists('llcm', str(llcm_root))
    sampler = IdentitySampler(lists['visible'].pids, lists['infrared'].pids, 2, 2, seed=0)
    owner = {seed: batch for batch in range(sampler.batches + 2)
             for seed in sampler.sample_seeds(batch)}
    return sampler.batches, [owner[seed] for seed in seeds]


def assert_each_planned_batch_trained_once(parts, llcm_root, world_sizes):
    """parts: the sample seeds each run fetched (one list per process of each run)."""
    batches, first = sample_batches(parts[0], llcm_root)
    counts = collections.Counter(first)
    for seeds in parts[1:]:
        counts.update(sample_batches(seeds, llcm_root)[1])
    assert {b: counts[b] for b in range(batches)} == {b: 4 for b in range(batches)}  # P*K samples
    extra = sorted(b for b in counts if b >= batches)  # the last step's, past the plan
    assert len(extra) < max(world_sizes) and all(counts[b] == 4 for b in extra)
    return sorted(set(first))


@pytest.fixture(scope='module')
def one_then_two(llcm_root, tmp_path_factory):
    """One process stopped by SIGTERM after 4 of the 11 batches of epoch 0, resumed by two."""
    out = tmp_path_factory.mktemp('one_then_two')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 1, '--eval-every', 0)
    code, first = run_probed_in_process(argv, PROBE_SIGNAL='TERM@4')
    assert code == 130
    stopped = load_checkpoint(str(out / 'models' / 'llcm_deen_last.pth'))
    result, ranks = run_probe(out, argv + ['--resume', 'last'])
    return out, code, first, stopped, result, ranks


@pytest.fixture(scope='module')
def two_then_one(llcm_root, tmp_path_factory):
    """Two processes stopped by SIGTERM after 3 steps (6 of the 11 batches), resumed by one."""
    out = tmp_path_factory.mktemp('two_then_one')
    argv = train_argv('llcm', llcm_root, str(out), '--epochs', 1, '--eval-every', 0)
    result, ranks = run_probe(out, argv, PROBE_SIGNAL='TERM@3')
    stopped = load_checkpoint(str(out / 'models' / 'llcm_deen_last.pth'))
    code, last = run_probed_in_process(argv + ['--resume', 'last'])
    return out, result, ranks, stopped, code, last


def test_a_resume_on_two_processes_trains_each_planned_batch_once(one_then_two, llcm_root):
    out, _, first, stopped, result, ranks = one_then_two
    assert result.returncode == 0, result.stderr[-3000:]
    assert (stopped['step'], stopped['sampler']['batch'], stopped['sampler']['world_size']) == (4, 4, 1)
    parts = [first['seeds']] + [rank['seeds'] for rank in ranks]
    assert assert_each_planned_batch_trained_once(parts, llcm_root, (1, 2)) == [0, 1, 2, 3]
    assert len(ranks[0]['weights']) == len(ranks[1]['weights']) == 4  # ceil((11 - 4) / 2) steps
    assert ranks[0]['weights'] == ranks[1]['weights']
    log = (out / 'logs' / 'llcm_deen.log').read_text()
    assert ('epoch 0 continues at global batch 4 of 11 on 2 process(es) instead of the 1 that '
            'saved it: 4 step(s) left') in log
    assert 'cannot carry over to another process count' in log
    history = [json.loads(line) for line in open(out / 'logs' / 'llcm_deen_history.jsonl')]
    assert [r['epoch'] for r in history] == [0] and history[0]['losses']['loss'] > 0


def test_a_resume_on_one_process_trains_each_planned_batch_once(two_then_one, llcm_root):
    out, result, ranks, stopped, code, last = two_then_one
    assert result.returncode != 0 and code == 0  # torchrun reports the stop; the resume ends
    assert (stopped['step'], stopped['sampler']['batch'], stopped['sampler']['world_size']) == (6, 6, 2)
    assert len(stopped['rng']['ranks']) == 2  # each process's random states
    parts = [ranks[0]['seeds'], ranks[1]['seeds'], last['seeds']]
    assert assert_each_planned_batch_trained_once(parts, llcm_root, (2, 1)) == [0, 2, 4]
    assert len(last['weights']) == 5  # batches 6..10
    log = (out / 'logs' / 'llcm_deen.log').read_text()
    assert ('epoch 0 continues at global batch 6 of 11 on 1 process(es) instead of the 2 that '
            'saved it: 5 step(s) left') in log
    finished = load_checkpoint(str(out / 'models' / 'llcm_deen_last.pth'))
    assert (finished['epoch'], finished['step']) == (0, 0)


def test_without_evaluation_the_summary_says_what_best_holds(two_then_one):
    out = two_then_one[0]
    log = (out / 'logs' / 'llcm_deen.log').read_text()
    assert 'llcm_deen done: no evaluation (--eval-every 0): best = the final weights, epoch 0;' in log
    assert '-100' not in log


# ----------------------------------------------------------------------------------------------
# Two "nodes": two launchers joined by c10d rendezvous, each in a folder of its own, so that a
# relative path names a different folder on each, as a node-local disk would

def run_two_nodes(tmp_path, argv):
    """train.py under two torchrun launchers of one process each (--nnodes 2), started in
    tmp_path/node0 and tmp_path/node1; returns their completed processes."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path))
    launchers = []
    for node in range(2):
        (tmp_path / f'node{node}').mkdir()
        command = torchrun_command([os.path.join(REPO, 'train.py'), *argv], nproc=1, nnodes=2,
                                   port=port)
        launchers.append(subprocess.Popen(command, cwd=tmp_path / f'node{node}', env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for launcher in launchers:
        stdout, stderr = launcher.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(launcher.args, launcher.returncode, stdout, stderr))
    return results


def test_an_error_of_every_process_is_printed_once(llcm_root, tmp_path):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--sync-bn')
    result = subprocess.run(torchrun_command([os.path.join(REPO, 'train.py'), *argv]), cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert result.stderr.count('error: --sync-bn needs CUDA GPUs') == 1, result.stderr[-3000:]
    assert 'error: --sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation); drop it ' \
        'to train on the CPU.' in result.stderr.splitlines()


def test_each_node_builds_its_own_cache_on_a_node_local_cache_dir(llcm_root, tmp_path):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 1, '--max-steps', 1,
                      '--eval-every', 0, '--cache-dir', 'cache')
    results = run_two_nodes(tmp_path, argv)
    assert all(result.returncode == 0 for result in results), results[0].stderr[-3000:]
    for node in range(2):  # one cache per node, built by its one process
        assert sorted(os.listdir(tmp_path / f'node{node}' / 'cache')) == [
            'train_ir_resized_img.npy', 'train_ir_resized_label.npy', 'train_ir_resized_meta.json',
            'train_rgb_resized_img.npy', 'train_rgb_resized_label.npy', 'train_rgb_resized_meta.json']
    assert (tmp_path / 'models' / 'llcm_deen_last.pth').exists()


def test_a_checkpoint_folder_the_nodes_do_not_share_is_refused_at_start(llcm_root, tmp_path):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 1, '--model_path', 'models')
    results = run_two_nodes(tmp_path, argv)
    sentence = ('error: --model_path models is not on a filesystem shared by all nodes: rank(s) 1 '
                'cannot read the file rank 0 wrote there, and the checkpoints must be in a folder '
                'that every node sees.')
    for result in results:
        assert result.returncode != 0
        assert sentence in result.stderr.splitlines(), result.stderr[-3000:]
        worker = result.stderr.split('failed (exitcode: 2)')[0]  # before torchrun's report
        assert 'Traceback' not in worker
    assert os.listdir(tmp_path / 'cache') == []  # found before the cache, the model, an epoch
    assert all(os.listdir(tmp_path / f'node{node}' / 'models') == [] for node in range(2))
