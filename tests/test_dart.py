"""DART: the clean-probability division, the co-divided losses (the four robust-triplet cases
each on a constructed batch), the label noise, the twin network and the division order; training
(warm-up then division, exact resume after the division, torchrun, SYSU-MM01 / RegDB / demo),
its refusals and every tool on a DART checkpoint."""
import json
import math
import os
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training
from data_loader import View
from methods.dart import (DARTCriterion, Triplet, TwinNetworks, TwinOutput, anchor_triplet,
                          clean_positive, clean_probability, divide, division_order, draw,
                          inject_label_noise, layout_rows, min_max, noisy_training_labels,
                          robust_triplet_loss, view_offsets, weighted_identity_loss)
from model import TrainOutput
from tiny_runs import TINY, at_criterion_call, train_argv
from utils import UserError, load_checkpoint

CAJ_VIEWS = [View('visible', 'visible', None), View('visible_ca', 'visible', None),
             View('infrared', 'infrared', None)]


# -- clean probabilities -------------------------------------------------------------------------

def two_clusters(low=40, high=10, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.uniform(0.1, 0.3, low), rng.uniform(3.0, 3.4, high)])


def test_clean_probability_separates_two_clusters():
    losses = two_clusters()
    (clean,) = clean_probability([losses], seed=0)
    assert clean.dtype == torch.float32 and clean.shape == (50,)
    assert clean[:40].min() > 0.99 and clean[40:].max() < 0.01


def test_clean_probability_normalises_each_view_on_its_own():
    # the second view's losses are 10x the first's: normalised separately, the same images are
    # clean in both; the mixture is fitted once over both views
    losses = two_clusters()
    first, second = clean_probability([losses, 10 * losses], seed=1)
    assert torch.equal(first > 0.5, second > 0.5)
    assert (first > 0.5).sum() == 40


def test_clean_probability_is_seeded():
    losses = [two_clusters(seed=3), two_clusters(seed=4)]
    assert all(torch.equal(a, b) for a, b in zip(clean_probability(losses, 5), clean_probability(losses, 5)))


def test_min_max_of_equal_values_is_zero():
    assert torch.equal(min_max([2.0, 2.0]), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(min_max([1.0, 3.0, 2.0]), torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64))


def test_divide_fits_one_mixture_per_modality():
    sizes = {'visible': 50, 'infrared': 50}
    low_high = torch.from_numpy(two_clusters())
    losses = torch.cat([low_high, low_high, low_high.flip(0)])  # visible, visible_ca, infrared
    clean = divide(losses, CAJ_VIEWS, sizes, seed=0)
    assert (clean[:40] > 0.99).all() and (clean[50:90] > 0.99).all()
    assert (clean[100:110] < 0.01).all() and (clean[110:] > 0.99).all()


# -- the robust triplet ----------------------------------------------------------------------------

# A batch on a line: anchor 0 (label 0) at 0, its positive 1 at 1, negatives (label 1) at 0.9, 3, 4
POSITIONS = torch.tensor([0.0, 1.0, 0.9, 3.0, 4.0])
LABELS = torch.tensor([0, 0, 1, 1, 1])


def line_batch():
    return (POSITIONS[:, None] - POSITIONS[None, :]).abs()


def predictions(hard_negative_as):
    return torch.tensor([0, 0, hard_negative_as, 1, 1])


def case(clean, hard_negative_as=1):
    return anchor_triplet(0, line_batch(), LABELS, predictions(hard_negative_as),
                          torch.tensor(clean), 0.5)


def test_triplet_both_clean_is_the_standard_one():
    assert case([1.0, 1.0, 1.0, 1.0, 1.0], hard_negative_as=0) == Triplet(0, (1,), (2,), False)


def test_triplet_clean_positive_noisy_negative():
    # predicted as the anchor's identity: d_ap = mean(d_p, d_n), negative = next clean one
    # (3 is noisy too, so 4)
    assert case([1.0, 1.0, 0.2, 0.2, 0.9], hard_negative_as=0) == Triplet(0, (1, 2), (4,), False)
    # predicted as another identity: the standard triplet
    assert case([1.0, 1.0, 0.2, 0.2, 0.9], hard_negative_as=1) == Triplet(0, (1,), (2,), False)


def test_triplet_noisy_positive_clean_negative():
    # d_an = mean(d_p, d_n), a new clean positive (here only 1 exists: redrawn, it stays)
    assert case([1.0, 0.1, 0.8, 1.0, 1.0]) == Triplet(0, (1,), (1, 2), False)


def test_triplet_both_noisy():
    # the negative predicted as the anchor's identity: the inverted hinge
    assert case([1.0, 0.1, 0.1, 1.0, 1.0], hard_negative_as=0) == Triplet(0, (1,), (2,), True)
    # otherwise as a noisy positive with a clean negative
    assert case([1.0, 0.1, 0.1, 1.0, 1.0], hard_negative_as=1) == Triplet(0, (1,), (1, 2), False)


def test_clean_positive_takes_the_first_clean_of_six_draws():
    # positives 1 and 5 noisy, 6 clean: the first clean one of the first draw and up to five
    # redraws, else the last draw
    positives, clean = [1, 5, 6], torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.9])
    for seed in range(30):
        replay = torch.Generator().manual_seed(seed)
        draws = [draw(positives, replay) for _ in range(6)]
        expected = next((d for d in draws if clean[d] >= 0.5), draws[-1])
        assert clean_positive(positives, clean, 0.5, torch.Generator().manual_seed(seed)) == expected


def test_robust_triplet_loss_values():
    features = POSITIONS[:, None].clone().requires_grad_()
    logits = F.one_hot(predictions(0), 2).float() * 5
    # only anchor 0 is confident; both its positive (1) and negative (2) noisy, 2 predicted as 0:
    # relu(d_an - d_ap + 0.3) = relu(0.9 - 1 + 0.3) = 0.2 over 1 anchor
    loss, count = robust_triplet_loss(features, logits, LABELS, torch.tensor([1.0, 0, 0, 0, 0]))
    assert count == 1 and loss.item() == pytest.approx(0.2, rel=1e-5)
    loss.backward()
    assert features.grad.abs().sum() > 0
    # nobody confident: 0 and no anchors
    loss, count = robust_triplet_loss(features, logits, LABELS, torch.zeros(5))
    assert count == 0 and loss.item() == 0.0


def test_robust_triplet_loss_all_clean_is_mean_hinge_over_anchors():
    # two rows per identity: every positive is forced, each anchor's hardest negative is fixed
    positions = torch.tensor([0.0, 1.0, 1.5, 3.0])
    labels = torch.tensor([0, 0, 1, 1])
    dist = (positions[:, None] - positions[None, :]).abs()
    expected = sum(max(0.0, float(dist[i, p] - dist[i][labels != labels[i]].min()) + 0.3)
                   for i, p in enumerate([1, 0, 3, 2])) / 4
    loss, count = robust_triplet_loss(positions[:, None], torch.zeros(4, 2), labels, torch.ones(4))
    assert count == 4 and loss.item() == pytest.approx(expected, rel=1e-5)


# -- co-divide ----------------------------------------------------------------------------------

def fake_output(generator, rows, classes=3, dim=4):
    return TrainOutput(torch.randn(rows, dim, generator=generator),
                       torch.randn(rows, classes, generator=generator), None)


def test_each_network_trains_with_the_other_networks_probabilities():
    sizes = {'visible': 4, 'infrared': 3}
    criterion = DARTCriterion(CAJ_VIEWS)
    criterion.set_sizes(sizes)
    _, total = view_offsets(CAJ_VIEWS, sizes)
    generator = torch.Generator().manual_seed(0)
    net1_clean, net2_clean = torch.rand(total, generator=generator), torch.rand(total, generator=generator)
    criterion.assign(1, [net1_clean, net2_clean])
    # B = 2 per view: visible 0 and 3, visible_ca the same two, infrared 2 and 1
    indices = torch.tensor([0, 3, 0, 3, 2, 1])
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    out = TwinOutput(fake_output(generator, 6), fake_output(generator, 6), indices)
    rows = layout_rows(CAJ_VIEWS, sizes, indices)
    assert rows.tolist() == [0, 3, 4, 7, 10, 9]
    total_loss, parts = criterion(out, labels)
    assert parts['id1'].item() == pytest.approx(
        weighted_identity_loss(out.first.logits, labels, net2_clean[rows]).item(), rel=1e-5)
    assert parts['id2'].item() == pytest.approx(
        weighted_identity_loss(out.second.logits, labels, net1_clean[rows]).item(), rel=1e-5)
    assert parts['id1'].item() != pytest.approx(
        weighted_identity_loss(out.first.logits, labels, net1_clean[rows]).item(), rel=1e-5)
    assert set(parts) == {'id1', 'tri1', 'id2', 'tri2'}
    assert total_loss.item() == pytest.approx(sum(v.item() for v in parts.values()), rel=1e-5)


def test_warm_up_is_the_identity_loss_of_each_network():
    criterion = DARTCriterion(CAJ_VIEWS)
    generator = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 1, 2, 0])
    out = TwinOutput(fake_output(generator, 6), fake_output(generator, 6), None)
    _, parts = criterion(out, labels)
    assert set(parts) == {'id1', 'id2'}
    assert parts['id2'].item() == pytest.approx(F.cross_entropy(out.second.logits, labels).item(), rel=1e-5)
    assert criterion.needs_division(1) and not criterion.needs_division(0)


def test_criterion_state_round_trips_with_the_training_set_size():
    criterion = DARTCriterion(CAJ_VIEWS)
    criterion.assign(3, [torch.rand(11), torch.rand(11)])
    restored = DARTCriterion(CAJ_VIEWS)
    restored.load_state_dict(criterion.state_dict())
    assert torch.equal(restored.clean, criterion.clean) and int(restored.divided_epoch) == 3
    assert not restored.needs_division(3) and restored.needs_division(4)
    restored.set_sizes({'visible': 4, 'infrared': 3})
    with pytest.raises(ValueError):
        restored.set_sizes({'visible': 5, 'infrared': 3})


# -- label noise ----------------------------------------------------------------------------------

def test_noise_replaces_the_rate_of_labels_by_another_identity():
    labels = np.repeat(np.arange(7), 9)  # 63 labels
    noisy, replaced = inject_label_noise(labels, 0.2, seed=4)
    assert len(replaced) == math.ceil(0.2 * 63) == 13
    changed = np.flatnonzero(noisy != labels)
    assert changed.tolist() == replaced.tolist()  # never the true label
    assert set(noisy) <= set(labels)
    again, _ = inject_label_noise(labels, 0.2, seed=4)
    other, _ = inject_label_noise(labels, 0.2, seed=5)
    assert np.array_equal(noisy, again) and not np.array_equal(noisy, other)
    clean, none = inject_label_noise(labels, 0.0, seed=4)
    assert np.array_equal(clean, labels) and len(none) == 0


def test_noise_per_modality_keeps_every_identity():
    labels = {'visible': np.repeat(np.arange(5), 3), 'infrared': np.repeat(np.arange(5), 2)}
    result = noisy_training_labels(labels, 0.5, seed=0)
    for name, (noisy, replaced) in result.items():
        assert len(replaced) == math.ceil(0.5 * len(labels[name]))
        assert set(noisy) == set(range(5))
        assert (noisy[replaced] != labels[name][replaced]).all()


# -- the division order and the twin network ---------------------------------------------------------

@pytest.mark.parametrize('sizes,batch,pads', [((22258, 11909), 32, (14, 10363)),  # SYSU-MM01
                                             ((2060, 2060), 32, (20, 20))])        # RegDB
def test_division_order_pads_as_the_released_sampler(sizes, batch, pads):
    visible, infrared = division_order(*sizes, batch, np.random.default_rng(0))
    assert len(visible) == len(infrared) == sizes[0] + pads[0] == sizes[1] + pads[1]
    assert len(visible) % batch == 0
    for order, n, pad in ((visible, sizes[0], pads[0]), (infrared, sizes[1], pads[1])):
        counts = np.bincount(order, minlength=n)
        assert (counts >= 1).all() and counts.sum() - n == pad


def test_twin_networks_eval_feature_is_the_mean_of_both():
    torch.manual_seed(0)
    model = TwinNetworks(5, arch='resnet18').eval()
    assert {k.split('.')[0] for k in model.state_dict()} == {'net1', 'net2'}
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pool, feat = model(visible=images)
        first, second = model.net1(visible=images), model.net2(visible=images)
    assert torch.allclose(feat, (first[1] + second[1]) / 2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pool, (first[0] + second[0]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first[1], second[1])  # two independently initialised networks
    model.train()
    out = model(visible=images, infrared=images, indices=torch.arange(4))
    assert isinstance(out, TwinOutput) and out.first.logits.shape == (4, 5)


def test_division_pass_covers_every_training_image():
    from data_loader import CrossModalTrainSet, training_views
    from methods.dart import division_batches, division_samples, per_sample_losses
    rng = np.random.default_rng(0)
    caches = [(rng.integers(0, 255, (n, 64, 32, 3), dtype=np.uint8), np.arange(n) % 3)
              for n in (7, 5)]
    views = training_views(64, 32, erasing=(0.02, 0.4), grayscale=0.0, pad=2,
                           erasing_kind='channel', channel_aug=True)
    sizes = {'visible': 7, 'infrared': 5}
    plan = division_samples(sizes, 4, seed=0, epoch=1)
    assert [len(b) for b in plan] == [4, 4] and plan == division_samples(sizes, 4, seed=0, epoch=1)
    torch.manual_seed(0)
    twin = TwinNetworks(3, arch='resnet18')
    dataset = CrossModalTrainSet(*caches, views)
    losses, writer = per_sample_losses(twin.networks(), division_batches(
        dataset, views, sizes, plan, torch.device('cpu')), 7 + 7 + 5, torch.device('cpu'))
    assert (losses >= 0).all() and (writer >= 0).all()
    criterion = DARTCriterion(views)
    criterion.set_sizes(sizes)
    rng_before = torch.get_rng_state()
    criterion.divide_epoch(1, twin, dataset, torch.device('cpu'), batch=4, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the training's stream untouched
    assert criterion.clean.shape == (2, 19) and ((0 <= criterion.clean) & (criterion.clean <= 1)).all()
    assert not criterion.needs_division(1) and criterion.needs_division(2)


def test_train_set_gives_each_views_image_index_when_asked():
    from data_loader import CrossModalTrainSet, training_views
    rng = np.random.default_rng(0)
    caches = [(rng.integers(0, 255, (n, 64, 32, 3), dtype=np.uint8), np.arange(n) % 3)
              for n in (7, 5)]
    views = training_views(64, 32, erasing=None, grayscale=0.0, pad=2, channel_aug=True)
    plain = CrossModalTrainSet(*caches, views)[(6, 4, 11)]
    indexed = CrossModalTrainSet(*caches, views, with_indices=True)[(6, 4, 11)]
    assert len(plain) == 6 and indexed[-3:] == (6, 6, 4) and indexed[3:6] == (0, 0, 1)
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], indexed[:3]))


# -- training, resume, refusals, tools ---------------------------------------------------------------

# 2 epochs of 3 steps: epoch 0 the warm-up, epoch 1 starts with the division; the SIGTERM
# arrives during the 5th step (epoch 1, step 1), after the division
RUN = ['--method', 'dart', '--epochs', 2, '--max-steps', 3, '--eval-every', 0]


def run_file(out, suffix):
    return os.path.join(out, 'models' if suffix.endswith('.pth') else 'logs', 'llcm_dart' + suffix)


@pytest.fixture(scope='module')
def straight(llcm_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('dart_straight'))
    assert training.main(train_argv('llcm', llcm_root, out, *RUN)) == 0
    return out


def test_a_dart_run_warms_up_then_divides_and_keeps_both_networks(straight):
    history = [json.loads(line) for line in open(run_file(straight, '_history.jsonl'))]
    assert set(history[0]['losses']) == {'loss', 'id1', 'id2'}  # the warm-up: identity loss only
    assert set(history[1]['losses']) == {'loss', 'id1', 'tri1', 'id2', 'tri2'}
    log = open(run_file(straight, '.log')).read()
    assert log.count('division pass') == 1 and 'llcm_dart epoch 1: division pass' in log
    state = load_checkpoint(run_file(straight, '_last.pth'))
    assert {key.split('.')[0] for key in state['model']} == {'net1', 'net2'}
    assert int(state['criterion']['divided_epoch']) == 1
    clean = state['criterion']['clean']
    assert clean.shape[0] == 2 and ((clean >= 0) & (clean <= 1)).all()
    # one optimiser over both networks, each network's BNNeck and classifier in the head group
    head = state['optimizer']['param_groups'][1]
    assert len(head['params']) == 2 * 2  # per network: BNNeck weight (its bias frozen), classifier


def test_resume_inside_an_epoch_after_the_division_is_exact(straight, llcm_root, tmp_path, monkeypatch):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN)

    def signal_self(loss, parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss, parts
    with monkeypatch.context() as patch:
        at_criterion_call(patch, 5, signal_self)
        assert training.main(argv) == 130
    stopped = load_checkpoint(run_file(out, '_last.pth'))
    assert (stopped['epoch'], stopped['step']) == (1, 2)
    assert int(stopped['criterion']['divided_epoch']) == 1  # divided before it stopped
    assert training.main(argv + ['--resume', 'last']) == 0
    expected, actual = load_checkpoint(run_file(straight, '_last.pth')), load_checkpoint(run_file(out, '_last.pth'))
    assert all(torch.equal(expected['model'][k], actual['model'][k]) for k in expected['model'])
    assert torch.equal(expected['criterion']['clean'], actual['criterion']['clean'])
    for key, state in expected['optimizer']['state'].items():
        assert torch.equal(state['momentum_buffer'], actual['optimizer']['state'][key]['momentum_buffer'])
    assert open(run_file(out, '.log')).read().count('division pass') == 1  # not divided again


def test_noise_rate_outside_zero_to_one_is_refused_in_one_sentence():
    for rate in ('1', '-0.1', '1.5'):
        with pytest.raises(UserError, match=r'^--noise-rate must be in \[0, 1\) [^.]*, got [-\d.]+\.$'):
            training.parse_args(['--method', 'dart', '--noise-rate', rate])
    with pytest.raises(UserError, match='--noise-rate'):
        training.parse_args(['--method', 'agw', '--noise-rate', '0.2'])
    assert training.parse_args(['--method', 'dart']).noise_rate == 0.0


def test_dart_recipe_is_the_released_one():
    args = training.parse_args(['--method', 'dart'])
    assert (args.lr, args.batch_size, args.num_pos, args.img_h, args.img_w, args.epochs) == \
        (0.1, 8, 4, 288, 144, 100)
    assert (args.warmup, tuple(args.lr_steps), args.erasing_kind, args.channel_aug, args.grayscale) == \
        (10, (20, 50), 'channel', True, 0.0)


def test_a_demo_step_with_label_noise_records_the_noise(tmp_path):
    from tools.synthetic_data import make_demo_dataset
    demo = make_demo_dataset(tmp_path / 'demo')
    out = tmp_path / 'run'
    argv = ['--dataset', 'demo', '--data-path', str(demo), '--method', 'dart', *TINY,
            '--model_path', str(out / 'm'), '--log_path', str(out / 'l'), '--cache-dir', str(out / 'c'),
            '--epochs', '1', '--max-steps', '1', '--eval-every', '0', '--noise-rate', '0.2']
    assert training.main(argv) == 0
    noise = json.loads((out / 'l' / 'demo_dart_noise.json').read_text())
    assert (noise['rate'], noise['seed']) == (0.2, 0)
    for modality in ('visible', 'infrared'):
        record = noise[modality]
        assert all(t != n for t, n in zip(record['true'], record['noisy']))
    assert len(noise['visible']['replaced']) == math.ceil(0.2 * 240)  # the demo's 240 visible
    assert 'label noise 0.2' in (out / 'l' / 'demo_dart.log').read_text()


def test_a_checkpoint_missing_a_network_is_refused_in_one_sentence(straight, llcm_root, tmp_path):
    import test as test_script
    state = load_checkpoint(run_file(straight, '_last.pth'))
    state['model'] = {k: v for k, v in state['model'].items() if k.startswith('net1.')}
    broken = tmp_path / 'one_network.pth'
    torch.save(state, broken)
    with pytest.raises(UserError) as error:
        test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', str(broken),
                          '--device', 'cpu', '--workers', '0', '--trial', '0'])
    message = str(error.value)
    assert 'no net2.* weights' in message and message.count('. ') == 0 and message.endswith('.')


def test_every_tool_reads_a_dart_checkpoint(straight, llcm_root, tmp_path):
    import search
    import test as test_script
    import visualize
    from inference import ReIDModel, image_files
    checkpoint = run_file(straight, '_last.pth')
    results = tmp_path / 'results.json'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', checkpoint,
                             '--device', 'cpu', '--workers', '0', '--trial', '0', '--output',
                             str(results)]) == 0
    record = json.loads(results.read_text())
    assert record['models'][0]['method'] == 'dart'
    assert all(set(by_fusion) == {'feat', 'pool+feat', '0.1pool+0.9feat'}
               for by_fusion in record['results'].values())
    assert visualize.main(['--resume', checkpoint, '--dataset', 'llcm', '--data-path', str(llcm_root),
                           '--out', str(tmp_path / 'fig'), '--device', 'cpu', '--workers', '0',
                           '--trial', '0']) == 0
    assert (tmp_path / 'fig' / 'distances.png').is_file()
    queries = image_files(str(llcm_root / 'test_nir'))[:2]
    gallery = str(llcm_root / 'test_vis')
    assert search.main(['--resume', checkpoint, '--query', *queries, '--query-modality', 'infrared',
                        '--gallery', gallery, '--device', 'cpu', '--out', str(tmp_path / 's')]) == 0
    model = ReIDModel.load(checkpoint, device='cpu')
    assert model.embed(queries, 'infrared').shape == (2, 2, 1, 512)


def test_a_dart_checkpoint_exports_to_onnx(straight, tmp_path):
    pytest.importorskip('onnxruntime')
    import export
    assert export.main(['--resume', run_file(straight, '_last.pth'), '--out',
                        str(tmp_path / 'dart.onnx')]) == 0
    assert (tmp_path / 'dart.onnx').is_file()


def test_reproduce_dry_run_writes_nothing(tmp_path, capsys):
    import reproduce
    out = tmp_path / 'repro'
    assert reproduce.main(['--method', 'dart', '--dataset', 'demo', '--dry-run', '--device', 'cpu',
                           '--out', str(out)]) == 0
    assert not out.exists() and 'dart' in capsys.readouterr().out


def test_dart_trains_under_torchrun_with_the_division_split_over_processes(llcm_root, tmp_path):
    import subprocess
    from test_distributed import torchrun_command
    from tiny_runs import REPO
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--method', 'dart', '--epochs', 2, '--max-steps', 1,
                      '--eval-every', 0)
    env = dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path))
    result = subprocess.run(torchrun_command([os.path.join(REPO, 'train.py'), *argv]), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    state = load_checkpoint(run_file(str(tmp_path), '_last.pth'))
    assert int(state['criterion']['divided_epoch']) == 1 and state['rng']['world_size'] == 2


# batch -> (rows it writes, base value); process r computes batches r, r + 2
MERGE_WRITES = {0: ([0, 1, 2], 10.0), 1: ([2, 3], 20.0), 2: ([4, 5, 0], 30.0), 3: ([1], 40.0)}


def _merge_on(rank, world, port, out):
    import torch.distributed as dist
    from methods.dart import merge_across_processes
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    losses, writer = torch.full((1, 6), -1.0, dtype=torch.float64), torch.full((6,), -1)
    for batch in range(rank, len(MERGE_WRITES), world):
        rows, base = MERGE_WRITES[batch]
        losses[0, rows] = base + torch.tensor(rows, dtype=torch.float64)
        writer[rows] = batch
    torch.save(merge_across_processes(losses, writer), f'{out}/rank{rank}.pt')
    dist.destroy_process_group()


def test_the_division_split_over_processes_keeps_the_last_batchs_loss(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import free_port
    mp.spawn(_merge_on, args=(2, free_port(), str(tmp_path)), nprocs=2)
    # one process writing batches 0..3 in order: row 0 by batch 2, row 1 by 3, rows 2, 3 by 1
    expected = torch.tensor([[30.0, 41.0, 22.0, 23.0, 34.0, 35.0]], dtype=torch.float64)
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f'rank{rank}.pt', weights_only=True), expected)


@pytest.mark.parametrize('dataset', ['sysu', 'regdb'])
def test_the_division_covers_sysu_and_regdb_training_sets(dataset, request, tmp_path):
    from data_manager import layout_of, train_image_lists
    root = request.getfixturevalue(f'{dataset}_root')
    argv = train_argv(dataset, root, str(tmp_path), '--method', 'dart', '--epochs', 2,
                      '--max-steps', 1, '--eval-every', 0, *(['--trial', 1] if dataset == 'regdb' else []))
    assert training.main(argv) == 0
    name = f'{dataset}_dart' + ('_trial1' if dataset == 'regdb' else '')
    state = load_checkpoint(os.path.join(str(tmp_path), 'models', name + '_last.pth'))
    lists = train_image_lists(layout_of(dataset), str(root), trial=1)
    visible, infrared = len(lists['visible'].pids), len(lists['infrared'].pids)
    assert state['criterion']['clean'].shape == (2, 2 * visible + infrared)  # CAJ's three views
    assert int(state['criterion']['divided_epoch']) == 1


def test_each_rows_index_names_the_image_of_its_label():
    from data_loader import CrossModalTrainSet, training_views
    from training import stem_batches, stem_indices
    from utils import IdentitySampler
    rng = np.random.default_rng(0)
    caches = [(rng.integers(0, 255, (n, 64, 32, 3), dtype=np.uint8), np.arange(n) % 5) for n in (30, 20)]
    for _, labels in caches:
        rng.shuffle(labels)
    views = training_views(64, 32, erasing=None, grayscale=0.0, pad=2, channel_aug=True)
    dataset = CrossModalTrainSet(*caches, views, with_indices=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=IdentitySampler(
        caches[0][1], caches[1][1], 2, 2))
    batch = next(iter(loader))
    _, _, labels = stem_batches(views, batch)
    indices = stem_indices(views, batch)
    stems = [0] * 8 + [1] * 4  # rows: visible, visible channel-exchanged, infrared; 4 each
    assert [int(caches[s][1][i]) for s, i in zip(stems, indices)] == labels.tolist()
