"""MMN: each module against a direct transcription of its formula on small inputs (generator,
stripes, four-pair triplet, consistency term, the frozen seeded head, the seven fusions); its
recipe and flags; a training run on synthetic data, its exact resume (the frozen head included)
and every tool on its checkpoint."""
import json
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F

import export
import reproduce
import search
import test as test_script
import training
import visualize
from data_loader import ChannelRandomErasing
from inference import CHECKPOINT_FORMAT, ReIDModel, embed_batch, load_trained_model, rank_gallery
from methods import build_network, get_method
from methods.mmn import (MMN, STRIPE_WIDTHS, MMNCriterion, MMNOutput, MiddleModalityGenerator,
                         check_stripe_rows, consistency_loss, four_pair_triplet_loss,
                         horizontal_stripes, seeded_consistency_head)
from tiny_runs import TINY, train_argv
from utils import UserError, load_checkpoint, run_main


def batchnorm_train(x, bn, dims):
    """BatchNorm in training mode, written out: batch mean, biased variance, affine."""
    shape = [1] * x.dim()
    shape[1] = -1
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def conv1x1(x, conv):
    """A 1x1 convolution as a per-pixel matrix product."""
    weight = conv.weight[:, :, 0, 0]
    return torch.einsum('oc,nchw->nohw', weight, x) + conv.bias.view(1, -1, 1, 1)


def middle_image(x, encoder, decoder):
    hidden = torch.relu(conv1x1(torch.relu(conv1x1(x, encoder.encode)), encoder.mix))
    return torch.relu(conv1x1(batchnorm_train(hidden, encoder.norm, (0, 2, 3)), decoder))


def randomised(generator, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in generator.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return generator


def test_generator_starts_constant():
    generator = MiddleModalityGenerator()
    convs = [m for m in generator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5  # encode + mix per modality, one shared decoder
    for conv in convs:
        assert torch.all(conv.weight == 0.333) and torch.all(conv.bias == 0)
    assert [tuple(c.weight.shape) for c in convs] == [(1, 3, 1, 1), (1, 1, 1, 1)] * 2 + [(3, 1, 1, 1)]


def test_generator_matches_its_formula():
    generator = randomised(MiddleModalityGenerator()).train()
    visible, infrared = torch.randn(3, 3, 8, 4), torch.randn(3, 3, 8, 4)
    expected_v = middle_image(visible, generator.visible_encoder, generator.decoder)
    expected_i = middle_image(infrared, generator.infrared_encoder, generator.decoder)
    torch.testing.assert_close(generator.visible(visible), expected_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(generator.infrared(infrared), expected_i, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected_v, middle_image(visible, generator.infrared_encoder,
                                                       generator.decoder))


@pytest.mark.parametrize('rows', [4, 7, 10, 18, 24])
def test_stripes_match_chunk_slices(rows):
    x = torch.randn(2, 5, rows, 3)
    size = math.ceil(rows / 4)
    expected = [x[:, :, k * size:(k + 1) * size].mean((2, 3)) for k in range(4)]
    got = horizontal_stripes(x)
    assert len(got) == 4
    for part, want in zip(got, expected):
        torch.testing.assert_close(part, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('rows', [3, 5, 6, 9])
def test_stripes_refuse_maps_without_four_parts(rows):
    with pytest.raises(UserError, match='--img_h'):
        horizontal_stripes(torch.randn(1, 2, rows, 2))


@pytest.mark.parametrize('img_h, ok', [(48, False), (64, True), (96, False), (112, True),
                                       (144, False), (288, True), (384, True)])
def test_image_heights_checked_before_building(img_h, ok):
    if ok:
        check_stripe_rows(img_h)
    else:
        with pytest.raises(UserError, match='--img_h'):
            check_stripe_rows(img_h)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return MMN(num_classes=3, arch='resnet18')


def test_network_feeds_each_stem_its_modality_and_middle_image():
    model = tiny_model().train()
    visible, infrared = torch.randn(2, 3, 64, 32), torch.randn(2, 3, 64, 32)
    out = model(visible=visible, infrared=infrared)
    assert isinstance(out, MMNOutput) and len(out.pool) == len(out.logits) == 4
    assert out.pool[0].shape == (8, 512) and out.logits[0].shape == (8, 3)

    # the same pass, written out: stems on [V; M_v] and [I; M_i], trunk on [V; M_v; I; M_i]
    reference = tiny_model().train()
    with torch.no_grad():
        g = reference.generator
        x = torch.cat([reference.visible_stem(torch.cat([visible, g.visible(visible)])),
                       reference.infrared_stem(torch.cat([infrared, g.infrared(infrared)]))])
        for name in ('layer1', 'layer2', 'layer3', 'layer4'):
            x = getattr(reference.trunk, name)(x)
        assert x.shape[2] == 4                                       # 64 rows / 16: one row a stripe
        for k in range(4):
            pooled = x[:, :, k].mean(2)
            torch.testing.assert_close(out.pool[k].detach(), pooled, rtol=1e-5, atol=1e-5)
            logits = reference.classifiers[k](reference.bottlenecks[k](pooled))
            torch.testing.assert_close(out.logits[k].detach(), logits, rtol=1e-5, atol=1e-6)


def test_eval_rows_are_original_then_middle():
    model = tiny_model().eval()
    visible, infrared = torch.randn(2, 3, 64, 32), torch.randn(3, 3, 64, 32)
    pool, feat = model(visible=visible, infrared=infrared)
    assert model.num_branches == 2 and model.embed_dim == 4 * 512
    assert pool.shape == feat.shape == (10, 2048)
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        rows = {}
        for name, images, stem, make in (('v', visible, model.visible_stem, model.generator.visible),
                                          ('i', infrared, model.infrared_stem, model.generator.infrared)):
            x = stem(torch.cat([images, make(images)]))
            for layer in ('layer1', 'layer2', 'layer3', 'layer4'):
                x = getattr(model.trunk, layer)(x)
            stripes = [x[:, :, k].mean(2) for k in range(4)]
            bn = torch.cat([b(s) for b, s in zip(model.bottlenecks, stripes)], 1)
            rows[name], rows['m' + name] = bn.split(len(images))
    expected = F.normalize(torch.cat([rows['v'], rows['i'], rows['mv'], rows['mi']]), dim=1)
    torch.testing.assert_close(feat, expected, rtol=1e-5, atol=1e-6)


def batch_hard_by_loop(features, labels, margin):
    """The batch-hard triplet of the released OriTripletLoss, anchor by anchor."""
    losses = []
    for i in range(len(features)):
        dist = [float(torch.linalg.vector_norm(features[i] - features[j])) for j in range(len(features))]
        positive = max(d for d, y in zip(dist, labels) if y == labels[i])
        negative = min(d for d, y in zip(dist, labels) if y != labels[i])
        losses.append(max(0.0, positive - negative + margin))
    return sum(losses) / len(losses)


def test_four_pair_triplet_matches_its_formula():
    torch.manual_seed(1)
    pool = torch.randn(16, 6)                                  # [V; M_v; I; M_i], B = 4
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])            # [y_v; y_i]
    v, mv, i, mi = pool.chunk(4)
    expected = sum(batch_hard_by_loop(torch.cat(pair), labels.tolist(), 0.3)
                   for pair in ((v, i), (v, mi), (mv, i), (mv, mi))) / 4
    got = four_pair_triplet_loss(pool, labels, margin=0.3)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > 0
    assert got.item() != pytest.approx(batch_hard_by_loop(torch.cat([v, i]), labels.tolist(), 0.3))


def projection_by_hand(head, x):
    lin1, bn1, lin2, bn2 = head.project, head.mlp[0], head.mlp[2], head.mlp[3]
    h = F.normalize(x, dim=1) @ lin1.weight.T
    h = torch.relu(batchnorm_train(h, bn1, (0,)))
    h = batchnorm_train(h @ lin2.weight.T + lin2.bias, bn2, (0,))
    return h / h.norm(dim=1, keepdim=True)


def test_consistency_term_matches_its_formula():
    head = seeded_consistency_head(12, seed=3).train()
    torch.manual_seed(2)
    middle_v, middle_i = torch.randn(5, 12), torch.randn(5, 12)
    with torch.no_grad():
        z = projection_by_hand(head, torch.cat([middle_v, middle_i]))
    expected = sum(float((z[r] - z[5 + r]).norm()) for r in range(5)) / 5
    got = consistency_loss(head, middle_v, middle_i)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_consistency_head_seeded_frozen_and_recorded():
    state = torch.random.get_rng_state()
    one, again, other = (MMNCriterion(12, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)    # the global stream is untouched
    assert torch.equal(one.head.project.weight, again.head.project.weight)
    assert not torch.equal(one.head.project.weight, other.head.project.weight)
    assert not any(p.requires_grad for p in one.parameters())
    assert all(p.requires_grad for p in MMNCriterion(12, train_head=True).parameters())
    keys = set(one.state_dict())
    assert {'head.project.weight', 'head.mlp.0.running_mean', 'head.mlp.3.running_var'} <= keys


def random_output(batch=4, dim=12, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = tuple(torch.randn(4 * batch, dim, generator=g, requires_grad=True) for _ in range(4))
    logits = tuple(torch.randn(4 * batch, classes, generator=g, requires_grad=True) for _ in range(4))
    return MMNOutput(pool, logits)


def test_criterion_sums_its_parts_over_stripes():
    criterion = MMNCriterion(12, margin=0.3, delta=0.2, seed=0)
    out = random_output()
    labels = torch.tensor([0, 0, 1, 2, 0, 0, 1, 2])                  # [y_v; y_i], B = 4
    reference = MMNCriterion(12, seed=0)                             # same head, fresh statistics
    total, parts = criterion(out, labels)
    stripe_labels = torch.tensor([0, 0, 1, 2] * 2 + [0, 0, 1, 2] * 2)
    expected_id = sum(F.cross_entropy(l, stripe_labels) for l in out.logits) / 4
    expected_tri = sum(four_pair_triplet_loss(p, labels, 0.3) for p in out.pool) / 4
    expected_dcl = 0.2 * sum(consistency_loss(reference.head, p[4:8], p[12:16]) for p in out.pool) / 4
    assert set(parts) == {'id', 'tri', 'dcl'}
    assert parts['id'].item() == pytest.approx(expected_id.item(), rel=1e-5)
    assert parts['tri'].item() == pytest.approx(expected_tri.item(), rel=1e-5)
    assert parts['dcl'].item() == pytest.approx(expected_dcl.item(), rel=1e-5)
    assert total.item() == pytest.approx(sum(p.item() for p in parts.values()), rel=1e-5)


def test_frozen_head_passes_gradients_and_keeps_its_weights_but_updates_statistics():
    criterion = MMNCriterion(12, seed=0)
    weight = criterion.head.project.weight.clone()
    running = criterion.head.mlp[0].running_mean.clone()
    out = random_output()
    total, _ = criterion(out, torch.tensor([0, 0, 1, 2, 0, 0, 1, 2]))
    total.backward()
    assert out.pool[0].grad[4:8].abs().sum() > 0                      # M_v rows reach the features
    assert criterion.head.project.weight.grad is None
    assert torch.equal(criterion.head.project.weight, weight)
    assert not torch.equal(criterion.head.mlp[0].running_mean, running)
    assert int(criterion.head.mlp[0].num_batches_tracked) == 4        # once per stripe


def released_combinations(query, gallery):
    """The released test's seven similarity matrices, written out as it computes them (matmul of
    the BNNeck features; X = the middle branch)."""
    q, xq = F.normalize(query[:, 1, 0], dim=1), F.normalize(query[:, 1, 1], dim=1)
    g, xg = F.normalize(gallery[:, 1, 0], dim=1), F.normalize(gallery[:, 1, 1], dim=1)
    d0, d1, d2, d3 = q @ g.T, q @ xg.T, xq @ g.T, xq @ xg.T
    return {'orig/orig': d0, 'orig/middle': d1, 'middle/orig': d2, 'middle/middle': d3,
            'sum': d0 + d1 + d2 + d3,
            'min': torch.minimum(torch.minimum(d0, d1), torch.minimum(d2, d3)),
            'max': torch.maximum(torch.maximum(d0, d1), torch.maximum(d2, d3))}


def test_fusions_are_the_released_seven_combinations():
    from methods.mmn import FUSIONS, HEADLINE
    torch.manual_seed(0)
    query, gallery = torch.randn(5, 2, 2, 8), torch.randn(7, 2, 2, 8)
    expected = released_combinations(query, gallery)
    assert list(FUSIONS) == list(expected) and HEADLINE == 'orig/orig'
    for name, fusion in FUSIONS.items():
        torch.testing.assert_close(fusion(query, gallery), -expected[name], rtol=1e-5, atol=1e-6)
    # the pooled (pre-BN) features take no part, as in the released test
    other_pool = query.clone()
    other_pool[:, 0] = torch.randn(5, 2, 8)
    torch.testing.assert_close(FUSIONS['sum'](other_pool, gallery), FUSIONS['sum'](query, gallery))


# ----------------------------------------------------------------------------------------------
# Recipe and flags

def test_recipe_is_the_released_one():
    args = training.parse_args(['--method', 'mmn'])
    assert (args.img_h, args.img_w, args.batch_size, args.num_pos) == (384, 192, 4, 4)
    assert (args.lr, args.warmup, tuple(args.lr_steps), args.epochs) == (0.1, 10, (20, 50), 81)
    assert (args.erasing, args.erasing_kind, args.grayscale, args.pad) == ((0.02, 0.4), 'channel-zero',
                                                                          0.0, 10)
    assert (args.margin, args.mmn_delta, args.mmn_train_dcl_head, args.channel_aug) == (0.3, 0.2,
                                                                                     False, False)
    demo = training.parse_args(['--method', 'mmn', '--dataset', 'demo'])
    assert (demo.img_h, demo.img_w) == (64, 32)       # a layer4 map of 4 rows: one a stripe
    check_stripe_rows(demo.img_h)


def test_released_erasing_fills_its_box_with_zero():
    views = get_method('mmn').training_views(training.parse_args(['--method', 'mmn']))
    erasing = views[0].transform.transforms[-1]
    assert isinstance(erasing, ChannelRandomErasing) and erasing.fill == (0.0, 0.0, 0.0)
    assert (erasing.p, erasing.scale, erasing.ratio) == (0.5, (0.02, 0.4), 0.3)
    erasing.p = 1.0
    torch.manual_seed(0)
    out = erasing(torch.full((3, 40, 20), 5.0))
    box = out != 5.0
    assert box.any() and torch.equal(box[0], box[1]) and torch.all(out[box] == 0)


@pytest.mark.parametrize('argv, named', [
    (['--method', 'mmn', '--img_h', '96'], '--img_h'),
    (['--method', 'mmn', '--channel-aug'], '--channel-aug'),
    (['--method', 'mmn', '--dee-stage', '2'], '--dee-stage'),
    (['--method', 'mmn', '--adp-gamma', '2'], '--adp-gamma'),
    (['--method', 'deen', '--mmn-delta', '0.5'], '--mmn-delta'),
    (['--method', 'agw', '--mmn-train-dcl-head'], '--mmn-train-dcl-head'),
    (['--method', 'mmn', '--mmn-delta', '-1'], '--mmn-delta'),
])
def test_bad_flags_are_refused_in_one_sentence(argv, named):
    with pytest.raises(UserError, match=named) as error:
        training.parse_args(argv)
    assert str(error.value).count('. ') == 0 and str(error.value).endswith('.')


def test_stripe_heads_and_a_trained_consistency_head_learn_at_the_base_lr():
    torch.manual_seed(0)
    model = MMN(3, arch='resnet18')
    heads = get_method('mmn').head_prefixes
    frozen = training.build_optimizer(model, 0.1, pretrained=True, head_prefixes=heads,
                                      criterion=MMNCriterion(512))
    body, head = frozen.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in head['params']) == sorted(
        [f'bottlenecks.{k}.weight' for k in range(4)] + [f'classifiers.{k}.weight' for k in range(4)])
    assert (body['lr_scale'], head['lr_scale']) == (0.1, 1.0)
    assert any(names[id(p)].startswith('generator.') for p in body['params'])
    trained = MMNCriterion(512, train_head=True)
    head = training.build_optimizer(model, 0.1, head_prefixes=heads, criterion=trained).param_groups[1]
    assert {id(p) for p in trained.parameters()} <= {id(p) for p in head['params']}
    assert STRIPE_WIDTHS['resnet18'] == model.stripe_dim


# ----------------------------------------------------------------------------------------------
# Training, resume and the tools on an MMN checkpoint

RUN = ['--method', 'mmn', '--epochs', 2, '--max-steps', 3, '--eval-every', 0]


def run_dir(out, name):
    return os.path.join(out, name, 'llcm_mmn_' + ('history.jsonl' if name == 'logs' else 'last.pth'))


@pytest.fixture(scope='module')
def straight(llcm_root, tmp_path_factory):
    """An uninterrupted tiny MMN training on the synthetic LLCM: (out folder, last checkpoint)."""
    out = str(tmp_path_factory.mktemp('mmn_straight'))
    assert training.main(train_argv('llcm', llcm_root, out, *RUN)) == 0
    return out, load_checkpoint(run_dir(out, 'models'))


def test_a_training_run_saves_the_frozen_head_with_its_statistics(straight):
    _, checkpoint = straight
    assert checkpoint['method'] == 'mmn' and checkpoint['args']['erasing_kind'] == 'channel-zero'
    saved = checkpoint['criterion']
    fresh = MMNCriterion(512, seed=0).state_dict()
    assert torch.equal(saved['head.project.weight'], fresh['head.project.weight'])  # never trained
    assert torch.equal(saved['head.mlp.2.weight'], fresh['head.mlp.2.weight'])
    assert int(saved['head.mlp.0.num_batches_tracked']) == 6 * 4   # 6 steps x 4 stripes
    assert not torch.equal(saved['head.mlp.0.running_mean'], fresh['head.mlp.0.running_mean'])
    with open(run_dir(straight[0], 'logs')) as handle:
        records = [json.loads(line) for line in handle]
    assert set(records[-1]['losses']) >= {'id', 'tri', 'dcl'}


def test_resume_inside_an_epoch_is_bit_exact_for_the_network_and_the_head(straight, llcm_root,
                                                                          tmp_path, monkeypatch):
    out = str(tmp_path)
    argv = train_argv('llcm', llcm_root, out, *RUN)
    calls, forward = [], MMNCriterion.forward

    def signalling(self, output, labels):
        calls.append(1)
        if len(calls) == 5:                      # epoch 1, step 1
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, output, labels)
    with monkeypatch.context() as patch:
        patch.setattr(MMNCriterion, 'forward', signalling)
        assert training.main(argv) == 130
    stopped = load_checkpoint(run_dir(out, 'models'))
    assert (stopped['epoch'], stopped['step']) == (1, 2)
    assert int(stopped['criterion']['head.mlp.0.num_batches_tracked']) == 5 * 4
    assert run_main(lambda: training.main(argv + ['--resume', 'last', '--mmn-train-dcl-head'])) == 2
    assert training.main(argv + ['--resume', 'last']) == 0
    expected, actual = straight[1], load_checkpoint(run_dir(out, 'models'))
    for part in ('model', 'criterion'):
        assert expected[part].keys() == actual[part].keys()
        assert all(torch.equal(expected[part][k], actual[part][k]) for k in expected[part]), part


@pytest.fixture(scope='module')
def seeded(tmp_path_factory):
    """Checkpoints of an untrained, seeded ResNet-18 MMN at 64x32 for SYSU-MM01 and RegDB."""
    folder, paths = tmp_path_factory.mktemp('mmn_seeded'), {}
    for dataset, classes in (('sysu', 4), ('regdb', 4)):
        torch.manual_seed(0)
        model = build_network('mmn', classes, dataset, arch='resnet18')
        paths[dataset] = folder / f'{dataset}.pth'
        torch.save({'format': CHECKPOINT_FORMAT, 'dataset': dataset, 'method': 'mmn',
                    'arch': 'resnet18', 'num_classes': classes, 'img_h': 64, 'img_w': 32,
                    'model': model.state_dict(), 'epoch': 0}, paths[dataset])
    return paths


def run_test_py(dataset, data_path, checkpoint, out, *extra):
    assert test_script.main(['--dataset', dataset, '--data-path', str(data_path), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--output',
                             str(out), *map(str, extra)]) == 0
    return json.loads(out.read_text())


def test_test_py_reports_the_seven_fusions_on_every_protocol(straight, seeded, llcm_root,
                                                             sysu_root, regdb_root, tmp_path):
    names = list(get_method('mmn').fusions)
    runs = {'llcm': run_test_py('llcm', llcm_root, run_dir(straight[0], 'models'),
                                tmp_path / 'llcm.json', '--trial', 0),
            'sysu': run_test_py('sysu', sysu_root, seeded['sysu'], tmp_path / 'sysu.json',
                                '--mode', 'both', '--trial', 0),
            'regdb': run_test_py('regdb', regdb_root, seeded['regdb'], tmp_path / 'regdb.json',
                                 '--trial', 1)}
    settings = {dataset: set(record['results']) for dataset, record in runs.items()}
    assert {'ir_to_vis', 'vis_to_ir', 'released_vis_to_ir'} <= settings['llcm']
    assert {'all ir_to_vis', 'indoor ir_to_vis'} <= settings['sysu']
    assert {'vis_to_ir', 'ir_to_vis'} <= settings['regdb']
    for record in runs.values():
        assert record['models'][0]['method'] == 'mmn'
        assert list(record['protocol']['fusions']) == names
        assert record['protocol']['fusions']['min'].startswith('distance = -min(cos(BNNeck original')
        for by_fusion in record['results'].values():
            assert list(by_fusion) == names


def test_visualize_search_export_and_the_api_on_an_mmn_checkpoint(straight, llcm_root, tmp_path):
    checkpoint = run_dir(straight[0], 'models')
    features = tmp_path / 'features.pt'
    reported = run_test_py('llcm', llcm_root, checkpoint, tmp_path / 'r.json', '--save-features',
                           features)['results']
    for fusion, bound in (('orig/orig', 1.0), ('sum', 4.0)):
        out = tmp_path / fusion.replace('/', '_')
        assert visualize.main(['--dataset', 'llcm', '--features', str(features), '--out', str(out),
                               '--fusion', fusion, 'cmc', 'distances']) == 0
        cmc = json.loads((out / 'cmc.json').read_text())
        for setting, curve in cmc.items():
            assert curve['mean'][0] == pytest.approx(reported[setting][fusion]['Rank-1'][0], abs=1e-9)
        edges = json.loads((out / 'distances.json').read_text())['bin_edges']
        assert (edges[0], edges[-1]) == (-bound, bound)

    model = ReIDModel.load(checkpoint, device='cpu')
    gallery_dir = llcm_root / 'test_vis'
    gallery = sorted(str(p) for p in gallery_dir.rglob('*.jpg'))[:6]
    query = sorted(str(p) for p in (llcm_root / 'test_nir').rglob('*.jpg'))[:2]
    q, g = model.embed(query, 'infrared'), model.embed(gallery, 'visible')
    assert q.shape == (2, 2, 2, 4 * 512)
    order, distances = rank_gallery(q, g, fusion='max', method='mmn')
    expected = get_method('mmn').fusions['max'](q, g).sort(dim=1, stable=True)
    assert torch.equal(order, expected.indices) and torch.equal(distances, expected.values)

    found = tmp_path / 'search'
    assert run_main(lambda: search.main(list(map(str, [
        '--resume', checkpoint, '--query', query[0], '--query-modality', 'infrared', '--gallery',
        gallery_dir, '--gallery-modality', 'visible', '--out', found, '--topk', 3,
        '--device', 'cpu'])))) == 0
    result = json.loads((found / 'search.json').read_text())
    assert result['fusion'] == 'orig/orig'

    onnx = pytest.importorskip('onnxruntime') and tmp_path / 'mmn.onnx'
    pytest.importorskip('onnx')
    assert export.main(['--resume', checkpoint, '--modality', 'infrared', '--out', str(onnx)]) == 0
    from onnx_export import onnx_features, onnx_session
    images = torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    (got,) = onnx_features(onnx_session(str(onnx)), ('infrared',), [images])
    network, _ = load_trained_model(checkpoint, device='cpu')
    with torch.inference_mode():
        reference = embed_batch(network, 'infrared', images).numpy()
    assert got.shape == reference.shape == (3, 2, 2, 2048)
    assert abs(got - reference).max() < 1e-4


def test_reproduce_dry_run_writes_nothing_and_refuses_another_methods_flag(tmp_path, capsys):
    out = tmp_path / 'repro'
    argv = ['--method', 'mmn', '--dataset', 'demo', '--out', str(out), '--dry-run']
    assert reproduce.main(argv) == 0
    assert '[1/1] demo mmn seed 0: train and test' in capsys.readouterr().out
    assert run_main(lambda: reproduce.main(argv + ['--lambda_1', '0.5'])) == 2
    assert '--lambda_1' in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bf16_autocast_trains_and_tests_an_mmn(llcm_root, tmp_path, capsys):
    argv = train_argv('llcm', llcm_root, str(tmp_path), '--method', 'mmn', '--epochs', 1,
                      '--max-steps', 2, '--amp', 'bf16', '--eval-every', 0)
    assert training.main(argv) == 0
    checkpoint = tmp_path / 'models' / 'llcm_mmn_last.pth'
    assert all(torch.isfinite(v).all() for v in load_checkpoint(checkpoint)['criterion'].values()
               if v.is_floating_point())
    run_test_py('llcm', llcm_root, checkpoint, tmp_path / 'bf16.json', '--trial', 0, '--amp', 'bf16')
    assert 'llcm ir_to_vis' in capsys.readouterr().out


def test_two_torchrun_processes_train_mmn_in_lock_step(llcm_root, tmp_path):
    from test_distributed import run_probe
    result, (rank0, rank1) = run_probe(tmp_path, train_argv('llcm', llcm_root, str(tmp_path),
                                                            '--method', 'mmn', '--epochs', 1,
                                                            '--max-steps', 2, '--eval-every', 0))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(rank0['weights']) == 2 and rank0['weights'] == rank1['weights']
    refused, _ = run_probe(tmp_path / 'head', train_argv('llcm', llcm_root, str(tmp_path / 'head'),
                                                          '--method', 'mmn', '--mmn-train-dcl-head'))
    assert refused.returncode != 0 and '--mmn-train-dcl-head trains a head outside' in refused.stderr


def test_a_test_size_without_four_stripes_is_refused_naming_img_h():
    from checks import check_network_input
    model = tiny_model().eval()
    check_network_input(model, 'mmn', 64, 32)
    with pytest.raises(UserError, match=r'^--img_h 96 x --img_w 32 does not fit the MMN network: '
                                        r'.*6 rows high \(3 stripes\); use --img_h 49-64'):
        check_network_input(model, 'mmn', 96, 32)
