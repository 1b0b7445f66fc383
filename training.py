"""Training runs as a library: train.py's flags and recipes, the Trainer (data, model, optimiser,
loop, checkpoints, history) and main(argv), which train.py and reproduce.py call."""
import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checks import (check_cache_build, check_data_folder, check_device_flags, check_free_space,
                    check_image_size, check_images_exist, check_integer, check_output_folder,
                    check_real, check_resume_network, check_resume_state, check_runtime_flags,
                    check_shared_folders, check_torch_file, checkpoint_estimate, checkpoint_space,
                    folder_writer, peek_checkpoint)
from data_loader import CrossModalTrainSet, training_views
from data_manager import DATASETS, MODALITIES
from loss import build_criterion
from model import (ATTENTIONS, BACKBONES, DEE_STAGES, SWITCHES, NetworkSwitches, build_model,
                   load_model_weights, uses_pretrained)
from evaluation import selection_rank1, selection_split
from inference import CHECKPOINT_FORMAT, inference_model
from provenance import run_provenance
from sources import (add_source_args, cache_dir_of, check_data_folders, evaluation_layout,
                     fill_paths, load_source_caches, recipe_overrides, recorded_sources,
                     resolve_sources, training_lists)
from utils import (AverageMeter, IdentitySampler, UserError, __version__, add_runtime_args,
                   autocast_context, epoch_seed, fill_runtime_defaults, first_sentence, flag,
                   from_main_process, gathered, load_checkpoint, manual_parser, rng_state,
                   save_checkpoint, seed_everything, set_rng_state, setup_logger, setup_runtime,
                   written_atomically)

# Flags left unset take these values, then the method's released recipe (METHOD.md), then the
# dataset's overrides.
RUN_DEFAULTS = dict(arch='resnet50', optim='sgd', eval_every=1, pretrained='imagenet',
                    channel_aug=False, erasing_kind='zero')
METHOD_DEFAULTS = {
    'deen': dict(lr=0.1, batch_size=6, num_pos=4, img_h=384, img_w=144, epochs=151,
                 lr_steps=(20, 80), warmup=10, grayscale=0.5, erasing=(0.02, 0.4), pad=10),
    'agw': dict(lr=0.1, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=81,
                lr_steps=(20, 50), warmup=10, grayscale=0.0, erasing=(0.02, 0.4), pad=10,
                adp_alpha=1.0, adp_gamma=1.0, adp_square=0),
    # CAJ's released train_ext.py and README command: AGW's network, three views (channel
    # erasing on each, channel exchange, infrared adaptive gray), the ADP triplet squared.
    'caj': dict(lr=0.1, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=100,
                lr_steps=(20, 50), warmup=10, grayscale=0.0, erasing=(0.02, 0.4), pad=10,
                erasing_kind='channel', channel_aug=True, adp_alpha=1.0, adp_gamma=1.0,
                adp_square=1),
}
# Named recipes, the rows of the LLCM benchmark (DEEN paper, Table 3) that reproduce.py runs:
# name -> (method, train.py flags on top of its recipe). 'agw' is the released AGW recipe, the
# paper's AGW* (random erasing); 'agw-plain' is the paper's AGW, without random erasing.
RECIPES = {'deen': ('deen', []), 'agw': ('agw', []), 'agw-plain': ('agw', ['--no-random-erasing']),
           'caj': ('caj', [])}
ADP_FLAGS = ('adp_alpha', 'adp_gamma', 'adp_square')
DATASET_OVERRIDES = {
    'sysu': {'deen': dict(erasing=(0.2, 0.8))},
    # The demo: a small configuration that learns from scratch on 2 CPU cores in about three
    # minutes. Measured on the demo data (notes in README): a ResNet-50 manages ~150 steps in that
    # time and stays near chance; random grayscale and erasing slow from-scratch learning down.
    'demo': {method: dict(arch='resnet18', optim='adam', lr=1e-3, batch_size=4, num_pos=4,
                          img_h=64, img_w=32, epochs=22, lr_steps=(18,), warmup=0, grayscale=0.0,
                          erasing=None, pad=2, eval_every=3, pretrained='none', workers=0,
                          test_batch=128)
             for method in METHOD_DEFAULTS},
}


# The flags an epoch's batch plan depends on (IdentitySampler.state_dict keys), besides the epoch
# and the training set: a change since a checkpoint was saved restarts its interrupted epoch.
PLAN_FLAGS = {'seed': flag('seed'), 'num_ids': flag('batch_size'), 'num_pos': flag('num_pos')}


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step finished and `last` was saved."""


DESCRIPTION = ('Train DEEN (any of its ablation variants), or the AGW or CAJ baseline, on '
               'SYSU-MM01, RegDB, LLCM or the embedded demo dataset: one process or many '
               '(torchrun, DDP), mixed precision, exact resume and atomic checkpoints.')


def build_parser():
    """train.py's flags, grouped as its --help shows them (docs/training.md, Flags). Flags left
    unset here take the method's recipe, then the dataset's overrides (resolve_defaults)."""
    parser = manual_parser(DESCRIPTION, epilog='Flags without a default here take the '
                           '--method\'s released recipe, then the --dataset\'s overrides '
                           '(docs/training.md).')
    data = parser.add_argument_group('data')
    data.add_argument('--dataset', default='llcm', choices=DATASETS, help='dataset to train on')
    data.add_argument('--data-path', help='dataset root (default: data/<name>; demo: generated '
                      'there)')
    data.add_argument('--cache-dir', help='folder of the resized training-image cache (default: '
                      'the dataset folder)')
    data.add_argument('--trial', default='1', help='RegDB split 1..10, or "all" to train the ten '
                      'splits one after another')
    data.add_argument('--mode', default='all', choices=('all', 'indoor'),
                      help='SYSU-MM01 search mode used for model selection')
    data.add_argument('--img_h', type=int, help='input height (default: per method, DEEN 384, AGW '
                      'and CAJ 288)')
    data.add_argument('--img_w', type=int, help='input width (default: per method, 144)')

    model = parser.add_argument_group('model and losses')
    model.add_argument('--method', default='deen', choices=tuple(METHOD_DEFAULTS),
                       help='network, losses and released recipe')
    model.add_argument('--arch', choices=BACKBONES, help='trunk (default: resnet50, as in the '
                       'paper)')
    model.add_argument('--pretrained', help='imagenet (default), none, or a local torchvision '
                       'state-dict file of the --arch trunk')
    model.add_argument('--lambda_1', type=float, help='weight of the CPM loss (default: 0.8)')
    model.add_argument('--lambda_2', type=float, help='weight of the orthogonal loss (default: '
                       '0.01, as the released code; the paper states 0.1)')
    model.add_argument('--margin', type=float, default=0.3, help='triplet margin')
    model.add_argument('--cpm-margin', type=float, default=0.2, help='CPM margin alpha')
    model.add_argument('--dee-stage', type=dee_stage_value, help='where DEE sits: 0 (after the '
                       'modality stem), 1..4 (after ResNet stage k), or none (one embedding per '
                       'image, no L_cpm / L_ort) (default: 3, RegDB 2, as released)')
    model.add_argument('--dee-embeddings', type=int, help='embeddings DEE generates (default: 2)')
    model.add_argument('--attention', choices=ATTENTIONS, help='block after ResNet stages 1-3 '
                       '(RegDB 1-2): mfa, nonlocal (a standard non-local block) or none '
                       '(default: mfa)')
    model.add_argument('--nonlocal-reduction', type=int, help='--attention nonlocal: its blocks '
                       'have C / this inter-channels (default: 2, the standard non-local block)')
    model.add_argument('--adp-alpha', type=float, help="ADP triplet's softmax temperature (agw, "
                       'caj; default: 1)')
    model.add_argument('--adp-gamma', type=float, help="ADP triplet's scale (agw, caj; default: 1)")
    model.add_argument('--adp-square', type=int, choices=(0, 1),
                       help='ADP triplet squared and clamped at 88 (caj default: 1) or soft margin '
                       "(0: AGW's weighted regularised triplet)")
    model.add_argument('--sync-bn', action='store_true',
                       help='SyncBatchNorm across processes (CUDA GPUs only)')

    augmentation = parser.add_argument_group('augmentation')
    augmentation.add_argument('--channel-aug', action=argparse.BooleanOptionalAction,
                              help="CAJ's channel augmentation for any method: a third view (the "
                              'visible image again, channels exchanged) and adaptive gray on the '
                              'infrared view (default: on for caj, off otherwise)')
    augmentation.add_argument('--random-erasing', action=argparse.BooleanOptionalAction,
                              help="random erasing (default: on; --no-random-erasing: the paper's "
                              'AGW row, on: AGW*)')
    augmentation.add_argument('--erasing-kind', choices=('zero', 'channel'),
                              help="random erasing's fill: zero (DEEN, AGW) or channel (CAJ's "
                              "per-channel constants) (default: the method's)")

    schedule = parser.add_argument_group('schedule')
    schedule.add_argument('--optim', choices=('sgd', 'adam'), help='optimiser (default: sgd, '
                          'Nesterov, momentum 0.9; both with weight decay 5e-4)')
    schedule.add_argument('--lr', type=float, help='base learning rate of BNNeck and classifier; '
                          'a pretrained trunk trains at 0.1x (default: 0.1)')
    schedule.add_argument('--batch-size', type=int, help='identities per step per process (P) '
                          '(default: DEEN 6, AGW and CAJ 8)')
    schedule.add_argument('--num_pos', type=int, help='images per identity per modality (K) '
                          '(default: 4)')
    schedule.add_argument('--epochs', type=int, help='number of epochs (default: DEEN 151, AGW 81, CAJ '
                          '100)')
    schedule.add_argument('--warmup', type=int, help='epochs of linear learning-rate warm-up '
                          '(default: 10)')
    schedule.add_argument('--lr-steps', type=int, nargs='+', help='epochs at which the learning '
                          'rate drops x0.1 (default: DEEN 20 80, AGW and CAJ 20 50)')
    schedule.add_argument('--eval-every', type=int, help='evaluate every N epochs, 0: never '
                          '(default: 1)')
    schedule.add_argument('--seed', type=int, default=0, help='seed of every random draw')
    schedule.add_argument('--max-steps', type=int, help='stop each epoch after this many steps per '
                          'process (smoke tests and benchmarks)')

    output = parser.add_argument_group('output and resume')
    output.add_argument('--model_path', default='save_model', help='folder for checkpoints')
    output.add_argument('--log_path', default='log', help='folder for logs, arguments, '
                        'TensorBoard')
    output.add_argument('--resume', help='a checkpoint, "last" (this run\'s last) or "auto" (last '
                        'when it exists, else a new run: for torchrun --max-restarts)')
    add_source_args(parser)
    add_runtime_args(parser)
    return parser


def parse_args(argv=None):
    return resolve_defaults(build_parser().parse_args(argv))


def resolve_defaults(args):
    """Fill unset flags from the method's recipe and the dataset's overrides; validate values."""
    resolve_sources(args)
    recipe = {**RUN_DEFAULTS, **METHOD_DEFAULTS[args.method]}
    recipe.update(recipe_overrides(args, DATASET_OVERRIDES))
    given = [name for name in ADP_FLAGS if getattr(args, name, None) is not None]
    if given and args.method == 'deen':
        raise UserError(f'{flag(given[0])} sets the ADP triplet of {flag("method")} agw and caj; '
                        f'deen trains with the batch-hard triplet ({flag("margin")}).')
    if args.random_erasing is False:
        recipe['erasing'] = None
    elif args.random_erasing and not recipe['erasing']:  # turned on where the recipe has none
        recipe['erasing'] = METHOD_DEFAULTS[args.method]['erasing']
    for name, value in recipe.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    fill_paths(args)
    fill_runtime_defaults(args)
    check_training_flags(args)
    resolve_network(args)
    return args


def check_training_flags(args):
    """Every numeric flag finite and in its range, once the recipe has filled the unset ones."""
    if args.trial != 'all' and not (args.trial.isdigit() and 1 <= int(args.trial) <= 10):
        raise UserError(f'{flag("trial")} must be a RegDB split 1..10 or "all", got {args.trial!r}.')
    for dest in ('batch_size', 'num_pos', 'epochs', 'img_h', 'img_w', 'max_steps'):
        check_integer(getattr(args, dest), dest, 1)
    for dest in ('warmup', 'eval_every', 'seed'):
        check_integer(getattr(args, dest), dest, 0)
    for step in args.lr_steps:
        check_integer(step, 'lr_steps', 0)
    check_real(args.lr, 'lr', positive=True)
    for dest in ('lambda_1', 'lambda_2', 'margin', 'cpm_margin'):
        if getattr(args, dest) is not None:  # the lambdas are filled by resolve_network
            check_real(getattr(args, dest), dest)
    for dest in ('adp_alpha', 'adp_gamma'):
        if getattr(args, dest, None) is not None:
            check_real(getattr(args, dest), dest, positive=True)
    check_runtime_flags(args)


# loss weight -> (its default, the generated embeddings its term needs)
LOSS_WEIGHTS = {'lambda_1': (0.8, 1), 'lambda_2': (0.01, 2)}


def dee_stage_value(text):
    """--dee-stage's value: 0..4 or 'none'."""
    if text.lower() == 'none':
        return 'none'
    if text.isdigit() and int(text) in DEE_STAGES:
        return int(text)
    raise argparse.ArgumentTypeError(f'expected 0..4 or none, got {text!r}')


def resolve_network(args):
    """Fill DEEN's switches (unset: the released network of the dataset) and the loss weights:
    a term whose embeddings the network lacks (L_cpm without DEE, L_ort with fewer than two
    generated) is off, and an explicit non-zero weight for it is refused. AGW takes none of the
    switches."""
    if args.method != 'deen':
        given = [flag(dest) for dest in SWITCHES if getattr(args, dest) is not None]
        if given:
            raise UserError(f'{", ".join(given)} switch(es) DEEN\'s parts; use them with '
                            f'{flag("method")} deen, not {args.method}.')
        for dest, (default, _) in LOSS_WEIGHTS.items():
            setattr(args, dest, default if getattr(args, dest) is None else getattr(args, dest))
        return
    if args.dee_stage == 'none' and args.dee_embeddings is not None:
        raise UserError(f'{flag("dee_embeddings")} sets how many embeddings DEE generates, but '
                        f'{flag("dee_stage")} none turns DEE off; pass one of them.')
    released = asdict(NetworkSwitches.released(args.dataset == 'regdb'))
    for dest in SWITCHES:
        if getattr(args, dest) is None:
            setattr(args, dest, released[dest])
    switches = network_switches(args)
    switches.check(args.dataset == 'regdb')
    generated = switches.num_branches - 1
    for dest, (default, needed) in LOSS_WEIGHTS.items():
        value = getattr(args, dest)
        if generated >= needed:
            setattr(args, dest, default if value is None else value)
        elif value:
            raise UserError(f'{flag(dest)} {value} weighs a loss term this network cannot have: it '
                            f'needs {needed} generated embedding(s), and {switches.describe()} '
                            f'gives {generated}; pass {flag(dest)} 0 or change '
                            f'{flag("dee_stage")} / {flag("dee_embeddings")}.')
        else:
            setattr(args, dest, 0.0)


def network_switches(args):
    """DEEN's NetworkSwitches of resolved arguments (None for AGW)."""
    return NetworkSwitches.from_args(args) if args.method == 'deen' else None


def describe_network(args):
    """One log line: the network's parts and the loss terms that are off."""
    switches = network_switches(args)
    if switches is None:
        return f'{args.method.upper()} network'
    off = [name for name, dest in (('L_cpm', 'lambda_1'), ('L_ort', 'lambda_2'))
           if LOSS_WEIGHTS[dest][1] > switches.num_branches - 1]
    line = f'DEEN network: {switches.describe()}, {switches.num_branches} embedding(s) per image'
    if off:
        line += (f'; {" and ".join(off)} off ({switches.num_branches - 1} generated '
                 f'embedding(s): L_cpm needs one, L_ort two)')
    return line


def learning_rate(base_lr, epoch, warmup, steps):
    """Linear warm-up over the first `warmup` epochs, then x0.1 at each epoch in `steps`."""
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    return base_lr * 0.1 ** sum(epoch >= step for step in steps)


def build_optimizer(model, base_lr, optim='sgd', pretrained=True):
    """SGD (Nesterov, momentum 0.9, wd 5e-4) or Adam (wd 5e-4): BNNeck and classifier at lr, the
    rest at 0.1 lr when it starts from pretrained weights (the released recipe), else at lr."""
    head = [p for name, p in model.named_parameters()
            if name.startswith(('bottleneck.', 'classifier.')) and p.requires_grad]
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{'params': body, 'lr_scale': 0.1 if pretrained else 1.0},
              {'params': head, 'lr_scale': 1.0}]
    if optim == 'adam':
        return torch.optim.Adam(groups, lr=base_lr, weight_decay=5e-4)
    return torch.optim.SGD(groups, lr=base_lr, momentum=0.9, weight_decay=5e-4, nesterov=True)


def set_learning_rate(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr * group['lr_scale']


def run_name(args, trial):
    return f'{args.dataset}_{args.method}' + (f'_trial{trial}' if trains_on_regdb(args) else '')


def trains_on_regdb(args):
    """Whether RegDB is the dataset, or one of the --sources, of the run (its split names it)."""
    return 'regdb' in args.dataset.split('+')


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag read after each step; a second SIGINT stops at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run (one dataset, one RegDB trial): data, model, optimiser, loop, checkpoints.
    cache_scope: who builds the training cache (check_run's answer; checks.folder_writer)."""

    def __init__(self, args, trial, ctx, device, logger, cache_scope='all'):
        self.args, self.trial, self.ctx, self.device, self.log = args, trial, ctx, device, logger
        self.name = run_name(args, trial)
        self.layout = evaluation_layout(args)
        self.provenance = run_provenance(args, ctx, device)  # recorded in every checkpoint
        self.best_path, self.last_path = checkpoint_paths(args, trial)
        parts, lists = training_lists(args, int(self.trial))
        self.sources = recorded_sources(args, parts)  # None for one dataset
        self.num_classes = num_classes = identity_count(lists)
        seed_everything(args.seed, args.deterministic)
        # the network and its pretrained weights first: a download failure costs no cache build
        model = build_model(args.method, num_classes, args.dataset, pretrained=args.pretrained,
                            arch=args.arch, switches=network_switches(args))
        self.log.info(f'{self.name}: {describe_network(args)}')
        model.to(device)
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if ctx.enabled and args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = build_optimizer(model, args.lr, args.optim, uses_pretrained(args.pretrained))
        self.views = training_views(args.img_h, args.img_w, args.erasing, args.grayscale, args.pad,
                                    args.erasing_kind, args.channel_aug)
        self.criterion = build_criterion(args.method, margin=args.margin, lambda_1=args.lambda_1,
                                         lambda_2=args.lambda_2, cpm_margin=args.cpm_margin,
                                         views=len(self.views), **adp_settings(args))
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
        self.start_epoch, self.start_batch = 0, 0
        self.best_rank1, self.best_epoch = -1.0, -1
        self.resumed_rng = self.resumed_progress = self.pending_record = None
        self.interrupted = None  # where a resumed checkpoint stopped inside an epoch
        self.saved = None  # (path, epoch, global batch) of the last checkpoint this run wrote
        path = resume_path(args, self.last_path, ctx) if args.resume else None
        if path:
            self._resume(path)
        elif args.resume:
            self.log.info(f'{flag("resume")} auto: no {self.last_path} yet, a new run starts')
        self.loader, self.sampler = self._build_data(parts, folder_writer(cache_scope, ctx))
        if self.interrupted is not None:
            self._continue_epoch(self.interrupted)
        self.train_model = self._wrap(model)
        self.eval_model = inference_model(model, args)  # compiled once per run with --compile
        self.writer = self._tensorboard()

    # -- setup ------------------------------------------------------------------------------
    def _build_data(self, parts, builds_cache):
        """(loader, sampler) of the sources' [SourceLists]; builds_cache: whether this process
        builds the caches (rank 0, or the first process of each node when every node has its own
        --cache-dir), the others wait and read them."""
        args, ctx = self.args, self.ctx
        size = (args.img_w, args.img_h)
        caches = load_source_caches(args, parts, size, builds_cache, max(args.workers, 1),
                                    self._barrier)
        dataset = CrossModalTrainSet(*caches, self.views)
        sampler = IdentitySampler(caches[0][1], caches[1][1], args.batch_size, args.num_pos,
                                  seed=args.seed, world_size=ctx.world_size, rank=ctx.rank)
        # its own generator: creating the workers draws nothing from the training process's RNG
        self.loader_generator = torch.Generator()
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size * args.num_pos, sampler=sampler,
            num_workers=args.workers, pin_memory=self.device.type == 'cuda', drop_last=False,
            persistent_workers=False, generator=self.loader_generator)
        self.log.info(f'{self.name}: {self.num_classes} identities, {len(caches[0][1])} visible and '
                      f'{len(caches[1][1])} infrared training images, {sampler.batches} batches of '
                      f'{args.batch_size}x{args.num_pos}, {sampler.steps} steps/epoch on '
                      f'{ctx.world_size} process(es)')
        return loader, sampler

    def _wrap(self, model):
        if self.ctx.enabled:
            ids = [self.device.index] if self.device.type == 'cuda' else None
            model = DistributedDataParallel(model, device_ids=ids)
        if self.args.compile:
            model = torch.compile(model)
        return model

    def _tensorboard(self):
        if not self.ctx.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(os.path.join(self.args.log_path, 'tensorboard', self.name))

    def _barrier(self):
        if self.ctx.enabled:
            dist.barrier()

    def _resume(self, path):
        state = load_checkpoint(path)
        if state.get('format') != CHECKPOINT_FORMAT:  # released DEEN checkpoint: weights only
            load_model_weights(self.model, state.get('net', state))
            self.start_epoch = int(state.get('epoch', -1)) + 1
            self.log.info(f'initialised from released checkpoint {path}; optimiser and schedule '
                          f'start fresh at epoch {self.start_epoch}')
            return
        check_resume_state(state, path, self.args, self.num_classes)
        check_resume_network(state, path, self.args)
        load_model_weights(self.model, state['model'])
        self.optimizer.load_state_dict(state['optimizer'])
        self.scaler.load_state_dict(state['scaler'])
        self.best_rank1, self.best_epoch = state['best_rank1'], state['best_epoch']
        self.start_epoch = state['epoch'] + (state['step'] == 0)
        if state['step']:  # an interrupted epoch: continued once the sampler exists
            self.interrupted = {'path': path, 'sampler': state.get('sampler') or {},
                                'rng': state.get('rng') or {},
                                'progress': state.get('epoch_progress')}
        self.pending_record = state.get('evaluation_pending')
        self.saved = (path, state['epoch'], state['step'])
        where = (f'inside epoch {state["epoch"]}, after {state["step"]} global batch(es)'
                 if state['step'] else f'after epoch {state["epoch"]}')
        self.log.info(f'resumed {path} ({where})')
        if self.start_epoch >= self.args.epochs and not self.pending_record:
            self.log.info(f'{path} has trained the {self.start_epoch} epoch(s) that '
                          f'{flag("epochs")} {self.args.epochs} asks for: nothing left to train')

    def _continue_epoch(self, saved):
        """Continue the interrupted epoch of a resumed checkpoint at the global batch it reached.
        The same process count also continues each process's random states, bit-exact; another
        count continues the batch plan exactly, but each process reseeds its own random stream
        (the dropout of the network), since the old processes' streams cannot be split or merged.
        A changed plan (--batch-size, --num_pos, --seed, the training set) restarts the epoch.
        Anything but an exact continuation is said in one line."""
        epoch, then = self.start_epoch, saved['sampler']
        now = self.sampler.state_dict(epoch, 0)
        changed = [f'{name} ({then.get(key)} -> {now[key]})' for key, name in PLAN_FLAGS.items()
                   if then.get(key) != now[key]]
        if not changed and then.get('batches_per_epoch') != now['batches_per_epoch']:
            changed = [f'the training set ({then.get("batches_per_epoch")} -> '
                       f'{now["batches_per_epoch"]} batches per epoch)']
        if 'batch' not in then or changed:
            why = (', '.join(changed) + ' changed' if changed
                   else 'the checkpoint does not record its position as global batches')
            self.log.info(f'epoch {epoch} restarts from its first batch: {why} since '
                          f'{saved["path"]} was saved, so its interrupted part cannot be continued '
                          f'exactly.')
            return
        world, before = self.ctx.world_size, then['world_size']
        self.start_batch, self.resumed_progress = then['batch'], saved['progress']
        states = saved['rng'].get('ranks', [])
        if before == world and len(states) == world:
            self.resumed_rng = states[self.ctx.rank]
            return
        where = f'epoch {epoch} continues at global batch {self.start_batch} of {self.sampler.batches}'
        if before == world:  # a checkpoint without every process's random states
            self.log.info(f'{where}; {saved["path"]} holds no random states of its {world} '
                          f'processes, so each process reseeds from (seed, epoch, rank, batch).')
            return
        steps = max(0, -(-(self._epoch_end() - self.start_batch) // world))
        self.log.info(
            f'{where} on {world} process(es) instead of the {before} that saved it: {steps} '
            f'step(s) left, each process {self.args.batch_size}x{self.args.num_pos} images per '
            f'modality (a global batch of {self.args.batch_size * world} identities, was '
            f'{self.args.batch_size * before}); the network\'s random state (dropout, one per '
            f'process) cannot carry over to another process count, so each process reseeds from '
            f'(seed, epoch, rank, batch).')

    # -- checkpoints -----------------------------------------------------------------------
    def _state(self, epoch, step, metrics=None, progress=None, pending=None):
        """The checkpoint after `step` global batches of `epoch` (step 0: after the whole epoch;
        one process trains one global batch per step, W processes W). Where the run stands:
        'epoch' / 'step', the sampler's position ('sampler': global batches consumed, with what
        the batch plan depends on) and every process's RNG states ('rng': world_size, ranks); the
        data pipeline's draws are functions of the sampler's position (IdentitySampler). Every
        process calls it (it gathers their RNG states). Mid-epoch, 'epoch_progress' holds
        the epoch's loss sums and counts so far; 'evaluation_pending' holds the history record
        of an epoch saved before its evaluation, which a resumed run evaluates first."""
        position = (epoch, step) if step else (epoch + 1, 0)
        return {
            'format': CHECKPOINT_FORMAT, 'version': __version__,
            'dataset': self.args.dataset, 'method': self.args.method, 'arch': self.args.arch,
            'trial': int(self.trial),
            'num_classes': self.num_classes, 'img_h': self.args.img_h, 'img_w': self.args.img_w,
            'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
            'scaler': self.scaler.state_dict(), 'epoch': epoch, 'step': step,
            'sampler': self.sampler.state_dict(*position),
            'best_rank1': self.best_rank1, 'best_epoch': self.best_epoch,
            'rng': {'world_size': self.ctx.world_size, 'ranks': gathered(rng_state(), self.ctx)},
            'epoch_progress': progress, 'evaluation_pending': pending,
            'metrics': metrics or {}, 'args': plain_args(self.args), 'sources': self.sources,
            'network': recorded_switches(self.args),
            'provenance': self.provenance,
        }

    def _save(self, path, state):
        """Write a checkpoint (main process), never one holding NaN or infinite weights."""
        if not finite_weights(self.model):
            raise TrainingDiverged(f'the weights became NaN or infinite in epoch {state["epoch"]}; '
                                   f'{self._last_good()}.')
        if self.ctx.is_main:
            save_checkpoint(state, path)
        if path == self.last_path:
            self.saved = (path, state['epoch'], state['step'])

    def _last_good(self):
        """Which checkpoint a diverged run leaves, as a phrase."""
        if self.saved is not None:
            path, epoch, step = self.saved
            where = (f'after epoch {epoch}' if step == 0
                     else f'inside epoch {epoch}, after {step} global batch(es)')
            return f'the last good checkpoint is {path} ({where})'
        if os.path.isfile(self.last_path):
            return f'this run saved no checkpoint and left {self.last_path} as it was'
        return 'this run saved no checkpoint'

    # -- loop -------------------------------------------------------------------------------
    def fit(self, stop):
        args = self.args
        if self.pending_record is not None:  # trained and saved; its evaluation did not finish
            record, self.pending_record = self.pending_record, None
            if args.eval_every:
                self._evaluate_and_report(record)
            else:
                self._report(record, None)
        for epoch in range(self.start_epoch, args.epochs):
            start_batch = self.start_batch if epoch == self.start_epoch else 0
            self._seed_epoch(epoch, start_batch)
            lr = learning_rate(args.lr, epoch, args.warmup, args.lr_steps)
            set_learning_rate(self.optimizer, lr)
            losses, train_seconds = self._train_epoch(epoch, start_batch, stop)
            record = {'epoch': epoch, 'lr': lr, 'losses': losses, 'train_seconds': train_seconds}
            if self._evaluation_due(epoch):
                # saved before it is evaluated: an evaluation that fails costs no training
                self._save(self.last_path, self._state(epoch, 0, pending=record))
                self._evaluate_and_report(record)
            else:
                self._save(self.last_path, self._state(epoch, 0))
                self._report(record, None)
        if self.best_epoch < 0:  # never evaluated: the final weights are the selection
            self._save(self.best_path, self._state(args.epochs - 1, 0))
        return self.best_rank1

    def _evaluation_due(self, epoch):
        every = self.args.eval_every
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.args.epochs)

    def _evaluate_and_report(self, record):
        """Evaluate the epoch of `record`, keep `best`, re-write `last` with the metrics, report."""
        epoch = record['epoch']
        metrics = self._evaluate()
        if metrics['rank1'] > self.best_rank1:
            self.best_rank1, self.best_epoch = metrics['rank1'], epoch
            self._save(self.best_path, self._state(epoch, 0, metrics))
        self._save(self.last_path, self._state(epoch, 0, metrics))
        self._report(record, metrics)

    def _epoch_end(self):
        """The global batches an epoch covers: the sampler's B, or --max-steps steps' worth."""
        if self.args.max_steps is None:
            return self.sampler.batches
        return min(self.sampler.batches, self.args.max_steps * self.ctx.world_size)

    def _seed_epoch(self, epoch, start_batch):
        if self.resumed_rng is not None and start_batch > 0:
            set_rng_state(self.resumed_rng)  # continue the interrupted epoch where it stopped
        else:
            seed_everything(epoch_seed(self.args.seed, epoch, self.ctx.rank, start_batch))
        self.resumed_rng = None
        self.loader_generator.manual_seed(epoch_seed(self.args.seed, epoch, self.ctx.rank))
        self.sampler.set_epoch(epoch, start_batch, self._epoch_end())

    def _train_epoch(self, epoch, start_batch, stop):
        """Train the global batches start_batch.. of epoch (this process every world_size-th);
        returns ({term: mean loss}, seconds), counting what an interrupted run trained before
        start_batch."""
        args, device, world = self.args, self.device, self.ctx.world_size
        self.train_model.train()
        progress = self.resumed_progress if start_batch else None
        progress = progress or {'meters': {}, 'train_seconds': 0.0}
        self.resumed_progress = None
        meters = {name: AverageMeter.resumed(total, count)
                  for name, (total, count) in progress['meters'].items()}
        started = time.time()
        done = start_batch // world  # the steps before start_batch, as this process count counts
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        with tqdm(total=done + self.sampler.steps_left, initial=done, desc=f'epoch {epoch}',
                  leave=False, disable=not self.ctx.is_main, dynamic_ncols=True) as bar:
            trained = 0  # the steps this call trains
            for step, batch in enumerate(self.loader, done):
                visible, infrared, labels = stem_batches(self.views, batch)
                visible = visible.to(device, non_blocking=True, memory_format=memory_format)
                infrared = infrared.to(device, non_blocking=True, memory_format=memory_format)
                labels = labels.to(device, non_blocking=True)
                with autocast_context(device, args.amp):
                    loss, parts = self.criterion(self.train_model(visible=visible, infrared=infrared), labels)
                values = self._reduce([loss.detach().float()] + [torch.as_tensor(v, dtype=torch.float32, device=device)
                                                                 for v in parts.values()] +
                                      [torch.tensor(float(stop.requested), device=device)])
                if not math.isfinite(values[0]):
                    raise TrainingDiverged(f'the loss became {values[0]} at epoch {epoch}, step {step}; '
                                           f'{self._last_good()}.')
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                for name, value in zip(['loss', *parts], values):
                    meters.setdefault(name, AverageMeter()).update(value)
                bar.set_postfix({name: f'{m.avg:.3f}' for name, m in meters.items()}, refresh=False)
                bar.update()
                trained += 1
                if values[-1] > 0:  # some process was asked to stop: all stop after this step
                    progress = {'meters': {name: [m.sum, m.count] for name, m in meters.items()},
                                'train_seconds': progress['train_seconds'] + time.time() - started}
                    consumed = start_batch + (step - done + 1) * world
                    self._save(self.last_path, self._state(epoch, consumed, progress=progress))
                    raise Interrupted(epoch)
        seconds = progress['train_seconds'] + time.time() - started
        self._warn_stalled_triplet(epoch, trained)
        return {name: m.avg for name, m in meters.items()}, seconds

    def _warn_stalled_triplet(self, epoch, steps):
        """One log line when the triplet term had zero gradient at each of the epoch's `steps`
        steps (CAJ's squared ADP hinge with every anchor at its clamp of 88)."""
        take = getattr(self.criterion, 'take_stall_count', None)
        if take is None:
            return
        stalled = take()
        if steps and stalled >= steps:
            self.log.warning(f'{self.name} epoch {epoch}: the triplet term had zero gradient at '
                             f'all {steps} step(s) (its squared hinge clamped at 88 for every '
                             f'anchor), so it did not train; {flag("adp_square")} 0 uses the soft '
                             f'margin instead.')

    def _reduce(self, values):
        """Mean over processes of the step's scalars (the stop flag is summed)."""
        stacked = torch.stack(values)
        if self.ctx.enabled:
            dist.all_reduce(stacked)
            stacked[:-1] /= self.ctx.world_size
        return stacked.tolist()

    def _evaluate(self):
        args = self.args
        start = time.time()
        if self.ctx.enabled:  # BN statistics differ per process (each saw its own batches): use rank 0's
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)
        metrics = selection_rank1(self.eval_model, self.layout, args.data_path, trial=int(self.trial),
                                  mode=args.mode, args=args, device=self.device, ctx=self.ctx)
        metrics['seconds'] = time.time() - start
        return metrics

    def _report(self, record, metrics):
        """The epoch's line in the log, its record in the history file, TensorBoard scalars.
        record: epoch, lr, losses, train_seconds."""
        epoch, lr, losses = record['epoch'], record['lr'], record['losses']
        if self.ctx.is_main:
            append_history(history_path(self.args.log_path, self.name),
                           {**record, 'metrics': metrics, 'time': time.time()})
        text = ' '.join(f'{name} {value:.4f}' for name, value in losses.items())
        line = f'{self.name} epoch {epoch} lr {lr:.4g} {text}'
        if metrics:
            line += (f' | {metrics["direction"]} Rank-1 {metrics["rank1"]:.2%} mAP {metrics["mAP"]:.2%}'
                     f' mINP {metrics["mINP"]:.2%} (best {self.best_rank1:.2%} @ {self.best_epoch})')
        self.log.info(line)
        if self.writer is not None:
            for name, value in losses.items():
                self.writer.add_scalar(f'train/{name}', value, epoch)
            self.writer.add_scalar('train/lr', lr, epoch)
            for name, value in (metrics or {}).items():
                if isinstance(value, float):
                    self.writer.add_scalar(f'test/{name}', value, epoch)
            self.writer.flush()


def recorded_switches(args):
    """What a checkpoint records of the network's switches (NetworkSwitches as a dict; None for
    AGW): load_trained_model rebuilds the network from it."""
    switches = network_switches(args)
    return None if switches is None else asdict(switches)


def adp_settings(args):
    """The ADP triplet's build_criterion arguments from the flags (unset for deen)."""
    if args.method == 'deen':
        return {}
    return {'adp_alpha': args.adp_alpha, 'adp_gamma': args.adp_gamma,
            'adp_square': bool(args.adp_square)}


def stem_batches(views, batch):
    """(visible images, infrared images, labels) of a loader batch (the images of each view,
    then the labels of each view, CrossModalTrainSet): the images of every view through a
    stem concatenated in view order, labels in the order [visible stem; infrared stem]."""
    images, labels = batch[:len(views)], batch[len(views):]
    by_stem = {stem: [i for i, view in enumerate(views) if view.stem == stem] for stem in MODALITIES}
    visible, infrared = (torch.cat([images[i] for i in by_stem[stem]]) for stem in MODALITIES)
    order = by_stem['visible'] + by_stem['infrared']
    return visible, infrared, torch.cat([labels[i] for i in order])


def plain_args(args):
    """The arguments as JSON-able, weights-only-loadable values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def history_path(log_path, name):
    """The run's per-epoch history: one JSON object per line with epoch, lr, losses ({term:
    mean}), metrics (the selection metrics with 'seconds', or null when not evaluated),
    train_seconds and time. A resumed run appends; the last line of an epoch wins."""
    return os.path.join(log_path, name + '_history.jsonl')


def append_history(path, record):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'a') as handle:
        handle.write(json.dumps(record) + '\n')


def save_args(args, name):
    with written_atomically(os.path.join(args.log_path, name + '_args.json')) as tmp, \
            open(tmp, 'w') as handle:
        json.dump(plain_args(args), handle, indent=2)


def trials_to_run(args):
    if not trains_on_regdb(args):
        return [1]
    return list(range(1, 11)) if args.trial == 'all' else [int(args.trial)]


def checkpoint_paths(args, trial):
    """(best, last) checkpoint paths of one run."""
    name = run_name(args, trial)
    return (os.path.join(args.model_path, name + '_best.pth'),
            os.path.join(args.model_path, name + '_last.pth'))


def identity_count(lists):
    """Classes of the identity classifier: the training labels are 0..N-1 in both modalities."""
    return int(lists['visible'].pids.max()) + 1


def resume_path(args, last_path, ctx):
    """The checkpoint --resume names: a file; "last", the run's own `last`; "auto", the run's
    `last` when it exists, else None (start afresh). Whether `last` exists is rank 0's answer
    on every process, so that all of them take the same decision."""
    if args.resume not in ('last', 'auto'):
        return args.resume
    if from_main_process(os.path.exists(last_path), ctx):
        return last_path
    if args.resume == 'auto':
        return None
    raise UserError(f'{flag("resume")} last: there is no {last_path} to continue from; run '
                    f'without {flag("resume")} to start, or pass the {flag("model_path")} of the '
                    f'run to continue.')


def continue_hint(args, last_path):
    """What continues an interrupted run whose `last` is last_path, for the flags it was given."""
    if args.resume in ('auto', 'last') or (
            args.resume and os.path.abspath(args.resume) == os.path.abspath(last_path)):
        return 'the same command continues it'
    if args.resume:
        return (f'continue with the same command, {flag("resume")} {last_path} instead of '
                f'{args.resume}')
    return f'continue with the same command plus {flag("resume")} {last_path}'


def finite_weights(model):
    """Whether every floating-point weight and buffer of model is finite."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def prepare_demo_data(args, ctx):
    """Generate the demo dataset under --data-path once where a process lacks it: by rank 0
    when every process sees the folder, else by the first process of each node (the others
    wait)."""
    from tools.synthetic_data import DEMO_MARKER, make_demo_dataset
    if args.dataset != 'demo':
        return
    missing = not os.path.isfile(os.path.join(args.data_path, DEMO_MARKER))
    if not any(gathered(missing, ctx)):
        return
    check_output_folder(args.data_path, 'data_path', 'the generated demo dataset')
    scope = check_shared_folders([('data_path', args.data_path, 'the generated demo dataset',
                                   True)], ctx)['data_path']
    if folder_writer(scope, ctx):
        make_demo_dataset(args.data_path)
    if ctx.enabled:
        dist.barrier()


def check_evaluation_data(layout, data_path, trial, mode):
    """The test images that the evaluation during training reads exist (found before an epoch
    is spent, not after it)."""
    try:
        _, query, gallery = selection_split(layout, data_path, trial, mode)
    except UserError as error:
        raise UserError(f'{first_sentence(error)}; the evaluation during training needs it '
                        f'({flag("eval_every")} 0 trains without evaluating).') from None
    check_images_exist([query, gallery], 'test')


def check_run(args, ctx):
    """Everything the run will read or write, checked before a cache, a model or an epoch is
    built: the data (index files, identities in both modalities, the test images the evaluation
    reads), --resume, --pretrained, the image size, and the output folders with room for the
    checkpoints and the cache; under torchrun, that every process sees what rank 0 writes into
    --model_path, and --cache-dir shared by all processes or one per node where a cache must be
    built. Raises UserError naming the flag. Returns the scope of --cache-dir ('all' or 'node',
    checks.check_shared_folders), which says who builds the cache."""
    check_data_folders(args, check_data_folder)
    check_output_folder(args.log_path, 'log_path', 'logs')
    check_output_folder(args.model_path, 'model_path', 'checkpoints')
    if uses_pretrained(args.pretrained) and args.pretrained.lower() != 'imagenet':
        check_torch_file(args.pretrained, 'pretrained')
    layout, size = evaluation_layout(args), (args.img_w, args.img_h)
    files, network, builds = [], None, False
    for trial in trials_to_run(args):
        parts, lists = training_lists(args, trial)
        IdentitySampler(lists['visible'].pids, lists['infrared'].pids, args.batch_size,
                        args.num_pos)  # enough identities per batch
        num_classes = identity_count(lists)
        if args.eval_every:
            check_evaluation_data(layout, args.data_path, trial, args.mode)
        network = network or check_image_size(args, args.method, num_classes, args.dataset,
                                              switches=network_switches(args))
        best, last = checkpoint_paths(args, trial)
        path = resume_path(args, last, ctx) if args.resume else None
        if path:  # "auto" continues a finished run as it is: a restart after its end trains nothing
            state = peek_checkpoint(path, 'resume')
            check_resume_state(state, path, args, num_classes,
                               None if args.resume == 'auto' else args.epochs)
            check_resume_network(state, path, args)
        for part in parts:
            builds |= check_cache_build([part.lists[m] for m in MODALITIES],
                                        cache_dir_of(args, part), size)
        files += [best, last]
    needed = checkpoint_space(files, checkpoint_estimate(network, args.optim))
    check_free_space(args.model_path, 'model_path', needed, 'the checkpoints of this run')
    folders = [('model_path', args.model_path, 'the checkpoints', False)]
    if any(gathered(builds, ctx)):  # a process would build the cache: who sees it matters
        folders.append(('cache_dir', args.cache_dir or cache_dir_of(args, parts[0]),
                        'the training cache', True))
    return check_shared_folders(folders, ctx).get('cache_dir', 'all')


def main(argv=None):
    args = parse_args(argv)
    joined = dist.is_initialized()  # a caller's process group (reproduce.py) is left to the caller
    device, ctx = setup_runtime(args)
    try:
        check_device_flags(args, device)
        prepare_demo_data(args, ctx)
        cache_scope = check_run(args, ctx)
        with StopRequest() as stop:
            for trial in trials_to_run(args):
                name = run_name(args, trial)
                logger = setup_logger(os.path.join(args.log_path, name + '.log'), ctx.is_main)
                if ctx.is_main:
                    save_args(args, name)
                logger.info(f'{name} on {device} x{ctx.world_size}: ' + ' '.join(sys.argv[1:]))
                trainer = Trainer(args, trial, ctx, device, logger, cache_scope)
                best = trainer.fit(stop)
                selection = (f'best Rank-1 {best:.2%} at epoch {trainer.best_epoch}'
                             if trainer.best_epoch >= 0 else
                             f'no evaluation ({flag("eval_every")} {args.eval_every}): best = the '
                             f'final weights, epoch {args.epochs - 1}')
                logger.info(f'{name} done: {selection}; checkpoints {trainer.best_path}, '
                            f'{trainer.last_path}')
    except Interrupted:
        if ctx.is_main:
            hint = continue_hint(args, trainer.last_path)
            print(f'interrupted: saved {trainer.last_path}; {hint}', file=sys.stderr)
        return 130
    finally:
        if ctx.enabled and not joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0

