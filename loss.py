"""Training losses: identity cross-entropy, batch-hard triplet, center-guided pair mining (CPM), the
orthogonal term of DEEN, AGW's weighted regularised triplet, and the per-method criterion."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Distances (always fp32 or wider, also under autocast)

def full_precision(loss_fn):
    """Run loss_fn with autocast off and its floating tensor arguments in fp32 (fp64 stays fp64),
    so that distances and hinges are not computed in bf16/fp16 under torch.autocast."""
    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if torch.is_tensor(a))
        with torch.autocast(device, enabled=False):
            return loss_fn(*[_widen(a) for a in args], **{k: _widen(v) for k, v in kwargs.items()})
    return wrapper


def _widen(value):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(torch.promote_types(value.dtype, torch.float32))
    return value


def pairwise_distance(x, y):
    """Euclidean distances [M, N] between the rows of x [M, D] and y [N, D]; squared distances are
    clamped at 1e-12 before the square root (as in the released code)."""
    squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1) - 2 * x @ y.T
    return squared.clamp(min=1e-12).sqrt()


def rowwise_distance(x, y):
    """Euclidean distance [N] between row i of x and row i of y (clamped like pairwise_distance)."""
    return (x - y).pow(2).sum(1).clamp(min=1e-12).sqrt()


def same_identity(labels):
    """[N, N] bool: labels[i] == labels[j]."""
    return labels[:, None] == labels[None, :]


# ----------------------------------------------------------------------------------------------
# Loss terms

@full_precision
def batch_hard_triplet_loss(embeddings, labels, margin=0.3):
    """Batch-hard triplet over all rows of embeddings [N, D]: for each anchor the farthest positive
    and the nearest negative, hinge relu(d_ap - d_an + margin), mean over anchors."""
    dist = pairwise_distance(embeddings, embeddings)
    same = same_identity(labels)
    hardest_positive = dist.masked_fill(~same, float('-inf')).amax(1)
    hardest_negative = dist.masked_fill(same, float('inf')).amin(1)
    return F.relu(hardest_positive - hardest_negative + margin).mean()


@full_precision
def center_pair_mining_loss(embeddings, labels, margin=0.2):
    """CPM of DEEN on one (original, generated) pair; METHOD.md states the formula.

    embeddings [4B, D] = [orig visible; orig infrared; generated visible; generated infrared] and
    labels [4B] in the same layout, each group holding the same identities in the same order (the
    first group's labels are used). Identity centres are per-row (each row gets the centre of its
    identity), and each row is weighted 1/(#rows of its id * #ids), so every mean below is the
    mean over identities without a loop or a data-dependent shape.
    """
    batch = len(embeddings) // 4
    groups = embeddings.reshape(4, batch, -1)                      # [4, B, D]
    same = same_identity(labels[:batch])                           # [B, B]
    members = same.to(groups.dtype)
    centres = (members / members.sum(1, keepdim=True)) @ groups    # [4, B, D], row i: centre of i's id
    orig_visible, orig_infrared, gen_visible, gen_infrared = centres
    identity_weight = 1.0 / members.sum(1)
    identity_weight = identity_weight / identity_weight.sum()     # [B], sums to 1 over identities

    def hinge(anchor, positive):  # mean over identities of relu(positive - anchor + margin)
        return (identity_weight * F.relu(positive - anchor + margin)).sum()

    def nearest_other_identity(centre):  # min_{j != i} d(c_i, c_j), +inf with a single identity
        return pairwise_distance(centre, centre).masked_fill(same, float('inf')).amin(1)

    def pull_generated(generated, source, other_modality):
        positive = rowwise_distance(other_modality, generated)
        return (hinge(rowwise_distance(source, generated).detach(), positive)
                + 0.5 * hinge(nearest_other_identity(generated), positive)
                + 0.5 * hinge(nearest_other_identity(source), positive))

    visible = pull_generated(gen_visible, orig_visible, orig_infrared)
    infrared = pull_generated(gen_infrared, orig_infrared, orig_visible)
    return (visible + infrared) / 2


@full_precision
def orthogonal_loss(pool, num_branches=3):
    """DEEN's orthogonal term, the released upper-triangle sum over every pair of generated
    embeddings of the same image: sum_{j<l} sum_i <gen_j,i, gen_l,i> / (num_branches * N) for
    pool [kN, D] in the order [orig; gen1; ...; gen_(k-1)] (released: k = 3, the one pair
    <gen1, gen2>). Needs two generated embeddings."""
    _, *generated = pool.chunk(num_branches)
    pairs = [(first * second).sum() for j, first in enumerate(generated)
             for second in generated[j + 1:]]
    return sum(pairs) / len(pool)


def softmax_weights(dist, mask):
    """Row-wise softmax of dist over the entries where mask is 1 (released AGW formulation)."""
    shift = (dist * mask).amax(1, keepdim=True)
    exp = torch.exp(dist - shift) * mask
    return exp / (exp.sum(1, keepdim=True) + 1e-6)


@full_precision
def weighted_regularized_triplet_loss(embeddings, labels):
    """AGW's weighted regularised triplet: softmax-weighted positive and negative distances per
    anchor (weights from the distances themselves), soft margin log(1 + exp(d_p - d_n)), mean."""
    dist = pairwise_distance(embeddings, embeddings)
    positive = same_identity(labels).to(dist.dtype)
    negative = 1 - positive
    dist_positive, dist_negative = dist * positive, dist * negative
    furthest_positive = (dist_positive * softmax_weights(dist_positive, positive)).sum(1)
    closest_negative = (dist_negative * softmax_weights(-dist_negative, negative)).sum(1)
    return F.softplus(furthest_positive - closest_negative).mean()


def identity_loss(logits, labels):
    """Cross-entropy over all rows, in fp32."""
    return F.cross_entropy(logits.float(), labels)


# ----------------------------------------------------------------------------------------------
# Criteria the training loop calls: criterion(TrainOutput, labels) -> (total, parts)

class DEENCriterion(nn.Module):
    """L = L_id + L_tri + lambda_1 sum_j CPM(orig, gen_j) + lambda_2 L_ort.

    labels [2B] = [visible; infrared] of the input batch; the model's outputs hold k branches
    [orig; gen1; ...] (released: 3), each [visible; infrared], so labels are repeated per branch.
    Without generated embeddings (no DEE) there is no 'cpm' part, without a pair of them no
    'ort'. The parts are detached and already weighted ('cpm' includes lambda_1, 'ort'
    lambda_2): they sum to L.
    """

    def __init__(self, margin=0.3, cpm_margin=0.2, lambda_1=0.8, lambda_2=0.01):
        super().__init__()
        self.margin, self.cpm_margin = margin, cpm_margin
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2

    def forward(self, out, labels):
        branches = len(out.pool) // len(labels)
        branch_labels = labels.repeat(branches)
        parts = {
            'id': identity_loss(out.logits, branch_labels),
            'tri': batch_hard_triplet_loss(out.pool, branch_labels, self.margin),
        }
        if branches > 1:  # generated embeddings to pull (no DEE: the baseline's id + triplet)
            parts['cpm'] = self.lambda_1 * self.pair_mining(out.pool, labels, branches)
        if out.ortho is not None:  # a pair of generated embeddings
            parts['ort'] = self.lambda_2 * out.ortho.float()
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}

    def pair_mining(self, pool, labels, branches):
        """Sum over the generated branches of CPM([orig; generated])."""
        original, *generated = pool.chunk(branches)
        pair_labels = torch.cat([labels, labels])
        return sum(center_pair_mining_loss(torch.cat([original, branch]), pair_labels, self.cpm_margin)
                   for branch in generated)


class AGWCriterion(nn.Module):
    """L = L_id + L_wrt (AGW); labels [2B] = [visible; infrared], one embedding per image."""

    def forward(self, out, labels):
        parts = {'id': identity_loss(out.logits, labels),
                 'tri': weighted_regularized_triplet_loss(out.pool, labels)}
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}


def build_criterion(method, margin=0.3, cpm_margin=0.2, lambda_1=0.8, lambda_2=0.01):
    """The loss of a method: 'deen' (parts id, tri, cpm, ort) or 'agw' (parts id, tri)."""
    if method == 'deen':
        return DEENCriterion(margin, cpm_margin, lambda_1, lambda_2)
    if method == 'agw':
        return AGWCriterion()
    raise ValueError(f'unknown method {method!r}; expected deen or agw')
