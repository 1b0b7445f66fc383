"""A method is one module: every registered method declares a complete recipe and fusions; a new
method defined only here (its network, views, criterion with per-epoch state, fusions) trains,
resumes exactly, tests through test.py and is refused another method's flags once registered, with
no other file touched; flags of one method given to another are refused in one sentence."""
import json
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import methods
import test as test_script
import training
from loss import batch_hard_triplet_loss, identity_loss
from methods.base import Method
from model import TwoStreamNet, average_pool
from tiny_runs import train_argv
from utils import UserError, load_checkpoint

RECIPE_KEYS = {'lr', 'batch_size', 'num_pos', 'img_h', 'img_w', 'epochs', 'lr_steps', 'warmup',
               'grayscale', 'erasing', 'pad'}


@pytest.mark.parametrize('name', sorted(methods.METHODS))
def test_every_method_declares_a_complete_recipe_and_its_headline_fusion(name):
    method = methods.get_method(name)
    assert method.name == name and method.title and method.summary
    assert RECIPE_KEYS <= set(method.recipe), f'{name} recipe lacks {RECIPE_KEYS - set(method.recipe)}'
    assert method.headline in method.fusions
    assert len(method.feature_kinds) == 2
    args = training.parse_args(['--method', name])
    for key in RECIPE_KEYS:
        value = getattr(args, key)
        assert (tuple(value) if isinstance(value, list) else value) == method.recipe[key]


def test_an_unknown_method_name_is_one_sentence():
    with pytest.raises(UserError, match=r"--method must be one of deen, agw, caj.*got 'nope'\.$"):
        methods.get_method('nope')


# ----------------------------------------------------------------------------------------------
# A fifth method, written here only: a two-stream trunk with average pooling and a BNNeck, id +
# batch-hard triplet, and a criterion that keeps a per-epoch weight and a running sum as buffers.

class PlainNet(TwoStreamNet):
    def forward(self, visible=None, infrared=None):
        x = self.stems(visible, infrared)
        for layer in (self.trunk.layer1, self.trunk.layer2, self.trunk.layer3, self.trunk.layer4):
            x = layer(x)
        return self.head(average_pool(x))


class WeightedCriterion(nn.Module):
    """id + weight * triplet; the weight is 1 in epoch 0, then 1 / (1 + previous epoch's mean id)."""

    def __init__(self):
        super().__init__()
        self.register_buffer('weight', torch.ones(()))
        self.register_buffer('id_sum', torch.zeros((), dtype=torch.float64))
        self.register_buffer('steps', torch.zeros((), dtype=torch.int64))
        self.started, self.ended = [], []

    def forward(self, out, labels):
        parts = {'id': identity_loss(out.logits, labels),
                 'tri': self.weight * batch_hard_triplet_loss(out.pool, labels)}
        self.id_sum += parts['id'].detach().double()
        self.steps += 1
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

    def start_epoch(self, epoch, run):
        self.started.append((epoch, run.num_classes))

    def end_epoch(self, epoch):
        self.ended.append(epoch)
        self.weight.fill_(1.0 / (1.0 + float(self.id_sum / self.steps)))
        self.id_sum.zero_()
        self.steps.zero_()


def feat_only(query, gallery):
    """the BNNeck features' dot product, branch 0 only"""
    return -query[:, 1, 0] @ gallery[:, 1, 0].T


class PlainMethod(Method):
    name, title = 'plain', 'Plain'
    summary = 'A two-stream ResNet with average pooling and a BNNeck, trained with id + triplet.'
    recipe = dict(lr=0.1, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=81,
                  lr_steps=(20, 50), warmup=10, grayscale=0.0, erasing=None, pad=10)
    own_flags = ('plain_flag',)
    fusions = {'pool+feat': (1.0, 1.0), 'feat-only': feat_only}
    headline = 'feat-only'
    criteria = []

    def add_arguments(self, group):
        group.add_argument('--plain-flag', type=int, help='a flag only this method takes')

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return PlainNet(num_classes, arch)

    def build_criterion(self, args, views):
        self.criteria.append(WeightedCriterion())
        return self.criteria[-1]


@pytest.fixture
def plain(monkeypatch):
    method = PlainMethod()
    monkeypatch.setitem(methods.METHODS, 'plain', method)
    return method


def test_a_new_method_is_one_module_that_trains_resumes_and_tests(plain, llcm_root, tmp_path):
    argv = train_argv('llcm', llcm_root, tmp_path, '--method', 'plain', '--epochs', 2,
                      '--max-steps', 2, '--eval-every', 1)
    assert training.main(argv) == 0
    criterion = plain.criteria[-1]
    assert [epoch for epoch, _ in criterion.started] == [0, 1] and criterion.ended == [0, 1]
    assert criterion.started[0][1] == 6  # the run it is given: the LLCM folder's 6 training ids
    last = load_checkpoint(os.path.join(tmp_path, 'models', 'llcm_plain_last.pth'))
    assert last['method'] == 'plain'
    assert torch.equal(last['criterion']['weight'], criterion.weight.cpu())
    assert 0 < float(last['criterion']['weight']) < 1  # set by end_epoch from the epoch's mean

    # interrupted after epoch 0, resumed: the criterion's state and the weights continue exactly
    once = tmp_path / 'once'
    assert training.main(train_argv('llcm', llcm_root, once, '--method', 'plain', '--epochs', 1,
                                    '--max-steps', 2, '--eval-every', 1)) == 0
    assert training.main(train_argv('llcm', llcm_root, once, '--method', 'plain', '--epochs', 2,
                                    '--max-steps', 2, '--eval-every', 1, '--resume', 'last')) == 0
    resumed = load_checkpoint(os.path.join(once, 'models', 'llcm_plain_last.pth'))
    assert torch.equal(resumed['criterion']['weight'], last['criterion']['weight'])
    for key, value in last['model'].items():
        assert torch.equal(resumed['model'][key], value), key

    output = tmp_path / 'results.json'
    checkpoint = os.path.join(tmp_path, 'models', 'llcm_plain_best.pth')
    assert test_script.main(['--resume', checkpoint, '--data-path', str(llcm_root), '--device',
                             'cpu', '--workers', '0', '--trial', '0', '--output', str(output)]) == 0
    record = json.load(open(output))
    assert set(record['results']['ir_to_vis']) == {'pool+feat', 'feat-only'}
    assert record['protocol']['fusions']['feat-only'] == feat_only.__doc__


def test_the_new_methods_flag_is_refused_to_the_others_and_theirs_to_it(plain):
    assert training.parse_args(['--method', 'plain', '--plain-flag', '3']).plain_flag == 3
    with pytest.raises(UserError, match=r'^--plain-flag belong\(s\) to --method plain; --method '
                                        r'deen does not take it\.$'):
        training.parse_args(['--plain-flag', '3'])
    with pytest.raises(UserError, match=r"--dee-stage switch\(es\) DEEN's parts; use them with "
                                        r'--method deen, not plain\.$'):
        training.parse_args(['--method', 'plain', '--dee-stage', '2'])
    with pytest.raises(UserError, match=r'^--adp-gamma sets the ADP triplet of --method agw and '
                                        r'caj; plain does not train with it\.$'):
        training.parse_args(['--method', 'plain', '--adp-gamma', '2'])


def test_a_method_fusion_can_be_its_own_function():
    from inference import fused_distance
    query, gallery = F.normalize(torch.randn(3, 2, 1, 4), dim=3), F.normalize(torch.randn(5, 2, 1, 4), dim=3)
    expected = -(query[:, 1, 0] @ gallery[:, 1, 0].T)
    assert torch.equal(fused_distance(query, gallery, feat_only), expected)
