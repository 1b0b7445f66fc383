"""Where a training run stands and how it goes on: what its checkpoints hold (weights, optimiser,
the criterion's state, the sampler's position, every process's random states, best and metrics),
writing them (never NaN weights), resuming one (after an epoch or inside it, on the same or
another process count) and naming the last good one."""
import os

import torch

from checks import check_resume_network, check_resume_state
from methods import get_method
from model import load_model_weights
from utils import (CHECKPOINT_FORMAT, __version__, flag, gathered, load_checkpoint, rng_state,
                   save_checkpoint)

# The flags an epoch's batch plan depends on (IdentitySampler.state_dict keys), besides the epoch
# and the training set: a change since a checkpoint was saved restarts its interrupted epoch.
PLAN_FLAGS = {'seed': flag('seed'), 'num_ids': flag('batch_size'), 'num_pos': flag('num_pos')}


class RunCheckpoints:
    """The `best` and `last` checkpoints of one training run and the position they record.

    `run` is the training run (training.Trainer): its args, ctx, log, model, optimizer, scaler,
    criterion, sampler, trial, num_classes and provenance are read when a checkpoint is written
    or resumed, so a checkpoint holds what trains. The position: best_rank1 / best_epoch, the
    epoch and global batch to start at, the random states and loss sums of an interrupted epoch
    (resumed_rng, resumed_progress), the history record whose evaluation is pending, and `saved`
    (path, epoch, global batch) of the last `last` this run wrote or resumed."""

    def __init__(self, run, best_path, last_path):
        self.run, self.best_path, self.last_path = run, best_path, last_path
        self.best_rank1, self.best_epoch = -1.0, -1
        self.start_epoch, self.start_batch = 0, 0
        self.resumed_rng = self.resumed_progress = self.pending_record = None
        self.interrupted = None  # where a resumed checkpoint stopped inside an epoch
        self.saved = None

    # -- writing ----------------------------------------------------------------------------
    def state(self, epoch, step, metrics=None, progress=None, pending=None):
        """The checkpoint after `step` global batches of `epoch` (step 0: after the whole epoch;
        one process trains one global batch per step, W processes W). Where the run stands:
        'epoch' / 'step', the sampler's position ('sampler': global batches consumed, with what
        the batch plan depends on) and every process's RNG states ('rng': world_size, ranks); the
        data pipeline's draws are functions of the sampler's position (IdentitySampler). Every
        process calls it (it gathers their RNG states). Mid-epoch, 'epoch_progress' holds
        the epoch's loss sums and counts so far; 'evaluation_pending' holds the history record
        of an epoch saved before its evaluation, which a resumed run evaluates first. 'criterion'
        holds the criterion's state (per-epoch weights, running sums, fixed projections);
        'sources' the datasets of a run on several (sources.recorded_sources), else None."""
        run, args = self.run, self.run.args
        position = (epoch, step) if step else (epoch + 1, 0)
        return {
            'format': CHECKPOINT_FORMAT, 'version': __version__,
            'dataset': args.dataset, 'method': args.method, 'arch': args.arch,
            'trial': int(run.trial),
            'num_classes': run.num_classes, 'img_h': args.img_h, 'img_w': args.img_w,
            'model': run.model.state_dict(), 'optimizer': run.optimizer.state_dict(),
            'scaler': run.scaler.state_dict(), 'criterion': criterion_state(run.criterion),
            'epoch': epoch, 'step': step,
            'sampler': run.sampler.state_dict(*position),
            'best_rank1': self.best_rank1, 'best_epoch': self.best_epoch,
            'rng': {'world_size': run.ctx.world_size, 'ranks': gathered(rng_state(), run.ctx)},
            'epoch_progress': progress, 'evaluation_pending': pending,
            'metrics': metrics or {}, 'args': plain_args(args),
            'sources': getattr(run, 'sources', None),  # a run on several datasets: each source
            'network': get_method(args.method).network_settings(args),
            'provenance': run.provenance,
        }

    def save(self, path, state, diverged):
        """Write a checkpoint (main process), never one holding NaN or infinite weights (then
        `diverged`, an exception class, is raised naming the last good checkpoint)."""
        if not finite_weights(self.run.model):
            raise diverged(f'the weights became NaN or infinite in epoch {state["epoch"]}; '
                           f'{self.last_good()}.')
        if self.run.ctx.is_main:
            save_checkpoint(state, path)
        if path == self.last_path:
            self.saved = (path, state['epoch'], state['step'])

    def last_good(self):
        """Which checkpoint a diverged run leaves, as a phrase."""
        if self.saved is not None:
            path, epoch, step = self.saved
            where = (f'after epoch {epoch}' if step == 0
                     else f'inside epoch {epoch}, after {step} global batch(es)')
            return f'the last good checkpoint is {path} ({where})'
        if os.path.isfile(self.last_path):
            return f'this run saved no checkpoint and left {self.last_path} as it was'
        return 'this run saved no checkpoint'

    # -- resuming ---------------------------------------------------------------------------
    def resume(self, path):
        """Load a checkpoint into the run: ours entirely (weights, optimiser, scaler, criterion,
        position), a released one's weights only (optimiser and schedule start fresh)."""
        run, args = self.run, self.run.args
        state = load_checkpoint(path)
        if state.get('format') != CHECKPOINT_FORMAT:  # released DEEN checkpoint: weights only
            load_model_weights(run.model, state.get('net', state))
            self.start_epoch = int(state.get('epoch', -1)) + 1
            run.log.info(f'initialised from released checkpoint {path}; optimiser and schedule '
                         f'start fresh at epoch {self.start_epoch}')
            return
        check_resume_state(state, path, args, run.num_classes)
        check_resume_network(state, path, args)
        load_model_weights(run.model, state['model'])
        run.optimizer.load_state_dict(state['optimizer'])
        run.scaler.load_state_dict(state['scaler'])
        load_criterion_state(run.criterion, state.get('criterion'))
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
        run.log.info(f'resumed {path} ({where})')
        if self.start_epoch >= args.epochs and not self.pending_record:
            run.log.info(f'{path} has trained the {self.start_epoch} epoch(s) that '
                         f'{flag("epochs")} {args.epochs} asks for: nothing left to train')

    def continue_epoch(self):
        """Continue the interrupted epoch of a resumed checkpoint at the global batch it reached
        (once the run's sampler exists). The same process count also continues each process's
        random states, bit-exact; another count continues the batch plan exactly, but each
        process reseeds its own random stream (the dropout of the network), since the old
        processes' streams cannot be split or merged. A changed plan (--batch-size, --num_pos,
        --seed, the training set) restarts the epoch. Anything but an exact continuation is said
        in one line."""
        saved, run = self.interrupted, self.run
        if saved is None:
            return
        epoch, then = self.start_epoch, saved['sampler']
        now = run.sampler.state_dict(epoch, 0)
        changed = [f'{name} ({then.get(key)} -> {now[key]})' for key, name in PLAN_FLAGS.items()
                   if then.get(key) != now[key]]
        if not changed and then.get('batches_per_epoch') != now['batches_per_epoch']:
            changed = [f'the training set ({then.get("batches_per_epoch")} -> '
                       f'{now["batches_per_epoch"]} batches per epoch)']
        if 'batch' not in then or changed:
            why = (', '.join(changed) + ' changed' if changed
                   else 'the checkpoint does not record its position as global batches')
            run.log.info(f'epoch {epoch} restarts from its first batch: {why} since '
                         f'{saved["path"]} was saved, so its interrupted part cannot be continued '
                         f'exactly.')
            return
        world, before = run.ctx.world_size, then['world_size']
        self.start_batch, self.resumed_progress = then['batch'], saved['progress']
        states = saved['rng'].get('ranks', [])
        if before == world and len(states) == world:
            self.resumed_rng = states[run.ctx.rank]
            return
        where = f'epoch {epoch} continues at global batch {self.start_batch} of {run.sampler.batches}'
        if before == world:  # a checkpoint without every process's random states
            run.log.info(f'{where}; {saved["path"]} holds no random states of its {world} '
                         f'processes, so each process reseeds from (seed, epoch, rank, batch).')
            return
        args = run.args
        steps = max(0, -(-(run.epoch_end() - self.start_batch) // world))
        run.log.info(
            f'{where} on {world} process(es) instead of the {before} that saved it: {steps} '
            f'step(s) left, each process {args.batch_size}x{args.num_pos} images per '
            f'modality (a global batch of {args.batch_size * world} identities, was '
            f'{args.batch_size * before}); the network\'s random state (dropout, one per '
            f'process) cannot carry over to another process count, so each process reseeds from '
            f'(seed, epoch, rank, batch).')


def criterion_state(criterion):
    """The state a criterion carries across steps and epochs (an nn.Module's state_dict), or
    None for a stateless one."""
    state_dict = getattr(criterion, 'state_dict', None)
    return state_dict() if callable(state_dict) else None


def load_criterion_state(criterion, state):
    """Restore what criterion_state saved (nothing for a stateless criterion or checkpoints
    written before criteria had state)."""
    if state and callable(getattr(criterion, 'load_state_dict', None)):
        criterion.load_state_dict(state)


def plain_args(args):
    """The arguments as JSON-able, weights-only-loadable values."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def finite_weights(model):
    """Whether every floating-point weight and buffer of model is finite."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
