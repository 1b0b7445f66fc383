"""Image data for training and testing: the resized uint8 training cache (built once, in
parallel), the training views (transforms, CAJ's channel augmentation), the paired cross-modal
training set, the test-image set and their transforms."""
import contextlib
import hashlib
import json
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2
from tqdm import tqdm

from utils import UserError, written_atomically

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CACHE_CHUNK = 256

# Cache file prefixes per modality; SYSU-MM01's are the names pre_process_sysu.py always wrote.
CACHE_PREFIX = {'visible': 'train_rgb_resized', 'infrared': 'train_ir_resized'}


UNDECODABLE = 'cannot be decoded (corrupt, truncated or not an image)'


def read_image(path, size=None):
    """Decode an image of any mode as RGB, optionally resized to size=(w, h) with Lanczos."""
    try:
        with Image.open(path) as img:
            return as_rgb(img, size)
    except FileNotFoundError:
        raise UserError(f'image {path} does not exist.') from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UserError(f'image {path} {UNDECODABLE}.') from None


def image_problem(path):
    """None when the image at path decodes; else why not, as a phrase. Cheaper than read_image:
    a JPEG is decoded at 1/8 scale (its DCT scaling), which still reads every byte of its data,
    so a file that is empty, truncated or not an image is found; nothing is resized."""
    try:
        with Image.open(path) as img:
            img.draft('RGB', (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
    except FileNotFoundError:
        return 'does not exist'
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return UNDECODABLE
    return None


def as_rgb(image, size=None):
    """A PIL image of any mode as RGB, optionally resized to size=(w, h) with Lanczos."""
    image = image.convert('RGB')
    return image.resize(size, Image.Resampling.LANCZOS) if size else image


# ----------------------------------------------------------------------------------------------
# Training cache: every training image resized once to (img_w, img_h), stored as uint8 .npy

def cache_key(image_list, size):
    """Identifies the cache content: the image paths (relative to nothing but their names and
    folders), the labels and the size. A change of any of them rebuilds the cache."""
    digest = hashlib.sha1(repr(tuple(size)).encode())
    for path, pid in zip(image_list.paths, image_list.pids.tolist()):
        digest.update(f'{path}\t{pid}\n'.encode())
    return digest.hexdigest()


def load_or_build_cache(image_list, cache_dir, size, workers=4, show_progress=True):
    """Return (images [N, h, w, 3] uint8, memory-mapped, labels [N]) for a training ImageList,
    building `<prefix>_img.npy`, `<prefix>_label.npy` and `<prefix>_meta.json` in cache_dir when
    they are missing, were built from another image list or size, or fail validation (a damaged
    or tampered cache is named in a warning and rebuilt)."""
    prefix = cache_prefix(image_list, cache_dir)
    problem = cache_problem(image_list, cache_dir, size)
    if problem is not None:
        if problem != CACHE_OUTDATED:
            logging.getLogger('deen').warning(f'the training cache {problem}; rebuilding it.')
        _build_cache(image_list, prefix, size, workers, show_progress)
    return _read_cache(prefix)


CACHE_OUTDATED = 'missing or built from another image list or size'


def cache_prefix(image_list, cache_dir):
    return os.path.join(cache_dir, CACHE_PREFIX[image_list.modality])


def cache_bytes(image_list, size):
    """Bytes of the image array a cache of image_list at size=(w, h) holds."""
    width, height = size
    return len(image_list) * height * width * 3


def cache_problem(image_list, cache_dir, size):
    """None when the cache of image_list at size=(w, h) can be used as it is; CACHE_OUTDATED
    when it must be built; else what is wrong with it (a phrase that names the file)."""
    prefix = cache_prefix(image_list, cache_dir)
    meta = _read_meta(prefix + '_meta.json')
    if meta.get('key') != cache_key(image_list, size):
        return CACHE_OUTDATED
    try:
        images, labels = _read_cache(prefix)
    except (OSError, ValueError, EOFError) as error:
        unsafe = 'object' in str(error).lower()
        reason = 'holds Python objects, which are not loaded' if unsafe else 'cannot be read'
        return f'{prefix}_img.npy or {prefix}_label.npy {reason}'
    width, height = size
    expected = (len(image_list), height, width, 3)
    if images.dtype != np.uint8 or images.shape != expected:
        return (f'{prefix}_img.npy holds {images.dtype} {tuple(images.shape)} instead of uint8 '
                f'{expected}')
    if (labels.dtype != np.int64 or labels.shape != (len(image_list),)
            or not np.array_equal(labels, image_list.pids)):
        return (f'{prefix}_label.npy does not hold the {len(image_list)} int64 labels of the image '
                f'list')
    return None


def _read_cache(prefix):
    return np.load(prefix + '_img.npy', mmap_mode='r'), np.load(prefix + '_label.npy')


def _read_meta(path):
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def _write_json(path, content):
    with written_atomically(path) as tmp, open(tmp, 'w') as handle:
        json.dump(content, handle)


def _build_cache(image_list, prefix, size, workers, show_progress):
    """Decode and resize every image into temporary files, then rename them into place and write
    the meta file last; on any failure (a bad image, a full disk, an interrupt) the temporary
    files are removed and an earlier cache is left as it was, still valid. Its meta file is
    removed only once the new arrays are complete, just before they replace the old ones: a
    crash between the renames leaves a cache without meta, which the next run rebuilds."""
    width, height = size
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    tmp_images, tmp_labels = prefix + '_img.tmp.npy', prefix + '_label.tmp.npy'
    try:
        images = np.lib.format.open_memmap(tmp_images, mode='w+', dtype=np.uint8,
                                           shape=(len(image_list), height, width, 3))
        del images  # workers fill it through their own memory maps
        chunks = [(tmp_images, start, image_list.paths[start:start + CACHE_CHUNK], size)
                  for start in range(0, len(image_list), CACHE_CHUNK)]
        with tqdm(total=len(image_list), desc=f'caching {image_list.modality} images',
                  disable=not show_progress, unit='img') as progress:
            if workers > 1 and len(chunks) > 1:
                with ProcessPoolExecutor(workers) as pool:
                    for done in pool.map(_fill_chunk, chunks):
                        progress.update(done)
            else:
                for chunk in chunks:
                    progress.update(_fill_chunk(chunk))
        np.save(tmp_labels, np.asarray(image_list.pids, dtype=np.int64))
        with contextlib.suppress(FileNotFoundError):
            os.remove(prefix + '_meta.json')  # the old arrays are about to be replaced
        os.replace(tmp_images, prefix + '_img.npy')
        os.replace(tmp_labels, prefix + '_label.npy')
        _write_json(prefix + '_meta.json', {'key': cache_key(image_list, size), 'size': list(size),
                                            'count': len(image_list)})
    finally:
        for leftover in (tmp_images, tmp_labels):
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


def _fill_chunk(job):
    path, start, paths, size = job
    images = np.load(path, mmap_mode='r+')
    for offset, image_path in enumerate(paths):
        images[start + offset] = np.asarray(read_image(image_path, size))
    images.flush()
    return len(paths)


# ----------------------------------------------------------------------------------------------
# Transforms

def train_transform(img_h, img_w, erasing_scale=(0.02, 0.4), grayscale=0.5, pad=10):
    """The released augmentation on a uint8 CHW tensor: pad 10, random grayscale, random crop,
    horizontal flip, ImageNet normalisation, random erasing (filled with the mean pixel)."""
    steps = [v2.Pad(pad)]
    if grayscale:
        steps.append(v2.RandomGrayscale(p=grayscale))
    steps += [v2.RandomCrop((img_h, img_w)), v2.RandomHorizontalFlip(),
              v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if erasing_scale:
        steps.append(v2.RandomErasing(p=0.5, scale=erasing_scale, ratio=(0.3, 1 / 0.3), value=0))
    return v2.Compose(steps)


# Channel augmentation of CAJ (Ye et al., ICCV 2021), applied to normalised CHW float tensors
# after the transform above; random draws come from torch's default generator, like every other
# draw of a training sample (CrossModalTrainSet seeds it per sample).

CHANNEL_ERASING_FILL = (0.4914, 0.4822, 0.4465)  # CAJ's per-channel constants, in normalised units
LUMINANCE = (0.2989, 0.5870, 0.1140)


def _uniform(low, high):
    return low + (high - low) * torch.rand(()).item()


def _integer(high):
    """Uniform integer in 0..high, both ends included."""
    return int(torch.randint(high + 1, ()).item())


class ChannelRandomErasing:
    """CAJ's random erasing: with probability p, a box of area uniform(scale) x H x W and aspect
    ratio h/w uniform in (ratio, 1/ratio) (up to 100 tries for a box inside the image) is filled
    channel by channel with `fill`, written into the normalised tensor as it is."""

    def __init__(self, p=0.5, scale=(0.02, 0.4), ratio=0.3, fill=CHANNEL_ERASING_FILL):
        self.p, self.scale, self.ratio, self.fill = p, tuple(scale), ratio, fill

    def box(self, height, width):
        """(top, left, h, w) of a box drawn as the erasing draws it, or None after 100 misses."""
        for _ in range(100):
            area = _uniform(*self.scale) * height * width
            aspect = _uniform(self.ratio, 1 / self.ratio)
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h < height and w < width:
                return _integer(height - h), _integer(width - w), h, w
        return None

    def __call__(self, image):
        if torch.rand(()).item() > self.p:
            return image
        box = self.box(*image.shape[-2:])
        if box is None:
            return image
        top, left, h, w = box
        image = image.clone()
        image[:, top:top + h, left:left + w] = image.new_tensor(self.fill)[:, None, None]
        return image


class ChannelExchange:
    """CAJ's augmented visible view: every channel set to one of R, G, B, chosen uniformly."""

    def __call__(self, image):
        return image[_integer(2)].expand_as(image).clone()


class ChannelAdaptiveGray:
    """CAJ's infrared augmentation: with probability 3/4 one channel (uniform among R, G, B)
    copied to all three; otherwise the image is kept or turned to luminance gray (1/8 each)."""

    def __call__(self, image):
        choice = _integer(3)
        if choice < 3:
            return image[choice].expand_as(image).clone()
        if torch.rand(()).item() > 0.5:
            return image
        gray = sum(weight * channel for weight, channel in zip(LUMINANCE, image))
        return gray.expand_as(image).clone()


# random erasing kinds: torchvision's ('zero') or ChannelRandomErasing with CAJ's constants or 0
CHANNEL_ERASING_FILLS = {'channel': CHANNEL_ERASING_FILL, 'channel-zero': (0.0, 0.0, 0.0)}
ERASING_KINDS = ('zero', *CHANNEL_ERASING_FILLS)


class View(NamedTuple):
    """One image a training sample yields: read from the cache of modality `stem`, augmented by
    `transform`, passed through that modality's stem, labelled with that image's identity."""
    name: str
    stem: str
    transform: Callable


def training_views(img_h, img_w, erasing=(0.02, 0.4), grayscale=0.5, pad=10, erasing_kind='zero',
                   channel_aug=False):
    """The views of a training sample. Without channel augmentation, DEEN's and AGW's two:
    [visible, infrared], both through train_transform (erasing_kind 'zero': torchvision's
    erasing, filled with 0). erasing_kind 'channel' uses ChannelRandomErasing instead (CAJ),
    'channel-zero' the same filled with 0 (MMN's released erasing).
    channel_aug adds CAJ's views: [visible, visible + ChannelExchange, infrared +
    ChannelAdaptiveGray], each drawn independently from the same visible / infrared image."""
    if erasing_kind not in ERASING_KINDS:
        raise ValueError(f'erasing_kind must be one of {", ".join(ERASING_KINDS)}, got '
                         f'{erasing_kind!r}')
    channel_erasing = erasing_kind in CHANNEL_ERASING_FILLS and erasing
    base = train_transform(img_h, img_w, None if channel_erasing else erasing, grayscale, pad)
    if channel_erasing:
        fill = CHANNEL_ERASING_FILLS[erasing_kind]
        base = v2.Compose([base, ChannelRandomErasing(scale=erasing, fill=fill)])
    if not channel_aug:
        return [View('visible', 'visible', base), View('infrared', 'infrared', base)]
    return [View('visible', 'visible', base),
            View('visible_ca', 'visible', v2.Compose([base, ChannelExchange()])),
            View('infrared', 'infrared', v2.Compose([base, ChannelAdaptiveGray()]))]


def test_transform():
    """uint8 HWC array or PIL image of the test size -> normalised float CHW tensor."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


# ----------------------------------------------------------------------------------------------
# Datasets

class CrossModalTrainSet(torch.utils.data.Dataset):
    """Paired training samples: index (visible i, infrared j, seed) -> (image of each view...,
    label of each view...), views in order: each view augments its own copy of visible image i
    or infrared image j (the cache of its stem) and carries that image's label; with the two
    views [visible, infrared] that is (vis image, ir image, vis label, ir label). The
    augmentation draws come from torch's CPU generator seeded with `seed` (the sampler's), views
    drawn in order, and the generator's state is restored afterwards: a sample is the same in
    any worker or in the main process, and the training process's own random stream is never
    touched. `views`: a list of View (training_views). with_indices: each view's image index in
    its stem's set follows the labels, (..., labels..., indices...), for a method whose loss
    looks up per-image state (DART's clean probabilities)."""

    def __init__(self, visible, infrared, views, with_indices=False):
        self.caches = {'visible': visible, 'infrared': infrared}
        self.views = list(views)
        self.with_indices = with_indices

    def __len__(self):
        return len(self.caches['visible'][1])

    def augment(self, view, index):
        """Image `index` of the view's stem cache through the view's transform (draws from
        torch's default generator as it stands)."""
        image = torch.from_numpy(np.array(self.caches[view.stem][0][index])).permute(2, 0, 1)
        return view.transform(image)

    def __getitem__(self, index):
        positions = dict(zip(('visible', 'infrared'), index[:2]))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(index[2])
            images = [self.augment(view, positions[view.stem]) for view in self.views]
        labels = [int(self.caches[view.stem][1][positions[view.stem]]) for view in self.views]
        if self.with_indices:
            return (*images, *labels, *(int(positions[view.stem]) for view in self.views))
        return (*images, *labels)


class TestImageSet(torch.utils.data.Dataset):
    """Test images by path (or as PIL images), decoded and resized to (img_w, img_h); with a
    corruption.Corruptor, the images it covers are corrupted (at CIL's size) before the resize."""

    def __init__(self, paths, img_h, img_w, corruption=None):
        self.paths, self.size = list(paths), (img_w, img_h)
        self.transform = test_transform()
        self.corruption = corruption

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = self.paths[index]
        if self.corruption is not None and self.corruption.covers(image):
            return self.transform(as_rgb(self.corruption.image(image), self.size))
        if isinstance(image, Image.Image):
            return self.transform(as_rgb(image, self.size))
        return self.transform(read_image(image, self.size))
