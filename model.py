"""The networks: DEEN (modality stems, shared last-stride-1 ResNet trunk, MFA blocks, DEE module,
BNNeck) and the AGW baseline, and their ImageNet / released-checkpoint / trained weight loading.
The trunk is torchvision's ResNet-50 as in the paper; ResNet-18/34 (`--arch`) give lighter
networks of the same design, with every width taken from the trunk's stages."""
import copy
import os
import re
import urllib.error
from dataclasses import dataclass, replace
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import Bottleneck

from loss import orthogonal_loss
from utils import UserError, flag, load_checkpoint


class TrainOutput(NamedTuple):
    pool: torch.Tensor               # [k*N, D] pre-BN pooled embeddings (fp32)
    logits: torch.Tensor             # [k*N, #ids]
    ortho: Optional[torch.Tensor]    # DEEN: orthogonal term (scalar); AGW: None


# ----------------------------------------------------------------------------------------------
# Building blocks

class ModalityStem(nn.Module):
    """conv1, bn1, ReLU, max-pool copied from a torchvision ResNet: [N, 3, H, W] -> [N, 64, H/4, W/4]."""

    def __init__(self, resnet):
        super().__init__()
        self.conv1 = copy.deepcopy(resnet.conv1)
        self.bn1 = copy.deepcopy(resnet.bn1)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = copy.deepcopy(resnet.maxpool)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNetTrunk(nn.Module):
    """layer1..layer3 (and layer4 with last stride 1) of a torchvision ResNet, shared by both
    modalities. ResNet-50: [N, 64, H/4, W/4] -> layer1 [N, 256, H/4, W/4] -> layer2
    [N, 512, H/8, W/8] -> layer3 [N, 1024, H/16, W/16] -> layer4 [N, 2048, H/16, W/16];
    ResNet-18/34 have a quarter of those channels (stage_widths)."""

    def __init__(self, resnet, with_layer4=True):
        super().__init__()
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.layer4 = last_stride_one(resnet.layer4) if with_layer4 else None


def last_stride_one(layer):
    """The first block of a ResNet stage at stride 1: its strided 3x3 conv (conv2 of a
    bottleneck, conv1 of a basic block) and its downsample."""
    block = layer[0]
    strided = block.conv2 if isinstance(block, Bottleneck) else block.conv1
    strided.stride = (1, 1)
    block.downsample[0].stride = (1, 1)
    return layer


BACKBONES = ('resnet18', 'resnet34', 'resnet50')


def make_resnet(arch):
    """A randomly initialised torchvision ResNet named by --arch (pretrained weights load later).
    Residual branches end in a zero-initialised BatchNorm so that from-scratch runs start stable."""
    if arch not in BACKBONES:
        raise UserError(f'--arch must be one of {", ".join(BACKBONES)}, got {arch!r}.')
    return getattr(torchvision.models, arch)(zero_init_residual=True)


def stage_widths(resnet):
    """Output channels of layer1..layer4: (256, 512, 1024, 2048) for ResNet-50, (64, 128, 256, 512)
    for ResNet-18/34."""
    last_blocks = (stage[-1] for stage in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4))
    return tuple((block.bn3 if isinstance(block, Bottleneck) else block.bn2).num_features
                 for block in last_blocks)


def zero_init_projection(in_channels, out_channels, stride=1):
    """W of a non-local block: 1x1 conv + BatchNorm2d with weight and bias 0 (block starts as identity)."""
    projection = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                               nn.BatchNorm2d(out_channels))
    nn.init.zeros_(projection[1].weight)
    nn.init.zeros_(projection[1].bias)
    return projection


def linear_attention(query, key, value, divisor):
    """(query @ key / divisor) @ value for [B, a, b], [B, b, c], [B, c, d] -> [B, a, d].

    There is no softmax, so the product is associated in whichever order costs fewer operations
    (the [a, c] affinity is never built when that is cheaper). Computed in fp32 with autocast off
    (fp16 would overflow the unnormalised affinities), returned in query's dtype."""
    dtype = query.dtype
    wide = torch.promote_types(dtype, torch.float32)
    (_, a, b), c, d = query.shape, key.shape[2], value.shape[2]
    with torch.autocast(query.device.type, enabled=False):
        query, key, value = query.to(wide), key.to(wide), value.to(wide)
        if a * b * c + a * c * d <= b * c * d + a * b * d:
            out = (query @ key) @ value
        else:
            out = query @ (key @ value)
    return (out / divisor).to(dtype)


def check_even_positions(count):
    """PNL's released reshape splits a map's positions in two halves: their number must be even."""
    if count % 2:
        raise UserError(f'the image size gives an odd number ({count}) of feature-map positions at an '
                        f'MFA block; use {flag("img_h")} / {flag("img_w")} giving even position '
                        f'counts, e.g. 384 x 144.')


class CNL(nn.Module):
    """Channel non-local: x_high [B, Ch, H, W], x_low [B, Cl, h, w] -> [B, Ch, H, W] (h = 2H when
    downsampling, else h = H). The Cl x Cl channel affinity of x_high and x_low re-weights x_low."""

    def __init__(self, high_dim, low_dim, downsample):
        super().__init__()
        stride = 2 if downsample else 1
        self.g = nn.Conv2d(low_dim, low_dim, 1)
        self.theta = nn.Conv2d(high_dim, low_dim, 1)
        self.phi = nn.Conv2d(low_dim, low_dim, 1, stride=stride)
        self.W = zero_init_projection(low_dim, high_dim, stride)

    def forward(self, x_high, x_low):
        batch, low_dim = x_low.shape[:2]
        g_x = self.g(x_low).reshape(batch, low_dim, -1)                          # [B, Cl, Nl]
        theta_x = self.theta(x_high).reshape(batch, low_dim, -1)                 # [B, Cl, Nh]
        phi_x = self.phi(x_low).reshape(batch, low_dim, -1).transpose(1, 2)      # [B, Nh, Cl]
        y = linear_attention(theta_x, phi_x, g_x, divisor=low_dim)               # [B, Cl, Nl]
        y = y.reshape(batch, low_dim, *x_low.shape[2:])                          # [B, Cl, h, w]
        return self.W(y) + x_high


class PNL(nn.Module):
    """Pixel non-local: x_high [B, Ch, H, W], x_low [B, Cl, h, w] -> [B, Ch, H, W]. Positions of
    x_high attend to positions of x_low. Keeps the released reshape: the Cl/2-channel maps are
    read as Cl channels of half as many positions (trained weights depend on it)."""

    def __init__(self, high_dim, low_dim, reduction=2):
        super().__init__()
        inter_dim = low_dim // reduction
        self.g = nn.Conv2d(low_dim, inter_dim, 1)
        self.theta = nn.Conv2d(high_dim, inter_dim, 1)
        self.phi = nn.Conv2d(low_dim, inter_dim, 1)
        self.W = zero_init_projection(inter_dim, high_dim)

    def forward(self, x_high, x_low):
        batch, low_dim = x_low.shape[:2]
        for x in (x_high, x_low):
            check_even_positions(x.shape[2] * x.shape[3])
        g_x = self.g(x_low).reshape(batch, low_dim, -1).transpose(1, 2)          # [B, Nl/2, Cl]
        theta_x = self.theta(x_high).reshape(batch, low_dim, -1).transpose(1, 2)  # [B, Nh/2, Cl]
        phi_x = self.phi(x_low).reshape(batch, low_dim, -1)                      # [B, Cl, Nl/2]
        y = linear_attention(theta_x, phi_x, g_x, divisor=phi_x.shape[2])        # [B, Nh/2, Cl]
        y = y.transpose(1, 2).reshape(batch, -1, *x_high.shape[2:])             # [B, Cl/2, H, W]
        return self.W(y) + x_high


class MFABlock(nn.Module):
    """Multi-stage feature aggregation: PNL(CNL(x_high, x_low), x_low), [B, Ch, H, W] out.
    x_low is the input of a ResNet stage, x_high its output."""

    def __init__(self, high_dim, low_dim, downsample):
        super().__init__()
        self.cnl = CNL(high_dim, low_dim, downsample)
        self.pnl = PNL(high_dim, low_dim)

    def forward(self, x_high, x_low):
        return self.pnl(self.cnl(x_high, x_low), x_low)


class DEEBranch(nn.Module):
    """One embedding generator of DEE: [B, C, H, W] -> [B, C, H, W]; the mean of three 3x3 convs
    C -> C/4 at dilation 1, 2, 3, ReLU, then a 1x1 conv C/4 -> C."""

    def __init__(self, channels):
        super().__init__()
        self.dilated = nn.ModuleList(
            nn.Conv2d(channels, channels // 4, 3, padding=rate, dilation=rate, bias=False)
            for rate in (1, 2, 3))
        self.expand = nn.Conv2d(channels // 4, channels, 1)
        for conv in [*self.dilated, self.expand]:
            nn.init.kaiming_normal_(conv.weight, a=0, mode='fan_in')

    def forward(self, x):
        mixed = sum(conv(x) for conv in self.dilated) / len(self.dilated)   # [B, C/4, H, W]
        return self.expand(F.relu(mixed))


class DEEModule(nn.Module):
    """Diverse embedding expansion: [B, C, H, W] -> [(1 + n)B, C, H, W] = [x; branch1(x); ...;
    branch_n(x)] for n = num_generated (released: 2), then Dropout(0.01)."""

    def __init__(self, channels, num_generated=2, dropout=0.01):
        super().__init__()
        self.branches = nn.ModuleList(DEEBranch(channels) for _ in range(num_generated))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(torch.cat([x] + [branch(x) for branch in self.branches]))


class NonLocal(nn.Module):
    """AGW's dot-product non-local block: [B, C, H, W] -> [B, C, H, W], starts as the identity.
    theta/phi/g map to `inter_dim` channels (1 in the released code); affinity / #positions."""

    def __init__(self, channels, inter_dim=1):
        super().__init__()
        self.inter_dim = inter_dim
        self.g = nn.Conv2d(channels, inter_dim, 1)
        self.theta = nn.Conv2d(channels, inter_dim, 1)
        self.phi = nn.Conv2d(channels, inter_dim, 1)
        self.W = zero_init_projection(inter_dim, channels)

    def forward(self, x):
        batch = x.shape[0]
        g_x = self.g(x).reshape(batch, self.inter_dim, -1).transpose(1, 2)          # [B, N, c]
        theta_x = self.theta(x).reshape(batch, self.inter_dim, -1).transpose(1, 2)  # [B, N, c]
        phi_x = self.phi(x).reshape(batch, self.inter_dim, -1)                      # [B, c, N]
        y = linear_attention(theta_x, phi_x, g_x, divisor=phi_x.shape[2])           # [B, N, c]
        y = y.transpose(1, 2).reshape(batch, self.inter_dim, *x.shape[2:])          # [B, c, H, W]
        return self.W(y) + x


def make_bnneck(dim):
    """BatchNorm1d with the bias frozen at 0 and weight ~ N(1, 0.01)."""
    bnneck = nn.BatchNorm1d(dim)
    nn.init.normal_(bnneck.weight, 1.0, 0.01)
    nn.init.zeros_(bnneck.bias)
    bnneck.bias.requires_grad_(False)
    return bnneck


def make_classifier(dim, num_classes):
    """Linear(dim, #ids) without bias, weight ~ N(0, 0.001)."""
    classifier = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(classifier.weight, 0.0, 0.001)
    return classifier


def gem_pool(x, p=3.0):
    """Generalised-mean pooling in fp32: [N, C, H, W] -> [N, C], (mean(x^p) + 1e-12)^(1/p)."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide).pow(p).mean((2, 3)) + 1e-12).pow(1.0 / p)


def average_pool(x):
    """Global average pooling accumulated and returned in fp32: [N, C, H, W] -> [N, C]."""
    return x.mean((2, 3), dtype=torch.promote_types(x.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# DEEN's parts as switches (the paper's ablations)

DEE_STAGES = (0, 1, 2, 3, 4)        # after the modality stem (0) or after ResNet stage 1..4
ATTENTIONS = ('mfa', 'nonlocal', 'none')
SWITCHES = ('dee_stage', 'dee_embeddings', 'attention', 'nonlocal_reduction')  # train.py's dests


@dataclass(frozen=True)
class NetworkSwitches:
    """Which of DEEN's parts a network has, as train.py's flags set them and every checkpoint
    records them (asdict). dee_stage: where DEE sits, None for no DEE; dee_embeddings: how many
    embeddings DEE generates; attention: the block after ResNet stages 1-3 (RegDB: 1-2), MFA, a
    non-local block (NonLocal with channels / nonlocal_reduction inter-channels) or none."""
    dee_stage: Optional[int] = 3
    dee_embeddings: int = 2
    attention: str = 'mfa'
    nonlocal_reduction: int = 2

    @classmethod
    def released(cls, regdb=False):
        """The released DEEN: DEE after stage 3 (RegDB: after stage 2), two generated, MFA."""
        return cls(dee_stage=2 if regdb else 3)

    @classmethod
    def of(cls, dataset, recorded=None):
        """The switches of a DEEN on `dataset` as a checkpoint records them (a dict; None, or
        missing keys as in checkpoints older than the switches: the released ones)."""
        return replace(cls.released(dataset == 'regdb'), **(recorded or {}))

    @classmethod
    def from_args(cls, args):
        """The switches of train.py's resolved arguments (--dee-stage none: no DEE)."""
        values = {name: getattr(args, name) for name in SWITCHES}
        return cls(**{**values, 'dee_stage': None if values['dee_stage'] == 'none'
                      else values['dee_stage']})

    def flag_value(self, name):
        """A switch as train.py's flag spells it (no DEE: 'none')."""
        value = getattr(self, name)
        return 'none' if value is None else value

    @property
    def num_branches(self):
        """Embeddings per image: the original plus the generated ones (1 without DEE)."""
        return 1 if self.dee_stage is None else 1 + self.dee_embeddings

    def describe(self):
        dee = ('no DEE' if self.dee_stage is None else
               f'DEE after stage {self.dee_stage} ({self.dee_embeddings} generated)')
        attention = {'mfa': 'MFA', 'none': 'no attention',
                     'nonlocal': f'non-local (C/{self.nonlocal_reduction})'}[self.attention]
        return f'{dee}, {attention}'

    def check(self, regdb):
        """One sentence for a combination the network cannot have."""
        if self.dee_stage is not None and self.dee_stage not in DEE_STAGES:
            raise UserError(f'{flag("dee_stage")} must be one of 0..4 or none, got {self.dee_stage!r}.')
        if regdb and self.dee_stage == 4:
            raise UserError(f'{flag("dee_stage")} 4 is impossible on RegDB: its network has no '
                            f'stage 4 (layer4); use 0..3.')
        if self.dee_embeddings < 1:
            raise UserError(f'{flag("dee_embeddings")} must be at least 1, got '
                            f'{self.dee_embeddings}; {flag("dee_stage")} none turns DEE off.')
        if self.attention not in ATTENTIONS:
            raise UserError(f'{flag("attention")} must be one of {", ".join(ATTENTIONS)}, got '
                            f'{self.attention!r}.')
        if self.nonlocal_reduction < 1:
            raise UserError(f'{flag("nonlocal_reduction")} must be at least 1, got '
                            f'{self.nonlocal_reduction}.')


# ----------------------------------------------------------------------------------------------
# Networks

class TwoStreamNet(nn.Module):
    """What DEEN and AGW share: a ResNet stem per modality, the shared trunk, BNNeck + classifier.

    Forward API (training must go through forward, for DDP):

        model(visible=None, infrared=None)   # either or both, [Nv, 3, H, W] and [Ni, 3, H, W];
                                             # each modality goes through its own stem and the
                                             # batch is [visible; infrared], N = Nv + Ni
        train mode -> TrainOutput(pool [k*N, D] pre-BN pooled embeddings (fp32),
                                  logits [k*N, #ids],
                                  ortho: DEEN's orthogonal term (scalar tensor); None for AGW
                                  and for DEEN with fewer than two generated embeddings)
        eval mode  -> (pool, feat), each L2-normalised, [k*N, D] (fp32)

    k = model.num_branches (released DEEN 3, AGW 1; DEEN's switches set it), D = model.embed_dim
    (ResNet-50: 2048, DEEN on RegDB 1024; ResNet-18/34: 512 and 256). model.arch names the trunk,
    model.widths its stage widths. DEEN's rows are [orig; gen1; ...], each [visible; infrared]
    (DEE multiplies the batch by k, also at test time); AGW's rows are [visible; infrared].

    State dict keys shared by both: visible_stem.{conv1,bn1}.*, infrared_stem.{conv1,bn1}.*,
    trunk.layer{1,2,3,4}.<torchvision ResNet names> (DEEN on RegDB: no layer4), bottleneck.*
    (BatchNorm1d) and classifier.weight.
    """

    num_branches = 1

    def __init__(self, num_classes, arch='resnet50', with_layer4=True):
        super().__init__()
        resnet = make_resnet(arch)
        self.arch, self.widths = arch, stage_widths(resnet)
        self.visible_stem = ModalityStem(resnet)
        self.infrared_stem = ModalityStem(resnet)
        self.trunk = ResNetTrunk(resnet, with_layer4)
        self.embed_dim = self.widths[3] if with_layer4 else self.widths[2]
        self.bottleneck = make_bnneck(self.embed_dim)
        self.classifier = make_classifier(self.embed_dim, num_classes)

    def stems(self, visible, infrared):
        """[Nv, 3, H, W], [Ni, 3, H, W] (either may be None) -> [Nv + Ni, 64, H/4, W/4]."""
        parts = []
        if visible is not None:
            parts.append(self.visible_stem(visible))
        if infrared is not None:
            parts.append(self.infrared_stem(infrared))
        if not parts:
            raise ValueError('forward needs visible and/or infrared images')
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def head(self, pool):
        """pool [M, D] (fp32) -> TrainOutput in train mode, (pool, feat) L2-normalised in eval."""
        feat = self.bottleneck(pool)
        if self.training:
            ortho = orthogonal_loss(pool, self.num_branches) if self.num_branches > 2 else None
            return TrainOutput(pool, self.classifier(feat), ortho)
        return F.normalize(pool, dim=1), F.normalize(feat.float(), dim=1)


class DEEN(TwoStreamNet):
    """Diverse Embedding Expansion Network (CVPR 2023), forward API as in TwoStreamNet. Released
    variant: 3 embeddings per image, rows [orig; gen1; gen2] each [visible; infrared], embed_dim
    2048; on RegDB no MFA3 and no layer4, DEE on 512 channels before layer3, embed_dim 1024.
    `switches` (NetworkSwitches, None: the released ones) move or remove DEE, change its number
    of generated embeddings and the attention block; the released parts are created in the same
    order whatever the switches, so the released variant's seeded weights do not change.

    State dict keys besides the shared ones:
        mfa{1,2,3}.{cnl,pnl}.{g,theta,phi}.{weight,bias}, mfa*.{cnl,pnl}.W.0.{weight,bias} (conv),
        mfa*.{cnl,pnl}.W.1.* (BatchNorm2d)                        (RegDB: no mfa3)
        non_local{1,2,3}.{g,theta,phi,W.0}.{weight,bias}, .W.1.*  (instead, with attention nonlocal)
        dee.branches.{0,1}.dilated.{0,1,2}.weight (dilation 1, 2, 3), dee.branches.{0,1}.expand.*
    """

    def __init__(self, num_classes, regdb=False, arch='resnet50', switches=None):
        switches = switches or NetworkSwitches.released(regdb)
        switches.check(regdb)
        super().__init__(num_classes, arch, with_layer4=not regdb)
        self.regdb, self.switches = regdb, switches
        self.num_branches = switches.num_branches
        channels = (self.visible_stem.conv1.out_channels, *self.widths)  # after stage k: channels[k]
        self.attention_after = {}  # stage -> attribute name of its attention block
        for stage in (1, 2) if regdb else (1, 2, 3):
            name, block = self._attention_block(stage, channels[stage], channels[stage - 1])
            if block is not None:
                setattr(self, name, block)
                self.attention_after[stage] = name
        if regdb:
            self.mfa3 = None  # no block after stage 3 on RegDB (the attribute exists, as released)
        self.dee = (None if switches.dee_stage is None else
                    DEEModule(channels[switches.dee_stage], switches.dee_embeddings))

    def _attention_block(self, stage, channels, low_channels):
        """(attribute name, block) of the attention after `stage`, or (None, None)."""
        if self.switches.attention == 'mfa':
            return f'mfa{stage}', MFABlock(channels, low_channels, downsample=stage > 1)
        if self.switches.attention == 'nonlocal':
            inter = max(1, channels // self.switches.nonlocal_reduction)
            return f'non_local{stage}', NonLocal(channels, inter_dim=inter)
        return None, None

    def forward(self, visible=None, infrared=None):
        x = self.expand(0, self.stems(visible, infrared))  # [N, 64, H/4, W/4]
        stages = (self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4)
        for stage, layer in enumerate(stages[:3] if self.regdb else stages, 1):
            x = self.expand(stage, self.attend(stage, layer(x), x))
        return self.head(average_pool(x))                  # [kN, D]; released [3N, D]

    def attend(self, stage, x_high, x_low):
        """The attention block after `stage` (if any) on its output x_high; MFA also reads its
        input x_low."""
        if stage not in self.attention_after:
            return x_high
        block = getattr(self, self.attention_after[stage])
        return block(x_high, x_low) if isinstance(block, MFABlock) else block(x_high)

    def expand(self, stage, x):
        """DEE when it sits after `stage`: [N, ...] -> [kN, ...]; else x unchanged."""
        return self.dee(x) if self.switches.dee_stage == stage else x


class AGW(TwoStreamNet):
    """The AGW baseline: non-local blocks after the last 2 blocks of layer2 and the last 3 of
    layer3 (ResNet-18's layer3 has only 2 blocks: one after each), GeM pooling (p=3), BNNeck.
    One embedding per image, embed_dim 2048. State dict keys besides the shared ones:
    layer{2,3}_non_local.<i>.{g,theta,phi,W.0}.{weight,bias}, .W.1.*."""

    def __init__(self, num_classes, arch='resnet50'):
        super().__init__(num_classes, arch)
        self.layer2_non_local = non_local_blocks(self.trunk.layer2, self.widths[1], count=2)
        self.layer3_non_local = non_local_blocks(self.trunk.layer3, self.widths[2], count=3)

    def forward(self, visible=None, infrared=None):
        x = self.stems(visible, infrared)                                   # [N, 64, H/4, W/4]
        x = self.trunk.layer1(x)                                            # [N, 256, H/4, W/4]
        x = with_non_local(self.trunk.layer2, self.layer2_non_local, x)     # [N, 512, H/8, W/8]
        x = with_non_local(self.trunk.layer3, self.layer3_non_local, x)     # [N, 1024, H/16, W/16]
        x = self.trunk.layer4(x)                                            # [N, 2048, H/16, W/16]
        return self.head(gem_pool(x))                                       # [N, 2048]


def non_local_blocks(layer, channels, count):
    """AGW's non-local blocks for the last `count` residual blocks of a ResNet stage (as many as
    the stage has, if fewer: a block with no residual block before it would never run)."""
    return nn.ModuleList(NonLocal(channels) for _ in range(min(count, len(layer))))


def with_non_local(layer, blocks, x):
    """Run a ResNet stage with non-local blocks after its last len(blocks) residual blocks."""
    first = len(layer) - len(blocks)
    for index, residual_block in enumerate(layer):
        x = residual_block(x)
        if index >= first:
            x = blocks[index - first](x)
    return x


def build_model(method, num_classes, dataset, pretrained=None, arch='resnet50', switches=None):
    """DEEN ('deen'; dataset 'regdb' selects its RegDB variant) or AGW ('agw', and 'caj', which
    trains the same network) on the trunk `arch`.
    pretrained: 'imagenet' (torchvision's IMAGENET1K_V1 weights of `arch` into both stems and the
    trunk), a path to a torchvision state dict of `arch`, or None / 'none'. switches: DEEN's
    NetworkSwitches (None: the released ones)."""
    if method == 'deen':
        model = DEEN(num_classes, regdb=dataset == 'regdb', arch=arch, switches=switches)
    elif method in ('agw', 'caj'):  # CAJ trains AGW's network (its released model.py)
        model = AGW(num_classes, arch=arch)
    else:
        raise UserError(f'--method must be deen, agw or caj, got {method!r}.')
    backbone_weights = backbone_state_dict(pretrained, arch)
    if backbone_weights is not None:
        load_backbone(model, backbone_weights, source=pretrained)
    return model


def uses_pretrained(pretrained):
    """Whether --pretrained names weights to start from (not 'none')."""
    return pretrained is not None and str(pretrained).lower() != 'none'


# ----------------------------------------------------------------------------------------------
# ImageNet / local backbone weights

def backbone_state_dict(pretrained, arch):
    """The torchvision state dict of `arch` that `pretrained` names, or None."""
    if not uses_pretrained(pretrained):
        return None
    if str(pretrained).lower() == 'imagenet':
        return imagenet_state_dict(arch)
    return read_state_dict_file(pretrained, f'{flag("pretrained")} file')


def imagenet_state_dict(arch='resnet50'):
    """torchvision's ImageNet weights of `arch` (IMAGENET1K_V1) from the torch hub cache, downloaded
    there when missing; offline, a UserError saying where to put the file."""
    url = torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    path = os.path.join(folder, os.path.basename(url))
    if not os.path.isfile(path):
        hash_prefix = torch.hub.HASH_REGEX.search(os.path.basename(url)).group(1)
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, path, hash_prefix=hash_prefix, progress=False)
        except (urllib.error.URLError, OSError, RuntimeError) as error:  # offline, disk, bad hash
            reason = getattr(error, 'reason', error)
            raise UserError(f'cannot download the ImageNet {arch} weights ({reason}): put '
                            f'{os.path.basename(url)} (from {url}) into {folder}, or pass '
                            f'--pretrained <path to a torchvision {arch} state dict> or '
                            f'--pretrained none.') from None
    return read_state_dict_file(path, 'the ImageNet weights file')


def read_state_dict_file(path, what):
    """The state dict in a weights-only torch file (utils.load_checkpoint: one-sentence errors
    naming `what` and the path)."""
    state = load_checkpoint(path, what)
    if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
        state = state['state_dict']
    if not isinstance(state, dict):
        raise UserError(f'{what} {path} holds a {type(state).__name__}, not a state dict.')
    return state


def load_backbone(model, state, source):
    """Load a torchvision ResNet state dict of model.arch into both stems and the trunk (fc is
    ignored)."""
    state = strip_prefixes(state)
    stem_keys = ('conv1.', 'bn1.')
    stem_state = {k: v for k, v in state.items() if k.startswith(stem_keys)}
    trunk_keys = tuple(f'{name}.' for name, _ in model.trunk.named_children())
    trunk_state = {k: v for k, v in state.items() if k.startswith(trunk_keys)}
    try:
        for stem in (model.visible_stem, model.infrared_stem):
            stem.load_state_dict(stem_state)
        model.trunk.load_state_dict(trunk_state)
    except RuntimeError as error:
        detail = ' '.join(str(error).split())[:300]
        raise UserError(f'--pretrained {source} is not a torchvision {model.arch} state dict '
                        f'({detail}).') from None


# ----------------------------------------------------------------------------------------------
# Released checkpoints and loading trained weights

RELEASED_PREFIXES = ('visible_module.', 'thermal_module.', 'base_resnet.')

# (released key prefix pattern, our prefix or None to drop); the first match wins.
_RELEASED_TO_OURS = [
    (r'visible_module\.visible\.(conv1|bn1)\.', lambda m: f'visible_stem.{m[1]}.'),
    (r'thermal_module\.thermal\.(conv1|bn1)\.', lambda m: f'infrared_stem.{m[1]}.'),
    (r'(visible_module|thermal_module)\.', None),         # full ResNet copies its forward never calls
    (r'base_resnet\.base\.(layer[1-4])\.', lambda m: f'trunk.{m[1]}.'),
    (r'base_resnet\.base\.', None),                        # conv1, bn1 (and fc) of the trunk copy
    (r'MFA([1-3])\.(CNL|PNL)\.', lambda m: f'mfa{m[1]}.{m[2].lower()}.'),
    (r'DEE\.FC([12])([1-3])\.', lambda m: f'dee.branches.{int(m[1]) - 1}.dilated.{int(m[2]) - 1}.'),
    (r'DEE\.FC([12])\.', lambda m: f'dee.branches.{int(m[1]) - 1}.expand.'),
    (r'NL_([1-4])\.(\d+)\.g\.0\.', lambda m: f'layer{m[1]}_non_local.{m[2]}.g.'),
    (r'NL_([1-4])\.(\d+)\.', lambda m: f'layer{m[1]}_non_local.{m[2]}.'),
]

_OURS_TO_RELEASED = [
    (r'visible_stem\.', lambda m: 'visible_module.visible.'),
    (r'infrared_stem\.', lambda m: 'thermal_module.thermal.'),
    (r'trunk\.', lambda m: 'base_resnet.base.'),
    (r'mfa([1-3])\.(cnl|pnl)\.', lambda m: f'MFA{m[1]}.{m[2].upper()}.'),
    (r'dee\.branches\.(\d)\.dilated\.(\d)\.', lambda m: f'DEE.FC{int(m[1]) + 1}{int(m[2]) + 1}.'),
    (r'dee\.branches\.(\d)\.expand\.', lambda m: f'DEE.FC{int(m[1]) + 1}.'),
    (r'layer([1-4])_non_local\.(\d+)\.g\.', lambda m: f'NL_{m[1]}.{m[2]}.g.0.'),
    (r'layer([1-4])_non_local\.(\d+)\.', lambda m: f'NL_{m[1]}.{m[2]}.'),
]


def _rename(key, rules):
    """The key renamed by the first matching rule; None when that rule drops it; unchanged if none match."""
    for pattern, rename in rules:
        match = re.match(pattern, key)
        if match:
            return None if rename is None else rename(match) + key[match.end():]
    return key


def convert_released_state_dict(state_dict):
    """A released DEEN/AGW state dict (ZYK100/LLCM, `checkpoint['net']`) in our key layout. The
    unused full-ResNet copies are dropped, and so is the trunk's layer4 for the RegDB variant
    (a DEE module without MFA3), which the released forward never calls."""
    state_dict = strip_prefixes(state_dict)
    converted = {}
    for key, value in state_dict.items():
        new_key = _rename(key, _RELEASED_TO_OURS)
        if new_key is not None:
            converted[new_key] = value
    regdb_variant = any(k.startswith('dee.') for k in converted) and not any(
        k.startswith('mfa3.') for k in converted)
    if regdb_variant:
        converted = {k: v for k, v in converted.items() if not k.startswith('trunk.layer4.')}
    return converted


def released_state_dict(state_dict):
    """Our state dict in the released key layout (the inverse of convert_released_state_dict on the
    keys the released forward uses; the unused ResNet copies are not recreated)."""
    return {_rename(key, _OURS_TO_RELEASED): value for key, value in strip_prefixes(state_dict).items()}


def strip_prefixes(state_dict):
    """Remove a DDP 'module.' or torch.compile '_orig_mod.' prefix carried by every key."""
    for prefix in ('module.', '_orig_mod.'):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return dict(state_dict)


def is_released_format(state_dict):
    return any(key.startswith(RELEASED_PREFIXES) for key in strip_prefixes(state_dict))


def converted_state_dict(state_dict):
    """A state dict, ours or released (detected from the keys, 'module.' prefix tolerated), in
    our key layout."""
    state_dict = strip_prefixes(state_dict)
    return convert_released_state_dict(state_dict) if is_released_format(state_dict) else state_dict


def load_model_weights(model, state_dict):
    """Load trained weights, ours or released (detected from the keys, 'module.' prefix tolerated),
    strictly: every key must exist with the same shape (only BatchNorm's num_batches_tracked, which
    old checkpoints lack, may be missing). Otherwise one-sentence UserError."""
    state_dict = converted_state_dict(state_dict)
    expected = model.state_dict()
    own_check = getattr(model, 'weights_problem', None)  # a network's own sentence (DART's twins)
    problem = (own_check(state_dict) if own_check else '') or weights_mismatch(expected, state_dict)
    if problem:
        raise UserError(f'the checkpoint does not fit this {type(model).__name__} model: {problem}.')
    model.load_state_dict(state_dict)  # a plain dict: BatchNorm fills a missing num_batches_tracked


def weights_mismatch(expected, given):
    """A short description of how `given` does not fit `expected`, or '' when it does."""
    classes = 'classifier.weight'
    if classes in expected and classes in given and len(expected[classes]) != len(given[classes]):
        return (f'checkpoint has {len(given[classes])} classes, model {len(expected[classes])} '
                f'(trained on another dataset?)')
    missing = [k for k in expected if k not in given and not k.endswith('num_batches_tracked')]
    unexpected = [k for k in given if k not in expected]
    reshaped = [f'{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}'
                for k in expected if k in given and given[k].shape != expected[k].shape]
    parts = [f'{label} {len(keys)} keys (e.g. {", ".join(keys[:3])})'
             for label, keys in (('it lacks', missing), ('it has unexpected', unexpected),
                                 ('shapes differ for', reshaped)) if keys]
    return '; '.join(parts) + ' (was it trained with another method, trunk or dataset?)' if parts else ''

