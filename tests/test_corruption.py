"""Corrupted test images (corruption.py, test.py --corrupt / --corruption): every corruption at
every severity runs, changes the image and repeats under its seed; the same seed gives
byte-identical images in any worker or process (and the same features under torchrun), another
seed other images; only the chosen modality changes; the mixed set's draws are in the results
file and follow from it; SYSU-MM01-C tests trial 0 with clean queries; each compatibility shim
fixes what fails without it; the refusals come before any work; reproduce.py --table robustness
and visualize.py's rank lists on corrupted images."""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

if importlib.util.find_spec('imagecorruptions') is None:
    pytest.skip('the corruption extra is not installed (pip install -r '
                'requirements-corruption.txt)', allow_module_level=True)

import corruption  # noqa: E402
import test as test_script  # noqa: E402
import data_loader  # noqa: E402
from data_manager import query_gallery  # noqa: E402
from tiny_runs import REPO, seeded_checkpoint  # noqa: E402
from utils import UserError  # noqa: E402

TINY_IMAGE = (40, 32)  # (h, w): every corruption of the library runs on it (glass_blur in ms)


def tiny_image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*TINY_IMAGE, 3), dtype=np.uint8)


def test_every_corruption_at_every_severity_runs_changes_the_image_and_repeats():
    image = tiny_image()
    for name in corruption.CORRUPTIONS:
        for severity in corruption.SEVERITIES:
            sequence = np.random.SeedSequence([7, severity])
            first = corruption.corrupt_array(image, name, severity, sequence)
            again = corruption.corrupt_array(image, name, severity, np.random.SeedSequence(
                [7, severity]))
            assert first.dtype == np.uint8 and first.shape == image.shape, (name, severity)
            assert (first != image).any(), (name, severity)
            assert np.array_equal(first, again), (name, severity)
    assert len(corruption.CORRUPTIONS) == 20 and corruption.CORRUPTIONS[14] == 'rain'


def test_the_random_corruptions_draw_other_pixels_under_another_seed():
    image = tiny_image()
    for name in ('gaussian_noise', 'impulse_noise', 'glass_blur', 'frost', 'fog', 'rain', 'snow'):
        first = corruption.corrupt_array(image, name, 3, np.random.SeedSequence(1))
        other = corruption.corrupt_array(image, name, 3, np.random.SeedSequence(2))
        assert not np.array_equal(first, other), name


def test_corrupting_leaves_numpys_global_random_state_as_it_was():
    np.random.seed(5)
    expected = np.random.rand(3)
    np.random.seed(5)
    corruption.corrupt_array(tiny_image(), 'gaussian_noise', 2, np.random.SeedSequence(0))
    assert np.array_equal(np.random.rand(3), expected)


def test_rain_darkens_more_at_higher_severity():
    image = np.full((288, 144, 3), 120, dtype=np.uint8)
    means = [corruption.rain(image, severity, np.random.default_rng(0)).mean()
             for severity in corruption.SEVERITIES]
    assert all(a > b for a, b in zip(means, means[1:]))
    # 120 - (0.05 + 0.05 s) * 255 away from the streaks: 94.5 at severity 1 (truncated: 94)
    assert np.median(corruption.rain(image, 1, np.random.default_rng(0))) == 94


# ----------------------------------------------------------------------------------------------
# Each shim: the library fails (or does not repeat) without it, on the versions that need it

def test_without_the_pkg_resources_shim_the_library_does_not_import():
    if not corruption.SHIMS['pkg_resources'].needed():
        pytest.skip('this setuptools still has pkg_resources (the shim is for setuptools >= 82)')
    with pytest.raises(ModuleNotFoundError, match='pkg_resources'):
        corruption.load_corruptions(shims=())
    module = corruption.load_corruptions(shims=('pkg_resources',))
    assert 'pkg_resources' not in sys.modules  # the stand-in is gone again
    frost = module.frost(corruption.Image.fromarray(tiny_image()), 1)  # reads the frost images
    assert np.asarray(frost).shape == (*TINY_IMAGE, 3)


def test_without_the_float_shim_fog_fails_on_numpy_2():
    if not corruption.SHIMS['np.float_'].needed():
        pytest.skip('this numpy has np.float_ (the shim is for numpy >= 2)')
    module = corruption.load_corruptions(shims=('pkg_resources',))
    with pytest.raises(AttributeError, match='float_'):
        module.fog(corruption.Image.fromarray(tiny_image()), 1)
    fixed = corruption.load_corruptions(shims=('pkg_resources', 'np.float_'))
    assert np.asarray(fixed.fog(corruption.Image.fromarray(tiny_image()), 1)).shape == \
        (*TINY_IMAGE, 3)
    assert not hasattr(np, 'float_')  # numpy itself is untouched


def test_without_the_gaussian_shim_the_gaussian_blurs_fail():
    if not corruption.SHIMS['gaussian multichannel'].needed():
        pytest.skip('this scikit-image still takes multichannel= (the shim is for later ones)')
    module = corruption.load_corruptions(shims=('pkg_resources',))
    for name in ('gaussian_blur', 'glass_blur'):
        with pytest.raises(TypeError, match='multichannel'):
            getattr(module, name)(corruption.Image.fromarray(tiny_image()), 1)
    fixed = corruption.load_corruptions(shims=('pkg_resources', 'gaussian multichannel'))
    blurred = np.asarray(fixed.gaussian_blur(corruption.Image.fromarray(tiny_image()), 2))
    from skimage.filters import gaussian
    expected = np.clip(gaussian(tiny_image() / 255., sigma=2, channel_axis=-1), 0, 1) * 255
    assert np.array_equal(blurred, expected)


def test_without_the_seeding_shim_impulse_noise_does_not_repeat():
    image = corruption.Image.fromarray(tiny_image())
    needed = corruption.needed_shims()
    raw = corruption.load_corruptions(shims=[s for s in needed if s != 'seeded impulse noise'])
    seeded = corruption.load_corruptions(shims=needed)
    outputs = {}
    for name, module in (('raw', raw), ('seeded', seeded)):
        runs = []
        for _ in range(2):
            with corruption.numpy_global_seeded(np.random.SeedSequence(3)):
                runs.append(module.impulse_noise(image, 3))
        outputs[name] = np.array_equal(*runs)
    assert outputs == {'raw': False, 'seeded': True}


def test_every_shim_says_what_it_fixes_and_which_versions_need_it():
    for name, shim in corruption.SHIMS.items():
        assert shim.breaks and shim.needed_by and isinstance(shim.needed(), bool), name


# ----------------------------------------------------------------------------------------------
# Images of a test: workers, processes, seeds, modalities, cache

def visible_and_infrared(root):
    """The test ImageLists of LLCM's IR->VIS trial 0 (infrared queries, visible gallery)."""
    return query_gallery('llcm', 'ir_to_vis', str(root), 0)


def setting(seed=0, modality='visible', name=None, severity=None, cache=None):
    return corruption.Setting(name, severity, seed, modality, cache)


def loaded(paths, corruptor, workers):
    images = data_loader.TestImageSet(paths, 64, 32, corruptor)
    loader = torch.utils.data.DataLoader(images, batch_size=4, num_workers=workers)
    return torch.cat(list(loader))


def test_the_same_seed_gives_byte_identical_images_with_0_and_2_workers_and_in_2_processes(
        llcm_root, tmp_path):
    infrared, visible = visible_and_infrared(llcm_root)
    corruptor = corruption.Plan(setting(seed=11)).corruptor([infrared, visible])
    paths = visible.paths[:6]
    in_main = loaded(paths, corruptor, 0)
    assert torch.equal(in_main, loaded(paths, corruptor, 2))
    out = tmp_path / 'other_process.pt'
    script = ('import sys, torch, corruption; from data_manager import query_gallery; '
              'from data_loader import TestImageSet; '
              'q, g = query_gallery("llcm", "ir_to_vis", sys.argv[1], 0); '
              'c = corruption.Plan(corruption.Setting(None, None, 11, "visible", None))'
              '.corruptor([g]); '
              'torch.save(torch.stack([TestImageSet(g.paths[:6], 64, 32, c)[i] for i in range(6)]),'
              ' sys.argv[2])')
    subprocess.run([sys.executable, '-c', script, str(llcm_root), str(out)], cwd=REPO,
                   check=True, env={**os.environ, 'PYTHONPATH': REPO})
    assert torch.equal(in_main, torch.load(out, weights_only=True))
    clean = loaded(paths, None, 0)
    assert not torch.equal(in_main, clean)
    other_seed = corruption.Plan(setting(seed=12)).corruptor([visible])
    assert not torch.equal(in_main, loaded(paths, other_seed, 0))


@pytest.mark.parametrize('modality, corrupted', [('visible', {'visible'}),
                                                 ('infrared', {'infrared'}),
                                                 ('both', {'visible', 'infrared'})])
def test_only_the_chosen_modality_is_corrupted(llcm_root, modality, corrupted):
    lists = visible_and_infrared(llcm_root)
    corruptor = corruption.Plan(setting(modality=modality, name='contrast', severity=5)) \
        .corruptor(lists)
    for image_list in lists:
        paths = image_list.paths[:3]
        changed = not torch.equal(loaded(paths, corruptor, 0), loaded(paths, None, 0))
        assert changed == (image_list.modality in corrupted), image_list.modality
        assert all(corruptor.covers(p) == (image_list.modality in corrupted)
                   for p in image_list.paths)


def test_a_cell_gives_the_mixed_sets_image_for_the_same_corruption_and_severity(llcm_root):
    _, visible = visible_and_infrared(llcm_root)
    mixed = corruption.Plan(setting(seed=4)).corruptor([visible])
    path = visible.paths[0]
    _, name, severity = mixed.plan[path]
    cell = corruption.Plan(setting(seed=4, name=name, severity=severity)).corruptor([visible])
    assert np.array_equal(np.asarray(mixed.image(path)), np.asarray(cell.image(path)))


def test_the_cache_keeps_each_corrupted_image_and_a_rerun_reads_it(llcm_root, tmp_path,
                                                                   monkeypatch):
    _, visible = visible_and_infrared(llcm_root)
    plan = corruption.Plan(setting(seed=2, cache=str(tmp_path / 'cache')))
    first = plan.corruptor([visible])
    made = [np.asarray(first.image(p)) for p in visible.paths[:3]]
    files = sorted(p for p in (tmp_path / 'cache').rglob('*.png'))
    assert len(files) == 3 and all('_seed2.png' in f.name for f in files)

    def no_corrupting(*args, **kwargs):
        raise AssertionError('a cached image was corrupted again')
    monkeypatch.setattr(corruption, 'corrupt_image', no_corrupting)
    again = corruption.Plan(setting(seed=2, cache=str(tmp_path / 'cache'))).corruptor([visible])
    assert all(np.array_equal(a, np.asarray(again.image(p)))
               for a, p in zip(made, visible.paths[:3]))


def test_an_images_draw_follows_its_content_not_its_path(llcm_root, tmp_path):
    _, visible = visible_and_infrared(llcm_root)
    copy = tmp_path / 'elsewhere.jpg'
    copy.write_bytes(open(visible.paths[0], 'rb').read())
    key = corruption.image_key(visible.paths[0])
    assert corruption.image_key(str(copy)) == key
    draws = {corruption.mixed_draw(seed, key) for seed in range(40)}
    assert len(draws) > 20  # the seeds spread over the 100 cells


# ----------------------------------------------------------------------------------------------
# test.py: the results file, the header and tables, SYSU-MM01-C

@pytest.fixture(scope='module')
def llcm_runs(llcm_root, tmp_path_factory):
    """Clean and corrupted (mixed set) test.py runs of one seeded checkpoint, features saved."""
    folder = tmp_path_factory.mktemp('corrupted_llcm')
    checkpoint = folder / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6, random_batchnorm=True)
    runs = {}
    for name, extra in (('clean', []), ('mixed', ['--corrupt', '--corrupt-seed', '3'])):
        argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', str(checkpoint),
                '--device', 'cpu', '--workers', '0', '--trial', '0',
                '--save-features', str(folder / f'{name}.pt'), *extra]
        assert test_script.main(argv) == 0
    for name, tag in (('clean', ''), ('mixed', '_mixed_seed3')):
        runs[name] = (json.load(open(folder / f'tiny{tag}_test.json')),
                      torch.load(folder / f'{name}.pt', weights_only=True))
    return runs


def test_the_mixed_sets_draws_are_in_the_results_file_and_follow_from_it(llcm_runs, llcm_root):
    record, _ = llcm_runs['mixed']
    recorded = record['corruption']
    assert recorded['corrupted'] and recorded['mode'] == 'mixed' and recorded['seed'] == 3
    _, visible = visible_and_infrared(llcm_root)
    every_visible = query_gallery('llcm', 'vis_to_ir', str(llcm_root), 0)[0]
    assert sorted(recorded['draws']) == sorted(os.path.relpath(p, llcm_root)
                                               for p in every_visible.paths)
    for relative, (name, severity) in recorded['draws'].items():
        key = corruption.image_key(os.path.join(llcm_root, relative))
        assert corruption.mixed_draw(recorded['seed'], key) == (name, severity)
    assert 'clean' not in record and 'corruption' not in llcm_runs['clean'][0]


def test_only_the_visible_features_change_in_a_corrupted_test(llcm_runs):
    _, clean = llcm_runs['clean']
    _, mixed = llcm_runs['mixed']
    assert mixed['meta']['corrupted'].startswith('corrupted visible images: CIL mixed set')
    assert torch.equal(clean['modalities']['infrared']['features'],
                       mixed['modalities']['infrared']['features'])
    assert not torch.allclose(clean['modalities']['visible']['features'],
                              mixed['modalities']['visible']['features'], atol=1e-4)


def test_the_header_and_tables_say_the_test_is_corrupted(llcm_root, tmp_path, capsys):
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6)
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', '0',
                             '--corruption', 'pixelate', '--severity', '2']) == 0
    printed = capsys.readouterr().out
    assert 'corrupted visible images: pixelate at severity 2, seed 0' in printed
    assert 'llcm-C (pixelate2_seed0) ir_to_vis  (1 trial' in printed
    record = json.load(open(tmp_path / 'tiny_pixelate2_seed0_test.json'))
    assert {tuple(draw) for draw in record['corruption']['draws'].values()} == {('pixelate', 2)}


def test_sysu_mm01_c_tests_trial_0_with_clean_infrared_queries(sysu_root, tmp_path):
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'sysu', num_classes=4)
    output = tmp_path / 'sysu_c.json'
    assert test_script.main(['--dataset', 'sysu', '--data-path', str(sysu_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--mode',
                             'all', '--corruption', 'contrast', '--severity', '1',
                             '--output', str(output)]) == 0
    record = json.load(open(output))
    assert record['protocol']['trials'] == [0]
    assert len(record['results']['all ir_to_vis']['pool+feat']['Rank-1'][2]) == 1
    query, gallery = query_gallery('sysu', 'ir_to_vis', str(sysu_root), 0, mode='all')
    assert sorted(record['corruption']['draws']) == sorted(os.path.relpath(p, sysu_root)
                                                           for p in gallery.paths)
    assert not set(record['corruption']['draws']) & {os.path.relpath(p, sysu_root)
                                                     for p in query.paths}


# ----------------------------------------------------------------------------------------------
# Refusals: one sentence, before any work

@pytest.mark.parametrize('argv, message', [
    (['--corruption', 'hail', '--severity', '2'],
     '--corruption hail is not a corruption; expected one of gaussian_noise, shot_noise,'),
    (['--corruption', 'fog', '--severity', '6'], '--severity must be 1..5, got 6.'),
    (['--corruption', 'fog', '--severity', '0'], '--severity must be 1..5, got 0.'),
    (['--corruption', 'fog'], '--corruption fog needs --severity 1..5.'),
    (['--corrupt', '--corruption', 'fog', '--severity', '2'],
     'pass --corrupt (CIL\'s mixed set) or --corruption NAME --severity S (one cell), not both.'),
    (['--corrupt', '--severity', '2'], '--severity is the severity of --corruption NAME;'),
    (['--corrupt-seed', '3'], '--corrupt-seed sets a corrupted test; add --corrupt or'),
    (['--corrupt-modality', 'both'], '--corrupt-modality sets a corrupted test;'),
])
def test_bad_corruption_flags_are_refused_in_one_sentence(argv, message):
    with pytest.raises(UserError) as error:
        test_script.parse_args(['--resume', 'missing.pth', *argv])
    assert message in str(error.value) and str(error.value).count('. ') == 0


def test_without_the_extra_the_corrupted_test_names_it(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *rest: (
        None if name == 'imagecorruptions' else find_spec(name, *rest)))
    with pytest.raises(UserError) as error:
        test_script.parse_args(['--resume', 'missing.pth', '--corrupt'])
    assert str(error.value) == ('--corrupt needs the optional package imagecorruptions '
                                '(imagecorruptions is not installed): pip install -r '
                                'requirements-corruption.txt.')


def test_sysu_mm01_c_refuses_another_gallery_trial(sysu_root, tmp_path):
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'sysu', num_classes=4)
    with pytest.raises(UserError, match='SYSU-MM01-C tests gallery trial 0 only'):
        test_script.main(['--dataset', 'sysu', '--data-path', str(sysu_root), '--resume',
                          str(checkpoint), '--device', 'cpu', '--trial', '3', '--corrupt'])


def test_a_modality_the_protocol_has_no_image_of_is_refused(llcm_root):
    _, visible = visible_and_infrared(llcm_root)
    with pytest.raises(UserError) as error:
        corruption.check_corrupted_modality(setting(modality='infrared'), [visible], 'llcm')
    assert str(error.value) == ('--corrupt-modality infrared: the llcm protocol tested here has '
                                'no infrared image.')
    corruption.check_corrupted_modality(setting(modality='visible'), [visible], 'llcm')


# ----------------------------------------------------------------------------------------------
# reproduce.py --table robustness

def test_robustness_dry_run_lists_the_corrupted_tests_and_writes_nothing(tmp_path, capsys):
    import reproduce
    out = tmp_path / 'out'
    assert reproduce.main(['--table', 'robustness', '--dataset', 'demo', '--device', 'cpu',
                           '--out', str(out), '--dry-run']) == 0
    printed = capsys.readouterr().out
    assert 'corrupted tests of demo deen seed 0: 101 (the mixed set and 100 grid cells), 0 done' \
        in printed
    assert not out.exists()


def test_robustness_table_puts_clean_beside_corrupted_and_draws_the_grid(llcm_root, tmp_path,
                                                                         monkeypatch, capsys):
    import corruption_report
    import reproduce
    monkeypatch.setattr(corruption_report, 'CORRUPTIONS', ('contrast', 'pixelate'))
    monkeypatch.setattr(corruption_report, 'SEVERITIES', (1, 5))
    out = tmp_path / 'out'
    argv = ['--table', 'robustness', '--dataset', 'llcm', '--data-path', str(llcm_root),
            '--out', str(out), '--cache-dir', str(tmp_path / 'cache'), '--arch', 'resnet18',
            '--pretrained', 'none', '--img_h', '64', '--img_w', '32', '--batch-size', '2',
            '--num_pos', '2', '--workers', '0', '--test-batch', '32', '--device', 'cpu',
            '--epochs', '1', '--max-steps', '1', '--eval-every', '1']
    assert reproduce.main(argv) == 0
    table = json.load(open(out / 'robustness' / 'llcm_deen_robustness.json'))
    assert [row['setting'] for row in table['rows']] == ['ir_to_vis', 'vis_to_ir']
    clean = json.load(open(out / 'llcm_deen' / 'seed0' / 'results' / 'llcm_deen_test.json'))
    for row in table['rows']:
        for metric in ('Rank-1', 'mAP', 'mINP'):
            ours = row['ours'][metric]
            values = clean['results'][row['setting']]['pool+feat'][metric][2]
            assert ours['clean'] == pytest.approx(100 * np.mean(values), rel=1e-6)
            assert ours['delta'] == pytest.approx(ours['corrupted'] - ours['clean'], rel=1e-6)
        assert row['published'] == {}
    assert table['no_published'] == 'no corrupted-image numbers are published for deen on llcm'
    grid = json.load(open(out / 'robustness' / 'llcm_deen_robustness_grid.json'))
    assert grid['corruptions'] == ['contrast', 'pixelate'] and grid['cells_done'] == 4
    assert np.array(grid['Rank-1']).shape == (2, 2)
    assert (out / 'robustness' / 'llcm_deen_robustness_grid.png').stat().st_size > 0
    capsys.readouterr()
    assert reproduce.main(argv) == 0  # everything done: nothing is tested again
    printed = capsys.readouterr().out
    assert '5 (the mixed set and 4 grid cells), 5 done' in printed
    assert ': corrupted test ' not in printed
    assert '| `ir_to_vis` | ours (clean: CIL setting) |' in printed


def test_cils_published_agw_rows_have_a_source_and_a_setting_we_test():
    import paper_results
    from data_manager import dataset_facts
    assert len(paper_results.CORRUPTED_PUBLISHED) == 8
    for (method, dataset, setting), sources in paper_results.CORRUPTED_PUBLISHED.items():
        assert method in ('agw', 'agw-plain')
        assert setting.split()[-1] in dataset_facts(dataset).directions
        for source, numbers in sources.items():
            assert source in paper_results.CORRUPTED_SOURCES
            assert set(numbers['clean']) == set(numbers['corrupted']) == {'Rank-1', 'mAP', 'mINP'}
    assert paper_results.corrupted_published('agw', 'sysu', 'all ir_to_vis')['cil-readme'][
        'corrupted'] == {'mINP': 14.73, 'mAP': 29.99, 'Rank-1': 34.42}
    assert paper_results.corrupted_published('deen', 'llcm', 'ir_to_vis') == {}


# ----------------------------------------------------------------------------------------------
# visualize.py: rank lists on the corrupted gallery

def test_visualize_draws_rank_lists_on_the_corrupted_gallery(llcm_root, tmp_path, capsys):
    import visualize
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6)
    out = tmp_path / 'figures'
    assert visualize.main(['ranks', '--resume', str(checkpoint), '--dataset', 'llcm',
                           '--data-path', str(llcm_root), '--trial', '0', '--num-queries', '1',
                           '--topk', '3', '--device', 'cpu', '--workers', '0', '--out', str(out),
                           '--corruption', 'contrast', '--severity', '5']) == 0
    numbers = json.load(open(out / 'ranks_ir_to_vis.json'))
    assert numbers['corruption'] == 'corrupted visible images: contrast at severity 5, seed 0'
    gallery = numbers['rows'][0]['gallery']
    assert all(entry['corruption'] == ['contrast', 5] for entry in gallery)  # visible gallery
    assert 'query_corruption' not in numbers['rows'][0]  # infrared query: clean
    shown = np.asarray(corruption.Image.open(gallery[0]['shown']))
    assert shown.shape == (288, 144, 3) and shown.std() < np.asarray(
        corruption.Image.open(gallery[0]['path']).convert('RGB')).std()
    vis_to_ir = json.load(open(out / 'ranks_vis_to_ir.json'))['rows'][0]
    assert vis_to_ir['query_corruption'] == ['contrast', 5]
    assert all('corruption' not in entry for entry in vis_to_ir['gallery'])


def test_visualize_refuses_corruption_flags_with_saved_features(tmp_path):
    import visualize
    with pytest.raises(UserError, match='--corrupt corrupts the images features are extracted '
                                        'from; use it with --resume, not --features.'):
        visualize.parse_args(['--features', 'f.pt', '--out', str(tmp_path), '--corrupt'])


def test_a_cache_folder_that_is_a_file_is_refused_before_any_extraction(llcm_root, tmp_path):
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6)
    not_a_folder = tmp_path / 'cache'
    not_a_folder.write_text('')
    with pytest.raises(UserError, match=r'--corrupt-cache .*cache is a file; expected a folder '
                                        r'for the corrupted images\.'):
        test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                          str(checkpoint), '--device', 'cpu', '--corrupt', '--corrupt-cache',
                          str(not_a_folder)])


def test_two_torchrun_processes_test_the_same_corrupted_images_as_one(llcm_root, tmp_path):
    import socket
    checkpoint = tmp_path / 'tiny.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6, random_batchnorm=True)
    argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', str(checkpoint),
            '--device', 'cpu', '--workers', '0', '--trial', '0', '--corrupt', '--corrupt-seed', '5']
    assert test_script.main([*argv, '--output', str(tmp_path / 'one.json'), '--save-features',
                             str(tmp_path / 'one.pt')]) == 0
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    command = [sys.executable, '-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2',
               '--rdzv-backend=c10d', f'--rdzv-endpoint=localhost:{port}',
               os.path.join(REPO, 'test.py'), *argv, '--output', str(tmp_path / 'two.json'),
               '--save-features', str(tmp_path / 'two.pt')]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = (json.load(open(tmp_path / f'{n}.json')) for n in ('one', 'two'))
    assert two['corruption']['draws'] == one['corruption']['draws']
    assert two['provenance']['processes'] == 2
    features = [torch.load(tmp_path / f'{n}.pt', weights_only=True)['modalities']['visible']
                for n in ('one', 'two')]
    assert features[0]['paths'] == features[1]['paths']
    assert torch.allclose(features[0]['features'], features[1]['features'], atol=1e-5)
    for setting, by_fusion in one['results'].items():
        for fusion, metrics in by_fusion.items():
            for metric, (mean, _, _) in metrics.items():
                assert two['results'][setting][fusion][metric][0] == pytest.approx(mean, rel=1e-5)


def test_the_sysu_robustness_row_compares_trial_0_and_stands_beside_cils_agw():
    import corruption_report

    def record(values, trials):
        metrics = {m: (float(np.mean(values)), 0.0, values) for m in ('Rank-1', 'mAP', 'mINP')}
        return {'protocol': {'trials': trials},
                'results': {s: {'pool+feat': metrics} for s in ('all ir_to_vis',
                                                                 'indoor ir_to_vis')}}
    clean = record([0.5 + t / 100 for t in range(10)], list(range(10)))
    mixed = record([0.3], [0])
    table = corruption_report.robustness_table('sysu', 'agw', 'pool+feat', [clean], [mixed])
    row = table['rows'][0]
    assert row['setting'] == 'all ir_to_vis'
    assert row['ours']['Rank-1']['clean'] == pytest.approx(50.0)  # trial 0 only
    assert row['ours']['Rank-1']['clean_all_trials'] == pytest.approx(54.5)
    assert row['ours']['Rank-1']['delta'] == pytest.approx(-20.0)
    assert row['published']['cil-readme']['clean']['Rank-1'] == 47.50
    assert 'cil-readme' in table['sources'] and table['no_published'] is None
    markdown = corruption_report.robustness_markdown(table)
    assert '| `all ir_to_vis` | ours (clean: CIL setting) | 50.00 → 30.00 |' in markdown
    assert '|  | published: cil-readme | 47.50 → 34.42 | 47.65 → 29.99 | 36.17 → 14.73 |' \
        in markdown
