"""DART (Yang et al., CVPR 2022, "Learning with Twin Noisy Labels for Visible-Infrared Person
Re-Identification"): two AGW networks trained against each other on labels that may be wrong.
This module owns its twin network, its clean-probability division (per-sample identity losses ->
min-max -> two-component Gaussian mixture), its co-divided losses (probability-weighted identity
loss and the four-case robust triplet), the label-noise injection of its published settings and
its Method entry. Facts from the released code (XLearning-SCU/2022-CVPR-DART) are cited as
file:line; none of its text is here."""
import json
import math
import os
import time
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist

from loss import full_precision, pairwise_distance
from methods.base import AGW_SCHEDULE, POOL_FEAT_FUSIONS, Method
from model import AGW, TrainOutput, load_backbone
from utils import UserError, autocast_context, flag, written_atomically

NETWORKS = ('net1', 'net2')
THRESHOLD = 0.5   # run.py:376 (hard-coded; --p-threshold only feeds the printout)
MARGIN = 0.3      # run.py:48 --margin
# run.py:326,331 GaussianMixture(n_components=2, max_iter=100, tol=1e-2, reg_covar=5e-4)
GMM_SETTINGS = dict(n_components=2, max_iter=100, tol=1e-2, reg_covar=5e-4)


# ----------------------------------------------------------------------------------------------
# The twin network

class TwinOutput(NamedTuple):
    """Train-mode output of TwinNetworks: each network's TrainOutput, and the training-set index
    of each row (None when the forward was not given them)."""
    first: TrainOutput
    second: TrainOutput
    indices: Optional[torch.Tensor]


class TwinNetworks(nn.Module):
    """DART's two AGW networks as one module (state dict keys net1.*, net2.*), each built and
    initialised in turn as the released run.py:187-188 builds net1 then net2. Forward API as
    model.TwoStreamNet's: train mode -> TwinOutput(net1's TrainOutput, net2's, indices), both
    networks on the same batch; eval mode -> (pool, feat), each the mean of the two networks'
    L2-normalised features, not renormalised (run.py:424,439, 'feat' is the released test
    feature), k = 1 branch. `indices` (train mode): the training-set index of each row, passed
    through to the criterion (DDP runs the forward, so what the loss needs goes through it)."""

    num_branches = 1

    def __init__(self, num_classes, arch='resnet50'):
        super().__init__()
        self.net1 = AGW(num_classes, arch=arch)
        self.net2 = AGW(num_classes, arch=arch)
        self.arch, self.widths, self.embed_dim = self.net1.arch, self.net1.widths, self.net1.embed_dim

    def networks(self):
        return self.net1, self.net2

    def weights_problem(self, state_dict):
        """What keeps a state dict from being this twin's, where it lacks one of the networks
        (model.load_model_weights reports it), else ''."""
        absent = [name for name in NETWORKS if not any(k.startswith(name + '.') for k in state_dict)]
        if absent:
            return (f'it holds no {" and no ".join(n + ".*" for n in absent)} weights, and a DART '
                    f'checkpoint holds both of its networks (net1.*, net2.*)')
        return ''

    def forward(self, visible=None, infrared=None, indices=None):
        first = self.net1(visible=visible, infrared=infrared)
        second = self.net2(visible=visible, infrared=infrared)
        if self.training:
            return TwinOutput(first, second, indices)
        return tuple((a + b) / 2 for a, b in zip(first, second))


# ----------------------------------------------------------------------------------------------
# Clean probabilities (run.py:290-336)

def min_max(values):
    """values [N] scaled to [0, 1] (all equal: zeros, where the released division gives NaN)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    spread = values.max() - values.min()
    if spread <= 0:
        return torch.zeros_like(values)
    return (values - values.min()) / spread


def clean_probability(losses, seed):
    """The probability that each sample's label is clean, from its per-sample losses: `losses`
    a list of 1-D loss vectors (the views of one modality, e.g. visible and visible
    channel-exchanged), each min-max normalised on its own, then one two-component Gaussian
    mixture over all of them (scikit-learn, GMM_SETTINGS, random_state=seed); a sample's clean
    probability is the posterior of the component with the lower mean. Returns one float32
    tensor per vector of `losses`."""
    from sklearn.mixture import GaussianMixture
    normalised = [min_max(vector) for vector in losses]
    points = torch.cat(normalised).numpy().reshape(-1, 1)
    mixture = GaussianMixture(random_state=seed, **GMM_SETTINGS).fit(points)
    clean = mixture.predict_proba(points)[:, int(np.argmin(mixture.means_.ravel()))]
    return list(torch.from_numpy(clean.astype(np.float32)).split([len(v) for v in normalised]))


# ----------------------------------------------------------------------------------------------
# Losses (run.py:369-378, loss.py:164-280)

def weighted_identity_loss(logits, labels, weights):
    """(1/N) sum_i w_i CE_i (run.py:370-372, 'sid'), in fp32."""
    per_sample = F.cross_entropy(logits.float(), labels, reduction='none')
    return (weights.to(per_sample) * per_sample).sum() / len(labels)


class Triplet(NamedTuple):
    """One anchor's term: d_ap is the mean of its distances to `positive` (one or two columns),
    d_an the mean of those to `negative`; `inverted` swaps them in the hinge."""
    anchor: int
    positive: tuple
    negative: tuple
    inverted: bool


def draw(candidates, generator=None):
    """One element of the list `candidates`, uniformly, from torch's CPU generator."""
    return candidates[int(torch.randint(len(candidates), (1,), generator=generator))]


def clean_positive(positives, clean, threshold, generator=None, tries=5):
    """A random positive, redrawn while its label is noisy, at most `tries` redraws (the last
    draw stands; loss.py:231-238)."""
    positive = draw(positives, generator)
    for _ in range(tries):
        if clean[positive] >= threshold:
            break
        positive = draw(positives, generator)
    return positive


def next_clean_negative(ranked, clean, threshold, steps=10):
    """After the hardest negative ranked[0]: ranked[1], then on while noisy, at most `steps`
    steps (the last one stands; loss.py:205-215); ranked[0] itself when it is the only one."""
    position = min(1, len(ranked) - 1)
    for _ in range(steps):
        if clean[ranked[position]] >= threshold or position + 1 >= len(ranked):
            break
        position += 1
    return ranked[position]


def anchor_triplet(i, dist, labels, predicted, clean, threshold, generator=None):
    """The Triplet of anchor i (loss.py:188-265), or None when it has no other positive or no
    negative in the batch. Positive: random other same-label row; negative: the hardest. Then,
    by the clean probability (>= threshold: clean) of the two:
      clean, clean  -> the standard triplet;
      clean, noisy  -> if the negative is predicted as the anchor's label (a false negative),
                       d_ap = mean(d_p, d_n) and the negative is the next clean one; else standard;
      noisy, clean  -> d_an = mean(d_p, d_n) and a random clean positive;
      noisy, noisy  -> negative predicted as the anchor's label: the inverted hinge; else as
                       noisy, clean.
    dist, labels, predicted, clean: CPU tensors (the distances detached)."""
    same = labels == labels[i]
    positives = [j for j in torch.nonzero(same).flatten().tolist() if j != i]
    negatives = torch.nonzero(~same).flatten()
    if not positives or len(negatives) == 0:
        return None
    ranked = negatives[torch.argsort(dist[i, negatives], stable=True)].tolist()
    positive, negative = draw(positives, generator), ranked[0]
    positive_clean, negative_clean = clean[positive] >= threshold, clean[negative] >= threshold
    false_negative = bool(predicted[negative] == labels[i])
    if positive_clean and (negative_clean or not false_negative):
        return Triplet(i, (positive,), (negative,), False)
    if positive_clean:
        return Triplet(i, (positive, negative),
                       (next_clean_negative(ranked, clean, threshold),), False)
    if not negative_clean and false_negative:
        return Triplet(i, (positive,), (negative,), True)
    return Triplet(i, (clean_positive(positives, clean, threshold, generator),),
                   (positive, negative), False)


def triplet_plan(dist, labels, predicted, clean, threshold=THRESHOLD, generator=None):
    """The Triplet of every confident anchor (clean probability >= threshold), in row order."""
    triplets = (anchor_triplet(i, dist, labels, predicted, clean, threshold, generator)
                for i in range(len(labels)) if clean[i] >= threshold)
    return [t for t in triplets if t is not None]


@full_precision
def robust_triplet_loss(features, logits, labels, clean, threshold=THRESHOLD, margin=MARGIN,
                        generator=None):
    """DART's robust triplet (loss.py:164-280) on pre-BN features [N, D] (Euclidean): the sum over
    confident anchors of relu(d_ap - d_an + margin) (inverted: relu(d_an - d_ap + margin)), over
    their count; 0 without one. logits [N, #ids] (the trained network's, for its predictions),
    clean [N]: the other network's clean probabilities. Random positives come from torch's CPU
    generator (`generator`, default: the global one). Returns (loss, #anchors)."""
    dist = pairwise_distance(features, features)
    plan = triplet_plan(dist.detach().cpu(), labels.cpu(), logits.detach().argmax(1).cpu(),
                        clean.detach().cpu(), threshold, generator)
    if not plan:
        return dist.sum() * 0, 0
    device = features.device

    def mean_distance(columns):  # one or two columns per anchor: (d1 + d2) / 2 (d1 = d2: d1)
        first = torch.tensor([c[0] for c in columns], device=device)
        second = torch.tensor([c[-1] for c in columns], device=device)
        return (dist[anchors, first] + dist[anchors, second]) / 2

    anchors = torch.tensor([t.anchor for t in plan], device=device)
    d_ap, d_an = mean_distance([t.positive for t in plan]), mean_distance([t.negative for t in plan])
    sign = torch.tensor([-1.0 if t.inverted else 1.0 for t in plan], device=device)
    return F.relu(sign * (d_ap - d_an) + margin).sum() / len(plan), len(plan)


# ----------------------------------------------------------------------------------------------
# Label noise (data_loader.py:64-121)

def inject_label_noise(labels, rate, seed):
    """Replace ceil(rate * N) of the labels by another identity: which ones uniformly without
    replacement, each new label uniformly among the identities of `labels` other than its own
    (data_loader.py:96-106), from numpy's generator seeded by `seed` (the released code draws the
    new labels from OS entropy). Returns (noisy labels, sorted indices of the replaced ones)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    count = math.ceil(rate * len(labels))
    replaced = np.sort(rng.choice(len(labels), count, replace=False))
    identities = np.unique(labels)
    noisy = labels.copy()
    for index in replaced:
        others = identities[identities != labels[index]]
        noisy[index] = others[rng.integers(len(others))]
    return noisy, replaced


def noisy_training_labels(labels_by_modality, rate, seed, attempts=100):
    """Noise of `rate` injected into each modality's training labels ({modality: labels}),
    seeded by (seed, modality position, attempt): the first attempt that leaves every identity
    at least one image in each modality (RegDB's rule in the released data_loader.py:248-262,
    here for every dataset: the sampler needs every identity in both). Returns {modality:
    (noisy labels, replaced indices)}."""
    identities = set(np.unique(np.concatenate([np.asarray(v) for v in labels_by_modality.values()])))
    for attempt in range(attempts):
        result = {name: inject_label_noise(labels, rate, [seed, position, attempt])
                  for position, (name, labels) in enumerate(labels_by_modality.items())}
        if all(set(np.unique(noisy)) == identities for noisy, _ in result.values()):
            return result
    raise ValueError(f'no noise draw of rate {rate} in {attempts} attempts leaves every identity '
                     f'an image in each modality')


# ----------------------------------------------------------------------------------------------
# The division pass (run.py:290-336, 478-516; utils.py:218-242)

def division_order(num_visible, num_infrared, batch, rng):
    """The released AllSampler generalised: each modality's indices 0..N-1 padded with its first
    ones (cyclically) to L = ceil(max(N_vis, N_ir) / batch) * batch, each shuffled on its own
    (numpy Generator `rng`); returns (visible [L], infrared [L]) to be read in batches of
    `batch` pairs (unpaired identities). SYSU-MM01 (22258, 11909) at 32 pads 14 and 10363 and
    RegDB (2060 each) pads 20, the released hard-coded counts."""
    length = -(-max(num_visible, num_infrared) // batch) * batch
    padded = [np.concatenate([np.arange(n), np.arange(length - n) % n])
              for n in (num_visible, num_infrared)]
    return tuple(rng.permutation(order) for order in padded)


def row_views(views):
    """The views in the order of a batch's rows: the visible stem's, then the infrared stem's
    (training.stem_batches)."""
    return ([v for v in views if v.stem == 'visible'] + [v for v in views if v.stem == 'infrared'])


def view_offsets(views, sizes):
    """{view name: where its images start} in the flat per-view layout of the clean
    probabilities (views in row order; a view has one entry per image of its stem; sizes:
    {stem: image count}) and the layout's length."""
    offsets, total = {}, 0
    for view in row_views(views):
        offsets[view.name], total = total, total + sizes[view.stem]
    return offsets, total


def layout_rows(views, sizes, indices):
    """Positions in the flat layout of a batch's rows: indices [V*B] is each row's image index in
    its stem's set, rows in row order, B per view."""
    offsets, _ = view_offsets(views, sizes)
    per_view = len(indices) // len(views)
    start = torch.tensor([offsets[v.name] for v in row_views(views)], device=indices.device)
    return indices + start.repeat_interleave(per_view)


@torch.no_grad()
def per_sample_losses(networks, batches, total, device, amp=None):
    """The identity loss of every training image under each of `networks`, flat layout
    (view_offsets, `total` rows): batches yields (batch number, visible images, infrared images,
    labels, rows) with rows = layout_rows(...); a row seen in several batches keeps the loss of
    the latest batch number (the released pass: the last write). The networks run as they are
    set (the released pass: train mode, BatchNorm on batch statistics, running statistics
    moving). Returns (losses [len(networks), total] float64, -1 where no row was seen;
    writer [total]: the batch number that wrote each row, -1 for none)."""
    losses = torch.full((len(networks), total), -1.0, dtype=torch.float64, device=device)
    writer = torch.full((total,), -1, dtype=torch.long, device=device)
    for number, visible, infrared, labels, rows in batches:
        rows, labels = rows.to(device), labels.to(device)
        for position, network in enumerate(networks):
            with autocast_context(device, amp or 'off'):
                out = network(visible=visible.to(device), infrared=infrared.to(device))
            if number >= 0:
                losses[position, rows] = F.cross_entropy(out.logits.float(), labels,
                                                         reduction='none').double()
        if number >= 0:
            writer[rows] = number
    return losses, writer


def merge_across_processes(losses, writer):
    """Each row's loss from the process that wrote it last (the highest batch number), on every
    process: the division pass split over processes gives what one process computes."""
    if not (dist.is_available() and dist.is_initialized()):
        return losses
    latest = writer.clone()
    dist.all_reduce(latest, op=dist.ReduceOp.MAX)
    mine = losses * (writer == latest)
    dist.all_reduce(mine)
    return mine


DIVISION_STREAM = 0xDA27  # the division pass's own random stream, apart from the training's


def division_samples(sizes, batch, seed, epoch):
    """The division pass's batches: [(visible index, infrared index, augmentation seed)] lists
    of `batch` samples in the generalised AllSampler order (division_order), drawn from a
    generator seeded by (seed, epoch) alone: the training's random streams are not touched."""
    rng = np.random.default_rng([seed, epoch, DIVISION_STREAM])
    visible, infrared = division_order(sizes['visible'], sizes['infrared'], batch, rng)
    seeds = rng.integers(2 ** 62, size=len(visible))
    samples = [(int(v), int(i), int(s)) for v, i, s in zip(visible, infrared, seeds)]
    return [samples[start:start + batch] for start in range(0, len(samples), batch)]


def division_batches(dataset, views, sizes, plan, device, rank=0, world_size=1, workers=0):
    """Yields (batch number, visible images, infrared images, labels, rows) of this process's
    share of `plan` (division_samples): batches rank, rank + W, ...; every process runs the same
    number of forwards (a process short of one repeats a batch under number -1, unrecorded), so
    that SyncBatchNorm processes stay in step. dataset: a CrossModalTrainSet of the views."""
    from training import stem_batches  # training imports the methods
    numbers = range(rank, -(-len(plan) // world_size) * world_size, world_size)
    samples = [sample for number in numbers for sample in plan[number % len(plan)]]
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(plan[0]), sampler=samples,
                                         num_workers=workers, pin_memory=device.type == 'cuda',
                                         generator=torch.Generator())  # draws nothing global
    for number, batch in zip(numbers, loader):
        visible, infrared, labels = stem_batches(views, batch)
        chosen = plan[number % len(plan)]
        by_stem = {stem: torch.tensor([s[position] for s in chosen])
                   for position, stem in enumerate(('visible', 'infrared'))}
        indices = torch.cat([by_stem[view.stem] for view in row_views(views)])
        yield (number if number < len(plan) else -1, visible, infrared, labels,
               layout_rows(views, sizes, indices))


def divide(losses, views, sizes, seed):
    """Clean probabilities [total] (float32) from the flat per-sample losses: each view min-max
    normalised, one Gaussian mixture per modality over its views (clean_probability), seeded
    with `seed` and the modality's position."""
    offsets, total = view_offsets(views, sizes)
    clean = torch.zeros(total)
    for position, stem in enumerate(('visible', 'infrared')):
        spans = [(offsets[v.name], sizes[stem]) for v in row_views(views) if v.stem == stem]
        if not spans:
            continue
        probabilities = clean_probability([losses[s:s + n] for s, n in spans],
                                          derived_seed(seed, position))
        for (start, count), probability in zip(spans, probabilities):
            clean[start:start + count] = probability
    return clean


# ----------------------------------------------------------------------------------------------
# The criterion

class DARTCriterion(nn.Module):
    """L = L_net1 + L_net2 (each network's gradient comes from its own term only).

    Warm-up (epochs < warmup_epochs, run.py:264-287): L_net = CE over the batch. After it, each
    epoch starts with the division (start_epoch): every training image's identity loss under
    each network -> clean probabilities per network; then co-divide (run.py:518-558): net1
    trains with net2's clean probabilities and net2 with net1's, L_net = probability-weighted
    CE + robust triplet (threshold 0.5, margin 0.3) on its pre-BN features.

    The clean probabilities live in the buffer `clean` [2, R] (row n: network n's, flat layout
    of view_offsets) and `divided_epoch` says which epoch they were divided for: both are in
    every checkpoint, so a run resumed inside an epoch after its division trains on the same
    probabilities and does not divide again. Parts: id1, tri1, id2, tri2 (detached, sum to L).
    views: the training views (data_loader.View); sizes: {stem: training images}, known at
    start_epoch (set_sizes). warmup_epochs: the released --warm-epoch 1 (run.py:78)."""

    def __init__(self, views, warmup_epochs=1, threshold=THRESHOLD, margin=MARGIN):
        super().__init__()
        self.views, self.sizes = list(views), None
        self.warmup_epochs, self.threshold, self.margin = warmup_epochs, threshold, margin
        self.register_buffer('clean', torch.zeros(len(NETWORKS), 0))
        self.register_buffer('divided_epoch', torch.tensor(-1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + 'clean')
        if saved is not None:  # the training set's size: take the saved buffer's shape
            self.clean = torch.zeros_like(saved, device=self.clean.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def divided(self):
        return int(self.divided_epoch) >= 0 and self.clean.shape[1] > 0

    def forward(self, out, labels):
        parts = {}
        for number, own in enumerate((out.first, out.second), 1):
            if not self.divided:
                parts[f'id{number}'] = F.cross_entropy(own.logits.float(), labels)
                continue
            other = self.clean[2 - number][self.batch_rows(out.indices, len(labels))]
            parts[f'id{number}'] = weighted_identity_loss(own.logits, labels, other)
            parts[f'tri{number}'] = robust_triplet_loss(own.pool, own.logits, labels, other,
                                                        self.threshold, self.margin)[0]
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}

    def batch_rows(self, indices, count):
        """Where the batch's rows are in the flat layout of `clean`."""
        if indices is None or len(indices) != count:
            raise ValueError('DART needs the training-set index of every row of the batch')
        if self.sizes is None:
            raise ValueError('the training-set sizes are unknown: call set_sizes first')
        return layout_rows(self.views, self.sizes, indices)

    def set_sizes(self, sizes):
        """{stem: training images}; a resumed buffer must cover them."""
        self.sizes = dict(sizes)
        _, total = view_offsets(self.views, self.sizes)
        if self.clean.shape[1] not in (0, total):
            raise ValueError(f'the saved clean probabilities cover {self.clean.shape[1]} rows, '
                             f'the training set has {total}')

    def assign(self, epoch, clean_by_network):
        """Store the divided clean probabilities (one [R] tensor per network) for `epoch`."""
        self.clean = torch.stack(clean_by_network).to(self.clean.device)
        self.divided_epoch.fill_(epoch)

    def needs_division(self, epoch):
        """Whether epoch starts with a division: past the warm-up and not already divided (a run
        resumed inside an epoch after its division)."""
        return epoch >= self.warmup_epochs and int(self.divided_epoch) != epoch

    def start_epoch(self, epoch, run):
        """Before each epoch's first step (the trainer): the division, when the epoch needs one.
        run: the Trainer (model, device, args, ctx, log, name, caches, loader)."""
        self.set_sizes({'visible': len(run.caches[0][1]), 'infrared': len(run.caches[1][1])})
        if not self.needs_division(epoch):
            return
        args, started = run.args, time.time()
        self.divide_epoch(epoch, run.model, run.loader.dataset, run.device,
                          args.batch_size * args.num_pos, args.seed, args.amp, run.ctx.rank,
                          run.ctx.world_size, args.workers)
        clean = ', '.join(f'{name} {float((row >= self.threshold).float().mean()):.1%}'
                          for name, row in zip(NETWORKS, self.clean))
        run.log.info(f'{run.name} epoch {epoch}: division pass {time.time() - started:.1f} s; '
                     f'clean (p >= {self.threshold}): {clean}')

    def divide_epoch(self, epoch, twin, dataset, device, batch, seed, amp='off', rank=0,
                     world_size=1, workers=0):
        """The division at the start of `epoch` (run.py:478-516): every training image, in
        batches of `batch` pairs (division_samples), through each network of `twin` in train
        mode under no_grad, as released (BatchNorm on batch statistics; its running statistics
        move); each network's losses -> its clean probabilities (divide, the mixtures seeded by
        (seed, epoch, network)); stored for co-divide. Split over `world_size` processes."""
        plan = division_samples(self.sizes, batch, seed, epoch)
        networks = twin.networks()
        for network in networks:
            network.train()
        batches = division_batches(dataset, self.views, self.sizes, plan, device, rank,
                                   world_size, workers)
        _, total = view_offsets(self.views, self.sizes)
        losses, writer = per_sample_losses(networks, batches, total, device, amp)
        losses = merge_across_processes(losses, writer).cpu()
        self.assign(epoch, [divide(losses[k], self.views, self.sizes, derived_seed(seed, epoch, k))
                            for k in range(len(networks))])


def derived_seed(*parts):
    """An int seed from a sequence of ints (numpy's SeedSequence), for scikit-learn's
    random_state: the mixtures are seeded by (--seed, epoch, network, modality); the released
    ones draw from numpy's global stream (random_state=None)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# The method

class TwinFeatDistance:
    """DART's test similarity (run.py:411-444): the inner product of the BNNeck features, each the
    mean of the two networks' L2-normalised ones, not renormalised (here flip-summed, as every
    method's test features are). query [Q, 2, k, D], gallery [G, 2, k, D] -> distance [Q, G]
    (the negative similarity)."""

    def __call__(self, query, gallery):
        return -(query[:, 1].flatten(1) @ gallery[:, 1].flatten(1).T)

    # the largest |distance| (visualize.py's histogram range): one branch, and a flip-summed
    # feature has a norm of at most 2
    distance_bound = 4.0


class DARTMethod(Method):
    name, title = 'dart', 'DART'
    summary = ("Two AGW networks on CAJ's three views, each trained on the labels the other deems "
               'clean (a Gaussian mixture on per-sample losses): weighted identity loss + robust triplet.')
    # The released run.py (3fe03d3): lr 0.1 (:21), P = 8 (:39), K = 4 (:50), 288x144 (:35-37; the
    # crops are hard-coded in data_loader.py:142), 100 epochs (:471), AGW's schedule (:246-261),
    # CAJ's three views with channel erasing (data_loader.py:138-167), no random grayscale; label
    # noise 0 (the dataset's labels; the released default is 0.2, :74).
    recipe = dict(**AGW_SCHEDULE, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=100,
                  grayscale=0.0, erasing=(0.02, 0.4), erasing_kind='channel', channel_aug=True,
                  noise_rate=0.0)
    own_flags = ('noise_rate',)
    head_prefixes = tuple(f'{net}.{part}.' for net in NETWORKS for part in ('bottleneck', 'classifier'))
    # The released test: the twin-mean BNNeck feature by inner product (headline); the two
    # fusions every (pool, feat) method reports beside it.
    fusions = {'feat': TwinFeatDistance(), **POOL_FEAT_FUSIONS}
    headline = 'feat'
    needs_indices = True

    def add_arguments(self, group):
        group.add_argument('--noise-rate', type=float,
                           help="dart: replace this fraction of each modality's training labels by "
                           'another identity, seeded by --seed (default: 0; the paper: 0.2, 0.5)')

    def resolve(self, args):
        if not 0 <= args.noise_rate < 1:
            raise UserError(f'{flag("noise_rate")} must be in [0, 1) (a fraction of the training '
                            f'labels), got {args.noise_rate}.')

    def describe_network(self, args):
        return (f'DART: two AGW networks, co-divided from epoch 1 (label noise '
                f'{args.noise_rate:g})')

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return TwinNetworks(num_classes, arch=arch)

    def load_pretrained(self, model, state, source):
        for network in model.networks():
            load_backbone(network, state, source)

    def build_criterion(self, args, views):
        return DARTCriterion(views)

    def forward_train(self, model, visible, infrared, labels, indices=None):
        return model(visible=visible, infrared=infrared, indices=indices)

    def training_caches(self, args, caches, run):
        """The caches with --noise-rate of each modality's labels replaced (noisy_training_labels,
        seeded by --seed), the replaced indices and labels logged and written beside the log."""
        if not args.noise_rate:
            return caches
        labels = {'visible': caches[0][1], 'infrared': caches[1][1]}
        noisy = noisy_training_labels(labels, args.noise_rate, args.seed)
        if run.ctx.is_main:
            record_noise(os.path.join(args.log_path, run.name + '_noise.json'), labels, noisy,
                         args.noise_rate, args.seed)
        run.log.info(f'{run.name}: label noise {args.noise_rate:g}: ' + ', '.join(
            f'{len(replaced)} of {len(labels[m])} {m} labels replaced'
            for m, (_, replaced) in noisy.items()) + ' (seeded by --seed)')
        return [(images, noisy[m][0]) for (images, _), m in zip(caches, ('visible', 'infrared'))]


def record_noise(path, labels, noisy, rate, seed):
    """The injected noise as JSON: rate, seed, and per modality the replaced indices, their true
    and their noisy labels."""
    record = {'rate': rate, 'seed': seed, **{
        modality: {'replaced': replaced.tolist(), 'true': labels[modality][replaced].tolist(),
                   'noisy': values[replaced].tolist()}
        for modality, (values, replaced) in noisy.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with written_atomically(path) as tmp, open(tmp, 'w') as handle:
        json.dump(record, handle)


DART_METHOD = DARTMethod()
