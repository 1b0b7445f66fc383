"""Training losses: identity cross-entropy, batch-hard triplet, center-guided pair mining (CPM), the
orthogonal term of DEEN, the ADP triplet family of CAJ (AGW's weighted regularised triplet is its
square-off, alpha = gamma = 1 case), and the per-method criterion."""
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


ADP_CLAMP = 88.0  # CAJ's clamp of the squared hinge (exp(88) is near float32's largest value)


@full_precision
def adp_distances(embeddings, labels, alpha=1.0):
    """(weighted furthest positive [N], weighted closest negative [N]) of every anchor: the
    batch distances of its positives and negatives, each averaged with softmax weights of
    alpha x the distances (positives) or -alpha x the distances (negatives)."""
    dist = pairwise_distance(embeddings, embeddings)
    positive = same_identity(labels).to(dist.dtype)
    negative = 1 - positive
    dist_positive, dist_negative = dist * positive, dist * negative
    positive_weights = softmax_weights(_scaled(dist_positive, alpha), positive)
    negative_weights = softmax_weights(_scaled(-dist_negative, alpha), negative)
    furthest_positive = (dist_positive * positive_weights).sum(1)
    closest_negative = (dist_negative * negative_weights).sum(1)
    return furthest_positive, closest_negative


def _scaled(value, factor):
    """value * factor; at factor 1 value itself, so that the default's autograd graph (and its
    gradients, bit for bit) is AGW's."""
    return value if factor == 1 else value * factor


@full_precision
def adp_ranking(furthest_positive, closest_negative, gamma=1.0, square=False):
    """The ADP hinge of CAJ, mean over anchors, on adp_distances' output. square=False: the soft
    margin log(1 + exp(gamma (d_p - d_n))). square=True: s = min(gamma (d_p - d_n)^2, 88) and
    log(1 + exp(s)) for an anchor whose positive is farther than its negative, else
    log(1 + exp(-s)); an anchor at the clamp has zero gradient."""
    gap = furthest_positive - closest_negative
    if not square:
        return F.softplus(_scaled(gap, gamma)).mean()
    clamped = _scaled(gap.pow(2), gamma).clamp(max=ADP_CLAMP)
    sign = torch.where(gap > 0, 1.0, -1.0)
    return F.softplus(sign * clamped).mean()


def adp_saturated(furthest_positive, closest_negative, gamma=1.0, square=False):
    """Whether every anchor of the ADP triplet sits at the clamp (zero gradient for the batch);
    never with square=False."""
    gap = (furthest_positive - closest_negative).detach()
    return bool(square) and bool((gap.pow(2) * gamma > ADP_CLAMP).all())


@full_precision
def adp_triplet_loss(embeddings, labels, alpha=1.0, gamma=1.0, square=False):
    """CAJ's TripletLoss_ADP on embeddings [N, D]: adp_ranking of adp_distances."""
    return adp_ranking(*adp_distances(embeddings, labels, alpha), gamma, square)


def weighted_regularized_triplet_loss(embeddings, labels):
    """AGW's weighted regularised triplet: softmax-weighted positive and negative distances per
    anchor (weights from the distances themselves), soft margin log(1 + exp(d_p - d_n)), mean;
    the ADP triplet with alpha = gamma = 1, square off."""
    return adp_triplet_loss(embeddings, labels)


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

    def __init__(self, margin=0.3, cpm_margin=0.2, lambda_1=0.8, lambda_2=0.01, views=2):
        super().__init__()
        self.margin, self.cpm_margin = margin, cpm_margin
        self.lambda_1, self.lambda_2 = lambda_1, lambda_2
        self.views = views

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
        """Sum over the generated branches of CPM([orig; generated]). CPM pairs each person's
        visible and infrared centres, so with more than two views (channel augmentation's
        [visible; visible channel-exchanged; infrared]) it takes the first view (the visible
        one) and the last (infrared) of every branch; the extra views enter the identity and
        triplet terms only."""
        per_view = len(labels) // self.views
        rows = torch.arange(len(labels), device=labels.device)
        keep = torch.cat([rows[:per_view], rows[-per_view:]])
        original, *generated = (branch[keep] for branch in pool.chunk(branches))
        pair_labels = labels[keep].repeat(2)
        return sum(center_pair_mining_loss(torch.cat([original, branch]), pair_labels, self.cpm_margin)
                   for branch in generated)


class TripletCriterion(nn.Module):
    """L = L_id + L_adp: AGW (alpha = gamma = 1, square off: its weighted regularised triplet)
    and CAJ (its README: alpha = gamma = 1, square on). One embedding per image and labels in
    the batch order, whatever the views ([visible; infrared], or CAJ's [visible; visible
    channel-exchanged; infrared]). Counts the steps whose triplet term was saturated (every
    anchor at the clamp: zero gradient), for the trainer's stall warning (take_stall_count)."""

    def __init__(self, alpha=1.0, gamma=1.0, square=False):
        super().__init__()
        self.alpha, self.gamma, self.square = alpha, gamma, square
        self.saturated_steps = 0

    def forward(self, out, labels):
        positive, negative = adp_distances(out.pool, labels, self.alpha)
        parts = {'id': identity_loss(out.logits, labels),
                 'tri': adp_ranking(positive, negative, self.gamma, self.square)}
        self.saturated_steps += adp_saturated(positive, negative, self.gamma, self.square)
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}

    def take_stall_count(self):
        """The steps with a saturated triplet term since the last call; resets the count."""
        count, self.saturated_steps = self.saturated_steps, 0
        return count



def build_criterion(method, margin=0.3, cpm_margin=0.2, lambda_1=0.8, lambda_2=0.01, views=2,
                    adp_alpha=1.0, adp_gamma=1.0, adp_square=None):
    """The loss of a method: 'deen' (parts id, tri, cpm, ort), 'agw' or 'caj' (parts id, tri:
    the ADP triplet; adp_square None: the method's own, AGW off, CAJ on). views: how many
    views a sample has (DEENCriterion)."""
    if method == 'deen':
        return DEENCriterion(margin, cpm_margin, lambda_1, lambda_2, views)
    if method in ('agw', 'caj'):
        square = (method == 'caj') if adp_square is None else adp_square
        return TripletCriterion(adp_alpha, adp_gamma, square)
    raise ValueError(f'unknown method {method!r}; expected deen, agw or caj')
