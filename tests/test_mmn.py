"""MMN: each module against a direct transcription of its formula on small inputs (generator,
stripes, four-pair triplet, consistency term, the frozen seeded head)."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.mmn import (MMN, MMNCriterion, MMNOutput, MiddleModalityGenerator,
                         check_stripe_rows, consistency_loss, four_pair_triplet_loss,
                         horizontal_stripes, seeded_consistency_head)
from utils import UserError


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
