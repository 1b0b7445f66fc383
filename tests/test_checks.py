"""Fail before the work: every bad flag, path, index file, test folder, image size and full or
read-only folder is refused before the first cache build, model build or training step (measured
by what was written: nothing); saving and loading errors are one sentence; a damaged training
cache is named and rebuilt; temporary files never outlive a failure; NaN never reaches a
checkpoint."""
import contextlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data_loader
import evaluation
import inference
import pre_process_sysu
import search
import test as test_script
import training
import visualize
from checks import checkpoint_estimate
from data_manager import train_image_lists
from model import build_model
from tiny_runs import REPO, poison_loss_at, seeded_checkpoint, train_argv
from utils import UserError, load_checkpoint, run_main, save_checkpoint


def run_train(argv):
    """train.py's exit status as the command line sees it (UserError -> 2)."""
    return run_main(lambda: training.main(argv))


def files_under(folder):
    """{relative path: (size, modification time)} of every file under folder."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            stat = os.stat(path)
            found[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns)
    return found


def assert_refused_up_front(capsys, code, out, before, *phrases):
    """Exit status 2, one line 'error: <sentence>' naming each phrase, and not a file written or
    touched under out (no cache, no checkpoint, no log)."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace('\r', '\n').splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith('error: ') and lines[0].endswith('.'), err
    for phrase in phrases:
        assert phrase in err, err
    assert files_under(out) == before
    return err


@pytest.fixture
def llcm_copy(llcm_root, tmp_path):
    return shutil.copytree(llcm_root, tmp_path / 'data')


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at path (root in a sandbox that allows mounts), else the test skips."""
    os.makedirs(path, exist_ok=True)
    try:
        mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip('no mount command here')
    if mounted.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({mounted.stderr.strip() or "not root"})')
    try:
        yield path
    finally:
        subprocess.run(['umount', '-l', str(path)], check=True)


@contextlib.contextmanager
def read_only_folder(path):
    """A folder this process cannot write into: permissions for a user, a read-only tmpfs for
    root (whom permissions do not stop)."""
    if os.geteuid() != 0:
        os.makedirs(path)
        os.chmod(path, 0o555)
        try:
            yield path
        finally:
            os.chmod(path, 0o755)
    else:
        with tmpfs(path, 'ro,size=64k') as mounted:
            yield mounted


# ----------------------------------------------------------------------------------------------
# Numeric flags: finite and in range, named as the parser spells them

@pytest.mark.parametrize('flag, value', [
    ('--lr', 'nan'), ('--lr', 'inf'), ('--lr', '0'), ('--lr', '-0.1'), ('--margin', 'nan'),
    ('--lambda_1', 'inf'), ('--lambda_2', '-1'), ('--workers', '-1'), ('--test-batch', '0'),
    ('--img_h', '0'), ('--img_w', '-4'), ('--num_pos', '0'), ('--batch-size', '0'),
    ('--epochs', '0'), ('--max-steps', '0'), ('--warmup', '-1'), ('--eval-every', '-2'),
    ('--seed', '-1'), ('--lr-steps', '-5'), ('--gpu', '-1'), ('--trial', '11')])
def test_train_refuses_out_of_range_numbers_naming_the_flag(flag, value):
    with pytest.raises(UserError) as refused:
        training.parse_args(['--dataset', 'llcm', flag, value])
    message = str(refused.value)
    assert message.startswith(f'{flag} must be ') and value in message and '\n' not in message


@pytest.mark.parametrize('flag, value', [('--workers', '-1'), ('--img_h', '0'),
                                         ('--test-batch', '0'), ('--gpu', '-2')])
def test_test_py_refuses_out_of_range_numbers(flag, value):
    with pytest.raises(UserError, match=f'^{flag} must be '):
        test_script.parse_args(['--resume', 'x.pth', flag, value])


@pytest.mark.parametrize('flag, value', [('--img_h', '0'), ('--img_w', '0'), ('--workers', '-1')])
def test_pre_process_sysu_refuses_a_zero_size(sysu_root, tmp_path, capsys, flag, value):
    code = run_main(lambda: pre_process_sysu.main(['--data-path', str(sysu_root), '--cache-dir',
                                                   str(tmp_path), flag, value]))
    assert_refused_up_front(capsys, code, tmp_path, {}, flag)


def pre_process(data_path, cache_dir):
    """pre_process_sysu.py's exit status as the command line sees it (UserError -> 2)."""
    return run_main(lambda: pre_process_sysu.main(['--data-path', str(data_path), '--cache-dir',
                                                   str(cache_dir), '--workers', '0']))


def test_pre_process_sysu_refuses_a_data_path_that_is_a_file_or_missing(tmp_path, capsys):
    (tmp_path / 'SYSU-MM01.zip').write_bytes(b'PK')
    code = pre_process(tmp_path / 'SYSU-MM01.zip', tmp_path / 'cache')
    assert_refused_up_front(capsys, code, tmp_path / 'cache', {}, '--data-path', 'is a file')
    code = pre_process(tmp_path / 'SYSU-MM01', tmp_path / 'cache')
    assert_refused_up_front(capsys, code, tmp_path / 'cache', {}, '--data-path')


def test_pre_process_sysu_refuses_a_cache_dir_it_cannot_write(sysu_root, tmp_path, capsys):
    (tmp_path / 'cache').write_text('not a folder')
    before = files_under(tmp_path)
    code = pre_process(sysu_root, tmp_path / 'cache')
    assert_refused_up_front(capsys, code, tmp_path, before, '--cache-dir', 'is a file')
    with read_only_folder(tmp_path / 'read_only'):
        code = pre_process(sysu_root, tmp_path / 'read_only')
        err = assert_refused_up_front(capsys, code, tmp_path / 'read_only', {}, '--cache-dir')
    assert 'is on a read-only file system' in err or 'is not writable (permission denied)' in err


def test_pre_process_sysu_refuses_a_cache_dir_without_room(sysu_root, tmp_path, capsys):
    with tmpfs(tmp_path / 'cache', 'size=64k'):
        code = pre_process(sysu_root, tmp_path / 'cache')
        assert_refused_up_front(capsys, code, tmp_path / 'cache', {}, '--cache-dir',
                                'is needed for the training cache')


def test_pre_process_sysu_names_an_undecodable_image_before_any_cache_work(sysu_root, tmp_path,
                                                                           capsys):
    data = shutil.copytree(sysu_root, tmp_path / 'data')
    image = train_image_lists('sysu', str(data))['infrared'].paths[0]
    damage_image(data / os.path.relpath(image, data), 'truncated')
    code = pre_process(data, tmp_path / 'cache')
    assert_refused_up_front(capsys, code, tmp_path / 'cache', {}, os.path.basename(image))
    assert pre_process(sysu_root, tmp_path / 'cache') == 0  # the intact folder is cached


def test_lr_nan_trains_nothing(llcm_root, tmp_path, capsys):
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--lr', 'nan'))
    assert_refused_up_front(capsys, code, tmp_path, {}, '--lr must be a finite number above 0, got nan.')


@pytest.mark.parametrize('flags, phrase', [
    (['--sync-bn'], '--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU implementation)'),
    (['--amp', 'fp16'], '--amp fp16 needs a CUDA GPU; use --amp bf16 on the CPU.'),
    (['--compile'], '--compile on cpu needs a C++ compiler (no-such-c++'),
    (['--device', 'meta'], "--device must be cpu, cuda or cuda:N, got 'meta'.")])
def test_flags_the_device_cannot_honour_are_refused(llcm_root, tmp_path, capsys, monkeypatch,
                                                    flags, phrase):
    monkeypatch.setenv('CXX', 'no-such-c++')  # a machine without the compiler torch.compile calls
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), *flags))
    assert_refused_up_front(capsys, code, tmp_path, {}, phrase)
    if flags[0] != '--sync-bn':  # test.py has the others
        code = run_main(lambda: test_script.main(['--resume', str(tmp_path / 'x.pth'),
                                                  '--device', 'cpu', *flags]))
        assert_refused_up_front(capsys, code, tmp_path, {}, phrase)


# ----------------------------------------------------------------------------------------------
# Late failures found before the first step

def test_model_path_that_is_a_file(llcm_root, tmp_path, capsys):
    (tmp_path / 'models').write_text('not a folder')
    before = files_under(tmp_path)
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path)))
    assert_refused_up_front(capsys, code, tmp_path, before, '--model_path', 'is a file')


@pytest.mark.parametrize('folder, flag', [('logs', '--log_path'), ('cache', '--cache-dir')])
def test_log_or_cache_folder_that_is_a_file(llcm_root, tmp_path, capsys, folder, flag):
    (tmp_path / folder).write_text('not a folder')
    before = files_under(tmp_path)
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path)))
    assert_refused_up_front(capsys, code, tmp_path, before, flag, 'is a file')


def test_data_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / 'data.zip').write_bytes(b'PK')
    code = run_train(train_argv('llcm', tmp_path / 'data.zip', str(tmp_path / 'out')))
    assert_refused_up_front(capsys, code, tmp_path / 'out', {}, '--data-path', 'is a file')


def test_read_only_checkpoint_folder(llcm_root, tmp_path, capsys):
    with read_only_folder(tmp_path / 'models'):
        code = run_train(train_argv('llcm', llcm_root, str(tmp_path)))
        err = assert_refused_up_front(capsys, code, tmp_path, {}, '--model_path', str(tmp_path / 'models'))
    assert 'is on a read-only file system' in err or 'is not writable (permission denied)' in err


def test_checkpoint_folder_on_a_small_file_system(llcm_root, tmp_path, capsys):
    with tmpfs(tmp_path / 'models', 'size=1m'):
        code = run_train(train_argv('llcm', llcm_root, str(tmp_path)))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith('error: --model_path '), err
        assert 'free but about 282.9 MiB is needed for the checkpoints of this run' in err
        assert files_under(tmp_path) == {}


def test_cache_folder_on_a_small_file_system(llcm_root, tmp_path, capsys):
    with tmpfs(tmp_path / 'cache', 'size=64k'):
        code = run_train(train_argv('llcm', llcm_root, str(tmp_path)))
        assert_refused_up_front(capsys, code, tmp_path, {}, '--cache-dir', 'is needed for the training cache')


def test_missing_test_folder_is_found_before_training(llcm_copy, tmp_path, capsys):
    shutil.rmtree(llcm_copy / 'test_vis')
    out = tmp_path / 'out'
    code = run_train(train_argv('llcm', llcm_copy, str(out)))
    assert_refused_up_front(capsys, code, out, {}, 'test_vis', '--eval-every 0')
    assert run_train(train_argv('llcm', llcm_copy, str(out), '--eval-every', 0, '--epochs', 1,
                                '--max-steps', 1)) == 0  # without evaluation it trains


def test_missing_test_image_or_index_file_of_a_regdb_split(regdb_root, tmp_path, capsys):
    data = shutil.copytree(regdb_root, tmp_path / 'data')
    first = (data / 'idx' / 'test_thermal_3.txt').read_text().split()[0]
    os.remove(data / first)
    code = run_train(train_argv('regdb', data, str(tmp_path / 'out'), '--trial', 3))
    assert_refused_up_front(capsys, code, tmp_path / 'out', {}, '1 test image(s)', first)
    shutil.copy(regdb_root / first, data / first)
    os.remove(data / 'idx' / 'test_visible_5.txt')
    code = run_train(train_argv('regdb', data, str(tmp_path / 'out'), '--trial', 'all'))
    assert_refused_up_front(capsys, code, tmp_path / 'out', {}, 'test_visible_5.txt')


def test_image_size_the_network_cannot_take_leaves_the_cache_alone(llcm_root, tmp_path, capsys):
    lists = train_image_lists('llcm', str(llcm_root))
    for modality in ('visible', 'infrared'):  # the cache of a good size, built earlier
        data_loader.load_or_build_cache(lists[modality], str(tmp_path / 'cache'), (32, 64), 1, False)
    before = files_under(tmp_path)
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--img_h', 8, '--img_w', 4))
    assert_refused_up_front(capsys, code, tmp_path, before, '--img_h 8 x --img_w 4 does not fit the '
                            'DEEN network: the image size gives an odd number (1) of feature-map '
                            'positions at an MFA block; use --img_h / --img_w giving even position '
                            'counts, e.g. 384 x 144.')


def test_missing_training_image_is_named_before_the_cache_is_built(llcm_copy, tmp_path, capsys):
    image = llcm_copy / open(llcm_copy / 'idx' / 'train_nir.txt').readline().split()[0]
    os.remove(image)
    code = run_train(train_argv('llcm', llcm_copy, str(tmp_path / 'out')))
    assert_refused_up_front(capsys, code, tmp_path / 'out', {}, 'training image(s)', image.name)


def damage_image(path, damage):
    """Make the image at path empty (0 bytes), truncated (its first half) or not an image."""
    data = path.read_bytes()
    path.write_bytes({'empty': b'', 'truncated': data[:len(data) // 2],
                      'not_an_image': b'not an image'}[damage])


@pytest.mark.parametrize('damage', ['empty', 'truncated', 'not_an_image'])
def test_an_undecodable_training_image_is_named_before_any_cache_work(llcm_copy, tmp_path, capsys,
                                                                       damage):
    """A training set gains an image that cannot be decoded beside a valid cache: the checks name
    it, nothing is written, and the earlier cache stays valid (the next run decodes nothing)."""
    out = tmp_path / 'out'
    lists = train_image_lists('llcm', str(llcm_copy))
    for modality in ('visible', 'infrared'):
        data_loader.load_or_build_cache(lists[modality], str(out / 'cache'), (32, 64), 1, False)
    index = llcm_copy / 'idx' / 'train_vis.txt'
    first, label = index.read_text().splitlines()[0].split()
    added = llcm_copy / first.replace('.jpg', '_added.jpg')
    shutil.copy(llcm_copy / first, added)
    damage_image(added, damage)
    with open(index, 'a') as handle:
        handle.write(f'{added.relative_to(llcm_copy)} {label}\n')
    before = files_under(out)
    code = run_train(train_argv('llcm', llcm_copy, str(out)))
    assert_refused_up_front(capsys, code, out, before, f'training image {added} cannot be decoded')
    assert all(data_loader.cache_problem(lists[m], str(out / 'cache'), (32, 64)) is None
               for m in ('visible', 'infrared'))


def test_more_identities_per_step_than_exist(llcm_root, tmp_path, capsys):
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--batch-size', 7))
    assert_refused_up_front(capsys, code, tmp_path, {}, '--batch-size 7', 'only 6')


@pytest.fixture(scope='module')
def finished_run(llcm_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('finished')
    assert run_train(train_argv('llcm', llcm_root, str(out), '--epochs', 1, '--max-steps', 1,
                                '--eval-every', 0)) == 0
    return out


def write_truncated_torch_file(path):
    torch.save({'w': torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])


def write_npy(path):
    with open(path, 'wb') as handle:  # np.save(path) would add '.npy' to the name
        np.save(handle, np.zeros(3))


# What a checkpoint path can wrongly hold ('missing' is none of these: nothing is written).
BAD_FILES = {
    'folder': lambda path: path.mkdir(),
    'empty': lambda path: path.write_bytes(b''),
    'jpeg': lambda path: Image.new('RGB', (4, 4)).save(path, format='JPEG'),
    'png': lambda path: Image.new('RGB', (4, 4)).save(path, format='PNG'),
    'text': lambda path: path.write_text('hello\n'),
    'npy': write_npy,
    'truncated': write_truncated_torch_file,
}


@pytest.mark.parametrize('kind, phrase', [
    ('missing', 'does not exist'), ('folder', 'is a folder; expected a file'),
    ('empty', 'is empty (0 bytes)'), ('jpeg', 'is not a PyTorch file but a JPEG image'),
    ('text', 'is not a PyTorch file but a text file'),
    ('truncated', 'is truncated or corrupt (PytorchStreamReader failed reading zip archive'),
    ('finished', 'has already trained the 1 epoch(s) that --epochs 1 asks for'),
    ('method', "method 'deen'")])
def test_bad_resume_checkpoints_are_refused_before_work(finished_run, llcm_root, tmp_path, capsys,
                                                        kind, phrase):
    last = finished_run / 'models' / 'llcm_deen_last.pth'
    path, extra = tmp_path / 'given.pth', []
    if kind in BAD_FILES:
        BAD_FILES[kind](path)
    elif kind in ('finished', 'method'):
        path = last
        extra = ['--method', 'agw'] if kind == 'method' else []
    out = tmp_path / 'out'
    code = run_train(train_argv('llcm', llcm_root, str(out), '--epochs', 1, *extra,
                                '--resume', path))
    assert_refused_up_front(capsys, code, out, {}, phrase, str(path))


def test_resume_last_without_a_last_checkpoint(llcm_root, tmp_path, capsys):
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--resume', 'last'))
    assert_refused_up_front(capsys, code, tmp_path, {}, '--resume last: there is no',
                            'llcm_deen_last.pth')


@pytest.mark.parametrize('kind', ['missing', 'folder'])
def test_bad_pretrained_path(llcm_root, tmp_path, capsys, kind):
    path = tmp_path / 'resnet.pth'
    if kind == 'folder':
        path.mkdir()
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path / 'out'), '--pretrained', path))
    assert_refused_up_front(capsys, code, tmp_path / 'out', {}, f'--pretrained {path}',
                            'does not exist' if kind == 'missing' else 'is a folder')


def test_test_py_refuses_an_image_size_the_network_cannot_take_before_extraction(
        llcm_root, tmp_path, capsys, monkeypatch):
    def no_extraction(*args, **kwargs):
        raise AssertionError('images were extracted before the image size was checked')

    monkeypatch.setattr(evaluation, 'evaluate_splits', no_extraction)
    checkpoint = tmp_path / 'model.pth'
    seeded_checkpoint(checkpoint, 'llcm', 6)
    code = run_main(lambda: test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root),
                                              '--device', 'cpu', '--resume', str(checkpoint),
                                              '--img_h', '8', '--img_w', '4']))
    assert_refused_up_front(capsys, code, tmp_path / 'none', {},
                            '--img_h 8 x --img_w 4 does not fit the DEEN network')
    assert sorted(os.listdir(tmp_path)) == ['model.pth']  # no results file


@pytest.mark.parametrize('tool', ['search', 'visualize'])
def test_the_tools_refuse_an_image_size_the_network_cannot_take_before_extraction(
        llcm_root, tmp_path, capsys, monkeypatch, tool):
    def no_extraction(*args, **kwargs):
        raise AssertionError('images were extracted before the image size was checked')

    for owner in (inference, search, visualize):
        for name in ('embed_images', 'extract_features'):
            if hasattr(owner, name):
                monkeypatch.setattr(owner, name, no_extraction)
    checkpoint = tmp_path / 'model.pth'
    seeded_checkpoint(checkpoint, 'llcm', 6)
    common = ['--resume', str(checkpoint), '--out', str(tmp_path / 'out'), '--device', 'cpu',
              '--img_h', '8', '--img_w', '4']
    if tool == 'search':
        argv = common + ['--query', str(llcm_root / 'test_nir'), '--query-modality', 'infrared',
                         '--gallery', str(llcm_root / 'test_vis'),
                         '--index-dir', str(tmp_path / 'index')]
    else:
        argv = common + ['--dataset', 'llcm', '--data-path', str(llcm_root)]
    main = search.main if tool == 'search' else visualize.main
    code = run_main(lambda: main(argv))
    assert_refused_up_front(capsys, code, tmp_path / 'none', {},
                            '--img_h 8 x --img_w 4 does not fit the DEEN network')


def test_test_py_checks_its_inputs_before_loading_a_model(finished_run, llcm_copy, tmp_path,
                                                          capsys, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError('a model was loaded before the inputs were checked')

    monkeypatch.setattr(evaluation, 'load_trained_model', no_loading)
    checkpoint = str(finished_run / 'models' / 'llcm_deen_best.pth')
    shutil.rmtree(llcm_copy / 'test_nir')
    base = ['--dataset', 'llcm', '--data-path', str(llcm_copy), '--device', 'cpu']
    code = run_main(lambda: test_script.main(base + ['--resume', checkpoint]))
    assert_refused_up_front(capsys, code, tmp_path / 'none', {}, 'test_nir')
    (tmp_path / 'afile').write_text('x')
    code = run_main(lambda: test_script.main(base + ['--resume', str(tmp_path)]))
    assert_refused_up_front(capsys, code, tmp_path / 'none', {}, '--resume', 'is a folder')
    code = run_main(lambda: test_script.main(base + ['--resume', str(tmp_path / 'afile')]))
    assert_refused_up_front(capsys, code, tmp_path / 'none', {}, 'is not a PyTorch file but a text file')


# ----------------------------------------------------------------------------------------------
# Saving: one sentence naming the folder and the space needed, the previous file intact

BIG_STATE = {'model': {'w': torch.zeros(2_000_000)}}  # 7.6 MiB of data, 7.7 MiB estimated


def test_checkpoint_estimate_is_a_close_upper_bound(finished_run):
    state = load_checkpoint(finished_run / 'models' / 'llcm_deen_last.pth')
    model = build_model('deen', state['num_classes'], 'llcm', arch='resnet18')
    estimate, actual = checkpoint_estimate(model, 'sgd'), os.path.getsize(
        finished_run / 'models' / 'llcm_deen_last.pth')
    assert actual <= estimate <= 1.01 * actual


SAVE_UNDER_FILE_SIZE_LIMIT = '''
import resource, signal, sys, torch
from utils import run_main, save_checkpoint
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
sys.exit(run_main(lambda: save_checkpoint({'model': {'w': torch.zeros(2_000_000)}}, sys.argv[1])))
'''


def test_save_on_a_full_file_system_keeps_the_previous_file(tmp_path):
    """A 1 MiB tmpfs where the machine allows a mount, else a 1 MiB file-size limit."""
    folder = tmp_path / 'models'
    try:
        with tmpfs(folder, 'size=1m'):
            save_checkpoint({'epoch': 1}, folder / 'last.pth')
            with pytest.raises(UserError) as refused:
                save_checkpoint({'epoch': 2, **BIG_STATE}, folder / 'last.pth')
            message = str(refused.value)
            assert message.startswith(f'cannot write checkpoint {folder / "last.pth"}: {folder} has ')
            assert 'free but about 7.7 MiB is needed for the checkpoint; the previous file is unchanged.' in message
            assert load_checkpoint(folder / 'last.pth') == {'epoch': 1}
            assert os.listdir(folder) == ['last.pth']
            return
    except pytest.skip.Exception:
        pass
    os.makedirs(folder, exist_ok=True)
    result = subprocess.run([sys.executable, '-c', SAVE_UNDER_FILE_SIZE_LIMIT, str(folder / 'last.pth')],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and 'file-size limit' in result.stderr and '7.7 MiB' in result.stderr
    assert os.listdir(folder) == []


def test_save_into_a_read_only_folder(tmp_path):
    with read_only_folder(tmp_path / 'models') as folder:
        with pytest.raises(UserError, match='read-only file system|not writable') as refused:
            save_checkpoint(BIG_STATE, folder / 'last.pth')
    assert 'nothing was written' in str(refused.value) and 'Traceback' not in str(refused.value)


RESUME_UNDER_FILE_SIZE_LIMIT = '''
import resource, signal, sys, training
from utils import run_main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (50 << 20, resource.RLIM_INFINITY))
sys.exit(run_main(lambda: training.main(sys.argv[1:])))
'''


def test_a_save_failing_mid_run_is_one_sentence_and_keeps_last(finished_run, llcm_root, tmp_path):
    """The up-front check passes (the disk has room) but the process may write no file over
    50 MiB, as under a quota: the save of epoch 1 fails, `last` of epoch 0 stays."""
    shutil.copytree(finished_run / 'models', tmp_path / 'models')
    last = tmp_path / 'models' / 'llcm_deen_last.pth'
    kept = last.read_bytes()
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 2, '--max-steps', 1,
                      '--eval-every', 0, '--resume', 'last')
    result = subprocess.run([sys.executable, '-c', RESUME_UNDER_FILE_SIZE_LIMIT, *argv], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    err = result.stderr.replace('\r', '\n').strip().splitlines()
    assert result.returncode == 2 and err[-1].startswith(f'error: cannot write checkpoint {last}: '), result.stderr
    assert 'file-size limit' in err[-1] and 'the previous file is unchanged.' in err[-1]
    assert 'Traceback' not in result.stderr
    assert last.read_bytes() == kept
    assert sorted(os.listdir(tmp_path / 'models')) == ['llcm_deen_best.pth', 'llcm_deen_last.pth']


# ----------------------------------------------------------------------------------------------
# Loading: the kind of problem, in a whole sentence

@pytest.mark.parametrize('kind, phrase', [
    ('missing', 'does not exist.'), ('folder', 'is a folder; expected a file.'),
    ('empty', 'is empty (0 bytes), as a save that was cut short leaves it.'),
    ('png', 'is not a PyTorch file but a PNG image.'),
    ('npy', 'is not a PyTorch file but a NumPy .npy array.'),
    ('truncated', 'is truncated or corrupt (PytorchStreamReader failed reading zip archive: '
                  'failed finding central directory).')])
def test_load_checkpoint_names_the_kind_of_problem(tmp_path, kind, phrase):
    path = tmp_path / 'file.pth'
    if kind in BAD_FILES:
        BAD_FILES[kind](path)
    with pytest.raises(UserError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == f'checkpoint {path} {phrase}'


def test_refused_pretrained_file_keeps_the_warning_about_arbitrary_code(tmp_path):
    path = tmp_path / 'weights.pth'
    torch.save({'conv1.weight': torch.zeros(1), 'hook': shutil.rmtree}, path)
    with pytest.raises(UserError) as refused:
        build_model('deen', 4, 'llcm', pretrained=str(path), arch='resnet18')
    message = str(refused.value)
    assert message.startswith(f'--pretrained file {path} was refused: unpickling it calls shutil.rmtree')
    assert message.endswith('use it only on a file from a source you trust).')
    assert 'arbitrary code' in message and '\n' not in message


# ----------------------------------------------------------------------------------------------
# The training cache: validated on load, rebuilt when damaged, no temporary files left

def cache_files(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize('damage, named', [
    ('objects', 'holds Python objects'), ('dtype', 'holds float32'), ('count', 'holds uint8 (20,'),
    ('labels', 'does not hold the 30 int64 labels'), ('label_dtype', 'does not hold the 30 int64'),
    ('garbage', 'cannot be read')])
def test_a_damaged_cache_is_named_and_rebuilt(llcm_root, tmp_path, caplog, damage, named):
    image_list = train_image_lists('llcm', str(llcm_root))['infrared']
    images, labels = data_loader.load_or_build_cache(image_list, str(tmp_path), (16, 32), 1, False)
    good = np.array(images)
    array, label_file = tmp_path / 'train_ir_resized_img.npy', tmp_path / 'train_ir_resized_label.npy'
    if damage == 'objects':
        np.save(array, np.array([{'a': 1}] * len(good), dtype=object), allow_pickle=True)
    elif damage == 'dtype':
        np.save(array, good.astype(np.float32))
    elif damage == 'count':
        np.save(array, good[:20])
    elif damage == 'labels':
        np.save(label_file, labels[::-1].copy())
    elif damage == 'label_dtype':
        np.save(label_file, labels.astype(np.float64))
    elif damage == 'garbage':
        array.write_bytes(b'\x93NUMPY garbage')
    with caplog.at_level('WARNING', logger='deen'):
        images, labels = data_loader.load_or_build_cache(image_list, str(tmp_path), (16, 32), 1, False)
    assert np.array_equal(np.asarray(images), good) and np.array_equal(labels, image_list.pids)
    warning = caplog.text
    assert 'the training cache' in warning and named in warning and 'rebuilding it' in warning
    assert str(tmp_path / 'train_ir_resized_') in warning
    assert cache_files(tmp_path) == ['train_ir_resized_img.npy', 'train_ir_resized_label.npy',
                                     'train_ir_resized_meta.json']


@pytest.mark.parametrize('failure', [UserError('image x cannot be decoded.'), KeyboardInterrupt()])
def test_a_failed_cache_build_leaves_no_temporary_array(llcm_root, tmp_path, monkeypatch, failure):
    image_list = train_image_lists('llcm', str(llcm_root))['visible']

    def failing(job):
        raise failure

    monkeypatch.setattr(data_loader, '_fill_chunk', failing)
    with pytest.raises(type(failure)):
        data_loader.load_or_build_cache(image_list, str(tmp_path), (16, 32), 1, False)
    assert cache_files(tmp_path) == []


@pytest.mark.parametrize('failure', [UserError('image x cannot be decoded.'), KeyboardInterrupt()])
def test_a_failed_cache_build_leaves_the_earlier_cache_valid(llcm_root, tmp_path, monkeypatch,
                                                            failure):
    """A rebuild (here: another size) that fails midway leaves the cache it was replacing as it
    was: the next run at the earlier size decodes nothing."""
    image_list = train_image_lists('llcm', str(llcm_root))['visible']
    data_loader.load_or_build_cache(image_list, str(tmp_path), (16, 32), 1, False)
    before = files_under(tmp_path)

    def failing(job):
        raise failure

    monkeypatch.setattr(data_loader, '_fill_chunk', failing)  # any decode now fails
    with pytest.raises(type(failure)):
        data_loader.load_or_build_cache(image_list, str(tmp_path), (32, 64), 1, False)
    assert files_under(tmp_path) == before
    images, labels = data_loader.load_or_build_cache(image_list, str(tmp_path), (16, 32), 1, False)
    assert images.shape == (len(image_list), 32, 16, 3)


# ----------------------------------------------------------------------------------------------
# Non-finite values never overwrite a good checkpoint

def test_nan_weights_with_a_finite_loss_never_reach_a_checkpoint(llcm_root, tmp_path, monkeypatch,
                                                                 capsys):
    build = training.build_optimizer

    def poisoning(*args, **kwargs):
        optimizer, steps = build(*args, **kwargs), []
        step = optimizer.step

        def poisoned_step(*step_args, **step_kwargs):
            result = step(*step_args, **step_kwargs)
            steps.append(1)
            if len(steps) == 4:  # the last step of epoch 1: its loss was finite
                optimizer.param_groups[1]['params'][0].data.fill_(float('nan'))
            return result
        optimizer.step = poisoned_step
        return optimizer

    monkeypatch.setattr(training, 'build_optimizer', poisoning)
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 3, '--max-steps', 2,
                                '--eval-every', 0))
    err = capsys.readouterr().err
    last = tmp_path / 'models' / 'llcm_deen_last.pth'
    assert code == 2 and 'the weights became NaN or infinite in epoch 1' in err, err
    assert f'the last good checkpoint is {last} (after epoch 0).' in err
    state = load_checkpoint(last)
    assert (state['epoch'], state['step']) == (0, 0)
    assert all(torch.isfinite(t).all() for t in state['model'].values() if t.is_floating_point())
    assert not (tmp_path / 'models' / 'llcm_deen_best.pth').exists()


def test_a_nan_loss_error_starts_its_own_line_after_the_progress_bar(llcm_root, tmp_path,
                                                                    monkeypatch, capsys):
    poison_loss_at(monkeypatch, 2)
    code = run_train(train_argv('llcm', llcm_root, str(tmp_path), '--epochs', 1, '--max-steps', 3,
                                '--eval-every', 0))
    err = capsys.readouterr().err
    before, _, message = err.partition('error: ')
    assert code == 2 and 'epoch 0' in before and before.endswith(('\r', '\n'))
    assert message.startswith('the loss became nan at epoch 0, step 1; this run saved no checkpoint.')
