"""The inference layer every tool builds on: a checkpoint (ours, or a released DEEN/AGW `.t` file)
-> an eval-ready model -> flip-TTA features of image lists (one forward pass per distinct image,
sharded across torchrun processes) -> fused query-gallery distances; features saved and read back."""
import os

import numpy as np
import torch
import torch.distributed as dist

from data_loader import TestImageSet
from model import build_model, converted_state_dict, load_model_weights, method_of_state_dict
from utils import DistContext, UserError, autocast_context, load_checkpoint

CHECKPOINT_FORMAT = 'deen-vireid'
FEATURES_FORMAT = 'deen-vireid-features'

# Weights of (pooled, BNNeck) embeddings in the similarity (METHOD.md "Test-time features").
FUSIONS = {'pool+feat': (1.0, 1.0), '0.1pool+0.9feat': (0.1, 0.9)}
METHOD_IMAGE_SIZE = {'deen': (384, 144), 'agw': (288, 144)}


# ----------------------------------------------------------------------------------------------
# Checkpoint -> model

def load_trained_model(path, dataset, device):
    """Build the network a checkpoint describes and load its weights: our checkpoints carry their
    method, trunk and image size; a released DEEN or AGW checkpoint (`{'net': state_dict, ...}`)
    is told apart by its keys and takes its method's image size. Returns (model, info) with info
    holding method, arch, img_h, img_w, num_classes, epoch and the training dataset (None for a
    released checkpoint)."""
    state = load_checkpoint(path)
    if state.get('format') == CHECKPOINT_FORMAT:
        from data_manager import layout_of
        if layout_of(state['dataset']) != layout_of(dataset):
            raise UserError(f'checkpoint {path} was trained on {state["dataset"]}; test it with '
                            f'--dataset {state["dataset"]}.')
        info = {key: state[key] for key in ('method', 'img_h', 'img_w', 'num_classes', 'epoch',
                                            'dataset')}
        info['arch'] = state.get('arch', 'resnet50')
        weights = state['model']
    else:
        weights = state.get('net', state)
        if not isinstance(weights, dict) or 'classifier.weight' not in converted_state_dict(weights):
            raise UserError(f'checkpoint {path} holds no DEEN/AGW weights (no classifier.weight).')
        method = method_of_state_dict(weights)
        height, width = METHOD_IMAGE_SIZE[method]
        info = {'method': method, 'arch': 'resnet50', 'img_h': height, 'img_w': width,
                'num_classes': int(weights['classifier.weight'].shape[0]),
                'epoch': state.get('epoch'), 'dataset': None}
    model = build_model(info['method'], info['num_classes'], dataset, pretrained=None,
                        arch=info['arch'])
    try:
        load_model_weights(model, weights)
    except UserError as error:
        raise UserError(f'checkpoint {path}: {error}') from None
    return model.to(device).eval(), info


# ----------------------------------------------------------------------------------------------
# Images -> features

class FeatureStore:
    """Test features of distinct images. Per modality: the sorted paths, a path -> row index, the
    images' ids and cameras, and a tensor [N, 2, branches, D] holding the flip-summed
    L2-normalised (pooled, BNNeck) embeddings of each branch (DEEN: original, generated 1, 2)."""

    def __init__(self):
        self.paths, self.rows, self.features, self.pids, self.camids = {}, {}, {}, {}, {}
        self.images, self.forward_passes = 0, 0

    def add(self, modality, paths, features, pids, camids):
        self.paths[modality] = list(paths)
        self.rows[modality] = {p: i for i, p in enumerate(paths)}
        self.features[modality] = features
        self.pids[modality] = np.asarray(pids, dtype=np.int64)
        self.camids[modality] = np.asarray(camids, dtype=np.int64)
        self.images += len(paths)

    def select(self, image_list):
        """The feature rows of a data_manager.ImageList, in its order."""
        rows = self.rows[image_list.modality]
        try:
            return self.features[image_list.modality][[rows[p] for p in image_list.paths]]
        except KeyError as missing:
            raise UserError(f'the features hold no image {missing.args[0]}; they were extracted '
                            f'from another dataset or data folder.') from None

    def save(self, path, meta):
        """Write the features with their paths, ids, cameras and modality to a torch file that
        torch.load(path, weights_only=True) reads (no pickled objects)."""
        content = {'format': FEATURES_FORMAT, 'meta': dict(meta), 'modalities': {
            m: {'paths': self.paths[m], 'pids': torch.from_numpy(self.pids[m]),
                'camids': torch.from_numpy(self.camids[m]), 'features': self.features[m].cpu()}
            for m in self.features}}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        torch.save(content, path)

    @classmethod
    def load(cls, path):
        """A FeatureStore and its meta dict from a file written by save()."""
        content = load_checkpoint(path, what='features file')
        if not isinstance(content, dict) or content.get('format') != FEATURES_FORMAT:
            raise UserError(f'{path} is not a features file written by test.py --save-features.')
        store = cls()
        for modality, part in content['modalities'].items():
            store.add(modality, part['paths'], part['features'], part['pids'].numpy(),
                      part['camids'].numpy())
        return store, content['meta']


def extract_features(model, image_lists, args, device, ctx=None):
    """Pass each distinct image of image_lists (and its horizontal flip, in the same batch)
    through the network once; under torchrun each process takes every world_size-th image and
    the results are gathered on all processes. args gives img_h, img_w, test_batch, workers,
    amp and channels_last."""
    ctx = ctx or DistContext()
    store = FeatureStore()
    model.eval()
    for modality in sorted({lst.modality for lst in image_lists}):
        labels = {p: (pid, cam) for lst in image_lists if lst.modality == modality
                  for p, pid, cam in zip(lst.paths, lst.pids.tolist(), lst.camids.tolist())}
        paths = sorted(labels)
        mine = paths[ctx.rank::ctx.world_size]
        features, passes = embed_images(model, modality, mine, args, device)
        store.add(modality, paths, _gather_strided(features, len(paths), ctx),
                  [labels[p][0] for p in paths], [labels[p][1] for p in paths])
        store.forward_passes += passes * ctx.world_size
    return store


def embed_images(model, modality, paths, args, device):
    """(features [N, 2, branches, D], batches) of image files through one modality's stem."""
    loader = torch.utils.data.DataLoader(TestImageSet(paths, args.img_h, args.img_w),
                                         batch_size=args.test_batch, num_workers=args.workers,
                                         pin_memory=device.type == 'cuda')
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    chunks = []
    with torch.inference_mode():
        for images in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            chunks.append(embed_batch(model, modality, images, args.amp, device))
    if not chunks:
        return torch.zeros(0, 2, model.num_branches, model.embed_dim, device=device), 0
    return torch.cat(chunks), len(chunks)


def embed_batch(model, modality, images, amp='off', device=None):
    """Normalised images [B, 3, H, W] -> [B, 2, branches, D]: (pooled, BNNeck) embeddings of the
    image plus those of its horizontal flip (one forward pass of both)."""
    branches = model.num_branches
    with autocast_context(device or images.device, amp):
        pool, feat = model(**{modality: torch.cat([images, images.flip(3)])})
    both = torch.stack([pool.float(), feat.float()], dim=1)     # [k*2B, 2, D]
    both = both.reshape(branches, 2, len(images), 2, -1).sum(1)  # [k, B, 2, D], flips summed
    return both.permute(1, 2, 0, 3)                              # [B, 2, k, D]


def _gather_strided(features, total, ctx):
    """Reassemble rows [rank::world_size] from every process into one [total, ...] tensor."""
    if not ctx.enabled:
        return features
    per_rank = -(-total // ctx.world_size)
    padded = features.new_zeros((per_rank,) + features.shape[1:])
    padded[:len(features)] = features
    gathered = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, padded.contiguous())
    full = features.new_empty((total,) + features.shape[1:])
    for rank, part in enumerate(gathered):
        count = len(range(rank, total, ctx.world_size))
        full[rank::ctx.world_size] = part[:count]
    return full


# ----------------------------------------------------------------------------------------------
# Features -> distances

def fused_distance(query_features, gallery_features, weights):
    """Negative fused similarity [Q, G] of features [Q, 2, k, D] and [G, 2, k, D]: the sum over
    branches of w_pool * <pool> + w_feat * <feat>; weights is a FUSIONS value."""
    scale = query_features.new_tensor(weights).view(1, 2, 1, 1)
    return -(query_features * scale).flatten(1) @ gallery_features.flatten(1).T
