"""Shared helpers: user-facing errors, seeding, the identity-balanced cross-modal sampler,
meters, logging, the run-time setup (device, distributed context, autocast, runtime flags) and
checkpoint I/O (atomic, weights-only)."""
import contextlib
import glob
import logging
import os
import pickle
import random
import re
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__version__ = '1.0.0'


class UserError(Exception):
    """An error the user caused (path, file, flag, checkpoint); its message is one sentence that
    says what was expected and where. The scripts print it without a stack trace and exit 2."""


def run_main(main_fn):
    """Run a script's main(), turning UserError into one line on stderr and exit status 2."""
    try:
        return main_fn()
    except UserError as error:
        print(f'error: {user_message(error)}', file=sys.stderr)
        return 2


def user_message(error):
    """The one sentence of a UserError, also when a DataLoader worker re-raised it wrapped in the
    worker's traceback."""
    text = str(error).strip()
    marker = 'UserError: '
    return text.rsplit(marker, 1)[-1] if 'Traceback' in text and marker in text else text


# ----------------------------------------------------------------------------------------------
# Seeding

def seed_everything(seed, deterministic=False):
    """Seed python, numpy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def epoch_seed(seed, epoch, rank=0):
    """A seed for one epoch on one process, so that a resumed run draws what the original drew."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def rng_state():
    """Every RNG state of this process, as tensors, numbers and lists (weights-only loadable)."""
    numpy_state = np.random.get_state()
    state = {
        'python': _to_lists(random.getstate()),
        'numpy': [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)),
                  int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(_to_tuples(state['python']))
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------------------------
# Identity-balanced cross-modal sampling

class IdentitySampler(torch.utils.data.Sampler):
    """Yields (visible index, infrared index) pairs in batches of P identities x K images.

    Each step draws P x world_size distinct identities (the global batch plan, identical on every
    process) and gives process r the identities r*P .. (r+1)*P-1, so the processes see different
    identities. For each identity K visible and K infrared images are drawn with replacement;
    pair j of a batch has the same identity in both modalities, identities in the same order.
    An epoch has ceil(max(#visible, #infrared) / (P*K*world_size)) steps. The plan of an epoch
    depends only on (seed, epoch), so a resumed run replays it; `start_step` skips steps that an
    interrupted run already trained on. The DataLoader's batch_size must be P*K.
    """

    def __init__(self, visible_labels, infrared_labels, num_ids, num_pos, seed=0,
                 world_size=1, rank=0):
        self.visible_by_id = _indices_by_label(visible_labels)
        self.infrared_by_id = _indices_by_label(infrared_labels)
        self.ids = np.array(sorted(self.visible_by_id))
        if set(self.visible_by_id) != set(self.infrared_by_id):
            raise ValueError('every identity must have images in both modalities')
        if num_ids * world_size > len(self.ids):
            raise UserError(f'--batch-size {num_ids} x {world_size} processes needs '
                            f'{num_ids * world_size} identities per step but the training set '
                            f'has only {len(self.ids)}.')
        self.num_ids, self.num_pos = num_ids, num_pos
        self.seed, self.world_size, self.rank = seed, world_size, rank
        per_step = num_ids * num_pos * world_size
        self.steps = -(-max(len(visible_labels), len(infrared_labels)) // per_step)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def batch_plan(self):
        """The global plan of this epoch: identities [steps, P*world_size]."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.stack([rng.choice(self.ids, self.num_ids * self.world_size, replace=False)
                         for _ in range(self.steps)])

    def __iter__(self):
        plan = self.batch_plan()
        rng = np.random.default_rng([self.seed, self.epoch, 1 + self.rank])
        mine = slice(self.rank * self.num_ids, (self.rank + 1) * self.num_ids)
        for step, step_ids in enumerate(plan):
            pairs = [self._draw(rng, pid) for pid in step_ids[mine]]
            if step >= self.start_step:
                yield from (pair for group in pairs for pair in group)

    def _draw(self, rng, pid):
        visible = rng.choice(self.visible_by_id[pid], self.num_pos)
        infrared = rng.choice(self.infrared_by_id[pid], self.num_pos)
        return list(zip(visible.tolist(), infrared.tolist()))

    def __len__(self):
        return (self.steps - self.start_step) * self.num_ids * self.num_pos


def _indices_by_label(labels):
    labels = np.asarray(labels)
    return {int(pid): np.flatnonzero(labels == pid) for pid in np.unique(labels)}


# ----------------------------------------------------------------------------------------------
# Meters and logging

class AverageMeter:
    """Running average of a scalar."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += float(value) * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def setup_logger(log_file=None, enabled=True):
    """A logger printing to stdout and, when given, appending to log_file; silent if disabled."""
    logger = logging.getLogger('deen')
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if enabled else logging.CRITICAL + 1)
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_file and enabled:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter('%(asctime)s %(message)s', '%H:%M:%S'))
        logger.addHandler(handler)
    return logger


# ----------------------------------------------------------------------------------------------
# Distributed context (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)

@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def init_distributed(device_type):
    """Join the process group when launched by torchrun; a plain run gets a 1-process context."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device_type == 'cuda' else 'gloo')
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0)))


# ----------------------------------------------------------------------------------------------
# Runtime shared by the scripts: device, precision and input-pipeline flags, device choice,
# distributed context, autocast

def add_runtime_args(parser):
    """Device, precision and input-pipeline flags common to train.py and test.py."""
    parser.add_argument('--gpu', type=int, help='CUDA device index (same as --device cuda:N)')
    parser.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--workers', type=int, help='data-loading processes (default: 4, fewer on machines '
                        'with fewer cores)')
    parser.add_argument('--test-batch', type=int, help='test images per forward pass (default 64)')
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                        help='mixed precision (autocast; fp16 adds a gradient scaler)')
    parser.add_argument('--channels-last', action='store_true', help='channels-last memory format')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model')
    parser.add_argument('--deterministic', action='store_true',
                        help='deterministic algorithms (bit-reproducible on CPU, cuDNN-deterministic on GPU)')


def default_workers():
    """Data-loading processes when --workers is unset: 4, or as many as the cores this process
    may use when there are fewer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return min(4, cores or 1)


def fill_runtime_defaults(args):
    """Unset --workers and --test-batch of train.py and test.py take their defaults."""
    args.workers = default_workers() if args.workers is None else args.workers
    args.test_batch = args.test_batch or 64


def resolve_device(args):
    """--device wins, then --gpu, then CUDA if available, else CPU; a missing GPU is an error."""
    name = args.device or (f'cuda:{args.gpu}' if args.gpu is not None else None)
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f'--device must be cpu, cuda or cuda:N, got {name!r}.') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise UserError(f'{name} was requested but PyTorch sees no CUDA GPU; use --device cpu.')
        if (device.index or 0) >= torch.cuda.device_count():
            raise UserError(f'{name} was requested but only {torch.cuda.device_count()} GPU(s) exist.')
    return device


def setup_runtime(args):
    """(device, distributed context): under torchrun each process takes the GPU of its local rank."""
    device = resolve_device(args)
    ctx = init_distributed(device.type)
    if ctx.enabled and device.type == 'cuda':
        device = torch.device('cuda', ctx.local_rank)
        torch.cuda.set_device(device)
    return device, ctx


def autocast_context(device, amp):
    """torch.autocast for --amp bf16|fp16, a no-op for off."""
    if amp == 'off':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == 'bf16' else torch.float16)


# ----------------------------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(state, path):
    """Write state to path atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over path, so that a crash or a full disk mid-save leaves the old file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    for stale in glob.glob(os.path.join(folder, f'.{glob.escape(os.path.basename(path))}.tmp*')):
        os.remove(stale)  # left by a process killed mid-save
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        with open(tmp, 'wb') as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _numpy_globals():
    """The numpy reconstructors that released checkpoints (saved with numpy metrics) need, under
    the module names of numpy 1.x and 2.x; they rebuild arrays and scalars and run no code."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed = [np.ndarray, np.dtype] + [type(np.dtype(c)) for c in 'bBhHiIlLqQefdgFD?']
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed += [(multiarray._reconstruct, f'{module}._reconstruct'),
                    (multiarray.scalar, f'{module}.scalar')]
    return allowed


def load_checkpoint(path, what='checkpoint'):
    """Load a checkpoint with torch.load(weights_only=True): tensors, numbers, strings, lists,
    dicts and numpy arrays only. A file that would need arbitrary unpickling is refused. `what`
    names the file in messages."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist.')
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r'GLOBAL (\S+)', str(error))
        what = f'it asks for {found.group(1)}' if found else 'it is not a weights-only file'
        raise UserError(f'{what} {path} needs arbitrary code to unpickle and was refused '
                        f'({what}; only tensors, numbers, strings, lists and dicts are loaded).') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise UserError(f'{what} {path} is not a readable PyTorch file '
                        f'(truncated or corrupt?): {str(error).splitlines()[0][:200]}') from None
