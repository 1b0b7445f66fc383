"""The inference layer every tool builds on: a checkpoint (ours of any method, or a released DEEN/AGW `.t` file)
-> an eval-ready model -> flip-TTA features of image lists (one forward pass per distinct image,
sharded across torchrun processes) -> fused query-gallery distances; features saved and read back;
the small Python API over it (ReIDModel, rank_gallery, image_files)."""
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from corruption import plan_of
from data_loader import TestImageSet
from data_manager import DATASETS
from checks import check_network_input
from methods import build_network, find_fusion, get_method, method_of_weights
from methods.base import POOL_FEAT_FUSIONS, SINGLE_FEATURE_FUSIONS
from model import converted_state_dict, load_model_weights
from utils import (CHECKPOINT_FORMAT, DistContext, UserError, autocast_context, load_checkpoint,
                   written_atomically)

FEATURES_FORMAT = 'deen-vireid-features'

# Weights of (pooled, BNNeck) embeddings in the similarity (METHOD.md "Test-time features"), and
# one of them alone (CAJ's columns); the tools' --fusion choices are every method's fusion names.
FUSIONS = POOL_FEAT_FUSIONS
SINGLE_FEATURES = SINGLE_FEATURE_FUSIONS
ALL_FUSIONS = {**FUSIONS, **SINGLE_FEATURES}


def fusion_weights(name, method=None):
    """The fusion `name` of a method (a Method or its name; its weights or callable:
    fused_distance takes either). Without a method (a network of none this code registers): a
    FUSIONS or SINGLE_FEATURES name, over (pooled, BNNeck) features."""
    if method is not None:
        return find_fusion(name, method)
    if name not in ALL_FUSIONS:
        raise UserError(f'fusion must be one of {", ".join(ALL_FUSIONS)}, got {name!r}.')
    return ALL_FUSIONS[name]


def method_fusions(method):
    """{name: fusion} of the fusions test.py reports for a method's checkpoints."""
    return dict(get_method(method).fusions)


# ----------------------------------------------------------------------------------------------
# Checkpoint -> model

def add_checkpoint_args(group):
    """--resume (required) and --dataset of the tools that run one trained network (search.py,
    export.py)."""
    group.add_argument('--resume', required=True, help='checkpoint (ours or a released DEEN/AGW '
                       '.t file)')
    group.add_argument('--dataset', choices=DATASETS, help='only for a released checkpoint whose '
                       'class count names no dataset')


def load_trained_model(path, dataset=None, device='cpu', cross_dataset=False):
    """Build the network a checkpoint describes and load its weights: our checkpoints carry their
    dataset, method, trunk and image size; a released DEEN or AGW checkpoint (`{'net':
    state_dict, ...}`) is told apart by its keys, takes its method's image size, and its class
    count names its dataset. `dataset` (None: the checkpoint's) is the test dataset. Returns
    (model, info) with info holding method, arch, img_h, img_w, num_classes, epoch, the training
    dataset (a released checkpoint's as its class count names it, else None), provenance (ours:
    how it was trained, see provenance.py), seed and network (DEEN's switches as recorded, a dict
    of model.NetworkSwitches; None: the released network, as in released and older checkpoints)
    and sources (a run on several datasets: what it records of each, sources.py; else None).
    A checkpoint of ours tested on another dataset than its own (or its sources) needs
    cross_dataset (test.py --cross-dataset); its network is the one it was trained as (DEEN's
    RegDB network differs), built from what it records, not from the test dataset."""
    state = load_checkpoint(path)
    trained_on, _ = checkpoint_dataset(state, path, required=dataset is None)
    dataset = dataset or trained_on
    network_dataset = dataset
    if state.get('format') == CHECKPOINT_FORMAT:
        from sources import check_tested_dataset
        check_tested_dataset(state['dataset'], dataset, path, cross_dataset)
        network_dataset = state['dataset']
        info = {key: state[key] for key in ('method', 'img_h', 'img_w', 'num_classes', 'epoch',
                                            'dataset')}
        info['sources'] = state.get('sources')
        info['arch'] = state.get('arch', 'resnet50')
        info['provenance'] = state.get('provenance')
        info['seed'] = state.get('args', {}).get('seed')
        info['network'] = state.get('network')  # DEEN's switches; None: released (older files)
        weights = state['model']
    else:
        weights = released_weights(state, path)
        method = released_method(weights)
        height, width = get_method(method).released_image_size
        info = {'method': method, 'arch': 'resnet50', 'img_h': height, 'img_w': width,
                'num_classes': int(weights['classifier.weight'].shape[0]),
                'epoch': state.get('epoch'), 'dataset': trained_on, 'provenance': None,
                'seed': None, 'network': None, 'sources': None}
    model = build_network(info['method'], info['num_classes'], network_dataset, pretrained=None,
                          arch=info['arch'], settings=info['network'])
    try:
        load_model_weights(model, weights)
    except UserError as error:
        raise UserError(f'checkpoint {path}: {error}') from None
    return model.to(device).eval(), info


def inference_model(model, args):
    """The network as feature extraction runs it under the runtime flags: in channels-last
    memory format with --channels-last, and with --compile a torch.compile'd module sharing
    model's weights (compiled on its first batches, so make it once per run and reuse it)."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.compile(model) if args.compile else model


def released_method(weights):
    """The method of a released checkpoint's state dict, told from its keys."""
    method = method_of_weights(converted_state_dict(weights))
    if method is None:
        raise UserError('the weights are of no method this code knows (neither DEEN\'s mfa/dee '
                        'keys nor AGW\'s non-local keys).')
    return method


def released_weights(state, path):
    """The state dict of a released checkpoint (`{'net': ...}` or a bare state dict)."""
    weights = state.get('net', state)
    if not isinstance(weights, dict) or 'classifier.weight' not in converted_state_dict(weights):
        raise UserError(f'checkpoint {path} holds no DEEN/AGW weights (no classifier.weight).')
    return weights


def checkpoint_dataset(state, path=None, required=False):
    """(dataset, how it was told) of a loaded checkpoint: ours records it; a released one's class
    count names it (395 SYSU-MM01, 206 RegDB, 713 LLCM). (None, None) when neither tells, or with
    `required` a UserError naming --dataset."""
    from data_manager import dataset_of_class_count
    if state.get('format') == CHECKPOINT_FORMAT:
        return state['dataset'], 'recorded in the checkpoint'
    count = int(released_weights(state, path)['classifier.weight'].shape[0])
    dataset = dataset_of_class_count(count)
    if dataset is None and required:
        raise UserError(f'checkpoint {path} has {count} classes, which names none of SYSU-MM01 '
                        f'(395), RegDB (206) or LLCM (713); pass --dataset.')
    return (dataset, f'inferred from the released checkpoint\'s {count} classes') if dataset \
        else (None, None)


# ----------------------------------------------------------------------------------------------
# Images -> features

class FeatureStore:
    """Test features of distinct images. Per modality stem the images passed through (their own
    modality's, except in RegDB's released routing): the sorted paths, a path -> row index, the
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
        """The feature rows of a data_manager.ImageList (through its stem), in its order."""
        rows = self.rows[image_list.stem]
        try:
            return self.features[image_list.stem][[rows[p] for p in image_list.paths]]
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
        with written_atomically(path) as tmp:
            torch.save(content, tmp)

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


def extract_features(model, image_lists, args, device, ctx=None, progress=False):
    """Pass each distinct image of image_lists (and its horizontal flip, in the same batch)
    through the network once; under torchrun each process takes every world_size-th image and
    the results are gathered on all processes. args gives img_h, img_w, test_batch, workers,
    amp, channels_last and corrupted (test.py's corruption flags, corruption.py); progress
    shows a progress bar per modality on the main process."""
    ctx = ctx or DistContext()
    store = FeatureStore()
    model.eval()
    plan = plan_of(args)  # corrupted images (test.py --corrupt / --corruption), else None
    corruptor = plan.corruptor(image_lists) if plan else None
    for modality in sorted({lst.stem for lst in image_lists}):  # the stem the images pass through
        labels = {p: (pid, cam) for lst in image_lists if lst.stem == modality
                  for p, pid, cam in zip(lst.paths, lst.pids.tolist(), lst.camids.tolist())}
        paths = sorted(labels)
        mine = paths[ctx.rank::ctx.world_size]
        features, passes = embed_images(model, modality, mine, args, device,
                                        progress=progress and ctx.is_main, corruption=corruptor)
        store.add(modality, paths, _gather_strided(features, len(paths), ctx),
                  [labels[p][0] for p in paths], [labels[p][1] for p in paths])
        store.forward_passes += passes * ctx.world_size
    return store


def embed_images(model, modality, paths, args, device, progress=False, unreadable=None,
                 corruption=None):
    """(features [N, 2, branches, D], batches) of image files (or PIL images) through one
    modality's stem; progress shows a progress bar of the batches. unreadable: a list to which
    the indices of images that cannot be decoded are appended, leaving them out of the features
    (without it such an image raises UserError). corruption: a corruption.Corruptor whose
    images are corrupted."""
    images = TestImageSet(paths, args.img_h, args.img_w, corruption)
    if unreadable is not None:
        images = _SkippingUnreadable(images)
    loader = torch.utils.data.DataLoader(images, batch_size=args.test_batch,
                                         num_workers=args.workers,
                                         pin_memory=device.type == 'cuda',
                                         collate_fn=getattr(images, 'collate', None))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    chunks = []
    with torch.inference_mode():
        for images in tqdm(loader, desc=f'{modality} features', unit='batch', disable=not progress,
                           leave=False):
            if unreadable is not None:
                images, failed = images
                unreadable.extend(failed)
                if images is None:
                    continue
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            chunks.append(embed_batch(model, modality, images, args.amp, device))
    if not chunks:
        return torch.zeros(0, 2, model.num_branches, model.embed_dim, device=device), 0
    return torch.cat(chunks), len(chunks)


class _SkippingUnreadable(torch.utils.data.Dataset):
    """A TestImageSet that skips images it cannot decode: its batches are (images, or None when
    none decoded, [indices of the images that failed])."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        try:
            return index, self.images[index]
        except Exception:  # noqa: BLE001  (image decoders raise many types on malformed files)
            return index, None

    @staticmethod
    def collate(items):
        decoded = [image for _, image in items if image is not None]
        failed = [index for index, image in items if image is None]
        return (torch.stack(decoded) if decoded else None), failed


def embed_batch(model, modality, images, amp='off', device=None):
    """Normalised images [B, 3, H, W] -> [B, 2, branches, D]: (pooled, BNNeck) embeddings of the
    image plus those of its horizontal flip (one forward pass of both)."""
    branches = model.num_branches
    with autocast_context(device or images.device, amp):
        pool, feat = model(**{modality: torch.cat([images, images.flip(3)])})
    both = torch.stack([pool.float(), feat.float()], dim=1)     # [k*2B, 2, D]
    both = both.reshape(branches, 2, images.shape[0], 2, -1).sum(1)  # [k, B, 2, D], flips summed
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
    branches of w_pool * <pool> + w_feat * <feat>; weights is a FUSIONS value. A SINGLE_FEATURES
    value (one weight 0) compares that feature alone as CAJ's test does: the flip-summed
    feature re-normalised, so the similarity is a cosine. A callable (a method's own fusion)
    computes the distance itself."""
    if callable(weights):
        return weights(query_features, gallery_features)
    scale = query_features.new_tensor(weights).view(1, 2, 1, 1)
    query, gallery = (query_features * scale).flatten(1), gallery_features.flatten(1)
    if 0.0 in weights:
        gallery = (gallery_features * scale).flatten(1)
        query, gallery = F.normalize(query, dim=1), F.normalize(gallery, dim=1)
    return -query @ gallery.T


# ----------------------------------------------------------------------------------------------
# The Python API (README "Python API"), also what search.py runs on: ReIDModel.load(checkpoint),
# .embed(images, modality), rank_gallery(query, gallery), image_files(folder)

# Suffixes (any letter case) of the files image_files lists: the formats Pillow decodes that
# cameras and datasets use.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.gif', '.ppm',
                    '.pgm', '.pnm')


def image_files(folder):
    """Every image file (an IMAGE_EXTENSIONS suffix) under folder, recursively, sorted; files and
    folders whose names start with '.' (hidden, caches) are skipped."""
    if not os.path.isdir(folder):
        raise UserError(f'{folder} is not a folder; expected a folder of images.')
    found = []
    for root, folders, files in os.walk(folder):
        folders[:] = [name for name in folders if not name.startswith('.')]
        found += [os.path.join(root, name) for name in files
                  if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def image_paths(paths, dest):
    """The image files a command line's PATH arguments name: a file itself, a folder's every image
    file (recursively, as image_files). A missing path, or none found, is a UserError naming the
    flag --dest (an argparse dest, e.g. 'query')."""
    from utils import flag
    found = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f'{flag(dest)} {path} does not exist; expected image files or folders.')
        found += image_files(path) if os.path.isdir(path) else [path]
    if not found:
        raise UserError(f'{flag(dest)} {" ".join(paths)} holds no image files '
                        f'({", ".join(IMAGE_EXTENSIONS)}).')
    return found


class ReIDModel:
    """A trained network (any method) with test.py's test-time settings. `model` is the eval-mode
    network, `info` what load_trained_model tells of the checkpoint, `settings` the image size,
    images per forward pass (batch_size), data-loading processes (workers), amp, channels_last
    and compile (torch.compile the network) that embed uses."""

    def __init__(self, model, info, device, img_h=None, img_w=None, batch_size=64, workers=0,
                 amp='off', channels_last=False, compile=False):
        self.model, self.info, self.device = model, info, torch.device(device)
        self.settings = SimpleNamespace(img_h=img_h or info['img_h'], img_w=img_w or info['img_w'],
                                        test_batch=batch_size, workers=workers, amp=amp,
                                        channels_last=channels_last, compile=compile)
        check_network_input(model, info['method'], self.settings.img_h, self.settings.img_w)
        self.model = inference_model(model, self.settings)

    @classmethod
    def load(cls, checkpoint, dataset=None, device=None, **settings):
        """The model of a checkpoint (ours, or a released DEEN/AGW `.t` file; dataset only when
        its class count does not name it) on device (default: CUDA when available, else CPU)."""
        device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
        model, info = load_trained_model(checkpoint, dataset, device)
        return cls(model, info, device, **settings)

    def embed(self, images, modality, progress=False, unreadable=None):
        """Features [N, 2, branches, D] of image files or PIL images of one modality ('visible'
        or 'infrared'), computed as test.py does: resized to the checkpoint's size, through the
        modality's stem, flip-summed L2-normalised (pooled, BNNeck) embeddings per branch.
        progress and unreadable as in embed_images."""
        from data_manager import MODALITIES
        if modality not in MODALITIES:
            raise UserError(f'modality must be one of {", ".join(MODALITIES)}, got {modality!r}.')
        return embed_images(self.model, modality, list(images), self.settings, self.device,
                            progress=progress, unreadable=unreadable)[0]


def rank_gallery(query_features, gallery_features, fusion='pool+feat', topk=None, method=None):
    """(order, distances), each [Q, k]: for every query the gallery rows nearest first (ties in
    gallery order) and their fused distances under the fusion `fusion` of `method` (the
    checkpoint's, ReIDModel.info['method']; None: a FUSIONS or SINGLE_FEATURES name); k = topk,
    or all rows."""
    distances = fused_distance(query_features, gallery_features.to(query_features.device),
                               fusion_weights(fusion, method))
    distances, order = distances.sort(dim=1, stable=True)
    return order[:, :topk], distances[:, :topk]
