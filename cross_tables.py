"""reproduce.py --table cross-dataset and --table transfer: generalisation to an unseen dataset.
cross-dataset: L2RW's three leave-one-out protocols (train on two of RegDB, SYSU-MM01 and LLCM,
test on the third); transfer: train on each dataset alone and test on each (the 3x3 matrix, the
diagonal in-domain). Every training takes --recipe l2rw (unless the flags say otherwise) and is
tested from its final weights; the plan is resumable (finished trainings and tests are skipped),
--dry-run lists it, --report compares what is done with L2RW's numbers and draws the matrix."""
import json
import os
from dataclasses import dataclass, field

import torch.distributed as dist

import figures
import training
from data_manager import DEFAULT_DATA_PATHS, SOURCE_ORDER, dataset_facts
from evaluation import parse_test_args, read_results, run_test
from paper_results import (L2RW_PUBLISHED, LEAVE_ONE_OUT, TRANSFER_SETTINGS,
                           cross_dataset_markdown, transfer_markdown, transfer_numbers)
from plan_steps import announce, train_unfinished
from utils import UserError, setup_runtime

TABLES = ('cross-dataset', 'transfer')
# train.py flags these tables set for each training themselves, and what to use instead
SET_BY_TABLES = {'--data-path': '--roots', '--cache-dir': '--roots (each root holds its cache)',
                 '--sources': '--table', '--eval-dataset': 'nothing (no target is evaluated)'}


def add_table_args(group):
    """reproduce.py's --roots: the dataset roots of these tables."""
    group.add_argument('--roots', nargs='+', metavar='NAME:PATH', default=[],
                       help='--table cross-dataset / transfer: the roots of regdb, sysu and llcm '
                       '(default: data/<name>)')


def check_args(args, train_flags):
    """The flags of these tables: no --dataset, --trials or --sweep, none of SET_BY_TABLES among
    the train.py flags; --roots parsed into args.root_of."""
    for name, dest in (('--dataset', 'dataset'), ('--trials', 'trials'), ('--sweep', 'sweep')):
        if getattr(args, dest):
            raise UserError(f'--table {args.table} runs every dataset (RegDB split 1) itself; '
                            f'drop {name}.')
    for given in train_flags:
        name = given.split('=', 1)[0]
        if name in SET_BY_TABLES:
            raise UserError(f'--table {args.table} sets {name} for each training itself; use '
                            f'{SET_BY_TABLES[name]} instead.')
    args.root_of = {name: path for name, path in
                    (root_value(text) for text in args.roots)}


def root_value(text):
    """(name, path) of a --roots NAME:PATH value."""
    name, _, path = text.partition(':')
    if name not in SOURCE_ORDER or not path:
        raise UserError(f'--roots {text}: expected NAME:PATH with NAME one of '
                        f'{", ".join(SOURCE_ORDER)}.')
    return name, path


# ----------------------------------------------------------------------------------------------
# The plan: trainings, each with the tests of its targets

@dataclass
class Training:
    """One training on `sources` (one dataset or several) and its tests on `targets`."""
    sources: tuple
    targets: tuple
    method: str                # a training.RECIPES name
    seed: int
    folder: str
    roots: dict
    train_flags: list
    label: str
    train_args: object = field(default=None, repr=False)

    def __post_init__(self):
        self.train_args = training.parse_args(self.train_argv())

    def root(self, name):
        return self.roots[name]

    def train_argv(self, resume=False):
        method, recipe_flags = training.RECIPES[self.method]
        if len(self.sources) > 1:
            data = ['--sources', *[f'{name}:{self.root(name)}' for name in self.sources]]
        else:
            data = ['--dataset', self.sources[0], '--data-path', self.root(self.sources[0])]
        return ['--recipe', 'l2rw', *recipe_flags, *self.train_flags, *data, '--method', method,
                '--seed', str(self.seed), '--trial', '1',
                '--model_path', os.path.join(self.folder, 'save_model'),
                '--log_path', os.path.join(self.folder, 'log'),
                *(['--resume', 'last'] if resume else [])]

    @property
    def name(self):
        return training.run_name(self.train_args, 1)

    def checkpoint(self, which):
        return os.path.join(self.train_args.model_path, f'{self.name}_{which}.pth')

    @property
    def history(self):
        return training.history_path(self.train_args.log_path, self.name)

    def results(self, target):
        return os.path.join(self.folder, 'results', f'{self.name}_on_{target}_test.json')

    def test_argv(self, target):
        """test.py's arguments on one target: the final weights ('best' of a run without
        evaluation); another dataset's protocol with --cross-dataset (RegDB: its ten splits with
        the one model), the training's own (RegDB: its split 1) on the diagonal."""
        args = self.train_args
        cross = target not in self.sources or len(self.sources) > 1
        trial = 'all' if target != 'regdb' or cross else '1'
        argv = ['--dataset', target, '--data-path', self.root(target),
                '--resume', self.checkpoint('best'), '--output', self.results(target),
                '--trial', trial, '--workers', str(args.workers), '--test-batch',
                str(args.test_batch), '--amp', args.amp]
        argv += ['--cross-dataset'] if cross else []
        argv += ['--mode', 'all'] if target == 'sysu' else []
        argv += ['--device', args.device] if args.device else []
        return argv + (['--gpu', str(args.gpu)] if args.gpu is not None else [])


def make_plan(args):
    """Every training of the table for each seed, in order."""
    roots = {name: args.root_of.get(name, DEFAULT_DATA_PATHS[name]) for name in SOURCE_ORDER}
    plan = []
    if args.table == 'cross-dataset':
        groups = [(protocol, sources, (target,)) for protocol, (sources, target)
                  in LEAVE_ONE_OUT.items()]
    else:
        groups = [(name, (name,), SOURCE_ORDER) for name in SOURCE_ORDER]
    for label, sources, targets in groups:
        for seed in args.seeds:
            folder = os.path.join(args.out, args.table, args.method,
                                  '+'.join(sources), f'seed{seed}')
            plan.append(Training(tuple(sources), tuple(targets), args.method, seed, folder, roots,
                                 list(args.train_flags), label))
    return plan


@dataclass
class Status:
    epochs_done: int
    epochs: int
    finished: bool
    resumable: bool
    tested: dict               # target -> whether its results file is of the final checkpoint

    @property
    def done(self):
        return self.finished and all(self.tested.values())

    def describe(self):
        if self.done:
            return 'done'
        left = [target for target, done in self.tested.items() if not done]
        if self.finished:
            return f'trained; test on {", ".join(left)} to run'
        if self.resumable:
            return (f'resume training after {self.epochs_done} of {self.epochs} epochs, then '
                    f'test on {", ".join(left)}')
        return f'train, then test on {", ".join(left)}'


def training_status(run):
    """Where a training and its tests stand, from their files."""
    from reproduce import epochs_trained
    best, last = run.checkpoint('best'), run.checkpoint('last')
    done = epochs_trained(run.history, last)
    finished = done >= run.train_args.epochs and os.path.isfile(best)
    return Status(done, run.train_args.epochs, finished, os.path.isfile(last),
                  {target: finished and tested(run.results(target), best)
                   for target in run.targets})


def tested(results, checkpoint):
    """Whether results is a results file of checkpoint, written after it."""
    record = read_results(results)
    return (record is not None
            and os.path.abspath(record['checkpoint']) == os.path.abspath(checkpoint)
            and os.path.getmtime(results) >= os.path.getmtime(checkpoint))


def format_plan(plan, statuses):
    done = sum(status.done for status in statuses)
    lines = [f'plan: {len(plan)} training(s), {sum(len(r.targets) for r in plan)} test(s); '
             f'{done} training(s) done with their tests, {len(plan) - done} to run']
    for number, (run, status) in enumerate(zip(plan, statuses), 1):
        lines += [f'[{number}/{len(plan)}] {run.label} {run.method} seed {run.seed}: '
                  f'{status.describe()}',
                  f'      trains  {" ".join(run.train_argv())}',
                  f'      checkpoint {run.checkpoint("best")} (last: {run.checkpoint("last")})']
        lines += [f'      test on {target}: {run.results(target)}' for target in run.targets]
    return '\n'.join(lines)


# ----------------------------------------------------------------------------------------------
# Running and reporting

def run_plan(plan, statuses, device, ctx):
    """Train and test what is not done; returns 0, or training.main's code when interrupted."""
    for number, (run, status) in enumerate(zip(plan, statuses), 1):
        header = f'[{number}/{len(plan)}] {run.label} {run.method} seed {run.seed}'
        if status.done:
            announce(ctx, f'{header}: done, skipped')
            continue
        code = train_unfinished(run, status, header, ctx)
        if code != 0:
            return code
        for target in run.targets:
            if not (status.finished and status.tested[target]):
                announce(ctx, f'{header}: testing on {target}')
                run_test(parse_test_args(run.test_argv(target)), device, ctx)
    return 0


def finished_records(plan, statuses, sources, target):
    """The results records of the finished tests on target of the trainings on sources."""
    return [read_results(run.results(target)) for run, status in zip(plan, statuses)
            if run.sources == tuple(sources) and status.finished and status.tested[target]]


def report(args, plan, statuses):
    """Write (and print) the table's Markdown and JSON into --out/<table>; the transfer matrix
    also as a figure. Returns the paths written."""
    folder = os.path.join(args.out, args.table)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f'{args.method}_{args.table.replace("-", "_")}')
    if args.table == 'cross-dataset':
        rows = []
        for protocol, (sources, target) in LEAVE_ONE_OUT.items():
            records = finished_records(plan, statuses, sources, target)
            rows.append({'protocol': protocol, 'sources': list(sources), 'target': target,
                         'setting': TRANSFER_SETTINGS[target],
                         'seeds': [run.seed for run, status in zip(plan, statuses)
                                   if run.sources == tuple(sources) and status.done],
                         'ours': transfer_numbers(records, TRANSFER_SETTINGS[target], args.fusion),
                         'published': L2RW_PUBLISHED.get((args.method, protocol))})
        numbers = {'table': args.table, 'method': args.method, 'fusion': args.fusion,
                   'units': '%', 'rows': rows}
        markdown = cross_dataset_markdown(args.method, rows, args.fusion)
    else:
        numbers = transfer_matrix(args, plan, statuses)
        markdown = transfer_markdown(args.method, numbers)
    with open(stem + '.md', 'w') as handle:
        handle.write(markdown)
    with open(stem + '.json', 'w') as handle:
        json.dump(numbers, handle, indent=2)
    written = [stem + '.md', stem + '.json']
    print('\n' + markdown)
    if args.table == 'transfer':
        width, height = figures.draw_transfer(numbers, stem + '.png')
        written.append(f'{stem}.png ({width}x{height})')
    print('written to ' + ', '.join(written))
    return written


def transfer_matrix(args, plan, statuses):
    """The matrix's numbers: a row per training dataset, a cell per target ({Rank-1, mAP} in %,
    the mean over trials and seeds; None where no test is done)."""
    cells = [[transfer_numbers(finished_records(plan, statuses, (source,), target),
                               TRANSFER_SETTINGS[target], args.fusion) for target in SOURCE_ORDER]
             for source in SOURCE_ORDER]
    titles = [dataset_facts(name).title for name in SOURCE_ORDER]
    return {'table': 'transfer', 'method': args.method, 'fusion': args.fusion, 'units': '%',
            'sources': list(SOURCE_ORDER), 'targets': list(SOURCE_ORDER),
            'source_titles': titles, 'target_titles': titles,
            'settings': TRANSFER_SETTINGS, 'seeds': list(args.seeds), 'cells': cells}


def main(args):
    """reproduce.py's run of --table cross-dataset | transfer (arguments parsed)."""
    plan = make_plan(args)
    device, ctx = setup_runtime(plan[0].train_args)
    try:
        statuses = [training_status(run) for run in plan]
        if ctx.is_main and (args.dry_run or not args.report):
            print(format_plan(plan, statuses), flush=True)
        if args.dry_run:
            return 0
        if not args.report:
            code = run_plan(plan, statuses, device, ctx)
            if code != 0:
                return code
            statuses = [training_status(run) for run in plan]
        if ctx.is_main:
            report(args, plan, statuses)
    finally:
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0
