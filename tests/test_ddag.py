"""DDAG (methods/ddag.py): each module against a direct transcription of its formula on small
inputs (the part pooling, IWPA, the graph attention layer with its masking, CGSA, the adjacency),
the network's two modes, and the criterion's w_G across epochs and across a save/load."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.ddag import (DDAG, DDAGCriterion, DDAGOutput, GraphAttention, GraphAttentionLayer,
                          PartAttention, identity_graph, part_pool)

TOL = dict(rtol=1e-5, atol=1e-6)


def leaky(value, slope=0.2):
    return value if value > 0 else slope * value


@pytest.mark.parametrize('height', [3, 4, 5, 18])
def test_part_pool_is_adaptive_average_pooling(height):
    x = torch.randn(2, 3, height, 2)
    expected = F.adaptive_avg_pool2d(x, (3, 1))[..., 0]
    torch.testing.assert_close(part_pool(x, 3), expected, **TOL)


def test_part_attention_matches_its_formula():
    torch.manual_seed(0)
    channels, parts = 4, 3
    module = PartAttention(channels, parts)
    with torch.no_grad():
        module.gate.copy_(torch.tensor([0.2, -0.5, 1.0]))
    x, feat = torch.randn(5, channels, 6, 2), torch.randn(5, channels)
    got = module(x, feat)

    def conv(layer, vector):
        return layer.weight[:, :, 0, 0] @ vector + layer.bias

    gate = [math.exp(g) for g in module.gate.tolist()]
    gate = [g / sum(gate) for g in gate]
    summed = []
    for n in range(len(x)):
        stripes = [x[n, :, 2 * p:2 * p + 2].mean((1, 2)) for p in range(parts)]  # 6 rows / 3 parts
        q = [conv(module.fc1, s) for s in stripes]
        k = [conv(module.fc2, s) for s in stripes]
        v = [conv(module.fc3, s) for s in stripes]
        out = feat[n].clone()
        for i in range(parts):
            scores = torch.stack([q[i] @ k[j] for j in range(parts)])
            weights = scores.exp() / scores.exp().sum()
            refined = sum(weights[j] * v[j] for j in range(parts))
            out = out + gate[i] * refined
        summed.append(out)
    summed = torch.stack(summed)
    bn = module.bottleneck  # training mode: batch statistics, biased variance
    expected = (summed - summed.mean(0)) / torch.sqrt(summed.var(0, unbiased=False) + bn.eps)
    expected = expected * bn.weight + bn.bias
    torch.testing.assert_close(got, expected, **TOL)
    assert module.gate.requires_grad and not module.bottleneck.bias.requires_grad
    assert not hasattr(module, 'W')  # the released, unused W conv + BN is not built


def test_part_attention_gate_starts_at_one_third():
    assert PartAttention(8).gate.tolist() == pytest.approx([1 / 3] * 3)


@torch.no_grad()
def transcribed_layer(layer, x, adj):
    """attention.py's dense GAT layer in eval mode, element by element."""
    h = x @ layer.W
    out_dim = h.shape[1]
    a1, a2 = layer.a[:out_dim, 0], layer.a[out_dim:, 0]
    rows = []
    for i in range(len(x)):
        logits = [leaky(float(a1 @ h[i] + a2 @ h[j])) if adj[i, j] > 0 else -9e15
                  for j in range(len(x))]
        top = max(logits)
        weights = [math.exp(value - top) for value in logits]
        rows.append(sum(w / sum(weights) * h[j] for j, w in enumerate(weights)))
    return torch.stack(rows)


def test_graph_attention_layer_matches_its_formula_and_masks_non_edges():
    torch.manual_seed(1)
    layer = GraphAttentionLayer(6, 3).eval()
    x = torch.randn(4, 6)
    adj = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 0, 1]]).float()
    got = layer(x, adj)
    torch.testing.assert_close(got, transcribed_layer(layer, x, adj), **TOL)
    h = x @ layer.W
    torch.testing.assert_close(got[3], h[3], **TOL)  # its only edge is itself
    x_changed = x.clone()
    x_changed[1] += 5.0  # not an edge of rows 0, 2 and 3: their outputs do not move
    changed = layer(x_changed, adj)
    torch.testing.assert_close(changed[[0, 2, 3]], got[[0, 2, 3]], **TOL)


def test_graph_attention_layer_drops_coefficients_in_training():
    torch.manual_seed(2)
    layer = GraphAttentionLayer(6, 3, dropout=0.5)
    x, adj = torch.randn(8, 6), torch.ones(8, 8)
    assert not torch.allclose(layer.train()(x, adj), layer.eval()(x, adj))


def test_graph_attention_matches_its_formula():
    torch.manual_seed(3)
    module = GraphAttention(6, 2, num_classes=5, heads=4).eval()
    x = torch.randn(4, 6)
    adj = identity_graph(torch.tensor([0, 1, 0, 2]))
    hidden = torch.cat([F.elu(transcribed_layer(head, x, adj)) for head in module.heads], dim=1)
    expected = F.log_softmax(F.elu(transcribed_layer(module.out, hidden, adj)), dim=1)
    torch.testing.assert_close(module(x, adj), expected, **TOL)
    assert [tuple(head.W.shape) for head in module.heads] == [(6, 2)] * 4
    assert tuple(module.out.W.shape) == (8, 5)


def test_identity_graph_links_same_identity_across_modalities():
    labels = torch.tensor([3, 1, 3, 1])  # [visible; infrared]
    expected = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 0, 1]]).float()
    assert torch.equal(identity_graph(labels), expected)


@pytest.fixture(scope='module')
def ddag_net():
    torch.manual_seed(0)
    return DDAG(num_classes=3, arch='resnet18')


def test_network_training_and_eval_outputs(ddag_net):
    visible, infrared = torch.randn(4, 3, 64, 32), torch.randn(4, 3, 64, 32)
    labels = torch.tensor([0, 0, 1, 2] * 2)
    ddag_net.train()
    out = ddag_net(visible=visible, infrared=infrared, labels=labels)
    assert isinstance(out, DDAGOutput)
    assert [tuple(t.shape) for t in out] == [(8, 512), (8, 3), (8, 3), (8, 3)]
    torch.testing.assert_close(out.graph.exp().sum(1), torch.ones(8), **TOL)
    total, _ = DDAGCriterion()(out, labels)
    ddag_net.zero_grad()
    total.backward()
    unused = [name for name, p in ddag_net.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []  # DDP needs every parameter used in training
    with pytest.raises(ValueError, match='labels'):
        ddag_net(visible=visible, infrared=infrared)
    ddag_net.eval()
    with torch.no_grad():
        feat, att = ddag_net(visible=visible)
    for kind in (feat, att):
        assert kind.shape == (4, 512) and kind.dtype == torch.float32
        torch.testing.assert_close(kind.norm(dim=1), torch.ones(4), **TOL)
    assert not torch.allclose(feat, att)


def fake_output(seed, batch=4, classes=3, dim=5):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, classes, generator=generator)
    return DDAGOutput(torch.randn(batch, dim, generator=generator), logits,
                      torch.randn(batch, classes, generator=generator),
                      torch.randn(batch, classes, generator=generator).log_softmax(1))


LABELS = {4: torch.tensor([0, 1, 0, 1]), 8: torch.tensor([0, 1, 2, 0, 0, 1, 2, 0])}


def test_criterion_terms_and_graph_weight_across_epochs():
    criterion = DDAGCriterion()
    epoch0 = [fake_output(0, batch=4), fake_output(1, batch=8)]
    seen = []
    for out in epoch0:
        labels = LABELS[len(out.pool)]
        total, parts = criterion(out, labels)
        base = (F.cross_entropy(out.logits, labels) + F.cross_entropy(out.att_logits, labels)
                + triplet(out.pool, labels))
        torch.testing.assert_close(total, base, **TOL)  # w_G = 0 in the first epoch
        assert set(parts) == {'id', 'tri', 'att', 'graph'} and float(parts['graph']) == 0.0
        seen.append((float(base), len(labels)))
    criterion.end_epoch(0)
    mean = sum(loss * n for loss, n in seen) / sum(n for _, n in seen)  # weighted by batch size
    assert float(criterion.graph_weight) == pytest.approx(1 / (1 + mean), rel=1e-6)
    assert float(criterion.loss_count) == 0.0
    out, labels = fake_output(2), LABELS[4]
    total, parts = criterion(out, labels)
    expected_graph = float(criterion.graph_weight) * F.nll_loss(out.graph, labels)
    torch.testing.assert_close(parts['graph'], expected_graph.float(), **TOL)
    torch.testing.assert_close(sum(parts.values()), total.detach(), **TOL)


def triplet(pool, labels, margin=0.3):
    """Batch-hard triplet, anchor by anchor."""
    dist = torch.cdist(pool, pool)
    losses = []
    for i in range(len(pool)):
        positive = max(dist[i, j] for j in range(len(pool)) if labels[j] == labels[i])
        negative = min(dist[i, j] for j in range(len(pool)) if labels[j] != labels[i])
        losses.append(torch.relu(positive - negative + margin))
    return torch.stack(losses).mean()


def test_graph_weight_resumes_exactly_from_a_mid_epoch_state(tmp_path):
    batches = [fake_output(seed, batch=4) for seed in range(5)]
    uninterrupted = DDAGCriterion()
    for epoch, chunk in enumerate([batches[:2], batches[2:]]):
        for out in chunk:
            uninterrupted(out, LABELS[4])
        uninterrupted.end_epoch(epoch)

    first = DDAGCriterion()
    for out in batches[:2]:
        first(out, LABELS[4])
    first.end_epoch(0)
    first(batches[2], LABELS[4])
    torch.save(first.state_dict(), tmp_path / 'criterion.pt')  # inside epoch 1
    resumed = DDAGCriterion()
    resumed.load_state_dict(torch.load(tmp_path / 'criterion.pt', weights_only=True))
    for out in batches[3:]:
        resumed(out, LABELS[4])
    resumed.end_epoch(1)
    assert float(resumed.graph_weight) == float(uninterrupted.graph_weight) != 0.0
