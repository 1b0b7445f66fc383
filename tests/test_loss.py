"""Tests of loss.py: each vectorised loss equals a per-sample loop written from METHOD.md (values and
gradients, float64), a hand-checked triplet case, bf16 autocast inputs, and the criteria."""
import pytest
import torch
import torch.nn.functional as F

from loss import (batch_hard_triplet_loss, build_criterion, center_pair_mining_loss,
                  orthogonal_loss, weighted_regularized_triplet_loss)
from model import TrainOutput


def distance(a, b):
    return ((a - b) ** 2).sum().clamp(min=1e-12).sqrt()


def triplet_loop(x, labels, margin=0.3):
    losses = []
    for i in range(len(x)):
        row = torch.stack([distance(x[i], x[j]) for j in range(len(x))])
        hardest_positive = row[labels == labels[i]].max()
        hardest_negative = row[labels != labels[i]].min()
        losses.append(F.relu(hardest_positive - hardest_negative + margin))
    return torch.stack(losses).mean()


def cpm_loop(x, labels, margin=0.2):
    """CPM as METHOD.md writes it, one identity at a time."""
    groups = x.chunk(4)
    ids = labels.chunk(4)[0]
    unique_ids = sorted(set(ids.tolist()))
    # centres[g][i]: mean of group g's rows of identity i
    centres = [[group[ids == pid].mean(0) for pid in unique_ids] for group in groups]
    count = len(unique_ids)

    def h(anchors, positives):
        return torch.stack([F.relu(p - a + margin) for a, p in zip(anchors, positives)]).mean()

    def nearest_other(c):
        return [min(distance(c[i], c[j]) for j in range(count) if j != i) for i in range(count)]

    def direction(source, generated, other):  # L_v: (c1, c3, c2); L_i: (c2, c4, c1)
        positive = [distance(other[i], generated[i]) for i in range(count)]
        anchor = [distance(source[i], generated[i]).detach() for i in range(count)]
        return (h(anchor, positive) + 0.5 * h(nearest_other(generated), positive)
                + 0.5 * h(nearest_other(source), positive))

    orig_visible, orig_infrared, gen_visible, gen_infrared = centres
    return (direction(orig_visible, gen_visible, orig_infrared)
            + direction(orig_infrared, gen_infrared, orig_visible)) / 2


def orthogonal_loop(pool):
    _, first, second = pool.chunk(3)
    return sum(torch.dot(first[i], second[i]) for i in range(len(first))) / len(pool)


def wrt_loop(x, labels):
    losses = []
    for i in range(len(x)):
        row = torch.stack([distance(x[i], x[j]) for j in range(len(x))])
        positive, negative = row[labels == labels[i]], row[labels != labels[i]]
        # the released shift is the row max of (d * mask), masked entries counting as 0
        positive_weights = torch.exp(positive - positive.max())
        positive_weights = positive_weights / (positive_weights.sum() + 1e-6)
        negative_shift = torch.cat([-negative, negative.new_zeros(1)]).max()
        negative_weights = torch.exp(-negative - negative_shift)
        negative_weights = negative_weights / (negative_weights.sum() + 1e-6)
        gap = (positive * positive_weights).sum() - (negative * negative_weights).sum()
        losses.append(torch.log1p(torch.exp(gap)))
    return torch.stack(losses).mean()


def balanced_labels(ids, per_id, groups=1):
    """[id0 x per_id, id1 x per_id, ...] repeated for each group."""
    return torch.tensor(ids).repeat_interleave(per_id).repeat(groups)


def assert_same_value_and_gradient(fast, slow, x, *args):
    x_fast = x.clone().requires_grad_()
    x_slow = x.clone().requires_grad_()
    value_fast, value_slow = fast(x_fast, *args), slow(x_slow, *args)
    value_fast.backward()
    value_slow.backward()
    torch.testing.assert_close(value_fast, value_slow)
    torch.testing.assert_close(x_fast.grad, x_slow.grad)
    assert value_fast.item() > 0  # the comparison covered a non-trivial case


def test_triplet_matches_loop():
    torch.manual_seed(0)
    labels = balanced_labels([3, 1, 4, 0], per_id=3)[torch.randperm(12)]
    x = torch.randn(12, 16, dtype=torch.float64)
    assert_same_value_and_gradient(batch_hard_triplet_loss, triplet_loop, x, labels, 0.3)


def test_triplet_hand_checked():
    # 1-D points: id 0 at 0 and 1, id 1 at 3 and 5. Only the anchor at 3 violates the margin:
    # farthest positive 2 (to 5), nearest negative 2 (to 1) -> 0.3; mean over 4 anchors 0.075.
    x = torch.tensor([[0.0], [1.0], [3.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    assert batch_hard_triplet_loss(x, labels, 0.3).item() == pytest.approx(0.075, abs=1e-6)
    assert batch_hard_triplet_loss(x, labels, 0.0).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize('ids', [[5, 2, 7], [0, 1, 2, 3, 4]])
def test_cpm_matches_loop(ids):
    torch.manual_seed(len(ids))
    per_group = balanced_labels(ids, per_id=4)
    labels = per_group.repeat(4)
    x = torch.randn(len(labels), 8, dtype=torch.float64)
    assert_same_value_and_gradient(center_pair_mining_loss, cpm_loop, x, labels, 0.2)


def test_cpm_interleaved_and_unequal_identity_counts_match_loop():
    torch.manual_seed(3)
    per_group = torch.tensor([4, 9, 4, 1, 9, 9, 1])    # ids interleaved, 3 / 2 / 2 rows
    labels = per_group.repeat(4)
    x = torch.randn(len(labels), 6, dtype=torch.float64)
    assert_same_value_and_gradient(center_pair_mining_loss, cpm_loop, x, labels, 0.2)


def test_cpm_single_identity_has_no_negative_terms():
    torch.manual_seed(4)
    labels = torch.zeros(8, dtype=torch.long)
    x = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    value = center_pair_mining_loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_orthogonal_matches_loop_and_released_formula():
    torch.manual_seed(5)
    pool = torch.randn(18, 10, dtype=torch.float64)
    assert_same_value_and_gradient(orthogonal_loss, orthogonal_loop, pool.abs())
    # the released form: per input image the upper triangle of the 2x2 Gram matrix of (gen1, gen2)
    _, first, second = pool.chunk(3)
    pairs = torch.stack([first, second], dim=1)                       # [N, 2, D]
    released = torch.triu(pairs @ pairs.transpose(1, 2), diagonal=1).sum() / len(pool)
    torch.testing.assert_close(orthogonal_loss(pool), released)


def test_weighted_regularized_triplet_matches_loop():
    torch.manual_seed(6)
    labels = balanced_labels([2, 8, 5], per_id=4)[torch.randperm(12)]
    x = torch.randn(12, 16, dtype=torch.float64)
    assert_same_value_and_gradient(weighted_regularized_triplet_loss, wrt_loop, x, labels)


def test_losses_under_bf16_autocast_are_finite_and_close():
    torch.manual_seed(7)
    labels = balanced_labels([0, 1, 2], per_id=4, groups=4)
    x = torch.randn(len(labels), 64) + 2.0
    rounded = x.bfloat16()
    with_labels = [batch_hard_triplet_loss, center_pair_mining_loss, weighted_regularized_triplet_loss]
    for loss_fn in with_labels + [orthogonal_loss]:
        args = (labels,) if loss_fn in with_labels else ()
        with torch.autocast('cpu', dtype=torch.bfloat16):
            value = loss_fn(rounded, *args)
        reference = loss_fn(x, *args)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        torch.testing.assert_close(value, reference, rtol=2e-2, atol=2e-2)


def fake_output(batch, dim, classes, branches, seed=8):
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(branches * batch, dim, generator=generator, dtype=torch.float64)
    logits = torch.randn(branches * batch, classes, generator=generator, dtype=torch.float64)
    ortho = orthogonal_loss(pool) if branches == 3 else None
    return TrainOutput(pool, logits, ortho)


def test_deen_criterion_combines_the_terms():
    ids = balanced_labels([0, 3, 1], per_id=2)
    labels = torch.cat([ids, ids])                        # [visible; infrared]
    out = fake_output(len(labels), 12, 4, branches=3)
    total, parts = build_criterion('deen', lambda_1=0.8, lambda_2=0.01)(out, labels)
    repeated = labels.repeat(3)
    original, gen1, gen2 = out.pool.chunk(3)
    pair_labels = torch.cat([labels, labels])
    expected = {
        'id': F.cross_entropy(out.logits.float(), repeated),
        'tri': triplet_loop(out.pool, repeated),
        'cpm': 0.8 * (cpm_loop(torch.cat([original, gen1]), pair_labels)
                      + cpm_loop(torch.cat([original, gen2]), pair_labels)),
        'ort': 0.01 * orthogonal_loop(out.pool),
    }
    assert set(parts) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(parts[name].double(), value.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total.double(), sum(expected.values()).double(), rtol=1e-5, atol=1e-6)
    assert not any(value.requires_grad for value in parts.values())


def test_agw_criterion_combines_the_terms():
    ids = balanced_labels([4, 2], per_id=3)
    labels = torch.cat([ids, ids])
    out = fake_output(len(labels), 12, 5, branches=1)
    total, parts = build_criterion('agw')(out, labels)
    expected = F.cross_entropy(out.logits.float(), labels) + wrt_loop(out.pool, labels)
    assert set(parts) == {'id', 'tri'}
    torch.testing.assert_close(total.double(), expected.double(), rtol=1e-5, atol=1e-6)
