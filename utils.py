"""Shared helpers: user-facing errors, seeding, the identity-balanced cross-modal sampler,
meters, logging, the run-time setup (device, distributed context, autocast, runtime flags) and
checkpoint I/O (atomic, weights-only)."""
import argparse
import contextlib
import errno
import glob
import logging
import os
import pickle
import random
import re
import shutil
import sys
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__version__ = '1.0.0'
CHECKPOINT_FORMAT = 'deen-vireid'  # the 'format' of every checkpoint train.py writes


class UserError(Exception):
    """An error the user caused (path, file, flag, checkpoint); its message is one sentence that
    says what was expected and where. The scripts print it without a stack trace and exit 2."""


# The flags kept from the released code with underscores, and the flags whose dest is not their
# name; every other flag spells its argparse dest with '-' for '_'. tests/test_messages.py holds
# this equal to every script's parser.
UNDERSCORE_FLAGS = frozenset({'img_h', 'img_w', 'num_pos', 'model_path', 'log_path', 'lambda_1',
                              'lambda_2'})
RENAMED_FLAGS = {'lambda_value': '--lambda'}  # `lambda` is a Python keyword


def flag(dest):
    """The option string of an argparse dest as the parsers spell it: 'img_h' -> '--img_h',
    'batch_size' -> '--batch-size'. Every message that names a flag names it through this."""
    if dest in RENAMED_FLAGS:
        return RENAMED_FLAGS[dest]
    return '--' + (dest if dest in UNDERSCORE_FLAGS else dest.replace('_', '-'))


def run_main(main_fn):
    """Run a script's main(), turning UserError into one line on stderr and exit status 2. Under
    torchrun only the first process of each launcher (local rank 0) prints it: the checks run on
    every process and fail alike, and one sentence per process would repeat it, interleaved in
    the launcher's output; each node's output still says why its processes stopped."""
    try:
        return main_fn()
    except UserError as error:
        end_progress_bars()
        if os.environ.get('LOCAL_RANK', '0') == '0':
            print(f'error: {user_message(error)}', file=sys.stderr)
        return 2


def end_progress_bars():
    """Close every open tqdm bar, so that what is printed next starts on a line of its own."""
    from tqdm import tqdm
    for bar in list(getattr(tqdm, '_instances', ())):
        bar.close()


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


def epoch_seed(seed, epoch, rank=0, batch=0):
    """A seed for one epoch on one process, so that a resumed run draws what the original drew;
    `batch` > 0: for the part of the epoch from that global batch on (a resume on another
    process count, whose processes cannot take over the random states of the old ones)."""
    return int(np.random.SeedSequence([seed, epoch, rank] + ([batch] if batch else []))
               .generate_state(1)[0])


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
    """Yields (visible index, infrared index, augmentation seed) in batches of P identities x K
    images, from an epoch plan that is the same for any number of processes.

    The plan of an epoch is a stream of global batches b = 0, 1, 2, ...: batch b holds P distinct
    identities, drawn in order from one generator seeded by (seed, epoch); for each of them K
    visible and K infrared images are drawn with replacement, and every sample gets an
    augmentation seed, both from a generator seeded by (seed, epoch, b) alone (not by the
    process, the data-loading worker or where a run was resumed). Pair j of a batch has the
    same identity in both modalities, identities in the same order. The epoch covers
    B = ceil(max(#visible, #infrared) / (P*K)) batches.

    W processes take W consecutive batches per step: at step s process r trains batch
    start + s*W + r, for ceil((B - start) / W) steps; the last step may take batches >= B of
    the same stream, so that every process has one. `start` is the number of batches an
    interrupted run consumed (set_epoch), so a run stopped by M processes continues with any
    number N of them and every planned batch is trained exactly once across the interruption.
    The price of a plan that does not depend on W: the W batches of one step are drawn
    independently, so two processes may train on the same identity in the same step. Nothing
    needs them apart: each process computes its triplet and cross-modal losses within its own
    batch (DDP averages the gradients), and every batch still holds P distinct identities.
    The DataLoader's batch_size must be P*K.
    """

    def __init__(self, visible_labels, infrared_labels, num_ids, num_pos, seed=0,
                 world_size=1, rank=0):
        self.visible_by_id = _indices_by_label(visible_labels)
        self.infrared_by_id = _indices_by_label(infrared_labels)
        self.ids = np.array(sorted(self.visible_by_id))
        if set(self.visible_by_id) != set(self.infrared_by_id):
            raise ValueError('every identity must have images in both modalities')
        if num_ids > len(self.ids):
            raise UserError(f'{flag("batch_size")} {num_ids} needs {num_ids} identities per batch '
                            f'but the training set has only {len(self.ids)}.')
        self.num_ids, self.num_pos = num_ids, num_pos
        self.seed, self.world_size, self.rank = seed, world_size, rank
        self.batches = -(-max(len(visible_labels), len(infrared_labels)) // (num_ids * num_pos))
        self.steps = -(-self.batches // world_size)  # of a whole epoch
        self.set_epoch(0)

    def set_epoch(self, epoch, start=0, end=None):
        """Iterate over `epoch` from global batch `start` (the batches consumed before) to `end`
        (default: the epoch's B batches; --max-steps ends it earlier)."""
        self.epoch, self.start = epoch, start
        self.end = self.batches if end is None else end

    @property
    def steps_left(self):
        """Steps from `start` to the end of the epoch with this process count."""
        return max(0, -(-(self.end - self.start) // self.world_size))

    def rank_batches(self):
        """The global batches this process trains, in order: start + s*W + rank."""
        return range(self.start + self.rank, self.start + self.steps_left * self.world_size,
                     self.world_size)

    def state_dict(self, epoch, batch):
        """The position: `batch` global batches of `epoch` consumed (0: the epoch's start), with
        what the plan depends on; a checkpoint keeps it as 'sampler'."""
        return {'seed': self.seed, 'epoch': epoch, 'batch': batch,
                'batches_per_epoch': self.batches, 'world_size': self.world_size,
                'num_ids': self.num_ids, 'num_pos': self.num_pos}

    def batch_plan(self, count=None):
        """The identities of global batches 0..count-1 of this epoch [count, P] (default: B)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return np.stack([rng.choice(self.ids, self.num_ids, replace=False)
                         for _ in range(self.batches if count is None else count)])

    def __iter__(self):
        mine = self.rank_batches()
        if not mine:
            return
        plan = self.batch_plan(mine[-1] + 1)
        for batch in mine:
            yield from self.batch_samples(batch, plan[batch])

    def batch_samples(self, batch, ids):
        """The P*K (visible, infrared, seed) samples of global batch `batch`, whose identities
        are `ids`."""
        rng = np.random.default_rng(self._sequence(batch).spawn(1)[0])
        pairs = [pair for pid in ids for pair in self._draw(rng, pid)]
        return [(v, i, seed) for (v, i), seed in zip(pairs, self.sample_seeds(batch))]

    def sample_seeds(self, batch):
        """The augmentation seeds of the P*K samples of global batch `batch`."""
        return self._sequence(batch).generate_state(self.num_ids * self.num_pos, np.uint64).tolist()

    def _sequence(self, batch):
        return np.random.SeedSequence([self.seed, self.epoch], spawn_key=(batch,))

    def _draw(self, rng, pid):
        visible = rng.choice(self.visible_by_id[pid], self.num_pos)
        infrared = rng.choice(self.infrared_by_id[pid], self.num_pos)
        return list(zip(visible.tolist(), infrared.tolist()))

    def __len__(self):
        return self.steps_left * self.num_ids * self.num_pos


def _indices_by_label(labels):
    labels = np.asarray(labels)
    return {int(pid): np.flatnonzero(labels == pid) for pid in np.unique(labels)}


# ----------------------------------------------------------------------------------------------
# Meters and logging

class AverageMeter:
    """Running average of a scalar."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    @classmethod
    def resumed(cls, total, count):
        """A meter that continues from a saved sum and count."""
        meter = cls()
        meter.sum, meter.count = total, count
        return meter

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


def from_main_process(value, ctx):
    """Rank 0's `value` on every process: a decision all of them must share (whether a file
    exists on rank 0's disk, a random nonce)."""
    if not ctx.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered(value, ctx):
    """[the value of rank 0, ..., of rank world_size-1] on every process."""
    if not ctx.enabled:
        return [value]
    values = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    return values


def init_distributed(device_type):
    """Join the process group when launched by torchrun; a plain run gets a 1-process context."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size == 1:
        return DistContext()
    if not dist.is_initialized():
        backend = 'nccl' if device_type == 'cuda' else 'gloo'
        store = attempt_store(world_size)
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ['RANK']),
                                    world_size=world_size)
    return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0)))


def attempt_store(world_size):
    """The launcher's store seen through a prefix of this restart attempt, when torchrun shares
    its own store with the workers (TORCHELASTIC_USE_AGENT_STORE: the static rendezvous of
    --master-addr/--master-port, and c10d unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); None
    otherwise. That store lives as long as the launcher, and torch (2.14) gives its workers no
    prefix per attempt: a restarted group would read the process addresses that the killed
    attempt published and fail to connect to them, or hang. TORCHELASTIC_RESTART_COUNT
    numbers the attempts of the one launcher of a single-node run (GROUP_WORLD_SIZE 1); the
    launchers of several nodes count their restarts each on its own (a node that joins, or whose
    workers did not fail, counts none), so there the store is left as torch gives it."""
    shared = os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == str(True)
    if not shared or os.environ.get('GROUP_WORLD_SIZE') != '1':
        return None
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), world_size,
                          is_master=False)
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    return dist.PrefixStore(f'deen/attempt_{attempt}', store)


# ----------------------------------------------------------------------------------------------
# Runtime shared by the scripts: device, precision and input-pipeline flags, device choice,
# distributed context, autocast

class ManualHelpFormatter(argparse.HelpFormatter):
    """--help as a manual page: each flag's help followed by "(default: X)" when it has a fixed
    default; flags resolved later (per method, dataset or checkpoint) say so in their own help."""

    def _get_help_string(self, action):
        text = action.help or ''
        if (action.default in (None, False, argparse.SUPPRESS) or 'default' in text
                or action.option_strings == [] and action.nargs in ('*', '?')):
            return text
        default = (' '.join(map(str, action.default))
                   if isinstance(action.default, (list, tuple)) else action.default)
        return f'{text} (default: {str(default).replace("%", "%%")})'


def manual_parser(description, epilog=None, **kwargs):
    """The argparse parser of a command-line tool, with ManualHelpFormatter; the tool adds its
    flags in argument groups (data, model, schedule, runtime, output, ...)."""
    return argparse.ArgumentParser(description=description, epilog=epilog,
                                   formatter_class=ManualHelpFormatter, **kwargs)


def add_image_size_args(group):
    """--img_h / --img_w of the tools that run a trained network (default: the checkpoint's)."""
    group.add_argument('--img_h', type=int, help='input height (default: the checkpoint\'s)')
    group.add_argument('--img_w', type=int, help='input width (default: the checkpoint\'s)')


def add_runtime_args(parser):
    """The "runtime" group: device, precision and input-pipeline flags of every tool that runs
    a network (train.py, test.py, visualize.py, search.py)."""
    parser = parser.add_argument_group('runtime', 'device, precision and data loading')
    parser.add_argument('--gpu', type=int, help='CUDA device index (same as --device cuda:N)')
    parser.add_argument('--device', help='cpu, cuda or cuda:N (default: cuda when available)')
    parser.add_argument('--workers', type=int, help='data-loading processes (default: 4, fewer on machines '
                        'with fewer cores)')
    parser.add_argument('--test-batch', type=int, help='test images per forward pass (default: 64)')
    parser.add_argument('--amp', default='off', choices=('off', 'bf16', 'fp16'),
                        help='mixed precision (autocast): bf16 on CPU or CUDA; fp16, with a '
                        'gradient scaler, on CUDA only')
    parser.add_argument('--channels-last', action='store_true',
                        help='channels-last memory format (CPU and CUDA)')
    parser.add_argument('--compile', action='store_true',
                        help='torch.compile the network (training, and the feature extraction, '
                        'compiled once per run); needs a C++ compiler on CPU, triton on CUDA')
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
    args.test_batch = 64 if args.test_batch is None else args.test_batch


def resolve_device(args):
    """--device wins, then --gpu, then CUDA if available, else CPU; a missing GPU is an error."""
    name = args.device or (f'cuda:{args.gpu}' if args.gpu is not None else None)
    if name is None:
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ('cpu', 'cuda'):
        raise UserError(f'--device must be cpu, cuda or cuda:N, got {name!r}.')
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

class CheckpointWriteError(UserError):
    """A checkpoint could not be written: no space, a read-only folder, a quota, a size limit."""


# What torch.save adds per tensor (zip entry, alignment, pickled reference) and per file (the
# pickled structure, RNG states, arguments), as upper bounds measured on our checkpoints.
TENSOR_RECORD_BYTES = 512
CHECKPOINT_BASE_BYTES = 64 * 1024
# torch.save writes through a C++ zip writer whose failures arrive as RuntimeError without errno.
TORCH_WRITE_FAILURES = ('inline_container', 'PytorchStreamWriter', 'enforce fail')
# The first bytes of torch files (zip, or a legacy pickle) and of files passed by mistake.
TORCH_SIGNATURES = (b'PK\x03\x04', b'\x80')
OTHER_SIGNATURES = {b'\xff\xd8\xff': 'a JPEG image', b'\x89PNG': 'a PNG image',
                    b'GIF8': 'a GIF image', b'\x93NUMPY': 'a NumPy .npy array',
                    b'\x1f\x8b': 'a gzip archive', b'%PDF': 'a PDF document'}


@contextlib.contextmanager
def written_atomically(path):
    """Yield a temporary path in path's folder to write the whole file into; when the block ends
    normally it replaces path (a rename: readers see the old file or the new one, never half of
    one), and when it fails (an error, an interrupt) it is removed and path is left as it was.
    Every derived file is written through it (save_checkpoint also fsyncs and names a
    failure)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp{os.getpid()}')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # none written, or a folder that refuses even that
            os.remove(tmp)


def save_checkpoint(state, path):
    """Write state to path atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over path, so that a crash mid-save leaves the old file intact. A failed write
    (no space, read-only folder, quota, file-size limit) raises CheckpointWriteError, one
    sentence naming the folder and the space needed; the old file is untouched and the
    temporary file removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        for stale in glob.glob(os.path.join(folder, f'.{glob.escape(os.path.basename(path))}.tmp*')):
            os.remove(stale)  # left by a process killed mid-save
        # a failure removes the temporary file before the handler below measures the free space
        with written_atomically(path) as tmp, open(tmp, 'wb') as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not any(m in str(error) for m in TORCH_WRITE_FAILURES):
            raise
        kept = 'the previous file is unchanged' if os.path.isfile(path) else 'nothing was written'
        reason = storage_problem(folder, error, checkpoint_bytes(state), 'the checkpoint')
        raise CheckpointWriteError(f'cannot write checkpoint {path}: {reason}; {kept}.') from None
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def checkpoint_bytes(state):
    """About how many bytes torch.save(state) writes (an upper bound): every tensor's data, plus
    a record per tensor and per file."""
    return CHECKPOINT_BASE_BYTES + sum(t.numel() * t.element_size() + TENSOR_RECORD_BYTES
                                       for t in _tensors_in(state))


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


def storage_problem(folder, error, needed, what):
    """Why writing `what` (about `needed` bytes) into folder failed with `error` (an OSError, or
    torch's errno-less RuntimeError), as a phrase naming the folder and the space needed."""
    code = getattr(error, 'errno', None)
    free, limit = free_bytes(folder), file_size_limit()
    if os.path.exists(folder) and not os.path.isdir(folder):
        return f'{folder} is a file, not a folder'
    if code == errno.ENOSPC or (code is None and free is not None and free < needed):
        shown = 'no space' if free is None else format_bytes(free)
        return f'{folder} has {shown} free but about {format_bytes(needed)} is needed for {what}'
    if code == errno.EROFS:
        return f'{folder} is on a read-only file system'
    if code in (errno.EACCES, errno.EPERM):
        return f'{folder} is not writable (permission denied)'
    if code == errno.EDQUOT:
        return f'the disk quota on {folder} is used up; about {format_bytes(needed)} is needed for {what}'
    if code == errno.EFBIG or (limit is not None and limit < needed):
        return (f'the file-size limit of this process (ulimit -f, {format_bytes(limit or 0)}) is '
                f'below the {format_bytes(needed)} of {what}')
    detail = getattr(error, 'strerror', None) or first_sentence(str(error))
    return f'writing {what} into {folder} failed ({detail})'


def free_bytes(folder):
    """Bytes available to this user in the file system holding folder (or its nearest existing
    parent), None when it cannot be read."""
    try:
        return shutil.disk_usage(nearest_existing(folder)).free
    except OSError:
        return None


def nearest_existing(path):
    """path, or its nearest parent that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def file_size_limit():
    """The largest file this process may write (RLIMIT_FSIZE), None when unlimited."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def format_bytes(count):
    """A size as people read it: '512 B', '1.5 KiB', '99.3 MiB', '3.71 GiB'."""
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if count < 1024:
            return f'{count} B' if unit == 'B' else f'{count:.1f} {unit}'
        count /= 1024
    return f'{count:.2f} TiB'


def first_sentence(text):
    """The first sentence of a library's message, whole (never cut mid-sentence), without the
    final full stop."""
    text = ' '.join(str(text).split())
    end = re.search(r'(?<!\be\.g)(?<!\bi\.e)[.!?](\s|$)', text)
    return (text[:end.start()] if end else text).strip()


def checkpoint_file_problem(path, what='checkpoint'):
    """Why path cannot be read as a torch file (missing, a folder, unreadable, empty, a file of
    another kind), as a phrase naming it; None when it looks like one."""
    if not os.path.exists(path):
        return f'{what} {path} does not exist'
    if os.path.isdir(path):
        return f'{what} {path} is a folder; expected a file'
    if not os.path.isfile(path):
        return f'{what} {path} is not a regular file'
    try:
        with open(path, 'rb') as handle:
            head = handle.read(8)
    except OSError as error:
        return f'{what} {path} cannot be read ({error.strerror})'
    if not head:
        return f'{what} {path} is empty (0 bytes), as a save that was cut short leaves it'
    if not head.startswith(TORCH_SIGNATURES):
        return f'{what} {path} is not a PyTorch file but {describe_content(head)}'
    return None


def describe_content(head):
    """What the first bytes of a file say it is, for messages."""
    for signature, kind in OTHER_SIGNATURES.items():
        if head.startswith(signature):
            return kind
    try:
        head.decode('utf-8')
        return 'a text file'
    except UnicodeDecodeError:
        return 'a file of another kind'


def _numpy_globals():
    """The numpy reconstructors that released checkpoints (saved with numpy metrics) need, under
    the module names of numpy 1.x and 2.x; they rebuild arrays and scalars and run no code."""
    multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray
    allowed = [np.ndarray, np.dtype] + [type(np.dtype(c)) for c in 'bBhHiIlLqQefdgFD?']
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        allowed += [(multiarray._reconstruct, f'{module}._reconstruct'),
                    (multiarray.scalar, f'{module}.scalar')]
    return allowed


def load_checkpoint(path, what='checkpoint', mmap=False):
    """Load a checkpoint with torch.load(weights_only=True): tensors, numbers, strings, lists,
    dicts and numpy arrays only. A file that would need arbitrary unpickling is refused. `what`
    names the file in messages. mmap=True maps the tensors of a zip-format file instead of
    reading them (a cheap look at its metadata)."""
    path = os.fspath(path)
    problem = checkpoint_file_problem(path, what)
    if problem:
        raise UserError(problem + '.')
    with open(path, 'rb') as handle:
        zip_format = handle.read(4) == TORCH_SIGNATURES[0]
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            if mmap and zip_format:
                with contextlib.suppress(Exception):  # the plain load below says what is wrong
                    return torch.load(path, map_location='cpu', weights_only=True, mmap=True)
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r'GLOBAL (\S+)', str(error))
        if found:
            raise UserError(f'{what} {path} was refused: unpickling it calls {found.group(1)}, so '
                            f'loading it could run arbitrary code (only tensors, numbers, strings, '
                            f'lists, dicts and numpy arrays are loaded; torch.load(weights_only=False) '
                            f'would load it and run that code, so use it only on a file from a source '
                            f'you trust).') from None
        raise UserError(f'{what} {path} is truncated or corrupt (its pickled data does not '
                        f'parse).') from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, KeyError, ValueError,
            IndexError) as error:
        # the zip reader's first sentence says what is missing; errno and key errors say nothing
        detail = first_sentence(error) if isinstance(error, (RuntimeError, zipfile.BadZipFile)) else ''
        raise UserError(f'{what} {path} is truncated or corrupt'
                        + (f' ({detail}).' if detail else '.')) from None
