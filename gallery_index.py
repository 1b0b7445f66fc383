"""The feature index of an image folder that search.py ranks: the features of every image under
it, cached in a numpy file keyed by each file's path, size and modification time and by the
checkpoint, so that a later search extracts only new or changed files and drops removed ones."""
import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from utils import written_atomically

INDEX_FORMAT = 'deen-vireid-gallery-index-1'
DEFAULT_INDEX_FOLDER = '.deen-index'  # inside the gallery folder; image_files skips it (hidden)
# A file modified this close before a scan may change again within the file system's timestamp
# granularity (coarse kernel clocks, FAT's 2 s) without its mtime changing: it is read again at
# the next update instead of being trusted.
RACY_NS = 2 * 10**9


@dataclass
class GalleryIndex:
    """Features [N, 2, branches, D] of the readable images of a folder (paths: sorted, joined to
    the folder), the files that could not be decoded, the counts of this update (extracted:
    decoded now; reused: read from the index file; removed: dropped from it as gone or changed
    into unreadable) and the index file."""
    paths: list
    features: torch.Tensor
    unreadable: list
    extracted: int
    reused: int
    removed: int
    index_file: str


def index_key(checkpoint, modality, settings):
    """What the features of an index depend on besides the images: the checkpoint file (path,
    size, mtime), the modality stem, the image size and the precision."""
    stat = os.stat(checkpoint)
    return {'format': INDEX_FORMAT, 'checkpoint': os.path.abspath(checkpoint),
            'checkpoint_size': stat.st_size, 'checkpoint_mtime_ns': stat.st_mtime_ns,
            'modality': modality, 'img_h': settings.img_h, 'img_w': settings.img_w,
            'amp': settings.amp}


def index_file(index_dir, key):
    """The file of a key: one per checkpoint path, modality, size and precision, so that a
    checkpoint rewritten in place replaces its old index instead of adding one."""
    stable = {name: key[name] for name in ('checkpoint', 'modality', 'img_h', 'img_w', 'amp')}
    digest = hashlib.sha1(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(index_dir, f'{key["modality"]}-{digest}.npz')


def update_index(reid_model, checkpoint, root, files, modality, index_dir, progress=False):
    """The GalleryIndex of files (image paths under the folder root) through reid_model (an
    inference.ReIDModel loaded from checkpoint): features of files whose size and mtime match
    the index file are read from it, the others are extracted (unreadable ones skipped and
    remembered), and the index file is rewritten when anything changed."""
    scanned_ns = time.time_ns()
    signatures = {}
    for path in files:
        try:
            stat = os.stat(path)
            signatures[os.path.relpath(path, root)] = (stat.st_size, stat.st_mtime_ns)
        except OSError:  # removed since it was listed
            continue
    key = index_key(checkpoint, modality, reid_model.settings)
    target = index_file(index_dir, key)
    cached = read_index(target, key)
    trusted_before = cached['scanned_ns'] - RACY_NS

    def unchanged(name, known):
        """Whether known (name -> signature) holds the file as it is now, dated before the index's
        scan by more than RACY_NS."""
        return known.get(name) == signatures[name] and signatures[name][1] < trusted_before

    reused = [name for name in signatures if unchanged(name, cached['readable'])]
    known_bad = [name for name in signatures if unchanged(name, cached['unreadable'])]
    skip = set(reused) | set(known_bad)
    todo = [name for name in signatures if name not in skip]
    failed_rows, parts = [], []
    if cached['features'] is not None:
        parts.append(cached['features'][[cached['rows'][name] for name in reused]])
    if todo or not parts:
        parts.append(reid_model.embed([os.path.join(root, name) for name in todo], modality,
                                      progress=progress, unreadable=failed_rows).cpu().numpy())
    failed = {todo[i] for i in failed_rows}
    extracted = [name for name in todo if name not in failed]
    names = reused + extracted
    order = sorted(range(len(names)), key=names.__getitem__)
    names, features = [names[i] for i in order], np.concatenate(parts)[order]
    unreadable = sorted(known_bad + list(failed))
    removed = len(set(cached['readable']) - set(names))
    changed = todo or removed or set(cached['unreadable']) != set(unreadable)
    if changed or not os.path.exists(target):
        write_index(target, key, scanned_ns, {n: signatures[n] for n in names}, features,
                    {n: signatures[n] for n in unreadable})
    return GalleryIndex([os.path.join(root, n) for n in names], torch.from_numpy(features),
                        [os.path.join(root, n) for n in unreadable], len(extracted), len(reused),
                        removed, target)


def read_index(path, key):
    """The content of an index file written for key: {'readable': {name: (size, mtime_ns)},
    'rows': {name: row}, 'features' (None when empty), 'unreadable': {name: (size, mtime_ns)},
    'scanned_ns'}; an empty one when the file is missing, unreadable or made for another key."""
    empty = {'readable': {}, 'rows': {}, 'features': None, 'unreadable': {}, 'scanned_ns': 0}
    try:
        with np.load(path, allow_pickle=False) as content:
            if json.loads(str(content['key'])) != key:
                return empty
            names = content['paths'].tolist()
            readable = dict(zip(names, zip(content['sizes'].tolist(), content['mtimes'].tolist())))
            unreadable = dict(zip(content['unreadable_paths'].tolist(),
                                  zip(content['unreadable_sizes'].tolist(),
                                      content['unreadable_mtimes'].tolist())))
            return {'readable': readable, 'rows': {n: i for i, n in enumerate(names)},
                    'features': content['features'], 'unreadable': unreadable,
                    'scanned_ns': int(content['scanned_ns'])}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return empty


def write_index(path, key, scanned_ns, readable, features, unreadable):
    """Write an index file atomically (numpy arrays only, read without pickle): readable and
    unreadable map names (paths relative to the folder) to (size, mtime_ns), features [N, ...]
    are the rows of readable's names in their order."""
    with written_atomically(path) as tmp, open(tmp, 'wb') as handle:
        np.savez(handle, key=np.array(json.dumps(key)), scanned_ns=np.int64(scanned_ns),
                 features=features, **_signature_arrays('', readable),
                 **_signature_arrays('unreadable_', unreadable))


def _signature_arrays(prefix, signatures):
    names = list(signatures)
    return {f'{prefix}paths': np.array(names, dtype=str),
            f'{prefix}sizes': np.array([signatures[n][0] for n in names], dtype=np.int64),
            f'{prefix}mtimes': np.array([signatures[n][1] for n in names], dtype=np.int64)}
