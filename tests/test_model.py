"""Tests of model.py: parameter counts, output shapes and layout, own-modality stems, MFA/non-local
blocks against the released formulas, weight loading (ImageNet offline, local, released), training."""
import copy
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision

from loss import build_criterion, orthogonal_loss
from model import (AGW, CNL, PNL, MFABlock, NonLocal, TrainOutput, build_model,
                   convert_released_state_dict, load_model_weights, released_state_dict)
from utils import UserError

HEIGHT, WIDTH = 64, 32


def images(count, seed):
    return torch.randn(count, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(seed))


def randomize_zero_init_bn(model, seed=0):
    """Give the zero-initialised BatchNorms of MFA / non-local blocks random weights, so that those
    blocks are not the identity and the tests see them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (CNL, PNL, NonLocal)):
                module.W[1].weight.copy_(0.5 * torch.randn(module.W[1].weight.shape, generator=generator))
                module.W[1].bias.copy_(0.1 * torch.randn(module.W[1].bias.shape, generator=generator))
    return model


@pytest.fixture(scope='module')
def deen():
    """A full DEEN (SYSU/LLCM layout) with 8 classes, non-trivial MFA blocks, in eval mode."""
    torch.manual_seed(0)
    return randomize_zero_init_bn(build_model('deen', 8, 'llcm')).eval()


@pytest.fixture(scope='module')
def resnet_file(tmp_path_factory):
    """A random torchvision resnet50 state dict saved like the ImageNet file."""
    torch.manual_seed(1)
    state = torchvision.models.resnet50().state_dict()
    path = tmp_path_factory.mktemp('hub') / 'checkpoints' / 'resnet50-0676ba61.pth'
    path.parent.mkdir()
    torch.save(state, path)
    return path, state


# ----------------------------------------------------------------------------------------------
# Sizes and outputs

@pytest.mark.parametrize('dataset, classes, expected', [
    ('llcm', 713, 42_689_056),
    ('sysu', 395, 42_037_792),
    ('regdb', 206, 13_094_176),
    ('regdb', 713, 13_613_344),   # the RegDB layout with LLCM's class count: METHOD.md's figure
])
def test_parameter_counts(dataset, classes, expected):
    model = build_model('deen', classes, dataset)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.embed_dim == (1024 if dataset == 'regdb' else 2048)
    assert (model.mfa3 is None) == (dataset == 'regdb')


def test_trunk_has_last_stride_one(deen):
    block = deen.trunk.layer4[0]
    assert block.conv2.stride == (1, 1) and block.downsample[0].stride == (1, 1)
    assert deen.trunk.layer3[0].conv2.stride == (2, 2)
    assert not hasattr(deen, 'fc') and not hasattr(deen.trunk, 'conv1')


def test_train_output_shapes(deen):
    model = copy.deepcopy(deen).train()
    out = model(visible=images(2, 1), infrared=images(2, 2))
    assert isinstance(out, TrainOutput)
    assert out.pool.shape == (12, 2048) and out.logits.shape == (12, 8)
    assert out.ortho.shape == () and torch.isfinite(out.ortho)
    torch.testing.assert_close(out.ortho, orthogonal_loss(out.pool))


def branch_embeddings(model, stem, x):
    """The three pooled embeddings [orig, gen1, gen2] of x, run module by module (eval mode)."""
    x = stem(x)
    x = model.mfa1(model.trunk.layer1(x), x)
    x = model.mfa2(model.trunk.layer2(x), x)
    x = model.mfa3(model.trunk.layer3(x), x)
    branches = [x] + [branch(x) for branch in model.dee.branches]
    return [model.trunk.layer4(b).mean((2, 3)) for b in branches]


def test_eval_layout_is_orig_gen1_gen2(deen):
    x = images(2, 3)
    with torch.no_grad():
        pool, feat = deen(visible=x)
        expected = branch_embeddings(deen, deen.visible_stem, x)
    assert pool.shape == feat.shape == (6, 2048)
    torch.testing.assert_close(pool.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(6))
    for index, embedding in enumerate(expected):
        torch.testing.assert_close(pool[2 * index: 2 * index + 2], F.normalize(embedding, dim=1))
    torch.testing.assert_close(feat, F.normalize(deen.bottleneck(torch.cat(expected)), dim=1))
    assert not torch.allclose(pool[0:2], pool[2:4], atol=1e-3)   # generated != original


def test_both_modalities_give_orig_gen1_gen2_each_visible_then_infrared(deen):
    visible, infrared = images(2, 4), images(1, 5)
    with torch.no_grad():
        both, _ = deen(visible=visible, infrared=infrared)
        only_visible, _ = deen(visible=visible)
        only_infrared, _ = deen(infrared=infrared)
    expected = torch.cat([torch.cat([only_visible[2 * b: 2 * b + 2], only_infrared[b: b + 1]])
                          for b in range(3)])
    torch.testing.assert_close(both, expected)


def test_each_image_goes_through_its_own_stem(deen):
    model = copy.deepcopy(deen)
    with torch.no_grad():
        model.infrared_stem.conv1.weight.mul_(-1.5)   # the two stems now differ
        x = images(2, 6)
        as_visible, _ = model(visible=x)
        as_infrared, _ = model(infrared=x)
        expected = branch_embeddings(model, model.infrared_stem, x)
        torch.testing.assert_close(as_infrared[:2], F.normalize(expected[0], dim=1))
        assert not torch.allclose(as_visible, as_infrared, atol=1e-3)
        model.visible_stem, model.infrared_stem = model.infrared_stem, model.visible_stem
        swapped, _ = model(visible=x)
    torch.testing.assert_close(swapped, as_infrared)


def test_odd_position_count_is_a_user_error(deen):
    with torch.no_grad(), pytest.raises(UserError, match='odd number'):
        deen(visible=torch.randn(1, 3, 48, 16))        # layer3 map 3x1


# ----------------------------------------------------------------------------------------------
# MFA and non-local blocks

def released_cnl(cnl, x_high, x_low):
    """CNL written out as METHOD.md states it (explicit Cl x Cl affinity)."""
    batch, low_dim = x_low.shape[:2]
    g_x = cnl.g(x_low).reshape(batch, low_dim, -1)
    theta_x = cnl.theta(x_high).reshape(batch, low_dim, -1)
    phi_x = cnl.phi(x_low).reshape(batch, low_dim, -1).transpose(1, 2)
    affinity = theta_x @ phi_x / low_dim
    return cnl.W((affinity @ g_x).reshape(batch, low_dim, *x_low.shape[2:])) + x_high


def released_pnl(pnl, x_high, x_low):
    """PNL as METHOD.md states it, with the Cl-channel reshape of the Cl/2-channel maps."""
    batch, low_dim = x_low.shape[:2]
    g_x = pnl.g(x_low).reshape(batch, low_dim, -1).transpose(1, 2)
    theta_x = pnl.theta(x_high).reshape(batch, low_dim, -1).transpose(1, 2)
    phi_x = pnl.phi(x_low).reshape(batch, low_dim, -1)
    affinity = theta_x @ phi_x / phi_x.shape[2]                    # [B, Nh/2, Nl/2]
    y = (affinity @ g_x).transpose(1, 2).reshape(batch, low_dim // 2, *x_high.shape[2:])
    return pnl.W(y) + x_high


def released_non_local(block, x):
    batch, inter = x.shape[0], block.inter_dim
    g_x = block.g(x).reshape(batch, inter, -1).transpose(1, 2)
    theta_x = block.theta(x).reshape(batch, inter, -1).transpose(1, 2)
    phi_x = block.phi(x).reshape(batch, inter, -1)
    affinity = theta_x @ phi_x / phi_x.shape[2]                    # [B, N, N]
    return block.W((affinity @ g_x).transpose(1, 2).reshape(batch, inter, *x.shape[2:])) + x


@pytest.mark.parametrize('high, low, downsample, size', [(256, 64, False, (12, 6)),
                                                         (512, 256, True, (6, 4))])
def test_mfa_block_is_identity_at_init_and_matches_the_method_formulas(high, low, downsample, size):
    torch.manual_seed(9)
    block = MFABlock(high, low, downsample).double()
    scale = 2 if downsample else 1
    x_low = torch.randn(2, low, size[0] * scale, size[1] * scale, dtype=torch.float64)
    x_high = torch.randn(2, high, *size, dtype=torch.float64)
    torch.testing.assert_close(block(x_high, x_low), x_high, rtol=0, atol=0)
    randomize_zero_init_bn(block)
    with torch.no_grad():
        expected = released_pnl(block.pnl, released_cnl(block.cnl, x_high, x_low), x_low)
        torch.testing.assert_close(block(x_high, x_low), expected)
        assert not torch.allclose(expected, x_high)


def test_non_local_matches_the_method_formula():
    torch.manual_seed(10)
    block = randomize_zero_init_bn(NonLocal(64).double())
    x = torch.randn(2, 64, 6, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), released_non_local(block, x))


@pytest.mark.parametrize('arch, widths', [('resnet18', (64, 128, 256, 512)),
                                           ('resnet34', (64, 128, 256, 512))])
def test_lighter_trunks_take_their_widths_from_the_stages(arch, widths):
    model = build_model('deen', 8, 'llcm', arch=arch)
    assert model.arch == arch and model.widths == widths and model.embed_dim == 512
    assert model.trunk.layer4[0].conv1.stride == (1, 1)            # basic block: stride in conv1
    assert model.trunk.layer4[0].downsample[0].stride == (1, 1)
    assert model.dee.branches[0].expand.out_channels == 256       # DEE on layer3's output
    out = model.train()(visible=images(2, 1), infrared=images(2, 2))
    assert out.pool.shape == (12, 512) and out.logits.shape == (12, 8)
    pool, feat = model.eval()(infrared=images(3, 3))
    assert pool.shape == feat.shape == (9, 512)
    regdb = build_model('deen', 8, 'regdb', arch=arch)
    assert regdb.embed_dim == 256 and regdb.trunk.layer4 is None
    agw = build_model('agw', 8, 'sysu', arch=arch).eval()
    assert agw(visible=images(2, 4))[0].shape == (2, 512)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match='--arch must be one of resnet18, resnet34, resnet50'):
        build_model('deen', 8, 'llcm', arch='vgg16')


# ----------------------------------------------------------------------------------------------
# Pretrained backbone weights

def test_imagenet_offline_is_a_user_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -2] Name or service not known')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    with pytest.raises(UserError) as error:
        build_model('deen', 4, 'regdb', pretrained='imagenet')
    message = str(error.value)
    assert 'resnet50-0676ba61.pth' in message and str(tmp_path / 'checkpoints') in message
    assert '--pretrained none' in message and '\n' not in message


def assert_resnet_loaded(model, state):
    for stem in (model.visible_stem, model.infrared_stem):
        torch.testing.assert_close(stem.conv1.weight, state['conv1.weight'], rtol=0, atol=0)
        torch.testing.assert_close(stem.bn1.running_var, state['bn1.running_var'], rtol=0, atol=0)
    for name, value in model.trunk.state_dict().items():
        torch.testing.assert_close(value, state[name], rtol=0, atol=0)


def test_imagenet_file_in_the_hub_cache_is_used(resnet_file, monkeypatch):
    path, state = resnet_file
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(path.parent.parent))
    model = build_model('deen', 4, 'llcm', pretrained='imagenet')
    assert_resnet_loaded(model, state)
    assert model.trunk.layer4[0].conv2.stride == (1, 1)


def test_local_pretrained_path(resnet_file, tmp_path):
    path, state = resnet_file
    for method, dataset in (('deen', 'regdb'), ('agw', 'sysu')):
        assert_resnet_loaded(build_model(method, 4, dataset, pretrained=str(path)), state)
    with pytest.raises(UserError, match='does not exist'):
        build_model('deen', 4, 'regdb', pretrained=str(tmp_path / 'missing.pth'))
    torch.save({'weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(UserError, match='not a torchvision resnet50 state dict'):
        build_model('deen', 4, 'regdb', pretrained=str(tmp_path / 'other.pth'))


def test_pretrained_weights_of_the_chosen_arch(resnet_file, tmp_path, monkeypatch):
    torch.manual_seed(2)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, tmp_path / 'resnet18.pth')
    assert_resnet_loaded(build_model('deen', 4, 'llcm', pretrained=str(tmp_path / 'resnet18.pth'),
                                     arch='resnet18'), state)
    with pytest.raises(UserError, match='not a torchvision resnet18 state dict'):
        build_model('deen', 4, 'llcm', pretrained=str(resnet_file[0]), arch='resnet18')
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, 'download_url_to_file', lambda *a, **k: (_ for _ in ()).throw(
        urllib.error.URLError('offline')))
    with pytest.raises(UserError, match='resnet18-f37072fd.pth'):
        build_model('deen', 4, 'llcm', pretrained='imagenet', arch='resnet18')


# ----------------------------------------------------------------------------------------------
# Released checkpoints and our own

RELEASED_KEYS = ['visible_module.visible.conv1.weight', 'thermal_module.thermal.bn1.running_var',
                 'base_resnet.base.layer3.0.conv2.weight', 'base_resnet.base.layer4.2.bn3.bias',
                 'MFA1.CNL.g.weight', 'MFA2.PNL.W.1.running_mean', 'MFA3.CNL.W.0.weight',
                 'bottleneck.weight', 'bottleneck.bias', 'classifier.weight']
DEE_KEYS = {f'DEE.FC{b}{d}.weight' for b in (1, 2) for d in (1, 2, 3)} | {
    f'DEE.FC{b}.{p}' for b in (1, 2) for p in ('weight', 'bias')}
UNUSED_RELEASED = ['visible_module.visible.layer1.0.conv1.weight', 'thermal_module.thermal.layer4.2.bn3.bias',
                   'thermal_module.thermal.fc.weight', 'base_resnet.base.conv1.weight',
                   'base_resnet.base.bn1.running_mean']


def with_unused_copies(released):
    """Add entries of the full ResNet copies that the released model holds but never calls."""
    extra = {key: torch.zeros(3) for key in UNUSED_RELEASED}
    return {**released, **extra}


def test_released_checkpoint_round_trip_gives_identical_outputs(deen):
    released = released_state_dict(deen.state_dict())
    assert set(RELEASED_KEYS) <= set(released)
    assert {k for k in released if k.startswith('DEE.')} == DEE_KEYS
    assert {k[len('MFA1.CNL.'):] for k in released if k.startswith('MFA1.CNL.')} == {
        f'{conv}.{p}' for conv in ('g', 'theta', 'phi', 'W.0') for p in ('weight', 'bias')} | {
        f'W.1.{p}' for p in ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')}
    checkpoint = {'net': with_unused_copies(released), 'epoch': 80, 'mAP': 0.5}
    assert convert_released_state_dict(checkpoint['net']).keys() == deen.state_dict().keys()

    fresh = build_model('deen', 8, 'sysu').eval()
    load_model_weights(fresh, {'module.' + k: v for k, v in checkpoint['net'].items()})
    for key, value in deen.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = images(2, 11)
    with torch.no_grad():
        for expected, got in zip(deen(infrared=x), fresh(infrared=x)):
            assert torch.equal(expected, got)


def test_regdb_released_checkpoint_drops_the_unused_layer4():
    model = build_model('deen', 4, 'regdb')
    released = with_unused_copies(released_state_dict(model.state_dict()))
    released['base_resnet.base.layer4.0.conv1.weight'] = torch.zeros(512, 1024, 1, 1)
    assert 'MFA3.CNL.g.weight' not in released and 'DEE.FC11.weight' in released
    fresh = build_model('deen', 4, 'regdb')
    load_model_weights(fresh, released)
    assert torch.equal(fresh.dee.branches[1].dilated[2].weight, model.dee.branches[1].dilated[2].weight)


def test_our_state_dict_loads_with_ddp_prefix_and_mismatches_are_user_errors(deen):
    ours = {'module.' + k: v for k, v in deen.state_dict().items()}
    del ours['module.trunk.layer1.0.bn1.num_batches_tracked']   # old checkpoints lack these
    same_layout = build_model('deen', 8, 'llcm')
    load_model_weights(same_layout, ours)
    assert torch.equal(same_layout.mfa3.pnl.W[1].weight, deen.mfa3.pnl.W[1].weight)
    with pytest.raises(UserError, match='checkpoint has 8 classes, model 9'):
        load_model_weights(build_model('deen', 9, 'llcm'), ours)
    with pytest.raises(UserError, match='unexpected') as error:
        load_model_weights(build_model('deen', 8, 'regdb'), ours)
    assert '\n' not in str(error.value)
    with pytest.raises(UserError, match='lacks'):
        load_model_weights(build_model('agw', 8, 'sysu'), ours)


# ----------------------------------------------------------------------------------------------
# AGW

def test_agw_shapes_and_identity_non_local_at_init():
    torch.manual_seed(12)
    model = build_model('agw', 5, 'sysu')
    assert isinstance(model, AGW) and model.num_branches == 1 and model.embed_dim == 2048
    out = model(visible=images(2, 13), infrared=images(2, 14))
    assert out.pool.shape == (4, 2048) and out.logits.shape == (4, 5) and out.ortho is None
    model.eval()
    x = images(3, 15)
    with torch.no_grad():
        pool, feat = model(visible=x)
        plain = model.trunk.layer4(model.trunk.layer3(model.trunk.layer2(
            model.trunk.layer1(model.visible_stem(x)))))
        gem = (plain.pow(3).mean((2, 3)) + 1e-12).pow(1 / 3)
    assert pool.shape == feat.shape == (3, 2048)
    torch.testing.assert_close(pool, F.normalize(gem, dim=1))   # non-local blocks start as identity
    torch.testing.assert_close(feat.norm(dim=1), torch.ones(3))


# ----------------------------------------------------------------------------------------------
# Training

@pytest.mark.parametrize('method', ['deen', 'agw'])
def test_sgd_steps_reduce_the_loss(method):
    # Random weights (zero-initialised residual branches), one fixed batch: plain SGD must fit it.
    torch.manual_seed(16)
    model = build_model(method, 4, 'llcm')
    criterion = build_criterion(method)
    visible, infrared = images(4, 17), images(4, 18)
    labels = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        torch.manual_seed(19)                      # the same dropout mask every step
        loss, parts = criterion(model(visible=visible, infrared=infrared), labels)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.isfinite(v) for v in parts.values())
    assert losses[-1] < 0.95 * losses[0], losses


def test_channels_last_and_bf16_autocast(deen):
    model = copy.deepcopy(deen).to(memory_format=torch.channels_last)
    visible = images(2, 20).to(memory_format=torch.channels_last)
    infrared = images(2, 21).to(memory_format=torch.channels_last)
    with torch.no_grad():
        reference, _ = deen(visible=visible)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            pool, feat = model(visible=visible)
    assert pool.dtype == feat.dtype == torch.float32
    assert F.cosine_similarity(pool, reference).min() > 0.98
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(visible=visible, infrared=infrared)
        loss, _ = build_criterion('deen')(out, torch.tensor([0, 1, 0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and out.pool.dtype == torch.float32
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
