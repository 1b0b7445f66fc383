"""Tests of the inference layer that tools share: released AGW checkpoints load and give the
outputs of the model they came from; test.py --save-features writes what FeatureStore reads."""
import numpy as np
import pytest
import torch

import evaluation
import inference
import test as test_script
from model import AGW, build_model, is_released_format, released_state_dict
from tiny_runs import seeded_checkpoint


def perturbed(model, seed=1):
    """The model with small noise on every float parameter and buffer, so that no weight keeps
    its initial value (the non-local blocks start as identities, BatchNorm statistics as 0 / 1;
    tiny_runs.randomise_batchnorm makes a ResNet-50 AGW overflow)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.add_(0.05 * torch.randn(tensor.shape, generator=generator))
        for module in model.modules():  # variances stay positive
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_var.uniform_(0.5, 1.5, generator=generator)
    return model.eval()


def test_released_agw_checkpoint_loads_with_its_image_size_and_gives_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    agw = perturbed(build_model('agw', 7, 'llcm'))
    weights = released_state_dict(agw.state_dict())
    assert is_released_format(weights)
    path = tmp_path / 'llcm_agw_p4_n8_lr_0.1_seed_0_best.t'
    torch.save({'net': weights, 'mAP': np.float64(0.3), 'epoch': 12}, path)

    model, info = inference.load_trained_model(str(path), 'llcm', torch.device('cpu'))
    assert isinstance(model, AGW) and not model.training
    assert {key: info[key] for key in ('method', 'arch', 'img_h', 'img_w', 'num_classes',
                                       'epoch')} == {'method': 'agw', 'arch': 'resnet50',
                                                     'img_h': 288, 'img_w': 144,
                                                     'num_classes': 7, 'epoch': 12}
    images = torch.randn(2, 3, info['img_h'], info['img_w'], generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        for modality in ('visible', 'infrared'):
            expected = inference.embed_batch(agw, modality, images)
            loaded = inference.embed_batch(model, modality, images)
            assert loaded.shape == (2, 2, 1, 2048)
            assert torch.allclose(loaded, expected, atol=1e-5)
        # the weights matter: another seed gives other features
        other = inference.embed_batch(perturbed(build_model('agw', 7, 'llcm'), seed=3), 'visible',
                                      images)
    assert not torch.allclose(other, inference.embed_batch(model, 'visible', images), atol=1e-3)


@pytest.fixture(scope='module')
def saved_features(llcm_root, tmp_path_factory):
    """test.py --save-features on gallery trial 0 of the tiny LLCM folder with a seeded model."""
    folder = tmp_path_factory.mktemp('features')
    checkpoint = folder / 'tiny.pth'
    model = seeded_checkpoint(checkpoint, 'llcm', num_classes=6)
    path = folder / 'features.pt'
    assert test_script.main(['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume',
                             str(checkpoint), '--device', 'cpu', '--workers', '0', '--trial', '0',
                             '--output', str(folder / 'results.json'),
                             '--save-features', str(path)]) == 0
    return path, model


def test_saved_features_are_weights_only_and_hold_the_protocol_lists(saved_features, llcm_root):
    path, _ = saved_features
    content = torch.load(path, weights_only=True)
    assert content['format'] == inference.FEATURES_FORMAT
    assert content['meta']['dataset'] == 'llcm' and content['meta']['method'] == 'deen'
    assert (content['meta']['img_h'], content['meta']['img_w']) == (64, 32)
    labels = {}
    for _, _, query, gallery in evaluation.protocol_splits('llcm', str(llcm_root), [0]):
        for image_list in (query, gallery):
            for image, pid, camid in zip(image_list.paths, image_list.pids, image_list.camids):
                labels.setdefault(image_list.modality, {})[image] = (int(pid), int(camid))
    assert sorted(content['modalities']) == ['infrared', 'visible']
    for modality, part in content['modalities'].items():
        assert part['paths'] == sorted(labels[modality])
        assert part['pids'].tolist() == [labels[modality][p][0] for p in part['paths']]
        assert part['camids'].tolist() == [labels[modality][p][1] for p in part['paths']]
        assert part['features'].shape == (len(part['paths']), 2, 3, 512)
        assert part['features'].dtype == torch.float32


def test_feature_store_reads_back_what_the_model_extracts(saved_features, llcm_root):
    path, model = saved_features
    store, meta = inference.FeatureStore.load(str(path))
    assert meta['dataset'] == 'llcm'
    query, gallery = evaluation.protocol_splits('llcm', str(llcm_root), [0])[0][2:]
    args = test_script.parse_args(['--resume', 'unused', '--workers', '0'])
    args.img_h, args.img_w = 64, 32
    direct = inference.extract_features(model, [query, gallery], args, torch.device('cpu'))
    for image_list in (query, gallery):
        assert torch.allclose(store.select(image_list), direct.select(image_list), atol=1e-5)
        rows = [store.rows[image_list.modality][p] for p in image_list.paths]
        assert np.array_equal(store.pids[image_list.modality][rows], image_list.pids)
        assert np.array_equal(store.camids[image_list.modality][rows], image_list.camids)
