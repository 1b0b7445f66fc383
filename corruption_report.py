"""reproduce.py --table robustness: the corrupted tests of a table's checkpoints (CIL's mixed set
and every cell of the corruption x severity grid, each a test.py run with its results file), where
they stand, and the report: clean against corrupted in CIL's setting (SYSU-MM01 gallery trial 0,
RegDB both directions, LLCM both directions), our clean means over every trial beside them, CIL's
published AGW rows with their source, and the grid as a figure with its numbers as JSON."""
import json
import os
from typing import NamedTuple

import numpy as np

import figures
from corruption import CORRUPTIONS, SEVERITIES, SYSU_TRIAL, Setting, check_library
from data_manager import layout_of
from evaluation import parse_test_args, read_results, run_test, write_results
from paper_results import CORRUPTED_SOURCES, corrupted_published
from plan_steps import announce
from utils import written_atomically

CORRUPT_SEED = 0
METRICS = ('Rank-1', 'mAP', 'mINP')
# The settings of CIL's table (its Mode A and B), and the one the grid is drawn for.
CIL_SETTINGS = {'sysu': ('all ir_to_vis', 'indoor ir_to_vis'), 'regdb': ('vis_to_ir', 'ir_to_vis'),
                'llcm': ('ir_to_vis', 'vis_to_ir')}
PROTOCOLS = {'sysu': 'SYSU-MM01-C: gallery trial 0 (the clean CIL-setting row too)',
             'regdb': 'RegDB-C: every split, each with its own model',
             'llcm': 'LLCM-C (ours): every gallery trial'}
GRID_SETTING = {'sysu': 'all ir_to_vis', 'regdb': 'vis_to_ir', 'llcm': 'ir_to_vis'}


def check_args(args):
    """--table robustness: --dataset given, no --sweep, the corruption extra installed."""
    from utils import UserError
    if args.sweep:
        raise UserError('--table and --sweep run different plans; pass one of them.')
    if args.dataset is None:
        raise UserError('--table robustness needs --dataset (sysu, regdb, llcm, demo or all).')
    check_library('table')


class CorruptedTest(NamedTuple):
    """One corrupted test of a part's best checkpoint: 'mixed' or a grid cell (corruption,
    severity), its results file."""
    corruption: str   # None: the mixed set
    severity: int
    results: str

    @property
    def label(self):
        return 'mixed set' if self.corruption is None else f'{self.corruption} {self.severity}'


def corrupted_tests(part):
    """The mixed set, then every grid cell, of a part (files under its results/corrupted/)."""
    cells = [(None, None)] + [(name, severity) for name in CORRUPTIONS for severity in SEVERITIES]
    folder = os.path.join(part.folder, 'results', 'corrupted')
    return [CorruptedTest(name, severity, os.path.join(
        folder, f'{part.name}_{Setting(name, severity, CORRUPT_SEED, "visible", None).tag()}'
                f'_test.json')) for name, severity in cells]


def test_argv(part, test, cache_dir):
    """test.py's arguments of a corrupted test: the part's clean test with its own results file
    and the corruption flags; the mixed set keeps its images in the shared cache (a grid cell is
    tested once, and caching all 100 would take 100 times the disk: about 48 GB for LLCM)."""
    argv = part.test_argv()
    argv[argv.index('--output') + 1] = test.results
    flags = (['--corrupt', '--corrupt-cache', cache_dir] if test.corruption is None else
             ['--corruption', test.corruption, '--severity', str(test.severity)])
    return argv + flags + ['--corrupt-seed', str(CORRUPT_SEED)]


def cache_folder(args):
    return os.path.join(args.out, 'corruption_cache')


def test_done(part, test):
    """Whether a corrupted test's results file is there, of the part's current best checkpoint."""
    record = read_results(test.results)
    best = part.checkpoint('best')
    return (record is not None and 'corruption' in record and os.path.isfile(best) and
            os.path.abspath(record['checkpoint']) == os.path.abspath(best) and
            os.path.getmtime(test.results) >= os.path.getmtime(best))


def format_tests(plan):
    """The corrupted tests of the plan, as format_plan lists the parts."""
    lines = []
    for part in plan:
        tests = corrupted_tests(part)
        done = sum(test_done(part, test) for test in tests)
        lines.append(f'corrupted tests of {part.label}: {len(tests)} (the mixed set and '
                     f'{len(tests) - 1} grid cells), {done} done; results under '
                     f'{os.path.dirname(tests[0].results)}')
    return '\n'.join(lines)


def run_tests(args, plan, device, ctx):
    """Run every corrupted test not done of the parts whose training is finished."""
    for part in plan:
        if not os.path.isfile(part.checkpoint('best')):
            continue
        for number, test in enumerate(corrupted_tests(part), 1):
            if test_done(part, test):
                continue
            announce(ctx, f'{part.label}: corrupted test {number}/{len(corrupted_tests(part))} '
                          f'({test.label})')
            run_test(parse_test_args(test_argv(part, test, cache_folder(args))), device, ctx)


# ----------------------------------------------------------------------------------------------
# The report

def report(args, plan, statuses):
    """Print and write, per dataset and method: clean against corrupted (the robustness table)
    and the grid (figure and JSON), from the finished tests."""
    folder = os.path.join(args.out, 'robustness')
    groups = {}
    for part, status in zip(plan, statuses):
        groups.setdefault((part.dataset, part.method), []).append((part, status))
    for (dataset, method), parts in groups.items():
        clean = [read_results(part.results) for part, status in parts if status.done]
        tests = [(part, corrupted_tests(part)) for part, _ in parts]
        mixed = [read_results(ts[0].results) for part, ts in tests if test_done(part, ts[0])]
        if not clean:
            print(f'\n{dataset} {method}: no clean test done yet.')
            continue
        table = robustness_table(dataset, method, args.fusion, clean, mixed)
        stem = os.path.join(folder, f'{dataset}_{method}_robustness')
        write_results(stem + '.json', table)
        markdown = robustness_markdown(table)
        with written_atomically(stem + '.md') as tmp, open(tmp, 'w') as handle:
            handle.write(markdown)
        print('\n' + markdown + f'written to {stem}.md and {stem}.json')
        grid = grid_numbers(dataset, method, args.fusion, tests, table)
        with written_atomically(stem + '_grid.json') as tmp, open(tmp, 'w') as handle:
            json.dump(grid, handle, indent=2)
        width, height = figures.draw_corruption_grid(grid, stem + '_grid.png')
        print(f'grid: {stem}_grid.png ({width}x{height}) and {os.path.basename(stem)}_grid.json '
              f'({grid["cells_done"]} of {len(CORRUPTIONS) * len(SEVERITIES)} cells tested)')


def cil_values(record, setting, fusion, metric, layout):
    """The per-trial values (in %) of a clean results record in CIL's setting: SYSU-MM01's gallery
    trial 0, every split or trial elsewhere."""
    values = record['results'][setting][fusion][metric][2]
    if layout == 'sysu':
        trials = record['protocol']['trials']
        return [100 * values[trials.index(SYSU_TRIAL)]] if SYSU_TRIAL in trials else []
    return [100 * v for v in values]


def _mean(values):
    return float(np.mean(values)) if values else None


def robustness_table(dataset, method, fusion, clean, mixed):
    """{settings: [{setting, ours: {clean_cil, corrupted, delta, clean_all}, published}], ...}:
    means in % over the records (RegDB: its splits) of each metric."""
    layout = layout_of(dataset)
    rows = []
    for setting in CIL_SETTINGS[layout]:
        if setting not in clean[0]['results']:
            continue
        ours = {}
        for metric in METRICS:
            clean_cil = _mean([v for r in clean for v in cil_values(r, setting, fusion, metric,
                                                                    layout)])
            all_trials = _mean([100 * v for r in clean
                                for v in r['results'][setting][fusion][metric][2]])
            corrupted = _mean([100 * v for r in mixed
                               for v in r['results'][setting][fusion][metric][2]])
            ours[metric] = {'clean': clean_cil, 'corrupted': corrupted,
                            'delta': None if corrupted is None else corrupted - clean_cil,
                            'clean_all_trials': all_trials}
        rows.append({'setting': setting, 'ours': ours,
                     'published': corrupted_published(method, dataset, setting)})
    used = sorted({source for row in rows for source in row['published']})
    return {'dataset': dataset, 'method': method, 'fusion': fusion, 'units': '%',
            'corrupt_seed': CORRUPT_SEED, 'clean_records': len(clean),
            'corrupted_records': len(mixed),
            'protocol': 'CIL mixed set: one random corruption and severity per visible image '
                        '(resized to 144x288 first), infrared images clean; ' + PROTOCOLS[layout],
            'rows': rows, 'sources': {key: CORRUPTED_SOURCES[key] for key in used},
            'no_published': None if used else f'no corrupted-image numbers are published for '
                                              f'{method} on {dataset}'}


def robustness_markdown(table):
    """The robustness table as Markdown: per setting, ours clean (CIL's setting) → corrupted,
    the difference, our clean mean over every trial, and each published clean → corrupted."""
    lines = [f'## Robustness to corrupted images — {table["dataset"]}, {table["method"]}', '',
             f'{table["protocol"]}; seed {table["corrupt_seed"]}; fusion {table["fusion"]}; '
             f'{table["clean_records"]} clean and {table["corrupted_records"]} corrupted results '
             f'file(s). Values in %, clean → corrupted.', '',
             '| setting | row | ' + ' | '.join(METRICS) + ' |',
             '|---|---|' + '---:|' * len(METRICS)]
    for row in table['rows']:
        ours = row['ours']
        cells = [('ours (clean: CIL setting)', [_pair(ours[m]['clean'], ours[m]['corrupted'])
                                                 for m in METRICS]),
                 ('ours: corrupted − clean', [_cell(ours[m]['delta'], True) for m in METRICS]),
                 ('ours: clean, every trial', [_cell(ours[m]['clean_all_trials'])
                                               for m in METRICS])]
        for source, numbers in row['published'].items():
            cells.append((f'published: {source}', [_pair(numbers['clean'].get(m),
                                                         numbers['corrupted'].get(m))
                                                   for m in METRICS]))
        for number, (label, values) in enumerate(cells):
            head = f'`{row["setting"]}`' if number == 0 else ''
            lines.append(f'| {head} | {label} | ' + ' | '.join(values) + ' |')
    lines.append('')
    for key, citation in table['sources'].items():
        lines.append(f'- **{key}**: {citation}')
    if table['no_published']:
        lines.append(f'- {table["no_published"]}')
    return '\n'.join(lines) + '\n'


def _cell(value, signed=False):
    if value is None:
        return '—'
    return f'{value:+.2f}' if signed else f'{value:.2f}'


def _pair(clean, corrupted):
    return f'{_cell(clean)} → {_cell(corrupted)}'


def grid_numbers(dataset, method, fusion, tests, table):
    """The grid of one dataset and method: Rank-1 and mAP in % (mean over the parts' records and
    trials) of each corruption (rows) and severity (columns) on GRID_SETTING, None where not
    tested; with the clean and mixed-set values of the table."""
    setting = GRID_SETTING[layout_of(dataset)]
    cells = {}
    for part, part_tests in tests:
        for test in part_tests[1:]:
            if test_done(part, test):
                record = read_results(test.results)
                cells.setdefault((test.corruption, test.severity), []).append(record)
    numbers = {'dataset': dataset, 'method': method, 'setting': setting, 'fusion': fusion,
               'modality': 'visible', 'corrupt_seed': CORRUPT_SEED, 'units': '%',
               'corruptions': list(CORRUPTIONS), 'severities': list(SEVERITIES),
               'cells_done': len(cells)}
    for metric in ('Rank-1', 'mAP'):
        numbers[metric] = [[_mean([100 * v for r in cells.get((name, severity), [])
                                   for v in r['results'][setting][fusion][metric][2]])
                            for severity in SEVERITIES] for name in CORRUPTIONS]
    row = next((r for r in table['rows'] if r['setting'] == setting), None)
    numbers['clean'] = {m: row['ours'][m]['clean'] for m in ('Rank-1', 'mAP')} if row else {}
    numbers['mixed'] = {m: row['ours'][m]['corrupted'] for m in ('Rank-1', 'mAP')} if row else {}
    return numbers
