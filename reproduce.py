"""Reproduce a paper table with one command: every training and test the dataset's table needs
(RegDB: the ten splits, each tested in both directions with its own model; SYSU-MM01: all and
indoor search; LLCM: both directions and the released variant), for each seed, through the same
functions as train.py and test.py. Re-running skips finished parts and resumes an interrupted
training from `last`; at the end (or with --report at any time) the published numbers are
printed beside ours and written as Markdown and JSON."""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch.distributed as dist

import training
from data_manager import DATASETS, dataset_facts
from evaluation import parse_test_args, read_results, run_test
from inference import FUSIONS
from paper_results import compare, comparison_markdown, write_comparison
from utils import UserError, load_checkpoint, run_main, setup_runtime

TABLE_DATASETS = ('sysu', 'regdb', 'llcm')  # what --dataset all runs
# train.py flags that reproduce.py sets for each part, and what to use instead
CONTROLLED = {'--dataset': '--dataset', '--method': '--method', '--seed': '--seeds',
              '--trial': '--trials', '--resume': 're-running the same command',
              '--model_path': '--out', '--log_path': '--out'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, allow_abbrev=False,
        epilog='Every other flag is a train.py flag passed to each training (e.g. --epochs, '
               '--data-path, --amp bf16); its runtime flags (--device, --gpu, --workers, '
               '--test-batch, --amp, --channels-last, --compile, --deterministic) also go to '
               'each test. Under torchrun the trainings and tests run distributed.')
    parser.add_argument('--dataset', required=True, choices=(*DATASETS, 'all'),
                        help='the table to reproduce; all = SYSU-MM01, RegDB and LLCM')
    parser.add_argument('--method', default='deen', choices=tuple(training.RECIPES),
                        help='the row to reproduce: a method\'s released recipe (deen, agw, '
                        'caj), or agw-plain, AGW without random erasing (the DEEN paper\'s AGW; '
                        'agw is its AGW*)')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0],
                        help='training seeds; with several, ours is the mean over all of them')
    parser.add_argument('--trials', type=int, nargs='+',
                        help='RegDB splits to run (default: all ten)')
    parser.add_argument('--out', default=os.path.join('runs', 'reproduce'),
                        help='folder of the checkpoints, logs, results files and comparisons')
    parser.add_argument('--fusion', default='pool+feat', choices=tuple(FUSIONS),
                        help='the fusion compared with the published numbers')
    parser.add_argument('--dry-run', action='store_true',
                        help='print the plan (every part, its files, whether it is done) and stop')
    parser.add_argument('--report', action='store_true',
                        help='print and write the comparison from the finished parts, run nothing')
    args, train_flags = parser.parse_known_args(argv)
    check_args(args, train_flags)
    args.train_flags = train_flags
    return args


def check_args(args, train_flags):
    for flag in train_flags:
        name = flag.split('=', 1)[0]
        if name in CONTROLLED:
            raise UserError(f'reproduce.py sets {name} for each part itself; use '
                            f'{CONTROLLED[name]} instead.')
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f'--seeds must be distinct, got {" ".join(map(str, args.seeds))}.')
    splits = dataset_facts('regdb').trials
    if args.trials is not None:
        if args.dataset not in ('regdb', 'all'):
            raise UserError('--trials selects RegDB splits; use it with --dataset regdb or all.')
        if len(set(args.trials)) != len(args.trials) or not set(args.trials) <= set(splits):
            raise UserError(f'--trials must be distinct RegDB splits {splits.start}..'
                            f'{splits.stop - 1}, got {" ".join(map(str, args.trials))}.')
    if args.dataset == 'all' and any(f.split('=', 1)[0] in ('--data-path', '--cache-dir')
                                     for f in train_flags):
        raise UserError('--dataset all uses each dataset\'s default folder (data/SYSU-MM01, '
                        'data/RegDB, data/LLCM); run one --dataset at a time to pass --data-path.')


# ----------------------------------------------------------------------------------------------
# The plan

@dataclass
class Part:
    """One training (dataset, method, seed, RegDB split) and the test of its best checkpoint;
    method is a training.RECIPES name."""
    dataset: str
    method: str
    seed: int
    trial: int                 # RegDB split (1 elsewhere, as train.py)
    folder: str                # holds save_model/, log/ and results/ of the seed
    train_flags: list
    train_args: argparse.Namespace = None  # train.py's resolved arguments (a bad flag stops here)

    def __post_init__(self):
        self.train_args = training.parse_args(self.train_argv())

    @property
    def label(self):
        split = f' split {self.trial}' if self.dataset == 'regdb' else ''
        return f'{self.dataset} {self.method} seed {self.seed}{split}'

    def train_argv(self, resume=False):
        method, recipe_flags = training.RECIPES[self.method]
        return [*recipe_flags, *self.train_flags, '--dataset', self.dataset, '--method', method,
                '--seed', str(self.seed), '--trial', str(self.trial),
                '--model_path', os.path.join(self.folder, 'save_model'),
                '--log_path', os.path.join(self.folder, 'log'),
                *(['--resume', 'last'] if resume else [])]

    @property
    def name(self):
        return training.run_name(self.train_args, self.trial)

    def checkpoint(self, which):
        return os.path.join(self.train_args.model_path, f'{self.name}_{which}.pth')

    @property
    def results(self):
        return os.path.join(self.folder, 'results', f'{self.name}_test.json')

    @property
    def history(self):
        return training.history_path(self.train_args.log_path, self.name)

    def test_argv(self):
        """test.py's arguments for the best checkpoint, with the training's runtime flags."""
        args = self.train_args
        argv = ['--dataset', args.dataset, '--data-path', args.data_path,
                '--resume', self.checkpoint('best'), '--output', self.results,
                '--trial', str(self.trial) if self.dataset == 'regdb' else 'all',
                '--workers', str(args.workers), '--test-batch', str(args.test_batch),
                '--amp', args.amp]
        argv += ['--device', args.device] if args.device else []
        argv += ['--gpu', str(args.gpu)] if args.gpu is not None else []
        return argv + [f'--{flag.replace("_", "-")}' for flag in
                       ('channels_last', 'compile', 'deterministic') if getattr(args, flag)]


def make_plan(args):
    """Every part of the requested table(s), in the order they run."""
    datasets = TABLE_DATASETS if args.dataset == 'all' else (args.dataset,)
    plan = []
    for dataset in datasets:
        trials = (args.trials or list(dataset_facts('regdb').trials)) if dataset == 'regdb' else [1]
        for seed in args.seeds:
            folder = os.path.join(args.out, f'{dataset}_{args.method}', f'seed{seed}')
            plan += [Part(dataset, args.method, seed, trial, folder, args.train_flags)
                     for trial in trials]
    return plan


@dataclass
class Status:
    epochs_done: int     # completed training epochs (from the history, else the last checkpoint)
    epochs: int          # epochs the training runs
    finished: bool       # trained to the end, best checkpoint written
    resumable: bool      # a `last` checkpoint exists
    tested: bool         # a results file of the current best checkpoint exists

    @property
    def done(self):
        return self.finished and self.tested

    def describe(self):
        if self.done:
            return 'done'
        if self.finished:
            return 'trained; test to run'
        if self.resumable:
            return f'resume training after {self.epochs_done} of {self.epochs} epochs, then test'
        return 'train and test'


def part_status(part):
    """Where a part stands, from its files."""
    best, last = part.checkpoint('best'), part.checkpoint('last')
    epochs = part.train_args.epochs
    done = epochs_trained(part.history, last)
    finished = done >= epochs and os.path.isfile(best)
    record = read_results(part.results)
    tested = (finished and record is not None and
              os.path.abspath(record['checkpoint']) == os.path.abspath(best) and
              os.path.getmtime(part.results) >= os.path.getmtime(best))
    return Status(done, epochs, finished, os.path.isfile(last), tested)


def epochs_trained(history, last):
    """Completed epochs: one more than the last epoch in the training history, or, without a
    history, what the `last` checkpoint records (0 when neither exists)."""
    epochs = -1
    if os.path.isfile(history):
        with open(history) as handle:
            for line in handle:
                try:
                    epochs = max(epochs, int(json.loads(line)['epoch']))
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a crash
        return epochs + 1
    if os.path.isfile(last):
        state = load_checkpoint(last)
        return int(state['epoch']) + (1 if state['step'] == 0 else 0)
    return 0


def format_plan(plan, statuses):
    done = sum(status.done for status in statuses)
    lines = [f'plan: {len(plan)} part(s), {done} done, {len(plan) - done} to run']
    for number, (part, status) in enumerate(zip(plan, statuses), 1):
        lines += [f'[{number}/{len(plan)}] {part.label}: {status.describe()}',
                  f'      checkpoint {part.checkpoint("best")} (last: {part.checkpoint("last")})',
                  f'      results    {part.results}']
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Running and reporting

def run_plan(plan, statuses, device, ctx):
    """Train and test every part not done; returns 0, or training.main's code when a training
    was interrupted (130)."""
    for number, (part, status) in enumerate(zip(plan, statuses), 1):
        header = f'[{number}/{len(plan)}] {part.label}'
        if status.done:
            announce(ctx, f'{header}: done, skipped')
            continue
        if not status.finished:
            resume = f', resumed after {status.epochs_done} done' if status.resumable else ''
            announce(ctx, f'{header}: training ({status.epochs} epochs{resume})')
            code = training.main(part.train_argv(resume=status.resumable))
            if code != 0:
                announce(ctx, f'{header}: training interrupted; run the same reproduce.py command '
                              f'again to continue from {part.checkpoint("last")}')
                return code
        announce(ctx, f'{header}: testing {part.checkpoint("best")}')
        run_test(parse_test_args(part.test_argv()), device, ctx)
    return 0


def announce(ctx, text):
    if ctx.is_main:
        print(f'\n==> {text}', flush=True)


def report(args, plan, statuses):
    """Compare every dataset and method of the plan with the published numbers from its finished
    parts; print the Markdown and write it with the JSON into --out."""
    groups = {}
    for part, status in zip(plan, statuses):
        groups.setdefault((part.dataset, part.method), []).append((part, status))
    for (dataset, method), parts in groups.items():
        done = [(part.seed, read_results(part.results)) for part, status in parts if status.done]
        missing = [f'{part.label} ({status.describe()})' for part, status in parts
                   if not status.done]
        if not done:
            print(f'\n{dataset} {method}: no part done yet ({len(missing)} to run).')
            continue
        comparison = compare(dataset, method, args.fusion, done, missing)
        markdown, data = write_comparison(comparison, args.out)
        print('\n' + comparison_markdown(comparison))
        print(f'written to {markdown} and {data}')


def shared_statuses(plan, ctx):
    """The statuses of the plan as the main process sees them, on every process."""
    statuses = [part_status(part) for part in plan] if ctx.is_main else None
    if ctx.enabled:
        box = [statuses]
        dist.broadcast_object_list(box, src=0)
        statuses = box[0]
    return statuses


def main(argv=None):
    args = parse_args(argv)
    plan = make_plan(args)
    device, ctx = setup_runtime(plan[0].train_args)
    try:
        statuses = shared_statuses(plan, ctx)
        if ctx.is_main and (args.dry_run or not args.report):
            print(format_plan(plan, statuses), flush=True)
        if args.dry_run:
            return 0
        if not args.report:
            code = run_plan(plan, statuses, device, ctx)
            if code != 0:
                return code
            statuses = shared_statuses(plan, ctx)
        if ctx.is_main:
            report(args, plan, statuses)
    finally:
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
