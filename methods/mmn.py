"""MMN (Zhang et al., ACM MM 2021, "Towards a Unified Middle Modality Learning for VI-ReID"):
the middle-modality generator, the four-stripe network, its criterion (identity, four-pair
triplet, distribution consistency with a frozen random head), test fusions and recipe."""
import os
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import batch_hard_triplet_loss, identity_loss
from methods.base import AGW_SCHEDULE, Method
from model import (ModalityStem, ResNetTrunk, average_pool, make_bnneck, make_classifier,
                   make_resnet, stage_widths)
from utils import UserError, flag

STRIPES = 4                 # horizontal parts of the layer4 map (released model.py:109-131)
GENERATOR_INIT = 0.333      # constant weight of every generator conv, bias 0 (model.py:39-45)
PROJECTION_DIM = 256        # the consistency head's width (loss.py:13-14)
HEAD_SEED_OFFSET = 1000003  # the frozen head's seed is --seed + this (its own stream)
STRIPE_WIDTHS = {'resnet18': 512, 'resnet34': 512, 'resnet50': 2048}  # layer4 channels per --arch


# ----------------------------------------------------------------------------------------------
# Network

class MiddleModalityEncoder(nn.Module):
    """One modality's half of the generator: [N, 3, H, W] -> [N, 1, H, W] by a 1x1 conv to one
    channel + ReLU, a 1x1 conv 1 -> 1 + ReLU and BatchNorm2d(1)."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Conv2d(3, 1, 1)
        self.mix = nn.Conv2d(1, 1, 1)
        self.norm = nn.BatchNorm2d(1)

    def forward(self, x):
        return self.norm(F.relu(self.mix(F.relu(self.encode(x)))))


class MiddleModalityGenerator(nn.Module):
    """The middle-modality generator (MMG): per modality an encoder to one channel, a decoder
    1 -> 3 (1x1 conv + ReLU) shared by both; every conv starts at weight 0.333, bias 0.
    visible(x) / infrared(x): [N, 3, H, W] -> the middle images [N, 3, H, W]."""

    def __init__(self):
        super().__init__()
        self.visible_encoder = MiddleModalityEncoder()
        self.infrared_encoder = MiddleModalityEncoder()
        self.decoder = nn.Conv2d(1, 3, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.constant_(module.weight, GENERATOR_INIT)
                nn.init.zeros_(module.bias)

    def visible(self, x):
        return F.relu(self.decoder(self.visible_encoder(x)))

    def infrared(self, x):
        return F.relu(self.decoder(self.infrared_encoder(x)))


class MMNOutput(NamedTuple):
    pool: Tuple[torch.Tensor, ...]    # per stripe [4B, C] pre-BN pooled (fp32): [V; M_v; I; M_i]
    logits: Tuple[torch.Tensor, ...]  # per stripe [4B, #ids]


def stripe_count(rows, stripes=STRIPES):
    """How many parts torch.chunk(map, stripes, dim=2) gives for a map `rows` high (fewer than
    `stripes` for 1-3, 5, 6 and 9 rows)."""
    size = -(-rows // stripes)
    return -(-rows // size)


def layer4_rows(img_h):
    """Rows of the layer4 map of an img_h-high image: the stem and layer2/3 halve it (rounding
    up) four times, layer4 keeps stride 1."""
    for _ in range(4):
        img_h = -(-img_h // 2)
    return img_h


def check_stripe_rows(img_h):
    """UserError unless an img_h-high image gives a layer4 map that splits into four stripes."""
    rows = layer4_rows(img_h)
    if stripe_count(rows) < STRIPES:
        raise UserError(stripes_message(rows, f'{flag("img_h")} {img_h}'))


def stripes_message(rows, source):
    return (f'MMN cuts the layer4 map into {STRIPES} horizontal stripes, but {source} gives a map '
            f'{rows} rows high ({stripe_count(rows)} stripes); use {flag("img_h")} 49-64, 97-128 '
            f'or at least 145 (384 as released).')


def horizontal_stripes(x, stripes=STRIPES):
    """[N, C, H, W] -> `stripes` average-pooled parts [N, C] (fp32), top to bottom, split as
    torch.chunk(x, stripes, dim=2) splits."""
    parts = torch.chunk(x, stripes, dim=2)
    if len(parts) < stripes:
        raise UserError(stripes_message(x.shape[2], 'the input image size'))
    return [average_pool(part) for part in parts]


class MMN(nn.Module):
    """MMN's network: the generator makes a middle image of every input; each modality's stem
    takes its images and their middle images, the shared last-stride-1 trunk the batch
    [V; M_v; I; M_i]; the layer4 map is cut into 4 horizontal stripes, each average pooled,
    with its own BNNeck and classifier.

        model(visible=None, infrared=None)
        train mode -> MMNOutput(pool: 4 x [4B, C], logits: 4 x [4B, #ids]), rows [V; M_v; I; M_i]
        eval mode  -> (pool, feat) L2-normalised [2N, 4C] (stripes concatenated), rows
                      [original; middle], each [visible; infrared]: num_branches 2

    C = the trunk's last width (ResNet-50: 2048, so embed_dim 8192). State dict keys:
    generator.{visible,infrared}_encoder.{encode,mix,norm}.*, generator.decoder.*,
    visible_stem.*, infrared_stem.*, trunk.layer{1..4}.*, bottlenecks.{0..3}.*,
    classifiers.{0..3}.weight.
    """

    num_branches = 2

    def __init__(self, num_classes, arch='resnet50'):
        super().__init__()
        resnet = make_resnet(arch)
        self.arch, self.widths = arch, stage_widths(resnet)
        self.visible_stem = ModalityStem(resnet)
        self.infrared_stem = ModalityStem(resnet)
        self.trunk = ResNetTrunk(resnet)
        width = self.widths[3]
        self.bottlenecks = nn.ModuleList(make_bnneck(width) for _ in range(STRIPES))
        self.classifiers = nn.ModuleList(make_classifier(width, num_classes)
                                         for _ in range(STRIPES))
        self.generator = MiddleModalityGenerator()
        self.stripe_dim, self.embed_dim = width, STRIPES * width

    def stems(self, visible, infrared):
        """Each given modality with its middle images through its stem: [V; M_v; I; M_i] (or the
        part of it that was given) -> [M, 64, H/4, W/4]."""
        parts = []
        if visible is not None:
            middle = self.generator.visible(visible)
            parts.append(self.visible_stem(torch.cat([visible, middle])))
        if infrared is not None:
            middle = self.generator.infrared(infrared)
            parts.append(self.infrared_stem(torch.cat([infrared, middle])))
        if not parts:
            raise ValueError('forward needs visible and/or infrared images')
        return torch.cat(parts)

    def forward(self, visible=None, infrared=None):
        x = self.stems(visible, infrared)                              # [4B, 64, H/4, W/4]
        for layer in (self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4):
            x = layer(x)                                               # -> [4B, C, H/16, W/16]
        pool = horizontal_stripes(x)                                   # 4 x [4B, C]
        feat = [bottleneck(part) for bottleneck, part in zip(self.bottlenecks, pool)]
        if self.training:
            return MMNOutput(tuple(pool), tuple(c(f) for c, f in zip(self.classifiers, feat)))
        sizes = [images.shape[0] for images in (visible, infrared) if images is not None]
        return tuple(F.normalize(original_then_middle(torch.cat(parts, 1).float(), sizes), dim=1)
                     for parts in (pool, feat))


def original_then_middle(rows, sizes):
    """The trunk's rows [V; M_v; I; M_i] (or [X; M_x]), `sizes` the modalities' batch sizes ->
    [V; I; M_v; M_i]; one modality's rows [X; M_x] are already in order."""
    if len(sizes) == 1:
        return rows
    blocks = rows.split([size for size in sizes for _ in range(2)])
    return torch.cat(blocks[0::2] + blocks[1::2])


# ----------------------------------------------------------------------------------------------
# Criterion

class ConsistencyHead(nn.Module):
    """The distribution-consistency projection: normalise -> Linear(C, 256, no bias) ->
    BatchNorm1d -> ReLU -> Linear(256, 256) -> BatchNorm1d -> normalise (torch's default init)."""

    def __init__(self, in_dim, dim=PROJECTION_DIM):
        super().__init__()
        self.project = nn.Linear(in_dim, dim, bias=False)
        self.mlp = nn.Sequential(nn.BatchNorm1d(dim), nn.ReLU(), nn.Linear(dim, dim),
                                 nn.BatchNorm1d(dim))

    def forward(self, x):
        return F.normalize(self.mlp(self.project(F.normalize(x, dim=1))), dim=1)


def seeded_consistency_head(in_dim, seed):
    """A ConsistencyHead drawn from torch's generator seeded with seed + HEAD_SEED_OFFSET, without
    touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + HEAD_SEED_OFFSET)
        return ConsistencyHead(in_dim)


def cross_pairs(pool):
    """[V; M_v; I; M_i] -> the four cross-modality pairs (V, I), (V, M_i), (M_v, I), (M_v, M_i),
    each [2B, C] = [visible-side; infrared-side]."""
    visible, middle_v, infrared, middle_i = pool.chunk(4)
    return [torch.cat(pair) for pair in ((visible, infrared), (visible, middle_i),
                                         (middle_v, infrared), (middle_v, middle_i))]


def four_pair_triplet_loss(pool, labels, margin=0.3):
    """Mean over the four cross pairs of the batch-hard triplet loss; pool [4B, C] is
    [V; M_v; I; M_i], labels [2B] are [visible; infrared]."""
    return sum(batch_hard_triplet_loss(pair, labels, margin) for pair in cross_pairs(pool)) / 4


def consistency_loss(head, middle_visible, middle_infrared):
    """Mean over i of ||z(M_v,i) - z(M_i,i)|| with z the head's normalised projection of the
    batch [M_v; M_i] (one BatchNorm batch, as released); row i of both is the same identity."""
    with torch.autocast(middle_visible.device.type, enabled=False):
        z = head(torch.cat([middle_visible, middle_infrared]).float())
    z_visible, z_infrared = z.chunk(2)
    return torch.linalg.vector_norm(z_visible - z_infrared, dim=1).mean()


class MMNCriterion(nn.Module):
    """L = mean_k CE(logits_k) + mean_k four-pair triplet(pool_k) + delta mean_k DCL(pool_k) over
    the 4 stripes k. labels [2B] = [visible; infrared] of the loaded batch; the network's rows
    are [V; M_v; I; M_i], so the identity labels are [y_v; y_v; y_i; y_i].

    The consistency head is, as released, a random projection that is never optimised (its
    BatchNorm statistics still update in training): seeded from `seed`, its parameters frozen,
    and kept in this module's state_dict so that a resumed run continues exactly.
    train_head=True makes its parameters trainable (they must then be given to the optimiser).
    Parts 'id', 'tri', 'dcl' (delta included): they sum to L."""

    def __init__(self, stripe_dim, margin=0.3, delta=0.2, seed=0, train_head=False):
        super().__init__()
        self.margin, self.delta = margin, delta
        self.head = seeded_consistency_head(stripe_dim, seed)
        self.head.requires_grad_(train_head)

    def forward(self, out, labels):
        visible, infrared = labels.chunk(2)
        stripe_labels = torch.cat([visible, visible, infrared, infrared])
        parts = {
            'id': sum(identity_loss(logits, stripe_labels) for logits in out.logits) / STRIPES,
            'tri': sum(four_pair_triplet_loss(pool, labels, self.margin)
                       for pool in out.pool) / STRIPES,
            'dcl': self.delta * sum(consistency_loss(self.head, *pool.chunk(4)[1::2])
                                    for pool in out.pool) / STRIPES,
        }
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}


# ----------------------------------------------------------------------------------------------
# Test: the released test's seven combinations of original and middle features

ORIGINAL, MIDDLE = 0, 1    # branches of the eval output (and of the features [N, 2, 2, D])
FEAT = 1                   # the BNNeck feature, the one the released test compares


def branch_similarity(query, gallery, query_branch, gallery_branch):
    """Cosine [Q, G] of the BNNeck features of one branch of the queries [Q, 2, 2, D] and one of
    the gallery [G, 2, 2, D] (the flip-summed features re-normalised)."""
    q = F.normalize(query[:, FEAT, query_branch], dim=1)
    g = F.normalize(gallery[:, FEAT, gallery_branch], dim=1)
    return q @ g.T


BRANCH_NAMES = {ORIGINAL: 'original', MIDDLE: 'middle'}


class MiddleFusion:
    """A distance over the BNNeck features of both branches: the negative sum, element-wise min
    or max of the cosine matrices of the (query branch, gallery branch) `pairs`, accumulated one
    matrix at a time. Its __doc__ says what it computes (results files and ONNX metadata), its
    distance_bound the largest |distance| (the range of visualize.py's histograms)."""

    def __init__(self, pairs, combine='sum'):
        self.pairs, self.combine = tuple(pairs), combine
        self.distance_bound = float(len(self.pairs)) if combine == 'sum' else 1.0  # of cosines
        terms = [f'cos(BNNeck {BRANCH_NAMES[q]} query, BNNeck {BRANCH_NAMES[g]} gallery)'
                 for q, g in self.pairs]
        self.__doc__ = ('distance = -' + (terms[0] if len(terms) == 1 else
                                          f'{combine}({", ".join(terms)})'))

    def __call__(self, query, gallery):
        reduce = {'sum': torch.add, 'min': torch.minimum, 'max': torch.maximum}[self.combine]
        similarity = None
        for query_branch, gallery_branch in self.pairs:
            current = branch_similarity(query, gallery, query_branch, gallery_branch)
            similarity = current if similarity is None else reduce(similarity, current)
        return -similarity

    def __repr__(self):
        return f'MiddleFusion({self.pairs}, {self.combine!r})'


ALL_PAIRS = ((ORIGINAL, ORIGINAL), (ORIGINAL, MIDDLE), (MIDDLE, ORIGINAL), (MIDDLE, MIDDLE))
FUSIONS = {  # released test.py:185-207 (SYSU); the names say query/gallery branches
    'orig/orig': MiddleFusion(ALL_PAIRS[:1]),
    'orig/middle': MiddleFusion(ALL_PAIRS[1:2]),
    'middle/orig': MiddleFusion(ALL_PAIRS[2:3]),
    'middle/middle': MiddleFusion(ALL_PAIRS[3:]),
    'sum': MiddleFusion(ALL_PAIRS, 'sum'),
    'min': MiddleFusion(ALL_PAIRS, 'min'),
    'max': MiddleFusion(ALL_PAIRS, 'max'),
}
HEADLINE = 'orig/orig'


# ----------------------------------------------------------------------------------------------
# The method entry

class MMNMethod(Method):
    name, title = 'mmn', 'MMN'
    summary = ('A generator makes a middle-modality image of every input that the two-stream '
               'ResNet-50 also learns from; 4 stripes with a BNNeck each; id + four-pair triplet '
               '+ consistency of the middle images.')
    # The released train.py defaults (ZYK100/MMN at 01d70d5): lr 0.1 (:24), warm-up 10 and x0.1
    # at 20 and 50 (:217-233), pad 10 (:101) are AGW's; 4 ids (:36) x 4 images (:40), 384 x 192
    # (:35, :34), 81 epochs (:397), no random grayscale (:99-107), random erasing p 0.5 area
    # 0.02-0.4 filled with 0 (:106; random_erasing.py:33-77: uniform aspect, 100 tries, as our
    # channel erasing draws it).
    recipe = dict(**AGW_SCHEDULE, batch_size=4, num_pos=4, img_h=384, img_w=192, epochs=81,
                  grayscale=0.0, erasing=(0.02, 0.4), erasing_kind='channel-zero')
    own_flags = ('mmn_delta', 'mmn_train_dcl_head')
    head_prefixes = ('bottlenecks.', 'classifiers.')  # released train.py:192-214
    fusions, headline = FUSIONS, HEADLINE

    def add_arguments(self, group):
        group.add_argument('--mmn-delta', type=float, help="weight of MMN's distribution-"
                           'consistency term (default: 0.2, the released --delta)')
        group.add_argument('--mmn-train-dcl-head', action='store_true', default=None,
                           help="train MMN's consistency projection head (default: off, as "
                           'released: a random head drawn from --seed, frozen)')

    def resolve(self, args):
        from checks import check_real  # checks imports the registry
        check_stripe_rows(args.img_h)
        if args.channel_aug:
            raise UserError(f'{flag("channel_aug")} adds a third view, but MMN trains on '
                            f'[visible; infrared] pairs and their middle images; drop it.')
        if args.mmn_delta is None:
            args.mmn_delta = 0.2   # released train.py:45
        check_real(args.mmn_delta, 'mmn_delta')
        if args.mmn_train_dcl_head and int(os.environ.get('WORLD_SIZE', '1')) > 1:
            raise UserError(f'{flag("mmn_train_dcl_head")} trains a head outside the DDP network '
                            f'whose gradients torchrun would not average; train it in one process.')
        args.mmn_train_dcl_head = bool(args.mmn_train_dcl_head)

    def network_settings(self, args):
        # not the network's shape but what its checkpoint's optimiser state holds: a run is
        # continued with the same head setting (checks.check_resume_network)
        return {'mmn_train_dcl_head': args.mmn_train_dcl_head}

    def recorded_settings(self, dataset, recorded):
        return {'mmn_train_dcl_head': bool((recorded or {}).get('mmn_train_dcl_head'))}

    def describe_network(self, args):
        head = 'trained' if args.mmn_train_dcl_head else f'random from --seed {args.seed}, frozen'
        return (f'MMN network: middle-modality generator, {STRIPES} stripes; consistency weight '
                f'{args.mmn_delta}, projection head {head}')

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return MMN(num_classes, arch=arch)

    def build_criterion(self, args, views):
        return MMNCriterion(STRIPE_WIDTHS[args.arch], margin=args.margin, delta=args.mmn_delta,
                            seed=args.seed, train_head=args.mmn_train_dcl_head)

    def is_released_state_dict(self, keys):
        return any(key.startswith('generator.') for key in keys)


MMN_METHOD = MMNMethod()
