"""Reproduce a paper table with one command: every training and test the dataset's table needs
(RegDB: the ten splits, each tested in both directions with its own model; SYSU-MM01: all and
indoor search; LLCM: both directions and the released variant), for each seed, through the same
functions as train.py and test.py; --table benchmark: every method's row of the LLCM benchmark.
Re-running skips finished parts and resumes an interrupted training from `last`; at the end (or
with --report at any time) the published numbers are printed beside ours and written as Markdown
and JSON."""
import argparse
import json
import os
import sys
from dataclasses import dataclass

import torch.distributed as dist

import corruption_report
import cross_tables
import figures
import training
from data_manager import DATASETS, dataset_facts
from evaluation import parse_test_args, read_results, run_test
from methods import METHODS, fusion_names, get_method
from paper_results import (ABLATION_SETTINGS, ABLATION_TABLE_DATASETS, ABLATION_TABLES,
                           BENCHMARK_PUBLISHED_AS, BENCHMARK_ROWS, SWEEP_CHOICES,
                           ablation_markdown, ablation_numbers, ablation_published,
                           benchmark_dataset_rows, benchmark_figure_numbers, benchmark_markdown,
                           benchmark_published, benchmark_settings, compare, comparison_markdown,
                           write_comparison)
from plan_steps import announce, train_unfinished
from utils import UserError, flag, load_checkpoint, manual_parser, run_main, setup_runtime

TABLE_DATASETS = ('sysu', 'regdb', 'llcm')  # what --dataset all runs
# train.py flags that reproduce.py sets for each part, and what to use instead
CONTROLLED = {'--dataset': '--dataset', '--method': '--method', '--seed': '--seeds',
              '--trial': '--trials', '--resume': 're-running the same command',
              '--model_path': '--out', '--log_path': '--out', '--sources': '--table cross-dataset',
              '--eval-dataset': '--table cross-dataset'}


def build_parser():
    """reproduce.py's own flags (its --help); every other flag is train.py's (EXTRA_PARSERS)."""
    parser = manual_parser(
        __doc__, allow_abbrev=False,
        epilog='Every other flag is a train.py flag passed to each training (e.g. --epochs, '
               '--data-path, --amp bf16); its runtime flags (--device, --gpu, --workers, '
               '--test-batch, --amp, --channels-last, --compile, --deterministic) also go to '
               'each test. Under torchrun the trainings and tests run distributed.')
    table = parser.add_argument_group('the table')
    table.add_argument('--dataset', choices=(*DATASETS, 'all'),
                       help='the table to reproduce; all = SYSU-MM01, RegDB and LLCM (with --table '
                       'or --sweep: narrows the datasets they run on)')
    table.add_argument('--table', default='main',
                       choices=('main', 'benchmark', *ABLATION_TABLES, 'robustness',
                                *cross_tables.TABLES),
                       help='main: the results table of --dataset; benchmark: the LLCM benchmark '
                       '(the paper\'s Table 3), every method\'s row on LLCM (--dataset sysu, '
                       'regdb: the rows that publish numbers there); components, dee-stage, '
                       'branches, attention: Tables 4-7 of the paper, every row on LLCM and '
                       'SYSU-MM01 (--dataset narrows); robustness: the main table\'s checkpoints '
                       'also tested on corrupted images (CIL\'s mixed set and the corruption x '
                       'severity grid; docs/reproducing.md); cross-dataset: train on two datasets, '
                       'test on the third (L2RW); transfer: train on each, test on each (any '
                       '--method)')
    table.add_argument('--sweep', nargs='+', metavar=('FLAG', 'VALUE'),
                       help='FLAG V1 V2 ...: one training per value of a numeric train.py flag '
                       '(e.g. lambda_1 0.2 0.4 0.6 0.8 1.0) on LLCM (--dataset: another), a figure '
                       'of Rank-1 and mAP against the value and its JSON')
    table.add_argument('--method', choices=tuple(training.RECIPES),
                       help='the row to reproduce (default: deen): a method\'s released recipe '
                       f'({", ".join(METHODS)}), or agw-plain, AGW without random erasing (the '
                       'DEEN paper\'s AGW; agw is its AGW*)')
    table.add_argument('--fusion', choices=fusion_names(),
                       help='the fusion compared with the published numbers, one the method '
                       'reports (default: its headline, DEEN\'s pool+feat; pool, feat: the '
                       'pooled or BNNeck feature alone, which test.py reports for CAJ)')
    runs = parser.add_argument_group('runs')
    runs.add_argument('--seeds', type=int, nargs='+', default=[0],
                      help='training seeds; with several, ours is the mean over all of them')
    runs.add_argument('--trials', type=int, nargs='+',
                      help='RegDB splits to run (default: all ten)')
    cross_tables.add_table_args(runs)
    output = parser.add_argument_group('output')
    output.add_argument('--out', default=os.path.join('runs', 'reproduce'),
                        help='folder of the checkpoints, logs, results files and comparisons')
    output.add_argument('--dry-run', action='store_true',
                        help='print the plan (every part, its files, whether it is done) and stop')
    output.add_argument('--report', action='store_true',
                        help='print and write the comparison from the finished parts, run nothing')
    return parser


# The parsers of the flags reproduce.py passes on: every other flag is train.py's.
EXTRA_PARSERS = (training.build_parser,)


def parse_args(argv=None):
    args, train_flags = build_parser().parse_known_args(argv)
    check_benchmark_args(args)
    args.method = args.method or 'deen'
    if args.table in cross_tables.TABLES:
        cross_tables.check_args(args, train_flags)
    else:
        check_ablation_args(args, train_flags)
    check_args(args, train_flags)
    args.train_flags = train_flags
    return args


def check_args(args, train_flags):
    for given in train_flags:
        name = given.split('=', 1)[0]
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
    method = get_method(training.RECIPES[args.method][0])
    args.fusion = args.fusion or method.headline
    if args.fusion not in method.fusions:
        owners = [m for m in METHODS.values() if args.fusion in m.fusions]
        raise UserError(f'--fusion {args.fusion} is reported for '
                        f'{" and ".join(m.title for m in owners)} only; use --method '
                        f'{" or ".join(m.name for m in owners)} or --fusion '
                        f'{" or ".join(method.fusions)}.')
    if args.table == 'main' and not args.sweep and args.dataset is None:
        raise UserError('reproduce.py needs --dataset (or --table / --sweep).')
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
    row: str = ''              # the row of an ablation table or sweep ('' for the main table)

    def __post_init__(self):
        self.train_args = training.parse_args(self.train_argv())

    @property
    def label(self):
        split = f' split {self.trial}' if self.dataset == 'regdb' else ''
        row = f' [{self.row}]' if self.row else ''
        return f'{self.dataset} {self.method}{row} seed {self.seed}{split}'

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
        argv += ['--released-routing'] if self.dataset == 'regdb' else []  # the paper's numbers
        argv += ['--device', args.device] if args.device else []
        argv += ['--gpu', str(args.gpu)] if args.gpu is not None else []
        return argv + [f'--{flag.replace("_", "-")}' for flag in
                       ('channels_last', 'compile', 'deterministic') if getattr(args, flag)]


def make_plan(args):
    """Every part of the requested table(s), in the order they run."""
    if args.table == 'benchmark':
        return benchmark_plan(args)
    if args.table not in ('main', 'robustness') or args.sweep:
        return ablation_plan(args)
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
        resumed = f', resumed after {status.epochs_done} done' if status.resumable else ''
        code = train_unfinished(part, status, header, ctx, resumed)
        if code != 0:
            return code
        announce(ctx, f'{header}: testing {part.checkpoint("best")}')
        run_test(parse_test_args(part.test_argv()), device, ctx)
    return 0


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
    if args.table in cross_tables.TABLES:
        return cross_tables.main(args)
    plan = make_plan(args)
    device, ctx = setup_runtime(plan[0].train_args)
    try:
        statuses = shared_statuses(plan, ctx)
        robustness = args.table == 'robustness'
        if ctx.is_main and (args.dry_run or not args.report):
            print(format_plan(plan, statuses), flush=True)
            if args.table == 'benchmark':
                print('\n'.join(benchmark_absent_rows(args)), flush=True)
            if robustness:
                print(corruption_report.format_tests(plan), flush=True)
        if args.dry_run:
            return 0
        if not args.report:
            code = run_plan(plan, statuses, device, ctx)
            if code != 0:
                return code
            if robustness:
                corruption_report.run_tests(args, plan, device, ctx)
            statuses = shared_statuses(plan, ctx)
        if ctx.is_main:
            reporters = {'main': report, 'benchmark': benchmark_report,
                         'robustness': corruption_report.report}
            reporter = None if args.sweep else reporters.get(args.table)
            (reporter or ablation_report)(args, plan, statuses)
    finally:
        if ctx.enabled and dist.is_initialized():
            dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------
# Ablation tables and parameter sweeps (--table, --sweep)

def check_ablation_args(args, train_flags):
    """--table / --sweep: one of them, DEEN, datasets the paper's tables use (or the demo), no
    train.py flag that a row sets itself, and a sweep over a numeric train.py flag."""
    if args.table == 'robustness':
        return corruption_report.check_args(args)
    if args.table in ('main', 'benchmark') and not args.sweep:
        return
    if args.table != 'main' and args.sweep:
        raise UserError('--table and --sweep run different plans; pass one of them.')
    if args.method != 'deen':
        raise UserError(f'--table and --sweep switch DEEN\'s parts; use --method deen, not '
                        f'{args.method}.')
    if args.dataset not in (None, 'all', *ABLATION_SETTINGS):
        raise UserError(f'the ablations were run on LLCM and SYSU-MM01; use --dataset '
                        f'{", ".join(ABLATION_SETTINGS)} or all, not {args.dataset}.')
    if args.sweep:
        args.sweep_dest = sweep_dest(args.sweep)
        if len(args.sweep) < 2:
            raise UserError('--sweep needs a train.py flag and at least one value, e.g. --sweep '
                            'lambda_1 0.2 0.4 0.6 0.8 1.0.')
    set_by_rows = {name for flags in ablation_rows(args).values() for name in flags[::2]}
    given = sorted({f.split('=', 1)[0] for f in train_flags} & set_by_rows)
    if given:
        raise UserError(f'the rows of this {"sweep" if args.sweep else "table"} set '
                        f'{", ".join(given)} themselves; leave {"it" if len(given) == 1 else "them"} '
                        f'out.')


def sweep_dest(sweep):
    """The argparse dest of --sweep's FLAG ('lambda_1', '--lambda_1', '--cpm-margin', ...), which
    must name a numeric train.py flag; its values must be numbers."""
    dest = sweep[0].lstrip('-').replace('-', '_')
    if flag(dest) in CONTROLLED:
        raise UserError(f'--sweep {sweep[0]}: reproduce.py sets {flag(dest)} itself; use '
                        f'{CONTROLLED[flag(dest)]} instead.')
    default = vars(training.parse_args([])).get(dest, 'missing')
    if isinstance(default, bool) or not isinstance(default, (int, float, type(None))):
        raise UserError(f'--sweep {sweep[0]}: expected a numeric train.py flag, e.g. lambda_1, '
                        f'lambda_2, cpm-margin or margin.')
    for value in sweep[1:]:
        try:
            float(value)
        except ValueError:
            raise UserError(f'--sweep {sweep[0]}: {value!r} is not a number.') from None
    return dest


def ablation_rows(args):
    """{row label: the train.py flags that make it} of --table or --sweep."""
    if args.sweep:
        return {f'{flag(args.sweep_dest)} {value}': (flag(args.sweep_dest), value)
                for value in args.sweep[1:]}
    return {label: flags for label, flags, _ in ABLATION_TABLES[args.table]['rows']}


def ablation_name(args):
    return f'sweep_{args.sweep_dest}' if args.sweep else args.table


def ablation_datasets(args):
    if args.dataset not in (None, 'all'):
        return (args.dataset,)
    return ('llcm',) if args.sweep else ABLATION_TABLE_DATASETS


def ablation_plan(args):
    """Every row of --table (or value of --sweep) on each dataset, for each seed."""
    plan = []
    for dataset in ablation_datasets(args):
        for number, (label, flags) in enumerate(ablation_rows(args).items(), 1):
            for seed in args.seeds:
                folder = os.path.join(args.out, ablation_name(args), dataset, f'row{number}',
                                      f'seed{seed}')
                plan.append(Part(dataset, args.method, seed, 1, folder,
                                 [*args.train_flags, *flags], row=label))
    return plan


def ablation_report(args, plan, statuses):
    """Print each dataset's table (ours beside the published numbers and the difference) and
    write it as Markdown and JSON into --out/<table>; a sweep also draws its figure."""
    folder = os.path.join(args.out, ablation_name(args))
    os.makedirs(folder, exist_ok=True)
    name = args.sweep_dest if args.sweep else args.table
    for dataset in ablation_datasets(args):
        setting = ABLATION_SETTINGS[dataset]
        rows = []
        for label in ablation_rows(args):
            parts = [(part, status) for part, status in zip(plan, statuses)
                     if part.dataset == dataset and part.row == label]
            done = [(part.seed, read_results(part.results)) for part, status in parts if status.done]
            rows.append({'label': label, 'seeds': [seed for seed, _ in done],
                         'ours': ablation_numbers(done, setting, args.fusion) if done else None,
                         'published': (None if args.sweep else
                                       ablation_published(args.table, label, dataset))})
        markdown = ablation_markdown(name, dataset, rows, args.seeds)
        stem = os.path.join(folder, f'{dataset}_comparison')
        with open(stem + '.md', 'w') as handle:
            handle.write(markdown)
        with open(stem + '.json', 'w') as handle:
            json.dump({'table': name, 'dataset': dataset, 'setting': setting, 'fusion': args.fusion,
                       'units': '%', 'rows': rows}, handle, indent=2)
        print('\n' + markdown + f'written to {stem}.md and {stem}.json')
        if args.sweep:
            print(f'figure: {draw_sweep(args, dataset, rows, folder)}')


def draw_sweep(args, dataset, rows, folder):
    """The parameter-study figure of a sweep on one dataset and its numbers as JSON beside it."""
    done = [(float(value), row['ours']) for value, row in zip(args.sweep[1:], rows) if row['ours']]
    numbers = {'flag': flag(args.sweep_dest), 'dataset': dataset,
               'setting': ABLATION_SETTINGS[dataset], 'fusion': args.fusion,
               'values': [value for value, _ in done],
               'Rank-1': [ours['Rank-1'] for _, ours in done],
               'mAP': [ours['mAP'] for _, ours in done],
               'paper_choice': SWEEP_CHOICES.get(args.sweep_dest)}
    stem = os.path.join(folder, f'{dataset}_sweep')
    with open(stem + '.json', 'w') as handle:
        json.dump(numbers, handle, indent=2)
    width, height = figures.draw_sweep(numbers, stem + '.png')
    return f'{stem}.png ({width}x{height}) and {os.path.basename(stem)}.json'



# ----------------------------------------------------------------------------------------------
# The LLCM benchmark (--table benchmark): every method's row, ours beside the published numbers

def check_benchmark_args(args):
    """--table benchmark runs each row with its method's own recipe and headline fusion."""
    if args.table != 'benchmark':
        return
    for given, dest in ((args.method, 'method'), (args.fusion, 'fusion')):
        if given is not None:
            raise UserError(f'--table benchmark runs every method with its own recipe and '
                            f'headline fusion; leave out {flag(dest)} {given}.')


def benchmark_datasets(args):
    """LLCM unless --dataset names another (all: SYSU-MM01, RegDB and LLCM)."""
    if args.dataset == 'all':
        return TABLE_DATASETS
    return (args.dataset or 'llcm',)


def benchmark_plan(args):
    """Every row of the benchmark this codebase trains, on each dataset, for each seed (RegDB:
    each split)."""
    plan = []
    for dataset in benchmark_datasets(args):
        trials = (args.trials or list(dataset_facts('regdb').trials)) if dataset == 'regdb' else [1]
        for row in benchmark_dataset_rows(dataset):
            if row.recipe not in training.RECIPES:
                continue
            for seed in args.seeds:
                folder = os.path.join(args.out, 'benchmark', dataset, row.recipe, f'seed{seed}')
                plan += [Part(dataset, row.recipe, seed, trial, folder, args.train_flags,
                              row=row.label) for trial in trials]
    return plan


def benchmark_report_rows(dataset):
    """The rows of the benchmark's report on dataset: every row on LLCM (and the demo), the rows
    that publish numbers elsewhere."""
    if dataset in ('llcm', *BENCHMARK_PUBLISHED_AS):
        return list(BENCHMARK_ROWS)
    return benchmark_dataset_rows(dataset)


def benchmark_absence(row, dataset):
    """Why a row of the benchmark has no training of ours on dataset, or None."""
    shown = ': the published numbers only' if dataset in ('llcm', *BENCHMARK_PUBLISHED_AS) else ''
    if row.recipe is None:
        return f'not trained by this codebase{shown}'
    if row.recipe not in training.RECIPES:
        return f'--method {row.recipe} is not in this codebase yet (methods/__init__.py){shown}'
    return None


def benchmark_absent_rows(args):
    """One line per benchmark row that the plan does not train, saying why."""
    lines = ['rows of the benchmark without a training of ours:']
    for dataset in benchmark_datasets(args):
        planned = set(benchmark_dataset_rows(dataset))
        for row in BENCHMARK_ROWS:
            why = benchmark_absence(row, dataset)
            if why is None and row not in planned:
                why = f'no published numbers on {dataset}: not run'
            if why:
                lines.append(f'[-] {dataset} {row.label}: {why}')
    return lines


def benchmark_report(args, plan, statuses):
    """Each dataset's benchmark as Markdown and JSON (ours beside the published rows) and its
    figure (Rank-1 and mAP per method) with the figure's JSON, in --out/benchmark."""
    folder = os.path.join(args.out, 'benchmark')
    os.makedirs(folder, exist_ok=True)
    for dataset in benchmark_datasets(args):
        rows = [benchmark_row(row, dataset, plan, statuses) for row in benchmark_report_rows(dataset)]
        markdown = benchmark_markdown(dataset, rows, args.seeds)
        stem = os.path.join(folder, f'{dataset}_benchmark')
        with open(stem + '.md', 'w') as handle:
            handle.write(markdown)
        with open(stem + '.json', 'w') as handle:
            json.dump({'dataset': dataset, 'units': '%', 'seeds': args.seeds, 'rows': rows},
                      handle, indent=2)
        numbers = benchmark_figure_numbers(dataset, rows)
        with open(stem + '_figure.json', 'w') as handle:
            json.dump(numbers, handle, indent=2)
        width, height = figures.draw_benchmark(numbers, stem + '.png')
        print('\n' + markdown + f'written to {stem}.md and {stem}.json; figure {stem}.png '
              f'({width}x{height}) and {os.path.basename(stem)}_figure.json')


def benchmark_row(row, dataset, plan, statuses):
    """One row of the report: {label, recipe, fusion, state, ours: {setting: {metric: summary}},
    published: {setting: {source: numbers}}}."""
    parts = [(part, status) for part, status in zip(plan, statuses)
             if part.dataset == dataset and part.row == row.label]
    done = [(part.seed, read_results(part.results)) for part, status in parts if status.done]
    fusion = (get_method(training.RECIPES[row.recipe][0]).headline
              if row.recipe in training.RECIPES else None)
    state = benchmark_absence(row, dataset) or (
        f'{len(done)} of {len(parts)} part(s) done' if parts else 'not run')
    ours = {}
    if done:
        missing = [part.label for part, status in parts if not status.done]
        ours = {setting['setting']: setting['ours'] for setting in
                compare(dataset, row.recipe, fusion, done, missing)['settings']}
    return {'label': row.label, 'recipe': row.recipe, 'fusion': fusion, 'state': state,
            'ours': ours, 'published': {setting: benchmark_published(row, dataset, setting)
                                        for setting in benchmark_settings(dataset)}}


if __name__ == '__main__':
    sys.exit(run_main(main))
