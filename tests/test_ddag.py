"""DDAG (methods/ddag.py): each module against a direct transcription of its formula on small
inputs (the part pooling, IWPA, the graph attention layer with its masking, CGSA, the adjacency),
the network's two modes, the criterion's w_G across epochs and across a save/load; then DDAG as a
method: its recipe and parameter groups, a refused foreign flag, exact resume inside an epoch
(w_G included), training and test.py on every dataset, visualize.py, search.py, the Python API,
export.py, a step of the demo recipe and reproduce.py's dry run."""
import contextlib
import io
import json
import math
import os
import signal
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import export
import onnx_export
import reproduce
import search
import test as test_script
import training
import visualize
from data_manager import query_gallery
from inference import ReIDModel, fused_distance, load_trained_model, rank_gallery
from methods import find_fusion
from methods.ddag import (DDAG, DDAG_METHOD, DDAGCriterion, DDAGOutput, GraphAttention,
                          GraphAttentionLayer, PartAttention, identity_graph, part_pool)
from tiny_runs import REPO, train_argv
from utils import UserError, load_checkpoint, run_main

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


# ----------------------------------------------------------------------------------------------
# DDAG as a method: recipe, training on every dataset, exact resume, every tool

def test_recipe_is_the_released_one_and_the_heads_train_at_the_base_lr():
    args = training.parse_args(['--method', 'ddag'])
    assert (args.img_h, args.img_w, args.batch_size, args.num_pos) == (288, 144, 8, 4)
    assert (args.lr, args.warmup, tuple(args.lr_steps), args.epochs) == (0.1, 10, (20, 50), 81)
    assert (args.erasing, args.grayscale, args.pad, args.margin) == (None, 0.0, 10, 0.3)
    demo = training.parse_args(['--method', 'ddag', '--dataset', 'demo'])
    assert (demo.arch, demo.img_h, demo.img_w) == ('resnet18', 64, 32)
    model = DDAG(num_classes=3, arch='resnet18')
    body, head = training.build_optimizer(model, 0.1, pretrained=True,
                                          head_prefixes=DDAG_METHOD.head_prefixes).param_groups
    head_names = {name for name, p in model.named_parameters() if any(p is q for q in head['params'])}
    assert (body['lr_scale'], head['lr_scale']) == (0.1, 1.0)
    assert {name.split('.')[0] for name in head_names} == {
        'bottleneck', 'classifier', 'part_attention', 'graph_attention'}
    assert not any(name.startswith(('trunk.', 'visible_stem.')) for name in head_names)


def test_another_methods_flag_is_refused_in_one_sentence():
    with pytest.raises(UserError) as error:
        training.parse_args(['--method', 'ddag', '--dee-stage', '2'])
    message = str(error.value)
    assert '--dee-stage' in message and 'ddag' in message and message.count('. ') == 0


def ddag_run(root, out, dataset='llcm', *extra):
    return train_argv(dataset, root, str(out), '--method', 'ddag', *extra)


def interrupt_at_forward(monkeypatch, call):
    """SIGTERM to this process during DDAG's `call`-th training forward (1-based)."""
    original, calls = DDAG_METHOD.forward_train, []

    def forward(model, visible, infrared, labels):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(model, visible, infrared, labels)
    monkeypatch.setattr(DDAG_METHOD, 'forward_train', forward)


RUN = ['--epochs', 2, '--max-steps', 3, '--eval-every', 0]


@pytest.fixture(scope='module')
def straight_run(llcm_root, tmp_path_factory):
    out = tmp_path_factory.mktemp('ddag_straight')
    assert training.main(ddag_run(llcm_root, out, 'llcm', *RUN)) == 0
    return out


def last_state(out):
    return load_checkpoint(str(out / 'models' / 'llcm_ddag_last.pth'))


@pytest.mark.parametrize('call', [2, 5])  # inside epoch 0 (w_G 0), inside epoch 1 (w_G set)
def test_resume_inside_an_epoch_gives_the_uninterrupted_weights_and_graph_weight(
        straight_run, llcm_root, tmp_path, monkeypatch, call):
    argv = ddag_run(llcm_root, tmp_path, 'llcm', *RUN)
    with monkeypatch.context() as patch:
        interrupt_at_forward(patch, call)
        assert training.main(argv) == 130
    stopped = last_state(tmp_path)
    assert (stopped['epoch'], stopped['step']) == ((call - 1) // 3, (call - 1) % 3 + 1)
    assert float(stopped['criterion']['loss_count']) > 0  # the epoch's running sum is saved
    assert training.main(argv + ['--resume', 'last']) == 0
    expected, actual = last_state(straight_run), last_state(tmp_path)
    assert all(torch.equal(expected['model'][k], actual['model'][k]) for k in expected['model'])
    for key, value in expected['criterion'].items():
        assert torch.equal(value, actual['criterion'][key]), key
    weight = float(expected['criterion']['graph_weight'])  # set after epoch 0, updated after 1
    assert weight == pytest.approx(graph_weight_from_history(straight_run), rel=1e-5)


@pytest.fixture(scope='module')
def checkpoints(llcm_root, sysu_root, regdb_root, straight_run, tmp_path_factory):
    """{dataset: a DDAG checkpoint trained 2 steps there} (LLCM: the straight run's)."""
    found = {'llcm': straight_run / 'models' / 'llcm_ddag_last.pth'}
    for dataset, root, extra in (('sysu', sysu_root, []), ('regdb', regdb_root, ['--trial', 2])):
        out = tmp_path_factory.mktemp(f'ddag_{dataset}')
        assert training.main(ddag_run(root, out, dataset, '--epochs', 1, '--max-steps', 2,
                                      '--eval-every', 0, *extra)) == 0
        found[dataset] = out / 'models' / f'{dataset}_ddag{"_trial2" if extra else ""}_best.pth'
    return found


@pytest.mark.parametrize('dataset, settings', [
    ('llcm', {'ir_to_vis', 'vis_to_ir', 'released_vis_to_ir'}),
    ('sysu', {'all ir_to_vis', 'indoor ir_to_vis'}),
    ('regdb', {'vis_to_ir', 'ir_to_vis'})])
def test_test_py_reports_both_features_in_every_protocol(checkpoints, request, tmp_path, dataset,
                                                         settings):
    root = request.getfixturevalue(f'{dataset}_root')
    results = tmp_path / 'results.json'
    argv = ['--dataset', dataset, '--data-path', str(root), '--resume', str(checkpoints[dataset]),
            '--device', 'cpu', '--workers', '0', '--output', str(results)]
    argv += ['--trial', '2'] if dataset == 'regdb' else ['--trial', '0']
    assert test_script.main(argv) == 0
    record = json.loads(results.read_text())
    assert record['models'][0]['method'] == 'ddag'
    assert settings <= set(record['results'])
    assert all(set(by_fusion) == {'feat', 'att'} for by_fusion in record['results'].values())
    assert any(by_fusion['feat']['mAP'] != by_fusion['att']['mAP']  # two features, not one twice
               for by_fusion in record['results'].values())


def test_a_single_ddag_feature_is_the_cosine_of_that_feature():
    query, gallery = torch.randn(3, 2, 1, 4), torch.randn(5, 2, 1, 4)
    for name, kind in (('feat', 0), ('att', 1)):
        expected = -F.normalize(query[:, kind, 0], dim=1) @ F.normalize(gallery[:, kind, 0], dim=1).T
        got = fused_distance(query, gallery, find_fusion(name, 'ddag'))
        torch.testing.assert_close(got, expected, **TOL)


def test_visualize_search_and_the_python_api_use_the_attention_feature(checkpoints, llcm_root,
                                                                        tmp_path):
    checkpoint = str(checkpoints['llcm'])
    assert visualize.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                           checkpoint, '--out', str(tmp_path / 'vis'), '--device', 'cpu',
                           '--workers', '0', '--trial', '0', '--num-queries', '2', 'ranks',
                           'cmc']) == 0
    assert (tmp_path / 'vis' / 'cmc.png').is_file()
    query, gallery = query_gallery('llcm', 'ir_to_vis', str(llcm_root), 0)
    assert run_main(lambda: search.main(
        ['--resume', checkpoint, '--query', *query.paths[:2], '--query-modality', 'infrared',
         '--gallery', str(llcm_root / 'test_vis'), '--out', str(tmp_path / 'search'), '--topk',
         '3', '--device', 'cpu', '--workers', '0'])) == 0
    found = json.loads((tmp_path / 'search' / 'search.json').read_text())
    assert found['fusion'] == 'att'
    api = ReIDModel.load(checkpoint, device='cpu')
    night, day = api.embed(query.paths[:2], 'infrared'), api.embed(gallery.paths[:4], 'visible')
    assert night.shape[1:] == (2, 1, 512)
    order, distances = rank_gallery(night, day, 'att', method='ddag')
    expected = fused_distance(night, day, (0.0, 1.0))
    assert torch.equal(order, expected.argsort(dim=1, stable=True))


def test_export_gives_pytorch_features(checkpoints, tmp_path):
    for package in onnx_export.ONNX_PACKAGES:
        pytest.importorskip(package)
    path = tmp_path / 'ddag.onnx'
    with contextlib.redirect_stdout(io.StringIO()):
        assert export.main(['--resume', str(checkpoints['llcm']), '--modality', 'both', '--out',
                            str(path)]) == 0
    model, _ = load_trained_model(str(checkpoints['llcm']), device='cpu')
    images = [torch.randn(3, 3, 64, 32, generator=torch.Generator().manual_seed(s)) for s in (0, 1)]
    got = onnx_export.onnx_features(onnx_export.onnx_session(str(path)), ('visible', 'infrared'),
                                    images)
    expected = onnx_export.torch_features(model, ('visible', 'infrared'), images)
    for g, e in zip(got, expected):
        assert np.abs(g - e).max() < 1e-4


def test_a_training_step_on_the_demo_recipe_under_bf16_autocast(tmp_path):
    from tools.synthetic_data import make_demo_dataset
    root = make_demo_dataset(tmp_path / 'demo')
    out = tmp_path / 'run'
    assert training.main(['--method', 'ddag', '--dataset', 'demo', '--data-path', str(root),
                          '--model_path', str(out / 'm'), '--log_path', str(out / 'l'),
                          '--epochs', '1', '--max-steps', '1', '--eval-every', '0',
                          '--device', 'cpu', '--amp', 'bf16']) == 0
    state = load_checkpoint(str(out / 'm' / 'demo_ddag_last.pth'))
    assert (state['args']['arch'], state['args']['img_h'], state['args']['batch_size']) == (
        'resnet18', 64, 4)
    assert float(state['criterion']['graph_weight']) > 0  # epoch 0 ended: w_G set


def test_reproduce_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / 'out'
    assert reproduce.main(['--method', 'ddag', '--dataset', 'demo', '--dry-run', '--out',
                           str(out), '--data-path', str(tmp_path / 'demo')]) == 0
    assert 'demo ddag seed 0: train and test' in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / 'demo').exists()


def graph_weight_from_history(out, dataset='llcm'):
    """1 / (1 + the last epoch's mean id + tri + att) from a run's history file."""
    with open(out / 'logs' / f'{dataset}_ddag_history.jsonl') as handle:
        losses = [json.loads(line) for line in handle][-1]['losses']
    return 1.0 / (1.0 + losses['id'] + losses['tri'] + losses['att'])


def test_two_processes_train_ddag_and_agree_on_the_graph_weight(llcm_root, tmp_path):
    """torchrun, 2 CPU processes (gloo): every parameter is used (DDP), the labels reach the
    graph through the network's forward, and w_G is the mean over both processes' batches."""
    from test_distributed import torchrun_command
    argv = ddag_run(llcm_root, tmp_path, 'llcm', '--epochs', 2, '--max-steps', 2, '--eval-every', 0)
    env = dict(os.environ, OMP_NUM_THREADS='1', TMPDIR=str(tmp_path))
    result = subprocess.run(torchrun_command([os.path.join(REPO, 'train.py'), *argv]), cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    weight = float(last_state(tmp_path)['criterion']['graph_weight'])
    assert weight == pytest.approx(graph_weight_from_history(tmp_path), rel=1e-5)
