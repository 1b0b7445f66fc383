"""LbA: each piece of the cross-modal alignment against a direct transcription of its formula,
the pair draws, the network's outputs and the criterion; the method's recipe and flags, a step on
the demo data, an exact resume inside an epoch, every tool on an LbA checkpoint, reproduce.py."""
import contextlib
import io
import json
import math
import os
import random
import shutil
import signal

import pytest
import torch
from torchvision.transforms import v2

import export
import methods
import onnx_export
import reproduce
import search
import test as test_script
import training
import visualize
from data_loader import IMAGENET_MEAN, IMAGENET_STD
from inference import ReIDModel, embed_batch, load_trained_model
from methods import lba
from model import released_state_dict
from test_distributed import run_probe
from tiny_runs import at_criterion_call, randomise_batchnorm, train_argv
from utils import UserError, load_checkpoint


def maps(n=4, c=5, h=3, w=2, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def sampler_labels(num_ids, num_pos, first=10):
    """[visible; infrared] labels as the identity sampler lays them out (ids first, first + 1, ...)."""
    half = torch.arange(first, first + num_ids).repeat_interleave(num_pos)
    return torch.cat([half, half])


# -- the pieces -------------------------------------------------------------------------------

def test_activation_mask_is_the_min_max_normalised_channel_norm_per_image():
    feat = maps()
    mask = lba.activation_mask(feat)
    assert mask.shape == (4, 1, 3, 2) and not mask.requires_grad
    for i in range(4):
        norms = [[sum(feat[i, c, y, x] ** 2 for c in range(5)) ** 0.5 for x in range(2)] for y in range(3)]
        low = min(min(row) for row in norms)
        high = max(max(row) for row in norms)
        for y in range(3):
            for x in range(2):
                assert mask[i, 0, y, x].item() == pytest.approx((norms[y][x] - low) / (high - low + 1e-12))
        assert mask[i].min().item() == 0.0 and mask[i].max().item() == pytest.approx(1.0)


def test_correspondence_is_the_softmax_of_50_cosines_over_key_locations():
    query, key = maps(seed=1), maps(seed=2)
    matches = lba.correspondence(query, key)
    assert matches.shape == (4, 6, 6)
    for n in range(4):
        q, k = query[n].flatten(1), key[n].flatten(1)   # [C, L]
        for i in range(6):
            cos = [torch.dot(q[:, i], k[:, j]) / (q[:, i].norm() * k[:, j].norm()) for j in range(6)]
            exps = [torch.exp(50 * c) for c in cos]
            for j in range(6):
                assert matches[n, i, j].item() == pytest.approx((exps[j] / sum(exps)).item(), rel=1e-9, abs=1e-300)


def test_warp_and_reconstruction_follow_their_formulas():
    feat, key = maps(seed=5), maps(seed=6)
    matches = lba.correspondence(feat, key)
    warped = lba.warp(matches, key)
    mask = lba.activation_mask(feat)
    recon = lba.reconstruct(mask, warped, feat)
    for n in range(4):
        k = key[n].flatten(1)
        for i in range(6):
            expected = sum(matches[n, i, j] * k[:, j] for j in range(6))
            assert torch.allclose(warped[n].flatten(1)[:, i], expected)
            m = mask[n, 0].flatten()[i]
            assert torch.allclose(recon[n].flatten(1)[:, i], m * expected + (1 - m) * feat[n].flatten(1)[:, i])


def test_co_attention_is_the_min_max_normalised_product_of_query_mask_and_matched_key_mask():
    feat, key = maps(seed=7), maps(seed=8)
    matches = lba.correspondence(feat, key)
    query_mask, key_mask = lba.activation_mask(feat), lba.activation_mask(key)
    comask = lba.co_attention(matches, query_mask, key_mask)
    assert comask.shape == (4, 1, 3, 2) and not comask.requires_grad
    for n in range(4):
        mq, mk = query_mask[n, 0].flatten(), key_mask[n, 0].flatten()
        joint = [mq[i] * sum(matches[n, i, j] * mk[j] for j in range(6)) for i in range(6)]
        low, high = min(joint), max(joint)
        for i in range(6):
            assert comask[n, 0].flatten()[i].item() == pytest.approx(((joint[i] - low) / (high - low + 1e-12)).item())


def released_dense_loss(comask, feat, positive, negative):
    """The released term as torch 1.7 computed it: the triplet's distance is the norm over dim 1
    of (a - b + 1e-6), loss [N, H, W] unreduced, times comask [N, 1, H, W] broadcast to
    [N, N, H, W], then the mean."""
    d_pos = (feat - positive + 1e-6).norm(dim=1)
    d_neg = (feat - negative + 1e-6).norm(dim=1)
    loss = torch.clamp(0.3 + d_pos - d_neg, min=0)
    product = torch.stack([torch.stack([comask[i, 0] * loss[j] for j in range(len(loss))])
                           for i in range(len(comask))])
    assert product.shape == (len(comask), len(loss), *loss.shape[1:])
    return product.mean()


def test_dense_triplet_reproduces_the_released_batch_averaged_product_by_default():
    feat, positive, negative = maps(seed=9), maps(seed=10), maps(seed=11)
    comask = torch.rand(4, 1, 3, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    hinge = lba.dense_hinge(feat, positive, negative)
    assert hinge.shape == (4, 3, 2) and (hinge > 0).any() and (hinge == 0).any()
    for n in range(4):
        for y in range(3):
            for x in range(2):
                d_pos = sum((feat[n, c, y, x] - positive[n, c, y, x] + 1e-6) ** 2 for c in range(5)) ** 0.5
                d_neg = sum((feat[n, c, y, x] - negative[n, c, y, x] + 1e-6) ** 2 for c in range(5)) ** 0.5
                assert hinge[n, y, x].item() == pytest.approx(max(0.0, 0.3 + d_pos - d_neg))
    batch_averaged = lba.dense_triplet(comask.squeeze(1), hinge)
    assert batch_averaged.item() == pytest.approx(released_dense_loss(comask, feat, positive, negative).item())
    per_sample = lba.dense_triplet(comask.squeeze(1), hinge, per_sample=True)
    expected = sum(comask[n, 0, y, x] * hinge[n, y, x] for n in range(4) for y in range(3) for x in range(2)) / 24
    assert per_sample.item() == pytest.approx(expected.item())
    assert per_sample.item() != pytest.approx(batch_averaged.item())


def test_align_composes_the_pieces_on_the_drawn_partners():
    feat = maps(seed=12).float()
    positive, negative = torch.tensor([2, 3, 0, 1]), torch.tensor([3, 2, 1, 0])
    recon, terms = lba.align(feat, positive, negative)
    mask = lba.activation_mask(feat)
    matches = lba.correspondence(feat, feat[positive])
    expected_recon = lba.reconstruct(mask, lba.warp(matches, feat[positive]), feat)
    negative_recon = lba.reconstruct(mask, lba.warp(lba.correspondence(feat, feat[negative]), feat[negative]), feat)
    assert torch.allclose(recon, expected_recon)
    assert torch.allclose(terms.comask, lba.co_attention(matches, mask, mask[positive]).squeeze(1))
    assert torch.allclose(terms.hinge, lba.dense_hinge(feat, expected_recon, negative_recon))


# -- the pair draws ---------------------------------------------------------------------------

@pytest.mark.parametrize('num_ids,num_pos', [(8, 4), (4, 4), (2, 2), (3, 1)])
def test_pairs_are_cross_modal_positives_of_the_same_identity_and_negatives_of_others(num_ids, num_pos):
    labels = sampler_labels(num_ids, num_pos)
    half = num_ids * num_pos
    positive, negative = lba.draw_pairs(labels, torch.Generator().manual_seed(3))
    rows = torch.arange(2 * half)
    assert ((rows < half) == (positive >= half)).all() and ((rows < half) == (negative >= half)).all()
    assert torch.equal(labels[positive], labels)
    assert (labels[negative] != labels).all()
    for start in range(0, 2 * half, num_pos):   # an identity's anchors take each of its images once
        block = positive[start:start + num_pos]
        assert sorted(block.tolist()) == sorted(set(block.tolist()))
        negative_ids = labels[negative[start:start + num_pos]].tolist()
        assert len(set(negative_ids)) == min(num_pos, num_ids - 1)


def test_pairs_are_drawn_from_the_seeded_torch_generator_not_python_random():
    labels = sampler_labels(8, 4)
    first = lba.draw_pairs(labels, torch.Generator().manual_seed(5))
    again = lba.draw_pairs(labels, torch.Generator().manual_seed(5))
    other = lba.draw_pairs(labels, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    torch.manual_seed(7)
    random.seed(1)
    default = lba.draw_pairs(labels)
    torch.manual_seed(7)
    random.seed(2)
    assert all(torch.equal(a, b) for a, b in zip(default, lba.draw_pairs(labels)))


def test_pairs_refuse_batches_not_laid_out_by_the_identity_sampler():
    with pytest.raises(ValueError, match='same identity'):
        lba.draw_pairs(torch.tensor([1, 1, 2, 2, 1, 2, 1, 2]))
    with pytest.raises(ValueError, match='identity sampler'):
        lba.draw_pairs(torch.tensor([1, 2, 1, 2, 1, 2, 1, 2]))
    with pytest.raises(ValueError, match='2 identities'):
        lba.draw_pairs(torch.tensor([1, 1, 1, 1]))


# -- network and criterion --------------------------------------------------------------------

def test_network_trains_on_alignments_and_tests_on_gem_features():
    torch.manual_seed(0)
    model = lba.LbANet(num_classes=3, arch='resnet18')
    visible, infrared = torch.randn(4, 3, 64, 32), torch.randn(4, 3, 64, 32)
    labels = sampler_labels(2, 2, first=1)
    out = model(visible=visible, infrared=infrared, labels=labels)
    assert out.pool.shape == (8, 512) and out.logits.shape == out.logits_l3.shape == (8, 3)
    assert out.dense_l3.comask.shape == out.dense_l4.hinge.shape == (8, 4, 2)
    tracked = model.bottleneck.num_batches_tracked.item()
    assert tracked == 3 and model.trunk.layer4[0].bn1.num_batches_tracked.item() == 2
    total, parts = lba.LbACriterion()(out, labels)
    assert list(parts) == ['id', 'tri', 'id_l3', 'id_l4', 'dense_l3', 'dense_l4']
    assert total.item() == pytest.approx(sum(parts.values()).item(), rel=1e-5)
    assert parts['dense_l3'].item() == pytest.approx(
        0.5 * lba.dense_triplet(out.dense_l3.comask, out.dense_l3.hinge).item(), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        pool, feat = model(visible=visible, infrared=infrared)
    assert pool.shape == feat.shape == (8, 512)
    assert torch.allclose(pool.norm(dim=1), torch.ones(8)) and torch.allclose(feat.norm(dim=1), torch.ones(8))


def test_per_sample_criterion_weights_each_hinge_by_its_own_co_attention():
    terms = lba.DenseTerms(torch.tensor([[[1.0]], [[0.0]]]), torch.tensor([[[0.0]], [[2.0]]]))
    out = lba.LbAOutput(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), terms, terms)
    labels = torch.tensor([0, 1])
    _, released = lba.LbACriterion()(out, labels)
    _, paper = lba.LbACriterion(per_sample=True)(out, labels)
    assert released['dense_l3'].item() == pytest.approx(0.5 * 0.5 * 1.0)  # 0.5 x mean(comask) x mean(hinge)
    assert paper['dense_l3'].item() == 0.0


@pytest.mark.parametrize('size,locations', [((288, 144), 162), ((64, 32), 8), ((17, 16), 2), ((16, 16), 1)])
def test_alignment_locations_match_the_trunk(size, locations):
    assert lba.alignment_locations(*size) == locations
    model = lba.LbANet(num_classes=2, arch='resnet18').eval()
    with torch.no_grad():
        layer3 = model.trunk.layer3(model.trunk.layer2(model.trunk.layer1(model.stems(torch.zeros(1, 3, *size), None))))
    assert layer3.shape[2] * layer3.shape[3] == locations


def test_a_single_location_is_refused_naming_the_size_flags():
    with pytest.raises(UserError, match='--img_h 16 x --img_w 16 gives 1'):
        lba.check_alignment_size(16, 16)
    lba.check_alignment_size(17, 16)
    model = lba.LbANet(num_classes=2, arch='resnet18')
    with pytest.raises(UserError, match='--img_h'):
        model(visible=torch.zeros(2, 3, 16, 16), infrared=torch.zeros(2, 3, 16, 16),
              labels=torch.tensor([0, 1, 0, 1]))


# -- the method: recipe, flags, a demo step, resume, every tool -------------------------------

def test_recipe_is_the_released_one_and_tests_the_last_epoch():
    args = training.parse_args(['--method', 'lba'])
    assert (args.img_h, args.img_w, args.batch_size, args.num_pos, args.epochs) == (288, 144, 8, 4, 81)
    assert (args.lr, args.warmup, tuple(args.lr_steps)) == (0.1, 10, (20, 50))
    assert (args.pad, args.grayscale, args.erasing, args.channel_aug) == (0, 0.0, None, False)
    assert args.eval_every == 0 and args.lba_per_sample_comask is False  # best = the final weights
    demo = training.parse_args(['--method', 'lba', '--dataset', 'demo'])
    assert (demo.arch, demo.img_h, demo.img_w, demo.pad, demo.eval_every) == ('resnet18', 64, 32, 0, 0)
    assert lba.alignment_locations(demo.img_h, demo.img_w) >= 2
    assert methods.get_method('lba').headline == 'pool'


def test_the_training_views_only_flip():
    views = methods.get_method('lba').training_views(training.parse_args(['--method', 'lba']))
    image = torch.randint(0, 256, (3, 288, 144), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    normalised = [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)(candidate.float() / 255)
                  for candidate in (image, image.flip(-1))]
    torch.manual_seed(0)
    seen = set()
    for _ in range(40):
        out = views[0].transform(image)
        match = [i for i, candidate in enumerate(normalised) if torch.allclose(out, candidate, atol=1e-6)]
        assert len(match) == 1
        seen.add(match[0])
    assert seen == {0, 1} and [v.name for v in views] == ['visible', 'infrared']


def test_flags_of_one_method_are_refused_to_the_other():
    assert training.parse_args(['--method', 'lba', '--lba-per-sample-comask']).lba_per_sample_comask
    with pytest.raises(UserError, match=r'^--lba-per-sample-comask belong\(s\) to --method lba; '
                                        r'--method agw does not take it\.$'):
        training.parse_args(['--method', 'agw', '--lba-per-sample-comask'])
    with pytest.raises(UserError, match='--adp-square sets the ADP triplet'):
        training.parse_args(['--method', 'lba', '--adp-square', '1'])


def test_sizes_and_batches_the_alignment_cannot_take_are_refused_before_any_work():
    with pytest.raises(UserError, match=r'--img_h 16 x --img_w 16 gives 1; use larger images'):
        training.parse_args(['--method', 'lba', '--img_h', '16', '--img_w', '16'])
    with pytest.raises(UserError, match='--batch-size must be at least 2'):
        training.parse_args(['--method', 'lba', '--batch-size', '1'])
    with pytest.raises(UserError, match='drop --channel-aug'):
        training.parse_args(['--method', 'lba', '--channel-aug'])


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    from tools.synthetic_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp('demo') / 'demo')


def test_a_training_step_on_the_demo_data_selects_the_final_weights(demo_root, tmp_path):
    argv = ['--dataset', 'demo', '--data-path', str(demo_root), '--method', 'lba', '--device', 'cpu',
            '--model_path', str(tmp_path / 'm'), '--log_path', str(tmp_path / 'l'),
            '--cache-dir', str(tmp_path / 'c'), '--epochs', '1', '--max-steps', '1']
    assert training.main(argv) == 0
    best = load_checkpoint(str(tmp_path / 'm' / 'demo_lba_best.pth'))
    last = load_checkpoint(str(tmp_path / 'm' / 'demo_lba_last.pth'))
    assert best['method'] == 'lba' and best['arch'] == 'resnet18' and best['epoch'] == 0
    assert all(torch.equal(best['model'][k], last['model'][k]) for k in last['model'])
    record = json.loads((tmp_path / 'l' / 'demo_lba_history.jsonl').read_text().splitlines()[-1])
    assert set(record['losses']) == {'loss', 'id', 'tri', 'id_l3', 'id_l4', 'dense_l3', 'dense_l4'}
    assert record['metrics'] is None
    assert 'best = the final weights, epoch 0' in (tmp_path / 'l' / 'demo_lba.log').read_text()


RUN = ['--method', 'lba', '--epochs', 2, '--max-steps', 3, '--eval-every', 0]


def history(out):
    with open(os.path.join(out, 'logs', 'llcm_lba_history.jsonl')) as handle:
        return [json.loads(line)['losses'] for line in handle]


@pytest.fixture(scope='module')
def uninterrupted(llcm_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('lba_straight'))
    assert training.main(train_argv('llcm', llcm_root, out, *RUN)) == 0
    return out


def test_a_resume_inside_an_epoch_gives_the_uninterrupted_weights(uninterrupted, llcm_root, tmp_path,
                                                                  monkeypatch):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN)

    def sigterm(loss, parts):
        os.kill(os.getpid(), signal.SIGTERM)
        return loss, parts
    with monkeypatch.context() as patch:
        at_criterion_call(patch, 5, sigterm)   # epoch 1, its 2nd step
        assert training.main(argv) == 130
    assert training.main(argv + ['--resume', 'last']) == 0
    expected = load_checkpoint(os.path.join(uninterrupted, 'models', 'llcm_lba_last.pth'))['model']
    actual = load_checkpoint(os.path.join(out, 'models', 'llcm_lba_last.pth'))['model']
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    assert history(out) == history(uninterrupted)
    assert history(out)[0]['dense_l3'] > 0  # the alignment trained


def test_every_tool_runs_on_an_lba_checkpoint(uninterrupted, llcm_root, tmp_path):
    checkpoint = os.path.join(uninterrupted, 'models', 'llcm_lba_best.pth')
    output = tmp_path / 'results.json'
    assert test_script.main(['--resume', checkpoint, '--data-path', str(llcm_root), '--device', 'cpu',
                             '--workers', '0', '--trial', '0', '--output', str(output)]) == 0
    results = json.loads(output.read_text())['results']['ir_to_vis']
    assert set(results) == {'pool', 'feat', 'pool+feat', '0.1pool+0.9feat'}

    model = ReIDModel.load(checkpoint, device='cpu', img_h=64, img_w=32)
    images = sorted(llcm_root.rglob('*.jpg'))[:3]
    features = model.embed([str(p) for p in images], 'infrared')
    assert features.shape == (3, 2, 1, 512)

    assert visualize.main(['--resume', checkpoint, '--data-path', str(llcm_root), '--out',
                           str(tmp_path / 'figures'), '--device', 'cpu', '--workers', '0',
                           '--trial', '0', '--num-ids', '2', '--num-queries', '1', '--topk', '3']) == 0
    assert json.loads((tmp_path / 'figures' / 'ranks_ir_to_vis.json').read_text())['fusion'] == 'pool'

    gallery = tmp_path / 'gallery'
    gallery.mkdir()
    for index, path in enumerate(images):
        shutil.copy(path, gallery / f'{index}.jpg')
    assert search.main(['--resume', checkpoint, '--query', str(images[0]), '--query-modality',
                        'infrared', '--gallery', str(gallery), '--out', str(tmp_path / 'search'),
                        '--topk', '2', '--device', 'cpu', '--workers', '0']) == 0
    found = json.loads((tmp_path / 'search' / 'search.json').read_text())
    assert found['fusion'] == 'pool'

    for package in onnx_export.ONNX_PACKAGES:
        pytest.importorskip(package)
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main(['--resume', checkpoint, '--out', str(tmp_path / 'lba.onnx')]) == 0
    assert (tmp_path / 'lba.onnx').is_file()


def test_reproduce_dry_run_plans_lba_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'out'
    assert reproduce.main(['--method', 'lba', '--dataset', 'demo', '--seeds', '0', '--out', str(out),
                           '--dry-run']) == 0
    assert not out.exists()
    assert 'demo lba seed 0: train and test' in capsys.readouterr().out


def test_released_weights_are_told_apart_by_their_keys():
    keys = lba.LbANet(num_classes=4, arch='resnet18').state_dict().keys()
    assert methods.method_of_weights(keys) == 'lba'
    agw = methods.build_network('agw', 4, 'llcm', arch='resnet18').state_dict().keys()
    assert methods.method_of_weights(agw) == 'agw'


def test_a_released_lba_checkpoint_loads_with_its_image_size_and_gives_the_same_features(tmp_path):
    torch.manual_seed(0)
    network = lba.LbANet(num_classes=7).eval()   # ResNet-50, as released
    randomise_batchnorm(network)
    weights = released_state_dict(network.state_dict())
    weights['visible_module.visible.fc.weight'] = torch.zeros(1000, 2048)  # its unused ResNet copies
    weights['base_resnet.base.conv1.weight'] = torch.zeros(64, 3, 7, 7)
    path = tmp_path / 'sysu_pretrained.t'
    torch.save({'net': weights, 'epoch': 80}, path)
    model, info = load_trained_model(str(path), 'llcm', torch.device('cpu'))
    assert isinstance(model, lba.LbANet) and (info['method'], info['img_h'], info['img_w']) == ('lba', 288, 144)
    images = torch.randn(2, 3, 288, 144, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected, loaded = embed_batch(network, 'infrared', images), embed_batch(model, 'infrared', images)
    assert loaded.shape == (2, 2, 1, 2048) and torch.allclose(loaded, expected, atol=1e-5)


def test_two_torchrun_processes_train_lba_in_lock_step(llcm_root, tmp_path):
    result, (rank0, rank1) = run_probe(tmp_path, train_argv('llcm', llcm_root, str(tmp_path), *RUN[:2],
                                                            '--epochs', 1, '--max-steps', 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rank0['weights']) == 2 and rank0['weights'] == rank1['weights']


def test_bf16_autocast_and_channels_last_train_lba(llcm_root, tmp_path):
    argv = train_argv('llcm', llcm_root, str(tmp_path), *RUN, '--amp', 'bf16', '--channels-last')
    assert training.main(argv) == 0
    assert all(math.isfinite(value) for losses in history(tmp_path) for value in losses.values())
