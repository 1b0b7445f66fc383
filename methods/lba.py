"""LbA, "Learning by Aligning" (Park et al., ICCV 2021; released as CMAlign) as a method: a
two-stream ResNet with GeM and BNNeck whose layer3 and layer4 maps are warped onto cross-modal
partners, trained with identity losses on the reconstructions and a co-attention-weighted dense
triplet; its released recipe and the flag only it takes. Written from the paper and from reading
the released code (cvlab-yonsei/LbA, GPL-3.0), none of which is copied here."""
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from loss import batch_hard_triplet_loss, full_precision, identity_loss
from methods.base import AGW_SCHEDULE, POOL_FEAT_FUSIONS, SINGLE_FEATURE_FUSIONS, Method
from model import TwoStreamNet, gem_pool
from utils import UserError, flag

TEMPERATURE = 50.0      # scale of the cosines before the softmax over key locations
DENSE_MARGIN = 0.3      # margin of the dense triplet
DISTANCE_EPS = 1e-6     # added to the difference before its norm, as torch's pairwise_distance does
RANGE_EPS = 1e-12       # keeps a min-max normalisation finite on a constant map
TRUNK_STRIDE = 16       # input pixels per layer3 / layer4 location (layer4 keeps stride 1)


# ----------------------------------------------------------------------------------------------
# The alignment, piece by piece: feature maps are [N, C, H, W], L = H * W locations

def min_max(values):
    """Each row of [N, L] shifted to minimum 0 and divided by its new maximum (+ 1e-12)."""
    shifted = values - values.amin(1, keepdim=True)
    return shifted / (shifted.amax(1, keepdim=True) + RANGE_EPS)


def activation_mask(feat):
    """Where an image is active: the channel L2 norm per location, min-max normalised per image,
    detached; [N, C, H, W] -> [N, 1, H, W]."""
    n, _, h, w = feat.shape
    return min_max(feat.norm(dim=1).reshape(n, h * w)).reshape(n, 1, h, w).detach()


def correspondence(query, key):
    """Soft matches [N, L, L]: row i is a softmax over key locations j of TEMPERATURE x
    cos(query_i, key_j) (channel vectors), the row maximum subtracted before the exponential."""
    cos = F.normalize(query.flatten(2), dim=1).transpose(1, 2) @ F.normalize(key.flatten(2), dim=1)
    scores = torch.exp(TEMPERATURE * (cos - cos.amax(2, keepdim=True)))
    return scores / scores.sum(2, keepdim=True)


def warp(matches, key):
    """The key map gathered onto the query's locations, sum_j P(i, j) key_j: [N, C, H, W]."""
    return (key.flatten(2) @ matches.transpose(1, 2)).reshape(key.shape)


def reconstruct(mask, warped, feat):
    """The active locations replaced by their warped partners: M w + (1 - M) f."""
    return mask * warped + (1.0 - mask) * feat


def co_attention(matches, query_mask, key_mask):
    """Locations active in the query and at their matches in the key, M_q (P M_k), min-max
    normalised per image and detached: [N, 1, H, W]."""
    n, _, h, w = query_mask.shape
    joint = query_mask.reshape(n, h * w) * (matches @ key_mask.reshape(n, h * w, 1)).squeeze(2)
    return min_max(joint).reshape(n, 1, h, w).detach()


def location_distance(a, b):
    """||a - b + 1e-6|| over channels at each location: [N, C, H, W] -> [N, H, W]."""
    return (a - b + DISTANCE_EPS).norm(dim=1)


def dense_hinge(feat, positive, negative, margin=DENSE_MARGIN):
    """The triplet hinge at each location, relu(margin + d(f, r+) - d(f, r-)): [N, H, W]."""
    return F.relu(margin + location_distance(feat, positive) - location_distance(feat, negative))


def dense_triplet(comask, hinge, per_sample=False):
    """The dense triplet term from the co-attention [N, H, W] and the hinge [N, H, W].

    Default, the released semantics (torch 1.7, where the released loss broadcast [N, 1, H, W]
    against [N, H, W] to [N, N, H, W]): co-attention and hinge are each averaged over the batch
    before their product, mean_{h,w}(mean_i comask_i * mean_j hinge_j). per_sample: the paper's
    form, each image's hinge weighted by its own co-attention, mean_{i,h,w}(comask_i hinge_i)."""
    if per_sample:
        return (comask * hinge).mean()
    return (comask.mean(0) * hinge.mean(0)).mean()


class DenseTerms(NamedTuple):
    comask: torch.Tensor    # [N, H, W] co-attention of each anchor with its positive (detached)
    hinge: torch.Tensor     # [N, H, W] dense triplet hinge of each anchor


@full_precision
def align(feat, positive, negative):
    """Cross-modal alignment of one map [N, C, H, W] (rows [visible; infrared]) with row indices
    of each anchor's positive and negative: (positive reconstruction [N, C, H, W], DenseTerms).
    In fp32 with autocast off (the softmax of 50 x cosine is sharp)."""
    mask = activation_mask(feat)
    matches = correspondence(feat, feat[positive])
    comask = co_attention(matches, mask, mask[positive])
    recon_positive = reconstruct(mask, warp(matches, feat[positive]), feat)
    recon_negative = reconstruct(mask, warp(correspondence(feat, feat[negative]), feat[negative]), feat)
    return recon_positive, DenseTerms(comask.squeeze(1), dense_hinge(feat, recon_positive, recon_negative))


# ----------------------------------------------------------------------------------------------
# Partners of each anchor, drawn per step from torch's generator

def batch_layout(labels):
    """(P, K) of a training batch [visible; infrared] as the identity sampler makes it: P
    identities of K consecutive rows each, the same identities in the same rows in both halves."""
    half = len(labels) // 2
    visible, infrared = labels[:half], labels[half:]
    if half == 0 or 2 * half != len(labels) or not torch.equal(visible, infrared):
        raise ValueError("LbA's alignment needs a batch [visible; infrared] with the same identity "
                         "in row j of both halves")
    num_pos = int((visible == visible[0]).sum())
    num_ids = half // num_pos
    blocks = visible[:num_ids * num_pos].reshape(num_ids, num_pos)
    if (num_ids * num_pos != half or not bool((blocks == blocks[:, :1]).all())
            or len(torch.unique(blocks[:, 0])) != num_ids):
        raise ValueError("LbA's alignment needs the identity sampler's batches (P identities of "
                         "K consecutive rows each)")
    return num_ids, num_pos


def draw_targets(num_ids, num_pos, generator=None):
    """Partners in the other modality's half for the P*K anchors of one modality: ([P*K] positive
    rows, [P*K] negative rows). An identity's K anchors take its K images of the other modality
    in a random order; their negatives are K distinct other identities in a random order (all
    P - 1 of them, repeated, when P - 1 < K), each at a random image position."""
    if num_ids < 2:
        raise ValueError("LbA's negatives need at least 2 identities per batch")
    first_row = torch.arange(num_ids)[:, None] * num_pos
    positive = first_row + torch.rand(num_ids, num_pos, generator=generator).argsort(1)
    order = torch.rand(num_ids, num_ids, generator=generator).fill_diagonal_(2.0).argsort(1)
    negative_ids = order[:, torch.arange(num_pos) % (num_ids - 1)]  # own identity sorts last
    negative = negative_ids * num_pos + torch.rand(num_ids, num_pos, generator=generator).argsort(1)
    return positive.flatten(), negative.flatten()


def draw_pairs(labels, generator=None):
    """Cross-modal partners of every row of a batch [visible; infrared]: (positive [2B],
    negative [2B]) row indices on labels' device; visible anchors get infrared rows and infrared
    anchors visible ones. Drawn from `generator` (None: torch's default CPU generator, which the
    trainer seeds and restores on resume), never from Python's random."""
    num_ids, num_pos = batch_layout(labels)
    half = num_ids * num_pos
    visible_pos, visible_neg = draw_targets(num_ids, num_pos, generator)
    infrared_pos, infrared_neg = draw_targets(num_ids, num_pos, generator)
    positive = torch.cat([visible_pos + half, infrared_pos])
    negative = torch.cat([visible_neg + half, infrared_neg])
    return positive.to(labels.device), negative.to(labels.device)


def alignment_locations(img_h, img_w):
    """Locations of the layer3 / layer4 maps for an input of img_h x img_w (each stride-2 stage
    halves a side rounding up)."""
    return math.ceil(img_h / TRUNK_STRIDE) * math.ceil(img_w / TRUNK_STRIDE)


def check_alignment_size(img_h, img_w):
    """The alignment's min-max normalisations and matches need at least 2 locations."""
    locations = alignment_locations(img_h, img_w)
    if locations < 2:
        raise UserError(f'LbA aligns the layer3 and layer4 maps location by location and needs at '
                        f'least 2 locations, but {flag("img_h")} {img_h} x {flag("img_w")} {img_w} '
                        f'gives {locations}; use larger images (released: 288 x 144).')


# ----------------------------------------------------------------------------------------------
# Network and criterion

class LbAOutput(NamedTuple):
    pool: torch.Tensor         # [N, D] GeM-pooled layer4 (fp32), pre-BN
    logits: torch.Tensor       # [N, #ids]
    logits_l3: torch.Tensor    # [N, #ids] of the layer3 positive reconstruction (through layer4)
    logits_l4: torch.Tensor    # [N, #ids] of the layer4 positive reconstruction
    dense_l3: DenseTerms
    dense_l4: DenseTerms


class LbANet(TwoStreamNet):
    """Two-stream ResNet (last stride 1, no non-local), GeM, BNNeck; in training the cross-modal
    alignment on layer3 and layer4 (TwoStreamNet's state dict keys, nothing else).

    model(visible, infrared, labels) in train mode -> LbAOutput; labels [2B] of the batch
    [visible; infrared] choose each anchor's partners (draw_pairs). As released, layer4 runs
    twice per step (the original, then the layer3 reconstruction) and the BNNeck three times
    (layer3 reconstruction, layer4 reconstruction, original), each updating running statistics.
    Eval mode -> (L2(GeM), L2(BNNeck)), [N, D] each; num_branches 1."""

    def forward(self, visible=None, infrared=None, labels=None):
        x = self.stems(visible, infrared)                                          # [N, 64, H/4, W/4]
        layer3 = self.trunk.layer3(self.trunk.layer2(self.trunk.layer1(x)))        # [N, 1024, H/16, W/16]
        layer4 = self.trunk.layer4(layer3)                                         # [N, 2048, H/16, W/16]
        pool = gem_pool(layer4)                                                    # [N, 2048]
        if not self.training:
            return self.head(pool)
        if labels is None:
            raise ValueError("LbA's training forward needs the batch's labels (model(..., labels=))")
        if layer3.shape[2] * layer3.shape[3] < 2:
            check_alignment_size(*(visible if visible is not None else infrared).shape[2:])
        pairs_l3, pairs_l4 = draw_pairs(labels), draw_pairs(labels)
        recon_l3, dense_l3 = align(layer3, *pairs_l3)
        logits_l3 = self.classify(gem_pool(self.trunk.layer4(recon_l3)))
        recon_l4, dense_l4 = align(layer4, *pairs_l4)
        logits_l4 = self.classify(gem_pool(recon_l4))
        return LbAOutput(pool, self.classify(pool), logits_l3, logits_l4, dense_l3, dense_l4)

    def classify(self, pool):
        """BNNeck then classifier: [N, D] -> [N, #ids]."""
        return self.classifier(self.bottleneck(pool))


class LbACriterion(nn.Module):
    """L = CE + batch-hard triplet(pool, 0.3) + CE(layer3 recon) + CE(layer4 recon)
    + 0.5 (dense layer3 + dense layer4). Parts id, tri, id_l3, id_l4, dense_l3, dense_l4, the
    dense ones already weighted: they sum to L. per_sample: the dense triplet's paper form
    (dense_triplet); default the released, batch-averaged one."""

    def __init__(self, margin=0.3, dense_weight=0.5, per_sample=False):
        super().__init__()
        self.margin, self.dense_weight, self.per_sample = margin, dense_weight, per_sample

    def forward(self, out, labels):
        parts = {'id': identity_loss(out.logits, labels),
                 'tri': batch_hard_triplet_loss(out.pool, labels, self.margin),
                 'id_l3': identity_loss(out.logits_l3, labels),
                 'id_l4': identity_loss(out.logits_l4, labels),
                 'dense_l3': self.dense_weight * self.dense(out.dense_l3),
                 'dense_l4': self.dense_weight * self.dense(out.dense_l4)}
        total = sum(parts.values())
        return total, {name: value.detach() for name, value in parts.items()}

    def dense(self, terms):
        return dense_triplet(terms.comask, terms.hinge, self.per_sample)


# ----------------------------------------------------------------------------------------------
# The method

TRUNK_KEYS = ('visible_stem.', 'infrared_stem.', 'trunk.', 'bottleneck.', 'classifier.')


class LbAMethod(Method):
    name, title = 'lba', 'LbA'
    summary = ('Two-stream ResNet-50 with GeM and BNNeck; layer3 and layer4 maps warped onto a '
               'cross-modal positive, id losses on the reconstructions + a co-attended dense triplet.')
    # The released train.py (cvlab-yonsei/LbA 66a3ab9): 288 x 144 (:29-30), 8 ids x 4 (:31-32),
    # lr 0.1 with AGW's schedule (:38, :175-190), 81 epochs (:355); RandomCrop(288, 144) of a
    # 288 x 144 image and a flip (:94-95): no pad, so the crop is a no-op; no grayscale, no erasing.
    # Its test.py loads the last epoch (ep_80, test.py:36): no selection during training.
    recipe = dict(AGW_SCHEDULE, pad=0, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=81,
                  grayscale=0.0, erasing=None, eval_every=0)
    dataset_recipes = {'demo': dict(eval_every=0, pad=0)}  # the demo's too: last epoch, flip only
    own_flags = ('lba_per_sample_comask',)
    # The released test.py's feature: L2(GeM), pre-BNNeck (feat4_p_norm, test.py:94, :111).
    fusions = {**SINGLE_FEATURE_FUSIONS, **POOL_FEAT_FUSIONS}
    headline = 'pool'
    released_image_size = (288, 144)

    def add_arguments(self, group):
        group.add_argument('--lba-per-sample-comask', action='store_true', default=None,
                           help="LbA's dense triplet as the paper states it, each image's hinge "
                           'weighted by its own co-attention (default: the released code\'s '
                           'batch-averaged product, docs/methods.md)')

    def resolve(self, args):
        args.lba_per_sample_comask = bool(args.lba_per_sample_comask)
        check_alignment_size(args.img_h, args.img_w)
        if args.channel_aug:
            raise UserError(f'LbA aligns each visible image with an infrared one and takes the two '
                            f'views [visible; infrared] only; drop {flag("channel_aug")}.')
        if args.batch_size < 2:
            raise UserError(f'LbA draws each anchor\'s negative from another identity of its batch, '
                            f'so {flag("batch_size")} must be at least 2, got {args.batch_size}.')

    def describe_network(self, args):
        form = 'per-sample' if args.lba_per_sample_comask else 'batch-averaged (released)'
        return f'LbA network: two-stream {args.arch}, GeM, BNNeck; dense triplet {form}'

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return LbANet(num_classes, arch=arch)

    def build_criterion(self, args, views):
        return LbACriterion(args.margin, per_sample=args.lba_per_sample_comask)

    def forward_train(self, model, visible, infrared, labels):
        """Labels go through the forward (DDP): they choose each anchor's partners."""
        return model(visible=visible, infrared=infrared, labels=labels)

    def is_released_state_dict(self, keys):
        """The released LbA network has the stems, trunk, BNNeck and classifier and nothing else."""
        keys = list(keys)
        return any(key.startswith('trunk.layer4.') for key in keys) and all(
            key.startswith(TRUNK_KEYS) for key in keys)


LBA_METHOD = LbAMethod()
