"""DEEN's parts as switches (the paper's ablations): the released defaults unchanged (state-dict
keys, parameter count, seeded weights and loss values as the code before the switches), every
variant's parameter count, forward and training step, each variant's checkpoint through test.py,
visualize.py, search.py and export.py from the checkpoint alone, impossible combinations refused
in one sentence, and reproduce.py --table / --sweep on the demo data."""
import contextlib
import hashlib
import io
import json
import os

import pytest
import torch
import torchvision

import export
import onnx_export
import paper_results
import reproduce
import search
import test as test_script
import training
import visualize
from inference import ReIDModel, load_trained_model
from loss import build_criterion, orthogonal_loss
from model import DEEBranch, MFABlock, NetworkSwitches, NonLocal, TrainOutput, build_model
from tiny_runs import TINY, randomise_batchnorm, train_argv
from utils import UserError, run_main

# ----------------------------------------------------------------------------------------------
# The released defaults, bit for bit

# Computed on the code before the switches existed (main at 1d3dc20) with
#   torch.manual_seed(0); model = build_model('deen', 7, dataset, pretrained=None, arch='resnet18')
# and fingerprint() below: (number of state-dict keys, sha256 of the keys joined by '\n',
# parameter count, sum of all parameters, sum of all parameters weighted by cos(1..n)).
RELEASED_FINGERPRINTS = {
    'llcm': (220, 'b47aea96c50e0f9055d1987dcdf3f0ef8a534809285fdff0cc70de939a7fa44e', 12_321_408,
             3425.0670029896, -7.5664273281),
    'regdb': (164, 'd0076bc90fdb00c944ba0d708a96e0fa56b7eac94df7b7ca935e537fd34f621e', 3_087_424,
              1614.2477640047, 40.5977265320),
}
# The same code's DEENCriterion() parts on loss_inputs() below (two generated embeddings).
RELEASED_LOSS_PARTS = {'id': 2.3116002083, 'tri': 3.3136184216, 'cpm': 1.2186943293,
                       'ort': 0.0006429574}


def fingerprint(model):
    keys = list(model.state_dict())
    parameters = list(model.parameters())
    total = sum(p.double().sum().item() for p in parameters)
    weighted = sum((p.double().flatten() * torch.arange(1, p.numel() + 1, dtype=torch.float64).cos())
                   .sum().item() for p in parameters)
    return (len(keys), hashlib.sha256('\n'.join(keys).encode()).hexdigest(),
            sum(p.numel() for p in parameters), total, weighted)


@pytest.mark.parametrize('dataset', ['llcm', 'regdb'])
def test_released_variant_has_todays_keys_parameters_and_seeded_weights(dataset):
    torch.manual_seed(0)
    model = build_model('deen', 7, dataset, pretrained=None, arch='resnet18')
    count, digest, parameters, total, weighted = fingerprint(model)
    expected = RELEASED_FINGERPRINTS[dataset]
    assert (count, digest, parameters) == expected[:3]   # exact on every machine
    # The seeded draws are float32: each parameter may differ by a few ulps (relative 1e-6) on
    # another CPU, so each sum may move by 1e-6 of the sum of the parameters' magnitudes (0.26
    # for LLCM); any other seed, layer or initialisation moves it by far more.
    allowed = 1e-6 * sum(p.double().abs().sum().item() for p in model.parameters())
    assert total == pytest.approx(expected[3], rel=0, abs=allowed)
    assert weighted == pytest.approx(expected[4], rel=0, abs=allowed)
    assert model.switches == NetworkSwitches.released(dataset == 'regdb') == NetworkSwitches.of(dataset)


# The same code's eval-mode outputs (pool, BNNeck feature) of that seeded model after
# tiny_runs.randomise_batchnorm(model, 0) (no block is the identity), for images
# torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0)), 2 visible + 2 infrared:
# each summed with the weights cos(1..n).
RELEASED_FORWARD = {'llcm': (-0.2618627511, -0.1274111068), 'regdb': (0.4989326558, 0.2254616184)}


@pytest.mark.parametrize('dataset', ['llcm', 'regdb'])
def test_released_variant_gives_todays_forward_numbers(dataset):
    torch.manual_seed(0)
    model = randomise_batchnorm(build_model('deen', 7, dataset, arch='resnet18'), 0).eval()
    images = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pool, feat = model(visible=images[:2], infrared=images[2:])
    weights = torch.arange(1, pool.numel() + 1, dtype=torch.float64).cos().reshape(pool.shape)
    terms = (pool.double() * weights, feat.double() * weights)
    assert pool.shape == (12, model.embed_dim)
    # A float32 forward: on another CPU or thread count each sum may move by 1e-5 of the sum
    # of its terms' magnitudes (about 1e-3); another model seed moves them by 0.04 to 0.1.
    for term, expected in zip(terms, RELEASED_FORWARD[dataset]):
        allowed = 1e-5 * term.abs().sum().item()
        assert term.sum().item() == pytest.approx(expected, rel=0, abs=allowed)


def loss_inputs():
    generator = torch.Generator().manual_seed(0)
    pool = torch.randn(3 * 8, 16, generator=generator)
    logits = torch.randn(24, 5, generator=generator)
    return pool, logits, torch.tensor([0, 0, 1, 1]).repeat(2)


def test_cpm_and_orthogonal_terms_with_two_generated_embeddings_are_todays():
    pool, logits, labels = loss_inputs()
    _, parts = build_criterion('deen')(TrainOutput(pool, logits, orthogonal_loss(pool, 3)), labels)
    # float32 losses recorded on another CPU: equal to float32 precision (relative 1e-5, or
    # 1e-6 absolute for the small orthogonal term), not bit for bit
    assert {name: value.item() for name, value in parts.items()} == pytest.approx(
        RELEASED_LOSS_PARTS, rel=1e-5, abs=1e-6)


def test_orthogonal_term_sums_every_pair_of_generated_embeddings():
    pool = torch.randn(4 * 5, 8, generator=torch.Generator().manual_seed(1))
    _, first, second, third = pool.chunk(4)
    pairs = (first * second).sum() + (first * third).sum() + (second * third).sum()
    assert orthogonal_loss(pool, 4).item() == pytest.approx(pairs.item() / len(pool))


def test_criterion_has_no_cpm_or_ort_without_the_embeddings_they_need():
    pool, logits, labels = loss_inputs()
    criterion = build_criterion('deen')
    total, parts = criterion(TrainOutput(pool[:8], logits[:8], None), labels)
    assert list(parts) == ['id', 'tri'] and total.item() == pytest.approx(sum(parts.values()).item())
    _, parts = criterion(TrainOutput(pool[:16], logits[:16], None), labels)
    assert list(parts) == ['id', 'tri', 'cpm']


def test_cpm_margin_reaches_the_criterion():
    pool, logits, labels = loss_inputs()
    out = TrainOutput(pool, logits, orthogonal_loss(pool, 3))
    wide = build_criterion('deen', cpm_margin=5.0)(out, labels)[1]['cpm']
    assert wide > RELEASED_LOSS_PARTS['cpm']
    args = training.parse_args(['--cpm-margin', '0.5'])
    assert args.cpm_margin == 0.5 and training.parse_args([]).cpm_margin == 0.2


# ----------------------------------------------------------------------------------------------
# Every variant: parameters and forward

def count(module):
    return sum(p.numel() for p in module.parameters())


def deen(dataset='llcm', **switches):
    return build_model('deen', 7, dataset, arch='resnet18',
                       switches=NetworkSwitches.of(dataset, switches))


def test_parameter_counts_per_variant():
    resnet = torchvision.models.resnet18()
    stem = count(resnet.conv1) + count(resnet.bn1)
    widths = (64, 64, 128, 256, 512)  # after the stem and after stages 1..4 of ResNet-18
    baseline = count(resnet) - count(resnet.fc) + stem + 2 * 512 + 7 * 512  # + stem, BNNeck, ids
    assert count(deen(dee_stage=None, attention='none')) == baseline
    mfa = sum(count(MFABlock(widths[k], widths[k - 1], downsample=k > 1)) for k in (1, 2, 3))
    assert count(deen(dee_stage=None)) == baseline + mfa
    for reduction in (2, 8):
        non_local = sum(count(NonLocal(widths[k], widths[k] // reduction)) for k in (1, 2, 3))
        assert count(deen(dee_stage=None, attention='nonlocal',
                          nonlocal_reduction=reduction)) == baseline + non_local
    for stage in range(5):
        for generated in (1, 2, 3):
            model = deen(dee_stage=stage, dee_embeddings=generated, attention='none')
            assert count(model) == baseline + generated * count(DEEBranch(widths[stage]))
            assert model.num_branches == generated + 1
    assert count(deen()) == count(build_model('deen', 7, 'llcm', arch='resnet18'))


@pytest.mark.parametrize('dataset, stages', [('llcm', (None, 0, 1, 2, 3, 4)),
                                             ('regdb', (None, 0, 1, 2, 3))])
def test_every_position_and_attention_gives_k_embeddings_per_image(dataset, stages):
    images = torch.randn(2, 3, 64, 32)
    for stage in stages:
        for attention in ('mfa', 'nonlocal', 'none'):
            model = deen(dataset, dee_stage=stage, attention=attention).eval()
            k = 1 if stage is None else 3
            pool, feat = model(visible=images)
            assert pool.shape == feat.shape == (k * 2, model.embed_dim)
            out = model.train()(visible=images, infrared=images)
            assert out.logits.shape == (k * 4, 7) and (out.ortho is None) == (k == 1)


# ----------------------------------------------------------------------------------------------
# Impossible combinations: one sentence before any work

@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'regdb', '--dee-stage', '4'], '--dee-stage 4 is impossible on RegDB'),
    (['--dee-embeddings', '1', '--lambda_2', '0.1'], '--lambda_2 0.1 weighs a loss term this '
                                                      'network cannot have'),
    (['--dee-stage', 'none', '--lambda_1', '0.8'], '--lambda_1 0.8 weighs a loss term'),
    (['--dee-stage', 'none', '--dee-embeddings', '2'], '--dee-stage none turns DEE off'),
    (['--dee-embeddings', '0'], '--dee-embeddings must be at least 1'),
    (['--nonlocal-reduction', '0', '--attention', 'nonlocal'], '--nonlocal-reduction must be at'),
    (['--method', 'agw', '--attention', 'nonlocal'], 'use them with --method deen'),
    (['--cpm-margin', 'nan'], '--cpm-margin'),
])
def test_impossible_combinations_are_one_sentence(argv, message):
    with pytest.raises(UserError, match=message) as error:
        training.parse_args(argv)
    assert str(error.value).count('. ') == 0 and str(error.value).endswith('.')


def test_terms_the_network_lacks_are_off_and_recorded_as_zero():
    args = training.parse_args(['--dee-stage', 'none'])
    assert (args.lambda_1, args.lambda_2) == (0.0, 0.0)
    args = training.parse_args(['--dee-embeddings', '1'])
    assert (args.lambda_1, args.lambda_2) == (0.8, 0.0)
    args = training.parse_args([])
    assert (args.dee_stage, args.dee_embeddings, args.attention, args.lambda_2) == (3, 2, 'mfa', 0.01)
    assert training.parse_args(['--dataset', 'regdb']).dee_stage == 2


# ----------------------------------------------------------------------------------------------
# Each variant's checkpoint through every tool

VARIANTS = {  # name: (train.py flags, embeddings per image); the other switches: see above
    'baseline': (['--dee-stage', 'none', '--attention', 'none'], 1),
    'stem-three-generated-nonlocal': (['--dee-stage', '0', '--dee-embeddings', '3', '--attention',
                                       'nonlocal'], 4),
    'stage4-one-generated': (['--dee-stage', '4', '--dee-embeddings', '1'], 2),
}


@pytest.fixture(scope='module', params=list(VARIANTS))
def variant(request, llcm_root, tmp_path_factory):
    """(name, checkpoint, embeddings per image, folder) of a one-step training of a variant,
    evaluated on the test data at its end."""
    flags, branches = VARIANTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    argv = train_argv('llcm', llcm_root, folder, '--epochs', '1', '--max-steps', '1',
                      '--eval-every', '1', *flags)
    assert training.main(argv) == 0
    return request.param, folder / 'models' / 'llcm_deen_best.pth', branches, folder


def test_checkpoint_records_its_switches_and_rebuilds_its_network(variant, llcm_root):
    name, checkpoint, branches, folder = variant
    model, info = load_trained_model(str(checkpoint))
    assert model.num_branches == branches
    image = next((llcm_root / 'test_vis').rglob('*.jpg'))
    assert ReIDModel.load(str(checkpoint), device='cpu').embed([image], 'visible').shape[2] == branches
    assert NetworkSwitches.of('llcm', info['network']) == model.switches
    log = (folder / 'logs' / 'llcm_deen.log').read_text()
    assert (('L_cpm and L_ort off' in log) == (branches == 1) and
            ('L_ort off' in log) == (branches < 3))


def test_variant_goes_through_test_visualize_search_and_export(variant, llcm_root, tmp_path):
    name, checkpoint, branches, _ = variant
    results = tmp_path / 'results.json'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--workers', '0', '--device', 'cpu', '--output',
                             str(results)]) == 0
    assert 'ir_to_vis' in json.loads(results.read_text())['results']
    figures_out = tmp_path / 'figures'
    assert visualize.main(['tsne', '--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                           str(checkpoint), '--out', str(figures_out), '--device', 'cpu',
                           '--workers', '0', '--num-ids', '3', '--tsne-points', '24']) == 0
    tsne = json.loads((figures_out / 'tsne.json').read_text())
    assert tsne['branches'] == branches and ('branches' in tsne['panels']) == (branches > 1)
    assert set(tsne['panels'].get('branches', {'branch': [0]})['branch']) == set(range(branches))
    gallery = llcm_root / 'test_vis'
    query = next((llcm_root / 'test_nir').rglob('*.jpg'))
    assert run_main(lambda: search.main(['--resume', str(checkpoint), '--query', str(query),
                                         '--query-modality', 'infrared', '--gallery', str(gallery),
                                         '--out', str(tmp_path / 'search'), '--topk', '3',
                                         '--device', 'cpu', '--workers', '0'])) == 0
    assert len(json.loads((tmp_path / 'search' / 'search.json').read_text())['results']) == 1
    for package in onnx_export.ONNX_PACKAGES:
        pytest.importorskip(package)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert export.main(['--resume', str(checkpoint), '--modality', 'infrared', '--out',
                            str(tmp_path / 'net.onnx')]) == 0
    assert f'[batch, 2, {branches}, ' in printed.getvalue()


def test_resuming_with_other_switches_is_one_sentence(variant, llcm_root, tmp_path):
    name, checkpoint, _, _ = variant
    if name != 'baseline':
        pytest.skip('one variant shows it')
    argv = train_argv('llcm', llcm_root, tmp_path, '--epochs', '2', '--max-steps', '1',
                      '--resume', str(checkpoint))
    with pytest.raises(UserError, match=r'holds another network: it was trained with '
                                        r'--dee-stage none \(this run: 3\), --attention none'):
        training.main(argv)


# ----------------------------------------------------------------------------------------------
# reproduce.py --table and --sweep

TINY_TRAINING = [*TINY, '--epochs', '1', '--max-steps', '1', '--eval-every', '0']


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """reproduce.py's --data-path and --cache-dir flags for a demo folder shared by the tests."""
    folder = tmp_path_factory.mktemp('demo')
    return ['--data-path', str(folder / 'demo'), '--cache-dir', str(folder / 'cache')]


def run_reproduce(argv):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = reproduce.main(argv)
    return code, printed.getvalue()


def test_components_table_on_the_demo_prints_every_row_with_published_numbers(demo, tmp_path):
    out = tmp_path / 'out'
    argv = ['--table', 'components', '--dataset', 'demo', '--seeds', '0', '--out', str(out),
            *demo, *TINY_TRAINING]
    code, printed = run_reproduce([*argv, '--dry-run'])
    assert code == 0 and 'plan: 7 part(s), 0 done, 7 to run' in printed
    assert not out.exists() and not os.path.exists(demo[1])
    code, printed = run_reproduce(argv)
    assert code == 0
    written = json.loads((out / 'components' / 'demo_comparison.json').read_text())
    rows = paper_results.ABLATION_TABLES['components']['rows']
    assert [row['label'] for row in written['rows']] == [label for label, _, _ in rows]
    for row, (label, _, published) in zip(written['rows'], rows):
        assert row['published'] == list(published['llcm'])
        delta = row['ours']['Rank-1'] - published['llcm'][0]
        assert f'| {label} | {row["ours"]["Rank-1"]:.2f} | {row["ours"]["mAP"]:.2f} | ' \
               f'{published["llcm"][0]:.2f} | {published["llcm"][1]:.2f} | {delta:+.2f} |' in printed
    assert 'say nothing about the paper\'s claims on real data' in printed
    code, again = run_reproduce([*argv, '--report'])
    assert code == 0 and again.count('| DEE + L_cpm |') == 1


def test_sweep_draws_rank1_and_map_against_the_value(demo, tmp_path):
    out = tmp_path / 'out'
    argv = ['--sweep', 'cpm-margin', '0.1', '0.2', '--dataset', 'demo', '--out', str(out),
            *demo, '--attention', 'none', *TINY_TRAINING]
    code, printed = run_reproduce(argv)
    assert code == 0
    numbers = json.loads((out / 'sweep_cpm_margin' / 'demo_sweep.json').read_text())
    assert numbers['values'] == [0.1, 0.2] and numbers['paper_choice'] == 0.2
    assert len(numbers['Rank-1']) == len(numbers['mAP']) == 2
    assert os.path.getsize(out / 'sweep_cpm_margin' / 'demo_sweep.png') > 0


@pytest.mark.parametrize('argv, message', [
    (['--table', 'components', '--attention', 'none'], 'set --attention themselves'),
    (['--table', 'branches', '--dataset', 'regdb'], 'the ablations were run on LLCM and SYSU-MM01'),
    (['--table', 'attention', '--method', 'agw'], 'use --method deen'),
    (['--sweep', 'lambda_1'], 'at least one value'),
    (['--sweep', 'arch', 'resnet18'], 'expected a numeric train.py flag'),
    (['--sweep', 'lambda_1', 'big'], "'big' is not a number"),
    (['--sweep', 'seed', '0', '1'], 'reproduce.py sets --seed itself; use --seeds'),
    (['--sweep', 'lambda_1', '0.5', '--table', 'components'], 'pass one of them'),
    ([], 'needs --dataset'),
])
def test_table_and_sweep_errors_are_one_sentence(argv, message):
    with pytest.raises(UserError, match=message):
        reproduce.parse_args(argv)
