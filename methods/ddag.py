"""DDAG (Ye et al., ECCV 2020, "Dynamic Dual-Attentive Aggregation Learning for Visible-Infrared
Person Re-Identification"; released code mangye16/DDAG, MIT): its network (the two-stream
trunk with the intra-modality weighted-part attention IWPA and the training-only cross-modality
graph attention CGSA), its criterion with the per-epoch graph weight w_G, and its method entry.

Facts from the released code (file:line at mangye16/DDAG HEAD 5548522) are cited where used;
docs/methods.md lists the recipe and the released quirks."""
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from loss import batch_hard_triplet_loss, full_precision, identity_loss, same_identity
from methods.base import AGW_SCHEDULE, Method
from model import TwoStreamNet, average_pool, make_bnneck

PARTS = 3            # train_ddag.py:53 --part 3 (README:39)
GRAPH_HEADS = 4      # model_main.py:134 nheads=4
GRAPH_DROPOUT = 0.2  # train_ddag.py:57 --drop 0.2 (features and attention coefficients)
GRAPH_SLOPE = 0.2    # model_main.py:134 alpha=0.2 (LeakyReLU of the attention logits)
MASKED = -9e15       # attention.py:48: the logit of a pair that is not an edge


# ----------------------------------------------------------------------------------------------
# IWPA: intra-modality weighted-part attention

def part_pool(x, parts):
    """Average of each of `parts` horizontal stripes of x [N, C, H, W] -> [N, C, parts]; the
    stripes are adaptive pooling's (rows floor(p H / P) to ceil((p + 1) H / P), overlapping when
    H is not a multiple of P), written as slices so that any H exports to ONNX."""
    height = x.shape[2]
    bounds = [(p * height // parts, -(-(p + 1) * height // parts)) for p in range(parts)]
    return torch.stack([x[:, :, top:bottom].mean((2, 3)) for top, bottom in bounds], dim=2)


class PartAttention(nn.Module):
    """IWPA (attention.py:157-240, part=3): the layer4 map's P horizontal parts p_i [C]; three 1x1
    convolutions C -> C; the part graph A = softmax_j(fc1(p_i) . fc2(p_j)) [P, P]; the refined
    parts r_i = sum_j A_ij fc3(p_j); learnable part weights g = softmax(gate) (gate initialised to
    1/P); and its own BNNeck (bias frozen) on the residual sum_i g_i r_i + feat, where feat is the
    network's BNNeck output (attention.py:236-238).

    Not built, because the released forward never uses them: IWPA's `W` 1x1 conv + BatchNorm
    (attention.py:188-194) and the network's classifier1/classifier2 (model_main.py:151-152).
    State dict keys: fc1/fc2/fc3.{weight,bias}, gate, bottleneck.*."""

    def __init__(self, channels, parts=PARTS):
        super().__init__()
        self.parts = parts
        self.fc1 = nn.Conv2d(channels, channels, 1)
        self.fc2 = nn.Conv2d(channels, channels, 1)
        self.fc3 = nn.Conv2d(channels, channels, 1)
        self.gate = nn.Parameter(torch.full((parts,), 1.0 / parts))
        self.bottleneck = make_bnneck(channels)

    def forward(self, x, feat):
        """x [N, C, H, W] the layer4 map, feat [N, C] the BNNeck feature -> [N, C]."""
        parts = part_pool(x, self.parts)[..., None]                 # [N, C, P, 1]
        query = self.fc1(parts).flatten(2).transpose(1, 2)          # [N, P, C]
        key = self.fc2(parts).flatten(2)                            # [N, C, P]
        value = self.fc3(parts).flatten(2).transpose(1, 2)          # [N, P, C]
        graph = torch.softmax(query @ key, dim=-1)                  # [N, P, P]
        refined = graph @ value                                     # [N, P, C]
        weights = torch.softmax(self.gate, dim=0).to(refined.dtype)
        weighted = (weights[:, None] * refined).sum(1)              # [N, C]
        return self.bottleneck(weighted.to(feat.dtype) + feat)


# ----------------------------------------------------------------------------------------------
# CGSA: cross-modality graph attention (training only)

class GraphAttentionLayer(nn.Module):
    """A dense graph attention layer (attention.py:21-57, after pyGAT): h = x W; the logit of the
    edge i -> j is LeakyReLU_0.2(a_1 . h_i + a_2 . h_j), pairs that are not edges (adj <= 0) get
    -9e15; softmax over j, dropout on the coefficients, output sum_j alpha_ij h_j. W [in, out]
    and a [2 out, 1] are Xavier-uniform with gain 1.414 (attention.py:34-37). The ELU the
    released layer applies is the caller's (GraphAttention)."""

    def __init__(self, in_dim, out_dim, dropout=GRAPH_DROPOUT, slope=GRAPH_SLOPE):
        super().__init__()
        self.dropout, self.slope = dropout, slope
        self.W = nn.Parameter(nn.init.xavier_uniform_(torch.empty(in_dim, out_dim), gain=1.414))
        self.a = nn.Parameter(nn.init.xavier_uniform_(torch.empty(2 * out_dim, 1), gain=1.414))

    def forward(self, x, adj):
        """x [N, in], adj [N, N] (edges where > 0) -> [N, out]."""
        h = x @ self.W
        source, target = self.a.chunk(2)
        logits = F.leaky_relu(h @ source + (h @ target).T, self.slope)   # [N, N]
        attention = torch.softmax(logits.masked_fill(adj <= 0, MASKED), dim=1)
        return F.dropout(attention, self.dropout, self.training) @ h


class GraphAttention(nn.Module):
    """CGSA (model_main.py:163-167, :190-196): dropout, `heads` graph attention layers
    in_dim -> hidden each followed by ELU and concatenated, dropout, an output layer
    heads*hidden -> #ids, ELU, log_softmax. Released: 4 heads 2048 -> 512 (--low-dim); ours
    scales the hidden width with the trunk (embed_dim / 4). Computed in fp32 (the -9e15 mask
    does not fit fp16). State dict keys: heads.<i>.{W,a}, out.{W,a}."""

    def __init__(self, in_dim, hidden, num_classes, heads=GRAPH_HEADS, dropout=GRAPH_DROPOUT):
        super().__init__()
        self.dropout = dropout
        self.heads = nn.ModuleList(GraphAttentionLayer(in_dim, hidden, dropout) for _ in range(heads))
        self.out = GraphAttentionLayer(heads * hidden, num_classes, dropout)

    @full_precision
    def forward(self, x, adj):
        """x [N, in], adj [N, N] -> log-probabilities over the identities [N, #ids] (fp32)."""
        x = F.dropout(x, self.dropout, self.training)
        x = torch.cat([F.elu(head(x, adj)) for head in self.heads], dim=1)
        x = F.dropout(x, self.dropout, self.training)
        return F.log_softmax(F.elu(self.out(x, adj)), dim=1)


def identity_graph(labels):
    """The CGSA adjacency (train_ddag.py:288-293): an edge between every two images of the same
    identity, whatever their modality, and from each image to itself. The released row
    normalisation is left out: only adj > 0 is used (attention.py:49)."""
    return same_identity(labels).float()


# ----------------------------------------------------------------------------------------------
# The network

class DDAGOutput(NamedTuple):
    pool: torch.Tensor          # [N, D] pre-BN average-pooled layer4 (fp32): the triplet's input
    logits: torch.Tensor        # [N, #ids] classifier(BNNeck feature)
    att_logits: torch.Tensor    # [N, #ids] the same classifier on the IWPA feature
    graph: torch.Tensor         # [N, #ids] CGSA log-probabilities (fp32)


class DDAG(TwoStreamNet):
    """DDAG's network (model_main.py:133-198) on the shared two-stream trunk: average pooling of
    layer4, BNNeck, one classifier shared by the BNNeck feature and the IWPA feature
    (model_main.py:196), the IWPA part attention, and in training the CGSA graph attention over
    the batch on the pooled features.

        model(visible=None, infrared=None, labels=None)
        train mode -> DDAGOutput; labels [N] (the batch's, [visible; infrared]) are needed:
                      they make the graph's adjacency (passed through forward for DDP)
        eval mode  -> (feat, att): the BNNeck and the IWPA features, each L2-normalised [N, D]

    State dict keys besides the shared ones: part_attention.*, graph_attention.*."""

    def __init__(self, num_classes, arch='resnet50'):
        super().__init__(num_classes, arch)
        self.part_attention = PartAttention(self.embed_dim)
        self.graph_attention = GraphAttention(self.embed_dim, self.embed_dim // 4, num_classes)

    def forward(self, visible=None, infrared=None, labels=None):
        trunk = self.trunk
        x = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(self.stems(visible, infrared)))))
        pool = average_pool(x)                                      # [N, D] fp32
        feat = self.bottleneck(pool)
        feat_att = self.part_attention(x, feat)
        if not self.training:
            return F.normalize(feat.float(), dim=1), F.normalize(feat_att.float(), dim=1)
        if labels is None:
            raise ValueError("DDAG's training forward needs the batch's labels (its graph)")
        graph = self.graph_attention(pool, identity_graph(labels))
        return DDAGOutput(pool, self.classifier(feat), self.classifier(feat_att), graph)


# ----------------------------------------------------------------------------------------------
# The criterion

class DDAGCriterion(nn.Module):
    """L = CE(feat) + batch-hard triplet(pool, margin 0.3) + CE(IWPA feature) + w_G NLL(graph)
    (train_ddag.py:306-321). w_G is 0 in the first epoch (:126), then 1 / (1 + the previous
    epoch's mean of L without the graph term) (:357, :439), the mean weighted by batch size as
    the released AverageMeter is (:329).

    w_G and the epoch's running sum and count are buffers, so the criterion's state_dict in a
    checkpoint written inside an epoch resumes it exactly; under torch.distributed the sum is
    over every process's batches (one all-reduce of two numbers per step). end_epoch(epoch)
    turns the sum into the next w_G. Parts: id, tri, att, graph (the weighted term), detached,
    summing to L."""

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin
        self.register_buffer('graph_weight', torch.zeros((), dtype=torch.float64))
        self.register_buffer('loss_sum', torch.zeros((), dtype=torch.float64))
        self.register_buffer('loss_count', torch.zeros((), dtype=torch.float64))

    def forward(self, out, labels):
        parts = {'id': identity_loss(out.logits, labels),
                 'tri': batch_hard_triplet_loss(out.pool, labels, self.margin),
                 'att': identity_loss(out.att_logits, labels)}
        without_graph = sum(parts.values())
        parts['graph'] = self.graph_weight.float() * F.nll_loss(out.graph.float(), labels)
        self._accumulate(without_graph.detach(), len(labels))
        return without_graph + parts['graph'], {name: value.detach() for name, value in parts.items()}

    @torch.no_grad()
    def _accumulate(self, loss, batch):
        """Add a step's loss without the graph term, weighted by its batch size, to the epoch's
        sum: every process's (all-reduced), so each holds the same state and the checkpoint
        that one of them writes inside an epoch resumes every process exactly."""
        step = torch.stack([loss.double() * batch, loss.new_tensor(batch, dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(step)
        self.loss_sum += step[0]
        self.loss_count += step[1]

    def end_epoch(self, epoch):
        """The next epoch's w_G from this epoch's mean loss without the graph term; resets it."""
        if self.loss_count > 0:
            self.graph_weight.fill_(1.0 / (1.0 + self.loss_sum / self.loss_count))
        self.loss_sum.zero_()
        self.loss_count.zero_()


# ----------------------------------------------------------------------------------------------
# The method

class DDAGMethod(Method):
    name, title = 'ddag', 'DDAG'
    summary = ('Two-stream ResNet-50 with average pooling and BNNeck, a part attention (IWPA) whose '
               'feature is tested, and a graph attention over the batch in training only.')
    # mangye16/DDAG train_ddag.py: lr 0.1 (:26), warm-up 10 and x0.1 at 20 and 50 (:249-263), pad
    # 10 then crop and flip, no erasing or grayscale (:132-139), P=8 (:49) K=4 (:61), 288x144
    # (:45-48), 81 epochs (:419).
    recipe = dict(**AGW_SCHEDULE, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=81,
                  grayscale=0.0, erasing=None)
    # train_ddag.py:216-238: BNNeck, classifier, IWPA and the graph heads at the base lr.
    head_prefixes = ('bottleneck.', 'classifier.', 'part_attention.', 'graph_attention.')
    # The released test reports the BNNeck feature ("FC") and the IWPA feature ("FC_att") each
    # alone and selects on the latter (train_ddag.py:460).
    feature_kinds = ('feat', 'att')
    fusions = {'feat': (1.0, 0.0), 'att': (0.0, 1.0)}
    headline = 'att'

    def describe_network(self, args):
        return (f'DDAG network: IWPA over {PARTS} parts, CGSA with {GRAPH_HEADS} heads (training '
                f'only)')

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return DDAG(num_classes, arch=arch)

    def build_criterion(self, args, views):
        return DDAGCriterion(margin=args.margin)

    def forward_train(self, model, visible, infrared, labels):
        return model(visible=visible, infrared=infrared, labels=labels)


DDAG_METHOD = DDAGMethod()
