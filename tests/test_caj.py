"""CAJ (ICCV 2021) and channel augmentation for every method: the three augmentations' effect on
pixels, the ADP triplet family, the training views of each method (DEEN's and AGW's batches
unchanged), a CAJ step on the demo data, the stall warning, CAJ's test-time fusions."""
import hashlib
import json
import math

import numpy as np
import pytest
import torch

import test as test_script
import training
import visualize
from data_loader import (CHANNEL_ERASING_FILL, ChannelAdaptiveGray, ChannelExchange,
                         ChannelRandomErasing, CrossModalTrainSet, training_views)
from loss import (ADP_CLAMP, DEENCriterion, adp_triplet_loss, build_criterion,
                  center_pair_mining_loss, weighted_regularized_triplet_loss)
from inference import FUSIONS, SINGLE_FEATURES, fused_distance, rank_gallery
from model import TrainOutput
from tiny_runs import TINY, seeded_checkpoint
from utils import IdentitySampler, UserError, load_checkpoint

DRAWS = 4000


def distinct_channels(seed=0, size=(3, 12, 8)):
    """A normalised-looking image whose three channels all differ everywhere."""
    image = torch.randn(size, generator=torch.Generator().manual_seed(seed))
    return image + torch.tensor([0.0, 10.0, 20.0])[:, None, None]


def frequencies(outcomes):
    values, counts = np.unique(outcomes, return_counts=True)
    return dict(zip(values.tolist(), (counts / len(outcomes)).tolist()))


def assert_close_to(found, expected, tolerance=0.03):
    assert set(found) == set(expected), found
    for key, share in expected.items():
        assert abs(found[key] - share) < tolerance, (key, found[key], share)


# ----------------------------------------------------------------------------------------------
# The augmentations, pixel by pixel

def test_channel_exchange_copies_one_channel_chosen_uniformly():
    image = distinct_channels()
    torch.manual_seed(0)
    chosen = []
    for _ in range(DRAWS):
        out = ChannelExchange()(image)
        assert out.shape == image.shape
        source = [c for c in range(3) if torch.equal(out[0], image[c])]
        assert len(source) == 1 and all(torch.equal(out[c], out[0]) for c in range(3))
        chosen.append(source[0])
    assert torch.equal(image, distinct_channels())  # the input is left as it was
    assert_close_to(frequencies(chosen), {0: 1 / 3, 1: 1 / 3, 2: 1 / 3})


def adaptive_gray_branch(image, out):
    if torch.equal(out, image):
        return 'kept'
    gray = 0.2989 * image[0] + 0.5870 * image[1] + 0.1140 * image[2]
    if all(torch.allclose(out[c], gray) for c in range(3)):
        return 'luminance'
    source = [c for c in range(3) if torch.equal(out[0], image[c])]
    assert len(source) == 1 and all(torch.equal(out[c], out[0]) for c in range(3))
    return f'channel {source[0]}'


def test_adaptive_gray_branches_have_the_published_probabilities():
    image = distinct_channels(1)
    torch.manual_seed(1)
    branches = [adaptive_gray_branch(image, ChannelAdaptiveGray()(image)) for _ in range(DRAWS)]
    assert_close_to(frequencies(branches), {'channel 0': 0.25, 'channel 1': 0.25,
                                            'channel 2': 0.25, 'kept': 0.125, 'luminance': 0.125})


def erased_box(image, out):
    """(fill per channel, h, w) of the rectangle where out differs from image, or None."""
    changed = (out != image).any(0)
    if not changed.any():
        return None
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = out[:, top:bottom, left:right]
    assert changed[top:bottom, left:right].all()  # a full rectangle
    assert changed.sum() == (bottom - top) * (right - left)
    return box[:, 0, 0].tolist(), int(bottom - top), int(right - left)


def test_channel_erasing_fills_a_box_of_the_published_area_and_aspect_with_the_constants():
    height, width = 96, 48
    image = distinct_channels(2, (3, height, width))
    erase = ChannelRandomErasing(p=0.5, scale=(0.02, 0.4), ratio=0.3)
    torch.manual_seed(2)
    boxes = [erased_box(image, erase(image)) for _ in range(DRAWS)]
    erased = [box for box in boxes if box is not None]
    assert abs(len(erased) / DRAWS - 0.5) < 0.03
    areas, aspects = [], []
    for fill, h, w in erased:
        assert fill == pytest.approx(CHANNEL_ERASING_FILL)
        assert fill == pytest.approx([0.4914, 0.4822, 0.4465])
        assert h < height and w < width
        areas.append(h * w / (height * width))
        aspects.append(h / w)
    # h and w are rounded to whole pixels: the bounds hold up to half a pixel on each side
    slack_area = (0.5 / math.sqrt(0.02 * height * width)) * 4
    assert 0.02 * (1 - slack_area) <= min(areas) and max(areas) <= 0.4 * (1 + slack_area)
    assert min(areas) < 0.05 and max(areas) > 0.3  # the whole range is drawn
    assert 0.3 * 0.8 <= min(aspects) and max(aspects) <= (1 / 0.3) * 1.25
    assert min(aspects) < 0.4 and max(aspects) > 2.5


# ----------------------------------------------------------------------------------------------
# The ADP triplet

def adp_loop(x, labels, alpha=1.0, gamma=1.0, square=False):
    """CAJ's TripletLoss_ADP transcribed anchor by anchor."""
    losses = []
    for i in range(len(x)):
        row = torch.stack([(x[i] - x[j]).pow(2).sum().clamp(min=1e-12).sqrt()
                           for j in range(len(x))])
        positive, negative = row[labels == labels[i]], row[labels != labels[i]]
        positive_weights = torch.exp(alpha * positive - (alpha * positive).max())
        positive_weights = positive_weights / (positive_weights.sum() + 1e-6)
        negative_shift = torch.cat([-alpha * negative, negative.new_zeros(1)]).max()
        negative_weights = torch.exp(-alpha * negative - negative_shift)
        negative_weights = negative_weights / (negative_weights.sum() + 1e-6)
        d_p, d_n = (positive * positive_weights).sum(), (negative * negative_weights).sum()
        if not square:  # SoftMarginLoss(gamma (d_n - d_p), y = 1)
            losses.append(torch.log1p(torch.exp(-gamma * (d_n - d_p))))
        else:  # SoftMarginLoss(min(gamma (d_p - d_n)^2, 88), y = -1 if d_p > d_n else 1)
            squared = torch.clamp(gamma * (d_p - d_n) ** 2, max=88)
            y = -1.0 if d_p > d_n else 1.0
            losses.append(torch.log1p(torch.exp(-y * squared)))
    return torch.stack(losses).mean()


@pytest.mark.parametrize('square', [False, True])
@pytest.mark.parametrize('alpha, gamma', [(1.0, 1.0), (2.0, 0.5)])
def test_adp_triplet_matches_its_formula(square, alpha, gamma):
    torch.manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1, 2, 3, 3, 3])
    x = torch.randn(12, 6, dtype=torch.float64)
    fast, slow = x.clone().requires_grad_(), x.clone().requires_grad_()
    value = adp_triplet_loss(fast, labels, alpha, gamma, square)
    reference = adp_loop(slow, labels, alpha, gamma, square)
    value.backward()
    reference.backward()
    torch.testing.assert_close(value, reference)
    torch.testing.assert_close(fast.grad, slow.grad)
    assert value.item() > 0 and fast.grad.abs().sum() > 0


def test_adp_square_clamps_at_88_with_zero_gradient():
    labels = torch.tensor([0, 0, 1, 1])
    # each anchor's positive 20 away, its negatives about 0 away: gap^2 = 400 > 88
    x = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 0.01], [20.0, 0.01]], requires_grad=True)
    value = adp_triplet_loss(x, labels, square=True)
    value.backward()
    assert value.item() == pytest.approx(ADP_CLAMP + math.log1p(math.exp(-ADP_CLAMP)))
    assert torch.count_nonzero(x.grad) == 0
    assert torch.equal(adp_loop(x.detach(), labels, square=True), value.detach())
    soft = x.detach().clone().requires_grad_()
    adp_triplet_loss(soft, labels, square=False).backward()
    assert soft.grad.abs().sum() > 0  # the soft margin still trains there


def test_adp_default_is_agws_weighted_regularized_triplet_bit_for_bit():
    torch.manual_seed(4)
    labels = torch.randint(0, 4, (16,))
    x = torch.randn(16, 8)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    wrt = weighted_regularized_triplet_loss(a, labels)
    adp = adp_triplet_loss(b, labels, 1.0, 1.0, False)
    wrt.backward()
    adp.backward()
    assert torch.equal(wrt, adp) and torch.equal(a.grad, b.grad)


def test_method_criteria_use_their_adp_settings():
    agw, caj = build_criterion('agw'), build_criterion('caj')
    assert (agw.alpha, agw.gamma, agw.square) == (1.0, 1.0, False)
    assert (caj.alpha, caj.gamma, caj.square) == (1.0, 1.0, True)
    args = training.parse_args(['--method', 'caj', '--adp-square', '0', '--adp-gamma', '2'])
    criterion = build_criterion('caj', **training.adp_settings(args))
    assert (criterion.gamma, criterion.square) == (2.0, False)


def test_adp_flags_with_deen_are_refused_naming_the_flag():
    with pytest.raises(UserError, match='--adp-square sets the ADP triplet of --method agw and '):
        training.parse_args(['--method', 'deen', '--adp-square', '1'])


def test_deen_with_three_views_mines_pairs_on_the_visible_and_infrared_views():
    torch.manual_seed(5)
    per_view, branches = 4, 3
    ids = torch.tensor([0, 0, 1, 1])
    labels = ids.repeat(3)                                    # [visible; visible CA; infrared]
    pool = torch.randn(branches * 3 * per_view, 8)
    out = TrainOutput(pool, torch.randn(len(pool), 5), torch.tensor(0.0))
    criterion = DEENCriterion(views=3)
    _, parts = criterion(out, labels)
    rows = torch.cat([torch.arange(per_view), torch.arange(2 * per_view, 3 * per_view)])
    original, *generated = (branch[rows] for branch in pool.chunk(branches))
    expected = sum(center_pair_mining_loss(torch.cat([original, g]), ids.repeat(4))
                   for g in generated)
    torch.testing.assert_close(parts['cpm'], 0.8 * expected)


# ----------------------------------------------------------------------------------------------
# Views: DEEN's and AGW's batches unchanged, CAJ's three

def synthetic_caches():
    rng = np.random.default_rng(0)
    visible = without_whole_luminance(rng.integers(0, 256, (24, 36, 20, 3), dtype=np.uint8))
    infrared = without_whole_luminance(rng.integers(0, 256, (18, 36, 20, 3), dtype=np.uint8))
    return (visible, np.repeat(np.arange(6), 4)), (infrared, np.repeat(np.arange(6), 3))


def without_whole_luminance(images):
    """`images` with R moved by one where the luminance 0.2989 R + 0.587 G + 0.114 B is a whole
    number: random grayscale truncates it, computed in float32, to uint8, and only there could
    another CPU's rounding give another gray pixel (2 pixels of 30240 here)."""
    whole = (images.astype(np.int64) @ np.array([2989, 5870, 1140])) % 10000 == 0
    red = images[..., 0]
    images[..., 0] = np.where(whole, np.where(red < 255, red + 1, red - 1), red)
    return images


RELEASED_NORMALISATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # ImageNet mean, std


def normalisation():
    return [torch.tensor(v, dtype=torch.float64)[:, None, None] for v in RELEASED_NORMALISATION]


def pixels_of(images):
    """The uint8 pixels that normalised images hold (normalisation undone in float64, rounded),
    -1 where erased (0 in every channel, which no uint8 pixel normalises to)."""
    mean, std = normalisation()
    pixels = ((images.double() * std + mean) * 255).round().to(torch.int16)
    return pixels.masked_fill((images == 0).all(dim=1, keepdim=True), -1)


def normalised(pixels):
    """The float64 images that pixels_of() reads back as `pixels`: 0 where erased."""
    mean, std = normalisation()
    return torch.where(pixels < 0, 0.0, (pixels.double() / 255 - mean) / std)


def batch_digests(views):
    """Per batch: sha256 (first 16 hex digits) over its sampler indices, the uint8 pixels of
    each image tensor (pixels_of) and the labels, all exact on every machine; each image tensor
    is checked against its pixels at float32 precision."""
    visible, infrared = synthetic_caches()
    sampler = IdentitySampler(visible[1], infrared[1], 3, 2, seed=5)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(CrossModalTrainSet(visible, infrared, views), batch_size=6,
                                         sampler=sampler)
    indices = np.array(list(sampler), dtype=np.uint64)   # (visible, infrared, seed) per sample
    digests = []
    for batch, batch_indices in zip(loader, np.split(indices, len(indices) // 6), strict=True):
        digest = hashlib.sha256(batch_indices.tobytes())
        for tensor in batch:
            exact = pixels_of(tensor) if tensor.is_floating_point() else tensor
            digest.update(exact.numpy().tobytes())
            if tensor.is_floating_point():
                # (pixel / 255 - mean) / std rounded to float32: within a few float32 ulps
                torch.testing.assert_close(tensor.double(), normalised(exact), rtol=1e-5, atol=1e-6)
        digests.append(digest.hexdigest()[:16])
    return digests


# Computed before views existed (commit 1d3dc20): the same sampler and loader over
# CrossModalTrainSet(visible, infrared, train_transform(32, 16, (0.02, 0.4), grayscale, 10)),
# each batch (vis images, ir images, vis labels, ir labels) through batch_digests() above.
# The normalised float images are not hashed: another CPU may round them differently.
BATCHES_BEFORE_VIEWS = {
    'deen': ['c1dcdf65d5923ee0', 'edf2155b8467b8e3', '6782cab64f177438', '6ed65fc7eb858b78'],
    'agw': ['74ebe7cbc3fb09e6', 'e608eb4711f0bea7', '71b4da086b217daa', 'ffc2e2d7b071c8cb'],
}


@pytest.mark.parametrize('method', ['deen', 'agw'])
def test_deen_and_agw_batches_are_bit_identical_to_before_views(method):
    args = training.parse_args(['--method', method, '--img_h', '32', '--img_w', '16'])
    recipe = (args.erasing_kind, args.channel_aug, args.erasing, args.pad)
    assert recipe == ('zero', False, (0.02, 0.4), 10)
    views = training_views(args.img_h, args.img_w, args.erasing, args.grayscale, args.pad,
                           args.erasing_kind, args.channel_aug)
    assert [(v.name, v.stem) for v in views] == [('visible', 'visible'), ('infrared', 'infrared')]
    assert batch_digests(views) == BATCHES_BEFORE_VIEWS[method]


def test_caj_recipe_is_the_released_one():
    args = training.parse_args(['--method', 'caj'])
    assert (args.img_h, args.img_w, args.batch_size, args.num_pos) == (288, 144, 8, 4)
    assert (args.lr, args.warmup, tuple(args.lr_steps), args.epochs) == (0.1, 10, (20, 50), 100)
    assert (args.erasing_kind, args.channel_aug, args.grayscale) == ('channel', True, 0.0)
    assert (args.adp_alpha, args.adp_gamma, args.adp_square) == (1.0, 1.0, 1)
    assert training.parse_args(['--method', 'agw', '--no-random-erasing']).erasing is None


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
    from tools.synthetic_data import make_demo_dataset
    return make_demo_dataset(tmp_path_factory.mktemp('demo') / 'demo')


def run_recorded(monkeypatch, argv):
    """training.main in this process; returns the (visible, infrared, labels) of each step."""
    steps = []
    original = training.stem_batches

    def recorded(views, batch):
        steps.append((views, *original(views, batch)))
        return steps[-1][1:]
    monkeypatch.setattr(training, 'stem_batches', recorded)
    assert training.main(argv) == 0
    return steps


@pytest.mark.parametrize('method, extra', [('caj', []), ('deen', ['--channel-aug'])])
def test_a_training_step_with_channel_augmentation_has_three_views(demo_root, tmp_path, monkeypatch,
                                                                   method, extra):
    out = tmp_path / 'run'
    steps = run_recorded(monkeypatch, [
        '--dataset', 'demo', '--data-path', str(demo_root), '--method', method, *TINY,
        '--model_path', str(out / 'm'), '--log_path', str(out / 'l'), '--cache-dir', str(out / 'c'),
        '--epochs', '1', '--max-steps', '1', '--eval-every', '0', *extra])
    assert len(steps) == 1
    views, visible, infrared, labels = steps[0]
    assert [(v.name, v.stem) for v in views] == [('visible', 'visible'), ('visible_ca', 'visible'),
                                                 ('infrared', 'infrared')]
    per_view = 2 * 2  # --batch-size 2 x --num_pos 2
    assert visible.shape[0] == 2 * per_view and infrared.shape[0] == per_view
    first, exchanged = visible[:per_view], visible[per_view:]
    assert torch.equal(exchanged[:, 0], exchanged[:, 1])
    assert torch.equal(exchanged[:, 1], exchanged[:, 2])
    assert not torch.equal(first[:, 0], first[:, 1])  # the plain visible view keeps its colours
    assert torch.equal(labels[:per_view], labels[per_view:2 * per_view])   # CA view: visible labels
    assert torch.equal(labels[:per_view], labels[2 * per_view:])           # paired identities
    checkpoint = load_checkpoint(str(out / 'm' / f'demo_{method}_last.pth'))
    assert checkpoint['method'] == method and checkpoint['args']['channel_aug'] is True


def test_a_stalled_triplet_is_named_in_one_log_line(demo_root, tmp_path):
    out = tmp_path / 'run'
    argv = ['--dataset', 'demo', '--data-path', str(demo_root), '--method', 'caj', *TINY,
            '--model_path', str(out / 'm'), '--log_path', str(out / 'l'), '--cache-dir', str(out / 'c'),
            '--epochs', '1', '--max-steps', '2', '--eval-every', '0', '--adp-gamma', '1e12']
    assert training.main(argv) == 0
    log = (out / 'l' / 'demo_caj.log').read_text()
    lines = [line for line in log.splitlines() if 'zero gradient' in line]
    assert len(lines) == 1
    assert 'epoch 0' in lines[0] and 'all 2 step(s)' in lines[0] and '--adp-square 0' in lines[0]


def test_an_unsaturated_triplet_gives_no_stall_line():
    criterion = build_criterion('caj')
    torch.manual_seed(6)
    pool = torch.randn(8, 4) * 0.01
    criterion(TrainOutput(pool, torch.randn(8, 3), torch.tensor(0.0)), torch.tensor([0, 1] * 4))
    assert criterion.take_stall_count() == 0
    far = torch.tensor([[0.0], [30.0], [0.01], [30.01]])  # positives 30 apart, negatives 0.01
    criterion(TrainOutput(far, torch.randn(4, 3), torch.tensor(0.0)), torch.tensor([0, 0, 1, 1]))
    assert criterion.take_stall_count() == 1 and criterion.take_stall_count() == 0


# ----------------------------------------------------------------------------------------------
# Testing a CAJ checkpoint

def test_caj_checkpoint_reports_pooled_and_bnneck_numbers(llcm_root, tmp_path):
    checkpoint = tmp_path / 'caj.pth'
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6, method='caj')
    results = tmp_path / 'results.json'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', '0',
                             '--output', str(results)]) == 0
    record = json.loads(results.read_text())
    assert record['models'][0]['method'] == 'caj'
    for by_fusion in record['results'].values():
        assert set(by_fusion) == {'pool+feat', '0.1pool+0.9feat', 'pool', 'feat'}
    assert set(record['protocol']['fusions']) == {'pool+feat', '0.1pool+0.9feat', 'pool', 'feat'}


def test_visualize_draws_caj_own_columns_with_test_py_numbers(llcm_root, tmp_path):
    """visualize.py --fusion pool|feat: the CMC of one feature alone is test.py's column of it,
    and the distance histogram spans a cosine's range."""
    checkpoint, results, features = (tmp_path / name for name in
                                     ('caj.pth', 'results.json', 'features.pt'))
    seeded_checkpoint(checkpoint, 'llcm', num_classes=6, method='caj')
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--output',
                             str(results), '--save-features', str(features)]) == 0
    reported = json.loads(results.read_text())['results']
    for fusion in ('pool', 'feat'):
        out = tmp_path / fusion
        assert visualize.main(['--dataset', 'llcm', '--features', str(features), '--out',
                               str(out), '--fusion', fusion, 'cmc', 'distances']) == 0
        cmc = json.loads((out / 'cmc.json').read_text())
        for setting, curve in cmc.items():
            assert curve['mean'][0] == pytest.approx(reported[setting][fusion]['Rank-1'][0], abs=1e-9)
            assert np.mean(curve['mAP']) == pytest.approx(reported[setting][fusion]['mAP'][0])
        distances = json.loads((out / 'distances.json').read_text())
        edges = distances['bin_edges']
        assert distances['fusion'] == fusion and (edges[0], edges[-1]) == (-1.0, 1.0)


def test_rank_gallery_ranks_by_pooled_or_bnneck_features_alone():
    query = torch.zeros(1, 2, 1, 2)
    query[0, 0, 0] = torch.tensor([1.0, 0.0])   # pooled
    query[0, 1, 0] = torch.tensor([0.0, 1.0])   # BNNeck
    gallery = torch.zeros(2, 2, 1, 2)
    gallery[0, 0, 0], gallery[1, 1, 0] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert rank_gallery(query, gallery, 'pool')[0].tolist() == [[0, 1]]
    assert rank_gallery(query, gallery, 'feat')[0].tolist() == [[1, 0]]


def test_a_single_feature_is_compared_re_normalised_as_caj_tests():
    """CAJ's test averages an image's embedding with its flip's and re-normalises before the dot
    product: the 'pool' / 'feat' distances are cosines of the flip-summed features, while the
    fusions keep the released sum of inner products."""
    generator = torch.Generator().manual_seed(0)
    query, gallery = (torch.randn(n, 2, 1, 8, generator=generator) for n in (3, 5))
    for name, index in (('pool', 0), ('feat', 1)):
        q = torch.nn.functional.normalize(query[:, index, 0], dim=1)
        g = torch.nn.functional.normalize(gallery[:, index, 0], dim=1)
        assert torch.allclose(fused_distance(query, gallery, SINGLE_FEATURES[name]), -q @ g.T,
                              atol=1e-6)
    plain = -(query[:, 0, 0] @ gallery[:, 0, 0].T + query[:, 1, 0] @ gallery[:, 1, 0].T)
    assert torch.allclose(fused_distance(query, gallery, FUSIONS['pool+feat']), plain, atol=1e-5)
