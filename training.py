"""Training runs as a library: train.py's flags and recipes, the Trainer (data, model, optimiser,
loop, checkpoints, history) and main(argv), which train.py and reproduce.py call."""
import argparse
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checks import (check_cache_build, check_data_folder, check_device_flags, check_free_space,
                    check_image_size, check_images_exist, check_integer, check_output_folder,
                    check_real, check_resume_network, check_resume_state, check_runtime_flags,
                    check_shared_folders, check_torch_file, checkpoint_estimate, checkpoint_space,
                    folder_writer, peek_checkpoint)
from data_loader import ERASING_KINDS, CrossModalTrainSet
from data_manager import DATASETS, MODALITIES
from evaluation import selection_rank1, selection_split
from inference import inference_model
from methods import METHODS, agw, build_network, get_method
from model import BACKBONES, uses_pretrained
from provenance import run_provenance
from sources import (add_source_args, cache_dir_of, check_data_folders, evaluation_layout,
                     fill_paths, load_source_caches, recipe_overrides, recorded_sources,
                     resolve_sources, several, training_lists)
from training_state import RunCheckpoints, plain_args
from utils import (AverageMeter, IdentitySampler, UserError, add_runtime_args, autocast_context,
                   epoch_seed, fill_runtime_defaults, first_sentence, flag, from_main_process,
                   gathered, manual_parser, seed_everything, set_rng_state, setup_logger,
                   setup_runtime, written_atomically)

# Flags left unset take these values, then the method's released recipe (METHOD.md), then the
# dataset's overrides.
RUN_DEFAULTS = dict(arch='resnet50', optim='sgd', eval_every=1, pretrained='imagenet',
                    channel_aug=False, erasing_kind='zero')
# The demo: a small configuration that learns from scratch on 2 CPU cores in about three minutes,
# for every method (a method's dataset_recipes['demo'] goes on top). Measured on the demo data
# (notes in README): a ResNet-50 manages ~150 steps in that time and stays near chance; random
# grayscale and erasing slow from-scratch learning down.
DEMO_RECIPE = dict(arch='resnet18', optim='adam', lr=1e-3, batch_size=4, num_pos=4, img_h=64,
                   img_w=32, epochs=22, lr_steps=(18,), warmup=0, grayscale=0.0, erasing=None, pad=2,
                   eval_every=3, pretrained='none', workers=0, test_batch=128)
# Named recipes, the rows of the LLCM benchmark (DEEN paper, Table 3) that reproduce.py runs:
# name -> (method, train.py flags on top of its recipe): every method's released recipe, and the
# variants a method names (AGW's 'agw-plain': the paper's AGW, without random erasing; 'agw' is
# the released recipe, the paper's AGW*).
RECIPES = {**{name: (name, []) for name in METHODS},
           **{variant: (method.name, list(flags)) for method in METHODS.values()
              for variant, flags in method.named_recipes.items()}}


def run_recipe(args, method):
    """The defaults of a run (docs/training.md, the recipe rule): one dataset, method_recipe; with
    --sources or --recipe l2rw, the method's recipe under sources.recipe_overrides (several
    datasets: no dataset's overrides, no evaluation unless --eval-dataset; L2RW's settings)."""
    if args.recipe == 'l2rw' or several(args):
        return {**RUN_DEFAULTS, **method.recipe, **recipe_overrides(args, method)}
    return method_recipe(method, args.dataset)


def method_recipe(method, dataset):
    """train.py's defaults for a method on a dataset: RUN_DEFAULTS, the method's recipe, then the
    dataset's overrides (the demo's for every method, then the method's own for the dataset)."""
    recipe = {**RUN_DEFAULTS, **method.recipe}
    if dataset == 'demo':
        recipe.update(DEMO_RECIPE)
    recipe.update(method.dataset_recipes.get(dataset, {}))
    return recipe



class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step finished and `last` was saved."""


DESCRIPTION = ('Train DEEN (any of its ablation variants) or a baseline of its LLCM benchmark '
               '(AGW, CAJ, DDAG, MMN, LbA, DART) on '
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
    model.add_argument('--method', default='deen', choices=tuple(METHODS),
                       help='network, losses and released recipe (docs/methods.md)')
    model.add_argument('--arch', choices=BACKBONES, help='trunk (default: resnet50, as in the '
                       'paper)')
    model.add_argument('--pretrained', help='imagenet (default), none, or a local torchvision '
                       'state-dict file of the --arch trunk')
    model.add_argument('--margin', type=float, default=0.3, help='triplet margin')
    for method in METHODS.values():  # each method's own flags
        method.add_arguments(model)
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
    augmentation.add_argument('--erasing-kind', choices=ERASING_KINDS,
                              help="random erasing: zero (torchvision's, filled with 0: DEEN, "
                              "AGW), channel (CAJ's, its per-channel constants) or channel-zero "
                              "(CAJ's box drawing filled with 0: MMN) (default: the method's)")

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
                          '(default: 1; LbA 0, its released test takes the last epoch)')
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
    method = get_method(args.method)
    refuse_foreign_flags(args, method)
    recipe = run_recipe(args, method)
    if args.random_erasing is False:
        recipe['erasing'] = None
    elif args.random_erasing and not recipe['erasing']:  # turned on where the recipe has none
        recipe['erasing'] = method.recipe.get('erasing') or DEFAULT_ERASING
    for name, value in recipe.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    fill_paths(args)
    fill_runtime_defaults(args)
    check_training_flags(args)
    method.resolve(args)
    return args


DEFAULT_ERASING = (0.02, 0.4)  # --random-erasing where a recipe has none: the released area range


def refuse_foreign_flags(args, method):
    """One sentence for a flag given that only other methods take (its owner's wording)."""
    for other in METHODS.values():
        given = [dest for dest in other.own_flags
                 if dest not in method.own_flags and getattr(args, dest, None) is not None]
        if given:
            raise UserError(other.foreign_flags_message(given, method))


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
        if getattr(args, dest) is not None:  # the lambdas are filled by the method (resolve)
            check_real(getattr(args, dest), dest)
    for dest in ('adp_alpha', 'adp_gamma'):
        if getattr(args, dest, None) is not None:
            check_real(getattr(args, dest), dest, positive=True)
    check_runtime_flags(args)


def learning_rate(base_lr, epoch, warmup, steps):
    """Linear warm-up over the first `warmup` epochs, then x0.1 at each epoch in `steps`."""
    if epoch < warmup:
        return base_lr * (epoch + 1) / warmup
    return base_lr * 0.1 ** sum(epoch >= step for step in steps)


def build_optimizer(model, base_lr, optim='sgd', pretrained=True,
                    head_prefixes=('bottleneck.', 'classifier.'), criterion=None):
    """SGD (Nesterov, momentum 0.9, wd 5e-4) or Adam (wd 5e-4): the head (the parameters named
    with head_prefixes, the method's: BNNeck and classifier; and the trainable parameters of an
    nn.Module criterion) at lr, the rest at 0.1 lr when it starts from pretrained weights (the
    released recipe), else at lr."""
    head = [p for name, p in model.named_parameters()
            if name.startswith(tuple(head_prefixes)) and p.requires_grad]
    if isinstance(criterion, torch.nn.Module):
        head += [p for p in criterion.parameters() if p.requires_grad]
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
    """One training run (one dataset, one RegDB trial): its network, optimiser, criterion and data,
    and the loop over epochs and steps; where it stands and its checkpoints are
    `self.checkpoints` (training_state.RunCheckpoints), its log lines, history and TensorBoard
    scalars `self.report` (RunReport). cache_scope: who builds the training cache (check_run's
    answer; checks.folder_writer)."""

    def __init__(self, args, trial, ctx, device, logger, cache_scope='all'):
        self.args, self.trial, self.ctx, self.device, self.log = args, trial, ctx, device, logger
        self.name = run_name(args, trial)
        self.layout = evaluation_layout(args)  # None: a run on several datasets evaluates nothing
        self.method = get_method(args.method)
        self.provenance = run_provenance(args, ctx, device)  # recorded in every checkpoint
        self.checkpoints = RunCheckpoints(self, *checkpoint_paths(args, trial))
        parts, lists = training_lists(args, int(self.trial))
        self.sources = recorded_sources(args, parts)  # None for one dataset
        self.num_classes = identity_count(lists)
        seed_everything(args.seed, args.deterministic)
        # the network and its pretrained weights first: a download failure costs no cache build
        self.model = run_network(self.method, args, self.num_classes, device, ctx)
        self.log.info(f'{self.name}: {self.method.describe_network(args)}')
        self.views = self.method.training_views(args)
        self.criterion = build_criterion(args, self.views)
        if isinstance(self.criterion, torch.nn.Module):
            self.criterion.to(device)
        self.optimizer = build_optimizer(self.model, args.lr, args.optim,
                                         uses_pretrained(args.pretrained),
                                         self.method.head_prefixes, self.criterion)
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
        path = resume_path(args, self.checkpoints.last_path, ctx) if args.resume else None
        if path:
            self.checkpoints.resume(path)
        elif args.resume:
            self.log.info(f'{flag("resume")} auto: no {self.checkpoints.last_path} yet, a new run '
                          f'starts')
        self.caches, self.loader, self.sampler, self.loader_generator = training_data(
            args, parts, self.views, ctx, device, folder_writer(cache_scope, ctx), run=self)
        self.log.info(f'{self.name}: {self.num_classes} identities, {len(self.caches[0][1])} '
                      f'visible and {len(self.caches[1][1])} infrared training images, '
                      f'{self.sampler.batches} batches of {args.batch_size}x{args.num_pos}, '
                      f'{self.sampler.steps} steps/epoch on {ctx.world_size} process(es)')
        self.checkpoints.continue_epoch()
        self.train_model = wrapped_for_training(self.model, args, ctx, device)
        self.eval_model = inference_model(self.model, args)  # compiled once per run with --compile
        self.report = RunReport(args, self.name, ctx, logger)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, stop):
        """Train the epochs left (evaluating the pending one first); returns the best Rank-1."""
        args, checkpoints = self.args, self.checkpoints
        if checkpoints.pending_record is not None:  # trained and saved; not yet evaluated
            record, checkpoints.pending_record = checkpoints.pending_record, None
            if args.eval_every:
                self._evaluate_and_report(record)
            else:
                self._report(record, None)
        for epoch in range(checkpoints.start_epoch, args.epochs):
            start_batch = checkpoints.start_batch if epoch == checkpoints.start_epoch else 0
            self._seed_epoch(epoch, start_batch)
            lr = learning_rate(args.lr, epoch, args.warmup, args.lr_steps)
            set_learning_rate(self.optimizer, lr)
            call_hook(self.criterion, 'start_epoch', epoch, self)
            losses, train_seconds = self._train_epoch(epoch, start_batch, stop)
            call_hook(self.criterion, 'end_epoch', epoch)
            record = {'epoch': epoch, 'lr': lr, 'losses': losses, 'train_seconds': train_seconds}
            if self._evaluation_due(epoch):
                # saved before it is evaluated: an evaluation that fails costs no training
                self._save(checkpoints.last_path, epoch, pending=record)
                self._evaluate_and_report(record)
            else:
                self._save(checkpoints.last_path, epoch)
                self._report(record, None)
        if checkpoints.best_epoch < 0:  # never evaluated: the final weights are the selection
            self._save(checkpoints.best_path, args.epochs - 1)
        return checkpoints.best_rank1

    def _save(self, path, epoch, step=0, **content):
        self.checkpoints.save(path, self.checkpoints.state(epoch, step, **content), TrainingDiverged)

    def _evaluation_due(self, epoch):
        every = self.args.eval_every
        return bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == self.args.epochs)

    def _evaluate_and_report(self, record):
        """Evaluate the epoch of `record`, keep `best`, re-write `last` with the metrics, report."""
        epoch, checkpoints = record['epoch'], self.checkpoints
        metrics = self._evaluate()
        if metrics['rank1'] > checkpoints.best_rank1:
            checkpoints.best_rank1, checkpoints.best_epoch = metrics['rank1'], epoch
            self._save(checkpoints.best_path, epoch, metrics=metrics)
        self._save(checkpoints.last_path, epoch, metrics=metrics)
        self._report(record, metrics)

    def epoch_end(self):
        """The global batches an epoch covers: the sampler's B, or --max-steps steps' worth."""
        if self.args.max_steps is None:
            return self.sampler.batches
        return min(self.sampler.batches, self.args.max_steps * self.ctx.world_size)

    def _seed_epoch(self, epoch, start_batch):
        checkpoints = self.checkpoints
        if checkpoints.resumed_rng is not None and start_batch > 0:
            set_rng_state(checkpoints.resumed_rng)  # continue the interrupted epoch where it stopped
        else:
            seed_everything(epoch_seed(self.args.seed, epoch, self.ctx.rank, start_batch))
        checkpoints.resumed_rng = None
        self.loader_generator.manual_seed(epoch_seed(self.args.seed, epoch, self.ctx.rank))
        self.sampler.set_epoch(epoch, start_batch, self.epoch_end())

    def _train_epoch(self, epoch, start_batch, stop):
        """Train the global batches start_batch.. of epoch (this process every world_size-th);
        returns ({term: mean loss}, seconds), counting what an interrupted run trained before
        start_batch."""
        world, checkpoints = self.ctx.world_size, self.checkpoints
        self.train_model.train()
        progress = checkpoints.resumed_progress if start_batch else None
        progress = progress or {'meters': {}, 'train_seconds': 0.0}
        checkpoints.resumed_progress = None
        meters = {name: AverageMeter.resumed(total, count)
                  for name, (total, count) in progress['meters'].items()}
        started = time.time()
        done = start_batch // world  # the steps before start_batch, as this process count counts
        with tqdm(total=done + self.sampler.steps_left, initial=done, desc=f'epoch {epoch}',
                  leave=False, disable=not self.ctx.is_main, dynamic_ncols=True) as bar:
            trained = 0  # the steps this call trains
            for step, batch in enumerate(self.loader, done):
                values, names = self._train_step(batch, stop, epoch, step)
                for name, value in zip(names, values):
                    meters.setdefault(name, AverageMeter()).update(value)
                bar.set_postfix({name: f'{m.avg:.3f}' for name, m in meters.items()}, refresh=False)
                bar.update()
                trained += 1
                if values[-1] > 0:  # some process was asked to stop: all stop after this step
                    progress = {'meters': {name: [m.sum, m.count] for name, m in meters.items()},
                                'train_seconds': progress['train_seconds'] + time.time() - started}
                    consumed = start_batch + (step - done + 1) * world
                    self._save(checkpoints.last_path, epoch, consumed, progress=progress)
                    raise Interrupted(epoch)
        seconds = progress['train_seconds'] + time.time() - started
        self._warn_stalled_triplet(epoch, trained)
        return {name: m.avg for name, m in meters.items()}, seconds

    def _train_step(self, batch, stop, epoch, step):
        """One optimiser step on a loader batch; returns the step's scalars averaged over the
        processes ([loss, each part..., the stop flag summed]) and their names."""
        args, device = self.args, self.device
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        visible, infrared, labels = stem_batches(self.views, batch)
        visible = visible.to(device, non_blocking=True, memory_format=memory_format)
        infrared = infrared.to(device, non_blocking=True, memory_format=memory_format)
        labels = labels.to(device, non_blocking=True)
        extra = ({'indices': stem_indices(self.views, batch).to(device)}
                 if self.method.needs_indices else {})
        with autocast_context(device, args.amp):
            output = self.method.forward_train(self.train_model, visible, infrared, labels, **extra)
            loss, parts = self.criterion(output, labels)
        values = self._reduce([loss.detach().float()] +
                              [torch.as_tensor(v, dtype=torch.float32, device=device)
                               for v in parts.values()] +
                              [torch.tensor(float(stop.requested), device=device)])
        if not math.isfinite(values[0]):
            raise TrainingDiverged(f'the loss became {values[0]} at epoch {epoch}, step {step}; '
                                   f'{self.checkpoints.last_good()}.')
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return values, ['loss', *parts]

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
                                  mode=args.mode, args=args, device=self.device, ctx=self.ctx,
                                  fusion=self.method.headline)
        metrics['seconds'] = time.time() - start
        return metrics

    def _report(self, record, metrics):
        self.report.epoch(record, metrics, self.checkpoints.best_rank1, self.checkpoints.best_epoch)


class RunReport:
    """What a run says of each epoch: a line in the log, a record in the history file (main
    process) and TensorBoard scalars (main process, when TensorBoard is installed)."""

    def __init__(self, args, name, ctx, log):
        self.args, self.name, self.ctx, self.log = args, name, ctx, log
        self.writer = tensorboard_writer(args, name) if ctx.is_main else None

    def epoch(self, record, metrics, best_rank1, best_epoch):
        """record: epoch, lr, losses, train_seconds; metrics: the selection metrics or None."""
        epoch, lr, losses = record['epoch'], record['lr'], record['losses']
        if self.ctx.is_main:
            append_history(history_path(self.args.log_path, self.name),
                           {**record, 'metrics': metrics, 'time': time.time()})
        text = ' '.join(f'{name} {value:.4f}' for name, value in losses.items())
        line = f'{self.name} epoch {epoch} lr {lr:.4g} {text}'
        if metrics:
            line += (f' | {metrics["direction"]} Rank-1 {metrics["rank1"]:.2%} mAP {metrics["mAP"]:.2%}'
                     f' mINP {metrics["mINP"]:.2%} (best {best_rank1:.2%} @ {best_epoch})')
        self.log.info(line)
        if self.writer is not None:
            for name, value in losses.items():
                self.writer.add_scalar(f'train/{name}', value, epoch)
            self.writer.add_scalar('train/lr', lr, epoch)
            for name, value in (metrics or {}).items():
                if isinstance(value, float):
                    self.writer.add_scalar(f'test/{name}', value, epoch)
            self.writer.flush()


def tensorboard_writer(args, name):
    """A TensorBoard SummaryWriter under --log_path, or None without TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(os.path.join(args.log_path, 'tensorboard', name))


def call_hook(criterion, name, *args):
    """Call the criterion's optional per-epoch hook (start_epoch, end_epoch) when it has one."""
    hook = getattr(criterion, name, None)
    if callable(hook):
        hook(*args)


def run_network(method, args, num_classes, device, ctx):
    """The network a run trains, on its device (channels-last, SyncBatchNorm as asked)."""
    model = build_network(method, num_classes, args.dataset, pretrained=args.pretrained,
                          arch=args.arch, settings=method.network_settings(args))
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if ctx.enabled and args.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def wrapped_for_training(model, args, ctx, device):
    """The network as the steps call it: in DDP under torchrun, compiled with --compile."""
    if ctx.enabled:
        ids = [device.index] if device.type == 'cuda' else None
        model = DistributedDataParallel(model, device_ids=ids)
    return torch.compile(model) if args.compile else model


def training_data(args, parts, views, ctx, device, builds_cache, run):
    """(caches, loader, sampler, the loader's generator) of a run's training images, the caches
    of its sources' [SourceLists] (sources.training_lists) joined. builds_cache: whether this
    process builds the caches (rank 0, or the first process of each node when every node has its
    own --cache-dir); the others wait and read them. run: the Trainer, whose method may change
    the training labels (Method.training_caches: DART's label noise) and read each row's image
    index (Method.needs_indices)."""
    size = (args.img_w, args.img_h)
    caches = load_source_caches(args, parts, size, builds_cache, max(args.workers, 1),
                                lambda: ctx.enabled and dist.barrier())
    caches = run.method.training_caches(args, caches, run)
    dataset = CrossModalTrainSet(*caches, views, with_indices=run.method.needs_indices)
    sampler = IdentitySampler(caches[0][1], caches[1][1], args.batch_size, args.num_pos,
                              seed=args.seed, world_size=ctx.world_size, rank=ctx.rank)
    # its own generator: creating the workers draws nothing from the training process's RNG
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size * args.num_pos, sampler=sampler,
        num_workers=args.workers, pin_memory=device.type == 'cuda', drop_last=False,
        persistent_workers=False, generator=generator)
    return caches, loader, sampler, generator


def build_criterion(args, views):
    """The criterion of args.method for a sample of `views` (Method.build_criterion)."""
    return get_method(args.method).build_criterion(args, views)


def adp_settings(args):
    """The ADP triplet's loss.build_criterion arguments from the flags (AGW and CAJ)."""
    return agw.adp_settings(args)


def stem_batches(views, batch):
    """(visible images, infrared images, labels) of a loader batch (the images of each view,
    then the labels of each view, CrossModalTrainSet): the images of every view through a
    stem concatenated in view order, labels in the order [visible stem; infrared stem]."""
    images, labels = batch[:len(views)], batch[len(views):]
    by_stem = {stem: [i for i, view in enumerate(views) if view.stem == stem] for stem in MODALITIES}
    visible, infrared = (torch.cat([images[i] for i in by_stem[stem]]) for stem in MODALITIES)
    order = by_stem['visible'] + by_stem['infrared']
    return visible, infrared, torch.cat([labels[i] for i in order])


def stem_indices(views, batch):
    """The image index of each row of a loader batch that carries them (CrossModalTrainSet
    with_indices: after the labels), rows in stem_batches' order."""
    indices = batch[2 * len(views):]
    by_stem = {stem: [i for i, view in enumerate(views) if view.stem == stem] for stem in MODALITIES}
    return torch.cat([indices[i] for i in by_stem['visible'] + by_stem['infrared']])


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
                                              get_method(args.method).network_settings(args))
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
                selection = (f'best Rank-1 {best:.2%} at epoch {trainer.checkpoints.best_epoch}'
                             if trainer.checkpoints.best_epoch >= 0 else
                             f'no evaluation ({flag("eval_every")} {args.eval_every}): best = the '
                             f'final weights, epoch {args.epochs - 1}')
                logger.info(f'{name} done: {selection}; checkpoints {trainer.checkpoints.best_path}, '
                            f'{trainer.checkpoints.last_path}')
    except Interrupted:
        if ctx.is_main:
            hint = continue_hint(args, trainer.checkpoints.last_path)
            print(f'interrupted: saved {trainer.checkpoints.last_path}; {hint}', file=sys.stderr)
        return 130
    finally:
        if ctx.enabled and not joined and dist.is_initialized():
            dist.destroy_process_group()
    return 0

