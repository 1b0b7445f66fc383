"""Never lose a run, never load untrusted code, explain every bad input: SIGTERM from outside,
SIGKILL during a save, non-finite losses, refused checkpoints and one-sentence user errors (exact
resume: test_resume.py; checks before the work: test_checks.py)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import data_loader
import evaluation
import test as test_script
import training
from tiny_runs import REPO, poison_loss_at, run_script, train_argv
from utils import load_checkpoint, run_main


def run_train(argv):
    """train.py's exit status as the command line sees it (UserError -> 2)."""
    return run_main(lambda: training.main(argv))


def wait_for(predicate, seconds=120):
    deadline = time.time() + seconds
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.2)


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_a_signal_finishes_the_step_saves_last_and_the_run_resumes(llcm_root, tmp_path, signum):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, '--epochs', 50, '--eval-every', 0, '--max-steps', 4)
    log = tmp_path / 'logs' / 'llcm_deen.log'
    process = subprocess.Popen([sys.executable, 'train.py', *map(str, argv)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: log.exists() and 'steps/epoch' in log.read_text())
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert '--resume' in stderr and 'Traceback' not in stderr
    state = load_checkpoint(os.path.join(out, 'models', 'llcm_deen_last.pth'))
    assert state['step'] > 0 or state['epoch'] >= 0
    epoch = state['epoch']
    resumed = run_script('train.py', argv[:argv.index('50')] + [epoch + 1] +
                         argv[argv.index('50') + 1:] + ['--resume', 'last'])
    assert resumed.returncode == 0, resumed.stderr
    finished = load_checkpoint(os.path.join(out, 'models', 'llcm_deen_last.pth'))
    assert (finished['epoch'], finished['step']) == (epoch, 0)


KILL_DURING_SECOND_SAVE = '''
import os, signal, sys, torch, training
real_save, saves = torch.save, []
def dying_save(obj, handle, *args, **kwargs):
    saves.append(1)
    if len(saves) == 2:  # half-written second checkpoint, then the node dies
        handle.write(b'PK-partial-checkpoint')
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, handle, *args, **kwargs)
torch.save = dying_save
sys.exit(training.main(sys.argv[1:]))
'''


def test_sigkill_during_a_save_loses_at_most_the_current_epoch(llcm_root, tmp_path):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, '--epochs', 3, '--max-steps', 2, '--eval-every', 0)
    killed = subprocess.run([sys.executable, '-c', KILL_DURING_SECOND_SAVE, *map(str, argv)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL
    state = load_checkpoint(os.path.join(out, 'models', 'llcm_deen_last.pth'))
    assert (state['epoch'], state['step']) == (0, 0)  # epoch 0 kept, epoch 1 lost
    assert run_train(argv + ['--resume', 'last']) == 0
    assert load_checkpoint(os.path.join(out, 'models', 'llcm_deen_last.pth'))['epoch'] == 2
    assert sorted(os.listdir(os.path.join(out, 'models'))) == ['llcm_deen_best.pth', 'llcm_deen_last.pth']


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_last(llcm_root, tmp_path, monkeypatch,
                                                                   capsys):
    poison_loss_at(monkeypatch, 4)
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 3, '--max-steps', 3,
                      '--eval-every', 0)
    assert run_train(argv) == 2
    assert 'epoch 1, step 0' in capsys.readouterr().err
    assert load_checkpoint(str(tmp_path / 'models' / 'llcm_deen_last.pth'))['epoch'] == 0
    history = (tmp_path / 'logs' / 'llcm_deen_history.jsonl').read_text().splitlines()
    assert [json.loads(line)['epoch'] for line in history] == [0]  # the failed epoch adds no line


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


def test_scripts_refuse_a_checkpoint_that_would_run_code(llcm_root, tmp_path, capsys):
    path, marker = tmp_path / 'evil.t', tmp_path / 'executed'
    torch.save({'net': {'classifier.weight': torch.zeros(2, 2)}, 'hook': RunsCode(marker)}, path)
    code = run_main(lambda: test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root),
                                              '--resume', str(path), '--device', 'cpu']))
    assert code == 2 and 'arbitrary code' in capsys.readouterr().err and not marker.exists()


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence on stderr, exit status 2, no stack trace

@pytest.fixture
def llcm_copy(llcm_root, tmp_path):
    return shutil.copytree(llcm_root, tmp_path / 'llcm_copy')


def first_train_image(root, modality_file='train_vis.txt'):
    return root / open(root / 'idx' / modality_file).readline().split()[0]


def assert_user_error(capsys, code, *phrases):
    err = capsys.readouterr().err
    last_line = err.replace('\r', '\n').strip().splitlines()[-1]
    assert code == 2, err
    assert last_line.startswith('error: ') and err.count('error: ') == 1, err
    assert 'Traceback' not in err and last_line.count('.') >= 1, err
    for phrase in phrases:
        assert phrase in err, err


def test_missing_data_root(tmp_path, capsys):
    code = run_train(train_argv('llcm', tmp_path / 'nowhere', str(tmp_path)))
    assert_user_error(capsys, code, str(tmp_path / 'nowhere'))


def test_missing_index_file(llcm_copy, tmp_path, capsys):
    os.remove(llcm_copy / 'idx' / 'train_nir.txt')
    assert_user_error(capsys, run_train(train_argv('llcm', llcm_copy, str(tmp_path))), 'train_nir.txt')


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_unreadable_or_truncated_image_is_named(llcm_copy, tmp_path, capsys, damage):
    image = first_train_image(llcm_copy)
    data = image.read_bytes()
    image.write_bytes(b'not an image' if damage == 'garbage' else data[:len(data) // 2])
    code = run_train(train_argv('llcm', llcm_copy, str(tmp_path)))
    assert_user_error(capsys, code, image.name)


def test_identity_in_one_modality_only(llcm_copy, tmp_path, capsys):
    index = llcm_copy / 'idx' / 'train_nir.txt'
    lines = index.read_text().splitlines()
    dropped = lines[0].split()[1]
    index.write_text('\n'.join(l for l in lines if l.split()[1] != dropped) + '\n')
    assert_user_error(capsys, run_train(train_argv('llcm', llcm_copy, str(tmp_path))), 'modalit')


def test_trial_outside_one_to_ten(regdb_root, tmp_path, capsys):
    assert_user_error(capsys, run_train(train_argv('regdb', regdb_root, str(tmp_path), '--trial', 11)),
                      '--trial')
    code = run_main(lambda: test_script.main(['--dataset', 'regdb', '--data-path', str(regdb_root),
                                              '--resume', 'x{trial}.pth', '--trial', '0']))
    assert_user_error(capsys, code, '--trial')


def test_empty_query(llcm_copy, tmp_path, capsys):
    (llcm_copy / 'idx' / 'test_id.txt').write_text('9999\n')
    code = run_main(lambda: evaluation.protocol_splits('llcm', str(llcm_copy), [0]))
    assert_user_error(capsys, code)


def test_unknown_flag_values(tmp_path, capsys):
    assert_user_error(capsys, run_train(['--device', 'tpu']), '--device')
    with pytest.raises(SystemExit) as exit_info:
        training.parse_args(['--dataset', 'market'])
    assert exit_info.value.code == 2 and 'invalid choice' in capsys.readouterr().err


@pytest.fixture(scope='module')
def llcm_checkpoint(llcm_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('ckpt'))
    assert run_train(train_argv('llcm', llcm_root, out, '--epochs', 1, '--max-steps', 1,
                                '--eval-every', 0)) == 0
    return os.path.join(out, 'models', 'llcm_deen_last.pth')


def test_checkpoint_of_another_dataset_method_arch_or_class_count(llcm_checkpoint, llcm_root, sysu_root,
                                                            tmp_path, capsys):
    code = run_main(lambda: test_script.main(['--dataset', 'sysu', '--data-path', str(sysu_root),
                                              '--resume', llcm_checkpoint, '--device', 'cpu']))
    assert_user_error(capsys, code, 'trained on llcm')
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--method', 'agw', '--resume',
                                llcm_checkpoint))
    assert_user_error(capsys, code, 'method')
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--arch', 'resnet50', '--resume',
                                llcm_checkpoint))
    assert_user_error(capsys, code, "arch 'resnet18', but this run has arch 'resnet50'")
    state = load_checkpoint(llcm_checkpoint)
    state['num_classes'] += 5
    torch.save(state, tmp_path / 'other_classes.pth')
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--resume',
                                tmp_path / 'other_classes.pth'))
    assert_user_error(capsys, code, 'num_classes')


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'I;16', 'CMYK'])
def test_images_of_any_mode_and_size_are_read_as_rgb(tmp_path, mode):
    path = tmp_path / 'odd.png' if mode != 'CMYK' else tmp_path / 'odd.jpg'
    Image.new(mode, (37, 91)).save(path)
    image = data_loader.read_image(path, (16, 32))
    assert image.mode == 'RGB' and image.size == (16, 32)
