"""Checks run before any expensive work (cache build, model build, training, feature extraction):
numeric flags, flags against the device, input files and folders, output folders and their free
space, image sizes, and the folders that the processes of a multi-node run must share."""
import contextlib
import errno
import importlib.util
import math
import os
import secrets
import shutil
import tempfile

import torch

from data_loader import cache_bytes, cache_problem, image_problem
from data_manager import dataset_facts
from methods import METHODS, build_network, get_method
from utils import (CHECKPOINT_FORMAT, UserError, checkpoint_bytes, checkpoint_file_problem,
                   first_sentence, flag,
                   free_bytes, gathered, load_checkpoint, nearest_existing, rng_state,
                   storage_problem)

# Per-parameter optimiser state tensors shaped like the parameter (SGD momentum; Adam's two
# moments), and whether each parameter also has a scalar step tensor.
OPTIMIZER_SLOTS = {'sgd': (1, False), 'adam': (2, True)}


# ----------------------------------------------------------------------------------------------
# Numeric flags

def check_integer(value, dest, minimum):
    """An integer flag is at least `minimum` (None: unset, allowed)."""
    if value is not None and value < minimum:
        expected = {0: 'an integer of 0 or more', 1: 'a positive integer'}.get(
            minimum, f'an integer of at least {minimum}')
        raise UserError(f'{flag(dest)} must be {expected}, got {value}.')


def check_real(value, dest, positive=False):
    """A float flag is finite and not negative (positive=True: above 0)."""
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        expected = 'a finite number above 0' if positive else 'a finite number of 0 or more'
        raise UserError(f'{flag(dest)} must be {expected}, got {value}.')


def check_runtime_flags(args):
    """The flags of utils.add_runtime_args, and --img_h / --img_w where the script has them."""
    check_integer(args.workers, 'workers', 0)
    check_integer(args.test_batch, 'test_batch', 1)
    check_integer(args.gpu, 'gpu', 0)
    for dest in ('img_h', 'img_w'):
        check_integer(getattr(args, dest, None), dest, 1)


def check_device_flags(args, device):
    """The runtime flags that the device can honour: --sync-bn (train.py) and --amp fp16 need
    CUDA; --compile needs a C++ compiler on the CPU and triton on CUDA (what torch.compile
    generates its kernels with); --channels-last works on both."""
    if getattr(args, 'sync_bn', False) and device.type != 'cuda':
        raise UserError(f'{flag("sync_bn")} needs CUDA GPUs (SyncBatchNorm has no CPU '
                        f'implementation); drop it to train on the CPU.')
    if args.amp == 'fp16' and device.type != 'cuda':
        raise UserError(f'{flag("amp")} fp16 needs a CUDA GPU; use {flag("amp")} bf16 on the CPU.')
    if args.compile:
        missing = compile_toolchain_missing(device)
        if missing:
            raise UserError(f'{flag("compile")} on {device.type} needs {missing}; install it or '
                            f'drop {flag("compile")}.')


def compile_toolchain_missing(device):
    """What torch.compile (inductor) lacks on this machine to generate code for device, as a
    phrase; None when nothing is missing."""
    if device.type == 'cuda':
        return None if importlib.util.find_spec('triton') else 'the triton package'
    compiler = os.environ.get('CXX', 'g++')  # the compiler inductor calls on Linux
    if shutil.which(compiler) is None:
        return f'a C++ compiler ({compiler}, or the one the CXX variable names)'
    return None


# ----------------------------------------------------------------------------------------------
# Inputs

def check_data_folder(path, dataset):
    """The dataset root exists and is a folder (its content is checked by reading it)."""
    facts = dataset_facts(dataset)
    if not os.path.isdir(path):
        problem = 'is a file' if os.path.exists(path) else 'does not exist'
        raise UserError(f'{flag("data_path")} {path} {problem}; expected the {facts.title} folder '
                        f'with {facts.layout}.')


def check_torch_file(path, dest):
    """A file that --dest names exists, is a readable file and starts like a torch file."""
    problem = checkpoint_file_problem(path, flag(dest))
    if problem:
        raise UserError(problem + '.')


def peek_checkpoint(path, dest):
    """The content of a checkpoint with its tensors memory-mapped, not read (cheap)."""
    check_torch_file(path, dest)
    return load_checkpoint(path, flag(dest), mmap=True)


def check_resume_state(state, path, args, num_classes, epochs=None):
    """A checkpoint of ours fits this run: the same dataset, method, trunk and identity count,
    and (given `epochs`) an epoch left to train."""
    if state.get('format') != CHECKPOINT_FORMAT:
        return  # a released checkpoint: weights only, checked when they are loaded
    expected = {'dataset': args.dataset, 'method': args.method, 'arch': args.arch,
                'num_classes': num_classes}
    for key, value in expected.items():
        if state.get(key) != value:
            raise UserError(f'checkpoint {path} was trained with {key} {state.get(key)!r}, but '
                            f'this run has {key} {value!r}.')
    finished = state['epoch'] + 1 if state['step'] == 0 else state['epoch']
    if epochs is not None and finished >= epochs and not state.get('evaluation_pending'):
        raise UserError(f'checkpoint {path} has already trained the {finished} epoch(s) that '
                        f'{flag("epochs")} {epochs} asks for; pass a larger {flag("epochs")} to '
                        f'train on.')


def check_resume_network(state, path, args):
    """A checkpoint to continue has the network this run builds: the network settings it records
    (none recorded, or a released checkpoint: the method's default network for --dataset) equal
    this run's."""
    method = get_method(args.method)
    recorded = state.get('network') if state.get('format') == CHECKPOINT_FORMAT else None
    saved = method.recorded_settings(args.dataset, recorded)
    wanted = method.network_settings(args)
    differ = [f'{flag(name)} {_flag_value(saved.get(name))} (this run: '
              f'{_flag_value(value)})' for name, value in (wanted or {}).items()
              if (saved or {}).get(name) != value]
    if differ:
        raise UserError(f'checkpoint {path} holds another network: it was trained with '
                        f'{", ".join(differ)}; pass the same switches to continue it.')


def _flag_value(value):
    """A recorded network setting as its flag spells it (None: 'none')."""
    return 'none' if value is None else value


def check_images_exist(image_lists, what):
    """Every image an index file or folder listing names is a file."""
    missing = [path for image_list in image_lists for path in image_list.paths
               if not os.path.isfile(path)]
    if missing:
        raise UserError(f'{len(missing)} {what} image(s) listed in the dataset do not exist, '
                        f'e.g. {missing[0]}.')


def check_images_decode(image_lists, what):
    """Every image of image_lists exists and decodes (data_loader.image_problem); the first that
    does not is named."""
    check_images_exist(image_lists, what)
    for image_list in image_lists:
        for path in image_list.paths:
            problem = image_problem(path)
            if problem:
                raise UserError(f'{what} image {path} {problem}; replace it or remove it from the '
                                f'dataset.')


def check_image_size(args, method, num_classes, dataset, settings=None):
    """The network takes --img_h x --img_w images: one image passes through a freshly built
    (randomly initialised) network of this run (its recorded network `settings`). Returns that
    network."""
    model = build_network(method, num_classes, dataset, pretrained=None, arch=args.arch,
                          settings=settings).eval()
    check_network_input(model, method, args.img_h, args.img_w)
    return model


def check_network_input(model, method, img_h, img_w):
    """An eval-mode network of `method` (its name) takes img_h x img_w images (the values of
    --img_h / --img_w): one zero image passes through it on its device (the CPU for a network
    without weights)."""
    device = next(model.parameters(), torch.zeros(())).device
    try:
        with torch.inference_mode():
            model(visible=torch.zeros(1, 3, img_h, img_w, device=device))
    except UserError as error:  # the network's own sentence says what would fit
        raise UserError(f'{flag("img_h")} {img_h} x {flag("img_w")} {img_w} does not fit '
                        f'the {method.upper()} network: {first_sentence(error)}.') from None
    except RuntimeError as error:
        raise UserError(f'{flag("img_h")} {img_h} x {flag("img_w")} {img_w} does not fit '
                        f'the {method.upper()} network ({first_sentence(error)}); the released '
                        f'sizes are {released_sizes()}.') from None


def released_sizes():
    """The methods' released input sizes, as a phrase: '384 x 144 (DEEN), 288 x 144 (AGW), ...'."""
    return ', '.join(f'{m.recipe["img_h"]} x {m.recipe["img_w"]} ({m.title})'
                     for m in METHODS.values())


# ----------------------------------------------------------------------------------------------
# Outputs

def check_output_folder(path, dest, what):
    """path is a folder this process can write into, or one it can create: a file there, or a
    read-only / unwritable folder, is refused."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f'{flag(dest)} {path} is a file; expected a folder for {what}.')
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        raise UserError(f'{flag(dest)} {path} cannot be created: {existing} is a file; expected '
                        f'a folder for {what}.')
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix='.write-test-')
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise UserError(f'{flag(dest)} {path} cannot hold {what}: '
                        f'{storage_problem(existing, error, 0, what)}.') from None


def check_free_space(path, dest, needed, what):
    """The file system of path (or of the folder that will hold it) has `needed` bytes free."""
    free = free_bytes(path)
    if free is not None and free < needed:
        folder = nearest_existing(path)
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        problem = storage_problem(folder, full, needed, what)
        raise UserError(f'{flag(dest)} {path} is too small: {problem}; free space there or choose '
                        f'another {flag(dest)}.')


def checkpoint_space(files, size):
    """Bytes a run needs free to write checkpoint `files` of about `size` bytes each: every file
    that does not exist yet, plus one temporary copy while a file is replaced, minus what the
    files it overwrites hold now."""
    existing = sum(os.path.getsize(f) for f in files if os.path.isfile(f))
    return max((len(files) + 1) * size - existing, size)


def checkpoint_estimate(model, optim):
    """About how many bytes a training checkpoint of model with optimiser `optim` takes: the
    weights and buffers, the optimiser state and the RNG states (utils.checkpoint_bytes)."""
    moments, step_tensor = OPTIMIZER_SLOTS[optim]
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer_state = [p for p in parameters for _ in range(moments)]
    if step_tensor:
        optimizer_state += [torch.zeros(()) for _ in parameters]
    return checkpoint_bytes({'model': model.state_dict(), 'optimizer': optimizer_state,
                             'rng': rng_state()})


def check_cache_build(image_lists, cache_dir, size):
    """The training caches of image_lists at size=(w, h) that must be (re)built can be: --cache-dir
    is writable and has room for them, and every image they read exists and decodes. Returns
    whether any must be built."""
    stale = [image_list for image_list in image_lists
             if cache_problem(image_list, cache_dir, size) is not None]
    if stale:
        check_output_folder(cache_dir, 'cache_dir', 'the training cache')
        check_free_space(cache_dir, 'cache_dir', sum(cache_bytes(lst, size) for lst in stale),
                         'the training cache')
        check_images_decode(stale, 'training')
    return bool(stale)


# ----------------------------------------------------------------------------------------------
# Folders of a multi-node run

SHARED_TOKEN_PREFIX = '.deen-shared-check-'


def check_shared_folders(folders, ctx):
    """Who sees the files written into each folder by the processes of a torchrun run. folders:
    [(dest, path, what it holds, per_node)]. The first process of every node (local rank 0)
    writes a token file with a random nonce into each folder; after a barrier every process
    reports the tokens it reads back. Returns {dest: 'all'} where every process reads rank 0's
    token (a filesystem shared by all nodes), or, for a per_node folder, 'node' where every
    process reads exactly one token (each node's own disk: its first process writes there).
    Anything else raises UserError, one sentence on every process naming the flag, instead of
    a hang or a process that later reads another file than rank 0 wrote. One process: 'all'."""
    if not ctx.enabled:
        return {dest: 'all' for dest, *_ in folders}
    nonce = secrets.token_hex(8) if ctx.local_rank == 0 else None
    problem = None
    if nonce:
        try:
            for _, path, _, _ in folders:
                os.makedirs(path, exist_ok=True)
                with open(os.path.join(path, SHARED_TOKEN_PREFIX + nonce), 'w') as handle:
                    handle.write(nonce)
        except OSError as error:
            problem = (path, storage_problem(nearest_existing(path), error, 0, 'a small file'))
    written = gathered((nonce, problem), ctx)  # every token is written once this returns
    failed = [(rank, found) for rank, (_, found) in enumerate(written) if found]
    if failed:
        rank, (path, reason) = failed[0]
        raise UserError(f'rank {rank} cannot write into {path}: {reason}.')
    writers = [(rank, token) for rank, (token, _) in enumerate(written) if token]
    seen = gathered([[rank for rank, token in writers if _token_reads(path, token)]
                     for _, path, _, _ in folders], ctx)
    if nonce:  # every process has read: the tokens can go
        for _, path, _, _ in folders:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(path, SHARED_TOKEN_PREFIX + nonce))
    return {dest: _folder_scope(dest, path, what, per_node, [ranks[i] for ranks in seen])
            for i, (dest, path, what, per_node) in enumerate(folders)}


def _token_reads(folder, token):
    try:
        with open(os.path.join(folder, SHARED_TOKEN_PREFIX + token)) as handle:
            return handle.read() == token
    except OSError:
        return False


def _folder_scope(dest, path, what, per_node, seen):
    """'all' or 'node' for a folder whose tokens process r reads from the writers seen[r]."""
    if all(0 in writers for writers in seen):
        return 'all'
    blind = [rank for rank, writers in enumerate(seen) if 0 not in writers]
    if not per_node:
        raise UserError(f'{flag(dest)} {path} is not on a filesystem shared by all nodes: '
                        f'rank(s) {", ".join(map(str, blind))} cannot read the file rank 0 wrote '
                        f'there, and {what} must be in a folder that every node sees.')
    if all(len(writers) == 1 for writers in seen):
        return 'node'
    rank = next(rank for rank, writers in enumerate(seen) if len(writers) != 1)
    raise UserError(f'{flag(dest)} {path} is neither shared by all nodes nor one folder per '
                    f'node: rank {rank} reads the files that {len(seen[rank])} nodes\' first '
                    f'processes wrote there (expected all of them, or its own node\'s only); put '
                    f'{what} on a filesystem shared by all nodes or on each node\'s own disk.')


def folder_writer(scope, ctx):
    """Whether this process writes what a folder of `scope` holds: rank 0 into a folder that all
    processes share ('all'), the first process of each node into a folder per node ('node')."""
    return ctx.is_main if scope == 'all' else ctx.local_rank == 0
