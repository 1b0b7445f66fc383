"""The published numbers of DEEN and of the LLCM benchmark's baselines (AGW with and without random
erasing, CAJ, DDAG, MMN, LbA, DART), in one table with their sources (and CIL's AGW rows on
corrupted images, L2RW's cross-dataset numbers), and the comparison of our results with them: ours
as mean ± std over trials and seeds, the difference, the protocol; the tables of reproduce.py
--table cross-dataset | transfer."""
import os
from typing import NamedTuple, Optional

import numpy as np

from data_manager import dataset_facts, layout_of
from evaluation import describe_setting, write_results
from methods import METHODS
from provenance import describe_code, describe_environment
from utils import written_atomically

METRICS = ('Rank-1', 'Rank-10', 'Rank-20', 'mAP', 'mINP')

_RELEASED_README = 'https://github.com/ZYK100/LLCM/blob/{commit}/DEEN/README.md'
SOURCES = {
    'paper': 'Zhang & Wang, "Diverse Embedding Expansion Network and Low-Light Cross-Modality '
             'Benchmark for Visible-Infrared Person Re-identification", CVPR 2023 (arXiv '
             '2303.14481): Rank-1 and mAP of DEEN on SYSU-MM01 and RegDB, as this repository\'s '
             'README quotes them (Rank-10/20 and mINP not transcribed)',
    'readme-13d0dff': 'released code README, section 4 "Results" ("We have made some updates to '
                      'the results in our paper on the LLCM dataset"), DEEN row, '
                      + _RELEASED_README.format(commit='13d0dff8045ca24c33161649acfe02b0e2eb375d'),
    'readme-da47925': 'released code README, section 4 "Results", DEEN row, '
                      + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'readme-agw': 'released code README, section 4 "Results", AGW row (the same in commits '
                  '13d0dff and da47925), '
                  + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'readme-caj': 'released code README, section 4 "Results", CAJ row (LLCM re-run by the DEEN '
                  'authors), '
                  + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'paper-table3': 'Zhang & Wang, CVPR 2023 (arXiv 2303.14481), Table 3 (LLCM benchmark), rows '
                    'AGW, AGW* (with random erasing), CAJ and DEEN: Rank-1 and mAP of IR->VIS and '
                    'VIS->IR (read here as the standard VIS->IR; the paper does not say which '
                    'gallery its VIS->IR draws)',
    'caj-readme': 'Ye et al., "Channel Augmented Joint Learning for Visible-Infrared '
                  'Recognition", ICCV 2021, released code README (results table), '
                  'https://github.com/mangye16/Cross-Modal-Re-ID-baseline/blob/'
                  '26bc0ce088eb97867ff489dceda386b8092b9fde/ICCV21_CAJ/README.md; SYSU-MM01 '
                  'all-search; RegDB: the README names no direction, its testa.py tests visible '
                  'queries against the thermal gallery by default (vis_to_ir)',
    'ddag-readme': 'Ye et al., "Dynamic Dual-Attentive Aggregation Learning for Visible-Infrared '
                   'Person Re-Identification", ECCV 2020, released code README (results table, '
                   'values marked "~"), https://github.com/mangye16/DDAG/blob/'
                   '554852291bc3d6e30256ff538c52c64744759f12/README.md; SYSU-MM01 all-search and '
                   'indoor-search, IR->VIS (the released test_ddag.py); no RegDB numbers',
    'readme-ddag': 'DEEN released code README, section 4 "Results", DDAG row (LLCM re-run by the '
                   'DEEN authors, settings not published), '
                   + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'readme-benchmark': 'DEEN released code README, section 4 "Results": the whole LLCM table '
                        '(DDAG, LbA, AGW, CAJ, MMN, MRCN, DART, DEEN; the baselines re-run by the '
                        'DEEN authors with settings they do not publish), Rank-1/10/20 and mAP of '
                        'two unlabelled column groups, read as IR->VIS and the released test.py\'s '
                        '"VIS to IR" (released_vis_to_ir), '
                        + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'readme-mmn-llcm': 'released code README, section 4 "Results", MMN row (LLCM re-run by the DEEN '
                       'authors; the same in ZYK100/LLCM README.md:25), '
                       + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac')
                       + ' line 59',
    'mmn-readme': 'Zhang et al., "Towards a Unified Middle Modality Learning for Visible-Infrared '
                  'Person Re-Identification", ACM MM 2021, released code README "Result" table '
                  '(lines 21-24, "~" values), https://github.com/ZYK100/MMN/blob/'
                  '01d70d523258dc46a202d114715fbc3cab230894/README.md; the README names neither the '
                  'setting nor which of its test\'s seven fusions it reports: placed here under '
                  'SYSU-MM01 all-search and RegDB IR->VIS, the defaults of its test.py (mode all; '
                  'RegDB --tvsearch, always on)',
    'readme-lba': 'released code README, section 4 "Results", LbA row (LLCM re-run by the DEEN '
                  'authors; the top-level README renames the row "CMAlign"), '
                  + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
    'lba-readme': 'Park et al., "Learning by Aligning: Visible-Infrared Person Re-identification '
                  'using Cross-Modal Correspondences", ICCV 2021, released code README, "Test" '
                  'table (method full), https://github.com/cvlab-yonsei/LbA/blob/'
                  '66a3ab987c3f50633bafd727db8c6680c3bb7f68/README.md; SYSU-MM01 all-search',
    'lba-readme-weights': 'the same README, "Pretrained weights" table: its released SYSU-MM01 '
                          'weights (sysu_pretrained.t, release v1.0) tested with its test.py',
    'readme-dart': 'released code README, section 4 "Results", DART row (LLCM run by the DEEN '
                   'authors, their settings for it not published; DART itself publishes no LLCM '
                   'numbers), '
                   + _RELEASED_README.format(commit='da479253b3c7a8177fbe7f6893a01d9e70c787ac'),
}

# The published numbers, in %: (method, dataset, setting) -> {source: {metric: value}}. Settings
# are test.py's setting names. The released README's LLCM table has two column groups without
# direction names: the first is IR->VIS, the second what its test.py calls "VIS to IR"
# (released_vis_to_ir, an IR->VIS search with a multi-shot gallery; data_manager.DIRECTION_PLANS).
PUBLISHED = {
    ('deen', 'sysu', 'all ir_to_vis'): {'paper': {'Rank-1': 74.7, 'mAP': 71.8}},
    ('deen', 'sysu', 'indoor ir_to_vis'): {'paper': {'Rank-1': 80.3, 'mAP': 83.3}},
    ('deen', 'regdb', 'vis_to_ir'): {'paper': {'Rank-1': 91.1, 'mAP': 85.1}},
    ('deen', 'regdb', 'ir_to_vis'): {'paper': {'Rank-1': 89.5, 'mAP': 83.4}},
    ('deen', 'llcm', 'ir_to_vis'): {
        'readme-13d0dff': {'Rank-1': 56.73, 'Rank-10': 84.52, 'Rank-20': 90.60, 'mAP': 63.28},
        'readme-da47925': {'Rank-1': 55.52, 'Rank-10': 83.88, 'Rank-20': 89.98, 'mAP': 62.07},
        'paper-table3': {'Rank-1': 54.9, 'mAP': 62.9}},
    ('deen', 'llcm', 'released_vis_to_ir'): {
        'readme-13d0dff': {'Rank-1': 69.66, 'Rank-10': 91.68, 'Rank-20': 95.99, 'mAP': 56.69},
        'readme-da47925': {'Rank-1': 69.21, 'Rank-10': 90.95, 'Rank-20': 95.07, 'mAP': 55.52}},
    ('agw', 'llcm', 'released_vis_to_ir'): {
        'readme-agw': {'Rank-1': 63.72, 'Rank-10': 88.66, 'Rank-20': 92.83, 'mAP': 47.21}},
    # The paper's AGW* is the released AGW recipe (random erasing on): reproduce.py's 'agw'; its
    # AGW row is the same without random erasing: 'agw-plain' (training.RECIPES).
    ('agw', 'llcm', 'ir_to_vis'): {
        'readme-agw': {'Rank-1': 49.13, 'Rank-10': 79.06, 'Rank-20': 85.89, 'mAP': 55.80},
        'paper-table3': {'Rank-1': 46.4, 'mAP': 54.8}},
    ('agw', 'llcm', 'vis_to_ir'): {'paper-table3': {'Rank-1': 56.0, 'mAP': 59.1}},
    ('agw-plain', 'llcm', 'ir_to_vis'): {'paper-table3': {'Rank-1': 43.6, 'mAP': 51.8}},
    ('deen', 'llcm', 'vis_to_ir'): {'paper-table3': {'Rank-1': 62.5, 'mAP': 65.8}},
    ('agw-plain', 'llcm', 'vis_to_ir'): {'paper-table3': {'Rank-1': 51.5, 'mAP': 55.3}},
    ('caj', 'sysu', 'all ir_to_vis'): {
        'caj-readme': {'Rank-1': 69.88, 'mAP': 66.89, 'mINP': 53.61}},
    ('caj', 'regdb', 'vis_to_ir'): {'caj-readme': {'Rank-1': 85.03, 'mAP': 79.14, 'mINP': 65.33}},
    ('caj', 'llcm', 'ir_to_vis'): {
        'readme-caj': {'Rank-1': 49.86, 'Rank-10': 78.91, 'Rank-20': 85.83, 'mAP': 56.40},
        'paper-table3': {'Rank-1': 48.8, 'mAP': 56.6}},
    ('caj', 'llcm', 'released_vis_to_ir'): {
        'readme-caj': {'Rank-1': 63.73, 'Rank-10': 87.95, 'Rank-20': 92.41, 'mAP': 47.71}},
    ('caj', 'llcm', 'vis_to_ir'): {'paper-table3': {'Rank-1': 56.5, 'mAP': 59.8}},
    ('ddag', 'sysu', 'all ir_to_vis'): {
        'ddag-readme': {'Rank-1': 54.75, 'mAP': 53.02, 'mINP': 39.62}},
    ('ddag', 'sysu', 'indoor ir_to_vis'): {
        'ddag-readme': {'Rank-1': 61.02, 'mAP': 67.98, 'mINP': 62.61}},
    ('ddag', 'llcm', 'ir_to_vis'): {
        'readme-ddag': {'Rank-1': 42.36, 'Rank-10': 72.69, 'Rank-20': 80.63, 'mAP': 48.97}},
    ('ddag', 'llcm', 'released_vis_to_ir'): {
        'readme-ddag': {'Rank-1': 51.42, 'Rank-10': 81.45, 'Rank-20': 88.26, 'mAP': 38.77}},
    ('mmn', 'llcm', 'ir_to_vis'): {
        'readme-mmn-llcm': {'Rank-1': 50.14, 'Rank-10': 79.81, 'Rank-20': 87.27, 'mAP': 56.66}},
    ('mmn', 'llcm', 'released_vis_to_ir'): {
        'readme-mmn-llcm': {'Rank-1': 63.97, 'Rank-10': 88.66, 'Rank-20': 93.05, 'mAP': 48.47}},
    ('mmn', 'sysu', 'all ir_to_vis'): {'mmn-readme': {'Rank-1': 70.6, 'mAP': 66.9}},
    ('mmn', 'regdb', 'ir_to_vis'): {'mmn-readme': {'Rank-1': 91.6, 'mAP': 84.1}},
    ('lba', 'sysu', 'all ir_to_vis'): {'lba-readme': {'Rank-1': 55.41, 'mAP': 54.14},
                                       'lba-readme-weights': {'Rank-1': 56.31, 'mAP': 55.22}},
    ('lba', 'llcm', 'ir_to_vis'): {
        'readme-lba': {'Rank-1': 42.76, 'Rank-10': 77.40, 'Rank-20': 86.11, 'mAP': 50.95}},
    ('lba', 'llcm', 'released_vis_to_ir'): {
        'readme-lba': {'Rank-1': 54.78, 'Rank-10': 85.12, 'Rank-20': 91.63, 'mAP': 40.81}},
    ('dart', 'llcm', 'ir_to_vis'): {
        'readme-dart': {'Rank-1': 52.97, 'Rank-10': 80.82, 'Rank-20': 87.05, 'mAP': 59.28}},
    ('dart', 'llcm', 'released_vis_to_ir'): {
        'readme-dart': {'Rank-1': 65.33, 'Rank-10': 89.42, 'Rank-20': 93.33, 'mAP': 51.13}},
}
# The published RegDB numbers name only the direction; they stand beside both stem routings.
PUBLISHED_AS = {'released_routing_vis_to_ir': 'vis_to_ir',
                'released_routing_ir_to_vis': 'ir_to_vis'}


def published(method, dataset, setting):
    """{source: {metric: value in %}} published for a setting of ours ({} for the demo data)."""
    return PUBLISHED.get((method, dataset, PUBLISHED_AS.get(setting, setting)), {})


def compare(dataset, method, fusion, done, missing=()):
    """The comparison of one dataset and method: `done` is [(seed, results record)] of finished
    parts (RegDB: one record per split), `missing` names the parts not done. Ours per setting and
    metric, in %: mean and std over every trial of every seed, and with several seeds the spread
    (std) of the seed means; beside it each published value and ours - published."""
    seeds = sorted({seed for seed, _ in done})
    trials = sorted({t for _, record in done for t in record['protocol']['trials']})
    multi_shot = any(record['protocol']['multi_shot'] for _, record in done)
    settings = []
    for name in _setting_names(done):
        ours = {metric: _summary({seed: [value for part_seed, record in done if part_seed == seed
                                         for value in record['results'][name][fusion][metric][2]]
                                  for seed in seeds})
                for metric in METRICS}
        rows = [{'source': source, 'metrics': numbers,
                 'delta': {metric: ours[metric]['mean'] - value
                           for metric, value in numbers.items()}}
                for source, numbers in published(method, dataset, name).items()]
        settings.append({'setting': name, 'protocol': describe_setting(
            layout_of(dataset), name, len(trials), multi_shot, fusion), 'ours': ours,
            'published': rows})
    used = sorted({row['source'] for setting in settings for row in setting['published']})
    return {'dataset': dataset, 'title': _title(dataset), 'method': method, 'fusion': fusion,
            'units': '%', 'seeds': seeds, 'trials': trials, 'parts_done': len(done),
            'missing': list(missing), 'settings': settings,
            'sources': {key: SOURCES[key] for key in used}, 'made_with': _made_with(done)}


def _title(dataset):
    return 'demo (synthetic, LLCM layout)' if dataset == 'demo' else dataset_facts(dataset).title


def _setting_names(done):
    """The settings of the results records, in the order test.py reports them."""
    names = []
    for _, record in done:
        names += [name for name in record['results'] if name not in names]
    return names


def _summary(by_seed):
    """{mean, std, values, seed_means, seed_std} in % of per-trial fractions grouped by seed; the
    std is over all values (population std, as test.py's); seed_std is None for one seed."""
    values = 100 * np.array([v for seed_values in by_seed.values() for v in seed_values],
                            dtype=float)
    seed_means = [100 * float(np.mean(v)) for v in by_seed.values()]
    return {'mean': float(values.mean()), 'std': float(values.std()), 'values': values.tolist(),
            'seed_means': seed_means,
            'seed_std': float(np.std(seed_means)) if len(seed_means) > 1 else None}


def _made_with(done):
    """The distinct code versions and environments that trained and tested the results."""
    code, environments = set(), set()
    for _, record in done:
        trained = [model.get('provenance') for model in record.get('models', [])]
        for made in [record.get('provenance'), *trained]:
            if made:
                code.add(describe_code(made.get('code')))
                environments.add(describe_environment({**made, 'seed': None}))
    return {'code': sorted(code), 'environments': sorted(environments)}


def _method_title(name):
    """A method's title as its module spells it ('LbA'); a named recipe's name in capitals."""
    return METHODS[name].title if name in METHODS else name.upper()


def comparison_markdown(comparison):
    """The comparison as a Markdown section: a table per dataset and method with ours (mean ±
    std), the seed spread, each published value and the difference, then sources and provenance."""
    seeds = comparison['seeds']
    trial_word = 'splits' if comparison['dataset'] == 'regdb' else 'gallery trials'
    lines = [f'## {comparison["title"]}, {_method_title(comparison["method"])}', '',
             f'Fusion {comparison["fusion"]}; seeds {" ".join(map(str, seeds)) or "none"}; '
             f'{trial_word} {_listed(comparison["trials"])}; {comparison["parts_done"]} part(s) '
             f'done, {len(comparison["missing"])} not done. Values in %.', '',
             '| setting | protocol | row | ' + ' | '.join(METRICS) + ' |',
             '|---|---|---|' + '---:|' * len(METRICS)]
    for setting in comparison['settings']:
        ours = setting['ours']
        count = len(ours['Rank-1']['values'])
        rows = [(f'ours: mean ± std over {count} values ({len(seeds)} seed(s) × '
                 f'{count // max(len(seeds), 1)} {trial_word})',
                 [f'{ours[m]["mean"]:.2f} ± {ours[m]["std"]:.2f}' for m in METRICS])]
        if len(seeds) > 1:
            rows.append((f'ours: spread (std) of the {len(seeds)} seed means',
                         [f'{ours[m]["seed_std"]:.2f}' for m in METRICS]))
        for row in setting['published']:
            rows.append((f'published: {row["source"]}',
                         [_cell(row['metrics'].get(m)) for m in METRICS]))
            rows.append((f'ours − {row["source"]}', [_cell(row['delta'].get(m), signed=True)
                                                     for m in METRICS]))
        if not setting['published']:
            rows.append(('published', ['—'] * len(METRICS)))
        for number, (label, cells) in enumerate(rows):
            head = (f'`{setting["setting"]}` | {setting["protocol"]}' if number == 0 else ' | ')
            lines.append(f'| {head} | {label} | ' + ' | '.join(cells) + ' |')
    lines.append('')
    for key, citation in comparison['sources'].items():
        lines.append(f'- **{key}**: {citation}')
    if not comparison['sources']:
        lines.append('- no published numbers exist for this dataset and method')
    made = comparison['made_with']
    lines.append(f'- code: {"; ".join(made["code"]) or "unknown"}')
    lines += [f'- environment: {environment}' for environment in made['environments']]
    lines += [f'- not done: {name}' for name in comparison['missing']]
    return '\n'.join(lines) + '\n'


def _cell(value, signed=False):
    if value is None:
        return '—'
    return f'{value:+.2f}' if signed else f'{value:.2f}'


def _listed(numbers):
    return ' '.join(map(str, numbers)) if numbers else 'none'


def write_comparison(comparison, folder):
    """Write <dataset>_<method>_comparison.md and .json into folder; returns the two paths."""
    stem = os.path.join(folder, f'{comparison["dataset"]}_{comparison["method"]}_comparison')
    write_results(stem + '.json', comparison)
    with written_atomically(stem + '.md') as tmp, open(tmp, 'w') as handle:
        handle.write(comparison_markdown(comparison))
    return stem + '.md', stem + '.json'


# ----------------------------------------------------------------------------------------------
# The LLCM benchmark (reproduce.py --table benchmark): the DEEN paper's Table 3 and its README's
# table, one row per method

_README_COLUMNS = ('Rank-1', 'Rank-10', 'Rank-20', 'mAP')
# SOURCES['readme-benchmark'] in %: README row -> {setting: {metric: value}}
LLCM_README = {row: {'ir_to_vis': dict(zip(_README_COLUMNS, ir_to_vis)),
                     'released_vis_to_ir': dict(zip(_README_COLUMNS, vis_to_ir))}
               for row, ir_to_vis, vis_to_ir in (
                   ('DDAG', (42.36, 72.69, 80.63, 48.97), (51.42, 81.45, 88.26, 38.77)),
                   ('LbA', (42.76, 77.40, 86.11, 50.95), (54.78, 85.12, 91.63, 40.81)),
                   ('AGW', (49.13, 79.06, 85.89, 55.80), (63.72, 88.66, 92.83, 47.21)),
                   ('CAJ', (49.86, 78.91, 85.83, 56.40), (63.73, 87.95, 92.41, 47.71)),
                   ('MMN', (50.14, 79.81, 87.27, 56.66), (63.97, 88.66, 93.05, 48.47)),
                   ('MRCN', (51.32, 80.10, 87.17, 57.74), (65.27, 88.11, 93.13, 49.45)),
                   ('DART', (52.97, 80.82, 87.05, 59.28), (65.33, 89.42, 93.33, 51.13)),
                   ('DEEN', (55.52, 83.88, 89.98, 62.07), (69.21, 90.95, 95.07, 55.52)))}


class BenchmarkRow(NamedTuple):
    label: str              # the method as the paper's Table 3 names it
    recipe: Optional[str]   # reproduce.py's --method (a training.RECIPES name); None: not trained
    readme: Optional[str]   # its row of the README's table, if any


# In the README's order, AGW (no random erasing) before AGW* (the released AGW recipe). The
# README's AGW row stands beside our AGW*, as PUBLISHED reads it.
BENCHMARK_ROWS = (BenchmarkRow('DDAG', 'ddag', 'DDAG'), BenchmarkRow('LbA', 'lba', 'LbA'),
                  BenchmarkRow('AGW', 'agw-plain', None), BenchmarkRow('AGW*', 'agw', 'AGW'),
                  BenchmarkRow('CAJ', 'caj', 'CAJ'), BenchmarkRow('MMN', 'mmn', 'MMN'),
                  BenchmarkRow('MRCN', None, 'MRCN'), BenchmarkRow('DART', 'dart', 'DART'),
                  BenchmarkRow('DEEN', 'deen', 'DEEN'))
# The settings of the table and of its figure, per dataset (the demo has LLCM's layout).
BENCHMARK_SETTINGS = {'llcm': ('ir_to_vis', 'vis_to_ir', 'released_vis_to_ir'),
                      'sysu': ('all ir_to_vis', 'indoor ir_to_vis'),
                      'regdb': ('vis_to_ir', 'ir_to_vis')}
BENCHMARK_FIGURE_SETTINGS = {'llcm': ('ir_to_vis', 'released_vis_to_ir'),
                             'sysu': ('all ir_to_vis', 'indoor ir_to_vis'),
                             'regdb': ('vis_to_ir', 'ir_to_vis')}
BENCHMARK_PUBLISHED_AS = {'demo': 'llcm'}
BENCHMARK_SOURCE_NAMES = {'readme-benchmark': 'DEEN README', 'paper-table3': 'paper Table 3'}
BENCHMARK_CAVEATS = (
    'The DEEN authors do not publish the settings (image size, epochs, schedule) they used for '
    'each baseline on LLCM; ours trains each method with its released recipe (docs/methods.md).',
    'Ours is each method\'s headline test feature or fusion (docs/methods.md), mean ± std over '
    'seeds and gallery trials (RegDB: splits).',
    'The README has no AGW* row: its AGW row stands beside our AGW* (the released AGW recipe, '
    'random erasing on), as everywhere in this codebase; the paper\'s Table 3 gives both.',
    'MRCN is in the README\'s table; this codebase does not train it.',
    'The paper\'s Table 3 rows of DDAG, LbA, MMN and DART are not transcribed here; its VIS->IR '
    'is read as the standard vis_to_ir.')


def benchmark_dataset_rows(dataset):
    """The rows the benchmark trains on dataset: every row on LLCM (and the demo); on SYSU-MM01
    and RegDB the rows whose method publishes numbers there."""
    if dataset in ('llcm', *BENCHMARK_PUBLISHED_AS):
        return [row for row in BENCHMARK_ROWS if row.recipe]
    return [row for row in BENCHMARK_ROWS if row.recipe and any(
        method == row.recipe and on == dataset for method, on, _ in PUBLISHED)]


def benchmark_published(row, dataset, setting):
    """{source: {metric: value in %}} published for a benchmark row in a setting: on LLCM (and
    the demo, which has its layout) the README's table and the paper's Table 3; elsewhere what
    PUBLISHED holds for the row's recipe."""
    dataset = BENCHMARK_PUBLISHED_AS.get(dataset, dataset)
    if dataset != 'llcm':
        return published(row.recipe, dataset, setting) if row.recipe else {}
    found = {}
    if row.readme and setting in LLCM_README[row.readme]:
        found['readme-benchmark'] = LLCM_README[row.readme][setting]
    table3 = PUBLISHED.get((row.recipe, 'llcm', setting), {}).get('paper-table3')
    if table3:
        found['paper-table3'] = table3
    return found


def benchmark_settings(dataset):
    return BENCHMARK_SETTINGS[BENCHMARK_PUBLISHED_AS.get(dataset, dataset)]


def benchmark_markdown(dataset, rows, seeds):
    """The benchmark on one dataset as Markdown, a table per setting: rows are {label, recipe,
    fusion, state (what was done, or why not), ours: {setting: {metric: summary}} (compare's),
    published: {setting: {source: numbers}}}; ours, each published value and the difference."""
    metrics = _README_COLUMNS
    lines = [f'## The LLCM benchmark (DEEN paper Table 3) — {_title(dataset)}', '',
             f'Seeds {" ".join(map(str, seeds))}. Values in %.', '']
    for setting in benchmark_settings(dataset):
        lines += [f'### `{setting}`', '', '| method | row | ' + ' | '.join(metrics) + ' |',
                  '|---|---|' + '---:|' * len(metrics)]
        for row in rows:
            lines += _benchmark_lines(row, setting, metrics)
        lines.append('')
    used = sorted({source for row in rows for by_source in row['published'].values()
                   for source in by_source})
    lines += [f'- **{key}**: {SOURCES[key]}' for key in used]
    lines += [f'- caveat: {caveat}' for caveat in BENCHMARK_CAVEATS]
    if dataset in BENCHMARK_PUBLISHED_AS:
        lines.append('- the demo data is synthetic (LLCM\'s layout): its numbers beside LLCM\'s say '
                     'nothing about the published ones; the demo recipe turns random erasing off '
                     'for every method, so AGW and AGW* train alike there.')
    return '\n'.join(lines) + '\n'


def _benchmark_lines(row, setting, metrics):
    """The lines of one method in one setting's table."""
    ours = row['ours'].get(setting)
    published_here = row['published'].get(setting, {})
    what = f'ours ({row["recipe"]}, {row["fusion"]})' if row['recipe'] and row['fusion'] else 'ours'
    cells = [(what, [f'{ours[m]["mean"]:.2f} ± {ours[m]["std"]:.2f}' for m in metrics] if ours
              else [row['state']] + [''] * (len(metrics) - 1))]
    for source, numbers in published_here.items():
        name = BENCHMARK_SOURCE_NAMES.get(source, source)
        cells.append((f'published: {name}', [_cell(numbers.get(m)) for m in metrics]))
        if ours:
            cells.append((f'ours − {name}', [_cell(numbers.get(m) and ours[m]['mean'] - numbers[m],
                                                  signed=True) for m in metrics]))
    return [f'| {row["label"] if number == 0 else ""} | {label} | ' + ' | '.join(values) + ' |'
            for number, (label, values) in enumerate(cells)]


def benchmark_figure_numbers(dataset, rows):
    """The figure's numbers (figures.draw_benchmark): Rank-1 and mAP per method in each figure
    setting, ours beside each published source."""
    panels = []
    for setting in BENCHMARK_FIGURE_SETTINGS[BENCHMARK_PUBLISHED_AS.get(dataset, dataset)]:
        sources = list(dict.fromkeys(source for row in rows
                                     for source in row['published'].get(setting, {})))
        for metric in ('Rank-1', 'mAP'):
            series = {'ours': [_ours_value(row, setting, metric) for row in rows]}
            for source in sources:
                series[BENCHMARK_SOURCE_NAMES.get(source, source)] = [
                    row['published'].get(setting, {}).get(source, {}).get(metric) for row in rows]
            panels.append({'title': f'{_title(dataset)} {setting}: {metric} (%)',
                           'methods': [row['label'] if row['recipe'] else f'{row["label"]} '
                                       f'(not trained)' for row in rows], 'series': series})
    return {'dataset': dataset, 'panels': panels}


def _ours_value(row, setting, metric):
    ours = row['ours'].get(setting)
    return ours[metric]['mean'] if ours else None


# ----------------------------------------------------------------------------------------------
# The paper's ablation tables (reproduce.py --table, --sweep)

ABLATION_SOURCE = ('Zhang & Wang, CVPR 2023 (arXiv 2303.14481), Tables 4-7 and Figure 6: Rank-1 / '
                   'mAP in % of DEEN\'s ablations on LLCM (IR->VIS) and SYSU-MM01 (all-search)')
# The setting of test.py each ablation number stands beside; the demo data (LLCM's layout) is
# compared with LLCM's numbers, which says nothing about the paper's claims.
ABLATION_SETTINGS = {'llcm': 'ir_to_vis', 'sysu': 'all ir_to_vis', 'demo': 'ir_to_vis'}
ABLATION_PUBLISHED_AS = {'demo': 'llcm'}

# A row: (label, the train.py flags that build it, {dataset: (Rank-1, mAP)}). Without a flag a
# switch is released DEEN's (DEE after stage 3, two generated embeddings, MFA, lambda_1 0.8,
# lambda_2 0.01, alpha 0.2); a loss term the network cannot have is off by itself.
NO_MFA = ('--attention', 'none')
ABLATION_TABLES = {
    'components': {
        'title': 'Table 4: DEEN\'s components (DEE, L_cpm, L_ort, MFA)',
        'rows': [
            ('baseline', ('--dee-stage', 'none', *NO_MFA),
             {'llcm': (45.4, 53.6), 'sysu': (60.7, 57.7)}),
            ('DEE', (*NO_MFA, '--lambda_1', '0', '--lambda_2', '0'),
             {'llcm': (50.5, 59.0), 'sysu': (64.7, 62.0)}),
            ('DEE + L_cpm', (*NO_MFA, '--lambda_2', '0'),
             {'llcm': (53.1, 61.1), 'sysu': (69.2, 66.2)}),
            ('DEE + L_ort', (*NO_MFA, '--lambda_1', '0'),
             {'llcm': (51.5, 60.1), 'sysu': (65.3, 63.2)}),
            ('DEE + L_cpm + L_ort', NO_MFA, {'llcm': (53.9, 62.3), 'sysu': (69.8, 66.7)}),
            ('MFA', ('--dee-stage', 'none'), {'llcm': (51.2, 59.6), 'sysu': (64.7, 62.0)}),
            ('DEE + L_cpm + L_ort + MFA', (), {'llcm': (54.9, 62.9), 'sysu': (74.7, 71.8)}),
        ],
        'caveats': [
            'The check marks of Table 4 are lost in the text we have; the row labels are our '
            'reading of it (row 6 = MFA alone is confirmed by Table 7, row 5 equals Table 5\'s '
            'stage-3 row).',
            'L_ort is weighted by the released code\'s lambda_2 = 0.01; the paper states 0.1.'],
    },
    'dee-stage': {
        'title': 'Table 5: where DEE is plugged (DEE + L_cpm + L_ort, no MFA)',
        'rows': [(f'DEE after stage {stage}', ('--dee-stage', str(stage), *NO_MFA), numbers)
                 for stage, numbers in (
                     (0, {'llcm': (48.5, 57.1), 'sysu': (63.4, 59.4)}),
                     (1, {'llcm': (49.4, 57.8), 'sysu': (63.7, 60.8)}),
                     (2, {'llcm': (49.6, 57.9), 'sysu': (65.3, 61.7)}),
                     (3, {'llcm': (53.9, 62.3), 'sysu': (69.8, 66.7)}),
                     (4, {'llcm': (50.9, 59.6), 'sysu': (60.0, 58.0)}))],
        'caveats': ['Stage 0 is after the modality stem; RegDB (not in the table) has DEE after '
                    'stage 2 and no stage 4, as the released code.'],
    },
    'branches': {
        'title': 'Table 6: number of branches (DEE + L_cpm + L_ort, no MFA)',
        'rows': [(f'{name} branches', ('--dee-embeddings', str(generated), *NO_MFA), numbers)
                 for name, generated, numbers in (
                     ('two', 1, {'llcm': (52.6, 60.9), 'sysu': (67.5, 64.6)}),
                     ('three', 2, {'llcm': (53.9, 62.3), 'sysu': (69.2, 66.2)}),
                     ('four', 3, {'llcm': (52.4, 60.7), 'sysu': (67.6, 64.6)}))],
        'caveats': [
            'We read "n branches" as the original embedding plus n - 1 generated ones (released: '
            'two generated, "three"); the paper does not say. With one generated embedding L_ort '
            'has no pair and is off.',
            'Table 6 is inconsistent: its SYSU-MM01 "three" row equals Table 4 row 3 (DEE + '
            'L_cpm), not row 5 (DEE + L_cpm + L_ort), which its LLCM row equals.'],
    },
    'attention': {
        'title': 'Table 7: MFA against a standard non-local (NL) block',
        'rows': [
            ('NL', ('--dee-stage', 'none', '--attention', 'nonlocal'),
             {'llcm': (50.1, 57.4), 'sysu': (63.8, 60.7)}),
            ('MFA', ('--dee-stage', 'none'), {'llcm': (51.2, 59.6), 'sysu': (64.7, 62.0)}),
            ('NL + DEE', ('--attention', 'nonlocal'), {'llcm': (54.2, 62.4), 'sysu': (73.4, 70.3)}),
            ('MFA + DEE', (), {'llcm': (54.9, 62.9), 'sysu': (74.7, 71.8)}),
        ],
        'caveats': [
            'NL is one non-local block after each of ResNet stages 1-3 (where MFA sits) with C/2 '
            'inter-channels (--nonlocal-reduction 2), the standard block of Wang et al. (2018); '
            'the paper does not give its width. AGW\'s released block has 1 inter-channel.'],
    },
}
ABLATION_TABLE_DATASETS = ('llcm', 'sysu')

# Figure 6 (LLCM): the values the paper chose; the swept values are not given.
SWEEP_CHOICES = {'lambda_1': 0.8, 'lambda_2': 0.1, 'cpm_margin': 0.2}
SWEEP_CAVEAT = ('Figure 6 gives only the chosen values (lambda_1 0.8, lambda_2 0.1, alpha 0.2); '
                'the released code uses lambda_2 0.01 and hard-codes alpha 0.2.')


def ablation_published(table, label, dataset):
    """(Rank-1, mAP) in % published for a row of an ablation table on dataset, or None."""
    for row_label, _, numbers in ABLATION_TABLES[table]['rows']:
        if row_label == label:
            return numbers.get(ABLATION_PUBLISHED_AS.get(dataset, dataset))
    return None


def ablation_markdown(table, dataset, rows, seeds):
    """The Markdown of one ablation table on one dataset: rows are {label, ours: {Rank-1, mAP}
    or None (not done)}; each row shows ours, the published numbers and ours - published."""
    spec = ABLATION_TABLES.get(table, {'title': f'sweep of {table}', 'caveats': [SWEEP_CAVEAT]})
    lines = [f'## {spec["title"]} — {_title(dataset)}', '',
             f'Setting `{ABLATION_SETTINGS[dataset]}`; ours: mean over seeds '
             f'{" ".join(map(str, seeds))}. Values in %.', '',
             '| row | ours Rank-1 | ours mAP | published Rank-1 | published mAP | Δ Rank-1 | Δ mAP |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for row in rows:
        ours, paper = row['ours'], row.get('published')
        cells = [_cell(ours and ours['Rank-1']), _cell(ours and ours['mAP']),
                 _cell(paper and paper[0]), _cell(paper and paper[1]),
                 _cell(ours and paper and ours['Rank-1'] - paper[0], signed=True),
                 _cell(ours and paper and ours['mAP'] - paper[1], signed=True)]
        lines.append(f'| {row["label"]} | ' + ' | '.join(cells) + ' |')
    lines += ['', f'- source: {ABLATION_SOURCE}']
    lines += [f'- caveat: {caveat}' for caveat in spec['caveats']]
    if dataset == 'demo':
        lines.append('- the demo data is synthetic (LLCM\'s layout): its numbers beside LLCM\'s say '
                     'nothing about the paper\'s claims on real data.')
    return '\n'.join(lines) + '\n'


def ablation_numbers(records, setting, fusion):
    """{Rank-1, mAP} in %, the mean over every trial of the results records of one row (its
    seeds), as compare's 'ours'."""
    by_seed = {seed: record['results'][setting][fusion] for seed, record in records}
    return {metric: _summary({seed: values[metric][2] for seed, values in by_seed.items()})['mean']
            for metric in ('Rank-1', 'mAP')}


# ----------------------------------------------------------------------------------------------
# Corrupted test images (reproduce.py --table robustness): CIL's published cross-modality rows

CORRUPTED_SOURCES = {
    'cil-readme': 'Chen et al., "Benchmarks for Corruption Invariant Person Re-identification", '
                  'NeurIPS 2021 Datasets and Benchmarks, released code README, "Cross-modality '
                  'datasets" table, AGW rows (Mode A / B: SYSU-MM01 all / indoor search, RegDB '
                  'visible-to-thermal / thermal-to-visible; only visible images corrupted; '
                  'SYSU-MM01 gallery trial 0), https://github.com/MinghuiChen43/CIL-ReID/blob/'
                  '038af273fee3d212dd8e13f621d6776f9387332a/README.md',
}
# CIL's AGW is Ye et al.'s cross-modality AGW baseline (its clean SYSU-MM01 numbers are those of
# the AGW paper); CIL does not say whether it trained with random erasing, so the rows stand
# beside both of our AGW recipes. No numbers are published for LLCM (LLCM-C is ours).
_CIL_AGW = {
    'all ir_to_vis': ({'mINP': 36.17, 'mAP': 47.65, 'Rank-1': 47.50},
                      {'mINP': 14.73, 'mAP': 29.99, 'Rank-1': 34.42}),
    'indoor ir_to_vis': ({'mINP': 59.74, 'mAP': 62.97, 'Rank-1': 54.17},
                         {'mINP': 35.39, 'mAP': 40.98, 'Rank-1': 33.80}),
    'vis_to_ir': ({'mINP': 54.10, 'mAP': 68.82, 'Rank-1': 75.78},
                  {'mINP': 32.88, 'mAP': 43.09, 'Rank-1': 45.44}),
    'ir_to_vis': ({'mINP': 52.40, 'mAP': 68.15, 'Rank-1': 75.29},
                  {'mINP': 6.00, 'mAP': 41.37, 'Rank-1': 67.54}),
}
CORRUPTED_PUBLISHED = {
    (method, dataset, setting): {'cil-readme': {'clean': clean, 'corrupted': corrupted}}
    for method in ('agw', 'agw-plain')
    for dataset, settings in (('sysu', ('all ir_to_vis', 'indoor ir_to_vis')),
                              ('regdb', ('vis_to_ir', 'ir_to_vis')))
    for setting in settings
    for clean, corrupted in [_CIL_AGW[setting]]
}


def corrupted_published(method, dataset, setting):
    """{source: {'clean': {metric: %}, 'corrupted': {metric: %}}} CIL published for a setting of
    ours ({} where nothing is published: every method but AGW, LLCM, the demo)."""
    return CORRUPTED_PUBLISHED.get((method, dataset, setting), {})
# Generalisation to an unseen dataset (reproduce.py --table cross-dataset | transfer)

L2RW_SOURCE = ('L2RW: "Lab-to-Real-World" (CVPR 2025), repository Joey623/L2RW (MIT), the '
               'notebooks ES/*/test.ipynb: Rank-1 / mAP in % of IR→VIS, trained on two of RegDB '
               '(one split, 206 identities), SYSU-MM01 (train + val, 395) and LLCM (713) merged by '
               'offsets, tested on the third')
L2RW_CAVEATS = ('Their settings: 30 epochs, SYSU-MM01\'s random erasing for every source, the last '
                'epoch (no model selection), no flip at test (ours sums each image\'s features with '
                'its flip\'s), their CAJ without the ADP triplet (WRT instead); our --recipe l2rw '
                'follows the training settings, not the test without flip. The numbers are '
                'transcribed from notebook outputs (one run each, seed not stated); AGW\'s L+S→R '
                'is not shown there. LbA and DNS are not methods of this repository.')
# protocol -> (the datasets trained on, the target); R = RegDB, S = SYSU-MM01, L = LLCM
LEAVE_ONE_OUT = {'R+S→L': (('regdb', 'sysu'), 'llcm'), 'R+L→S': (('regdb', 'llcm'), 'sysu'),
                 'L+S→R': (('sysu', 'llcm'), 'regdb')}
# The setting of each target that L2RW reports (IR→VIS everywhere; SYSU-MM01 all-search).
TRANSFER_SETTINGS = {'sysu': 'all ir_to_vis', 'llcm': 'ir_to_vis', 'regdb': 'ir_to_vis'}
# (method, protocol) -> {metric: %}; our recipes' names (agw: AGW with random erasing)
L2RW_PUBLISHED = {
    ('deen', 'R+S→L'): {'Rank-1': 10.50, 'mAP': 14.09},
    ('deen', 'R+L→S'): {'Rank-1': 9.48, 'mAP': 10.03},
    ('deen', 'L+S→R'): {'Rank-1': 19.42, 'mAP': 19.44},
    ('caj', 'R+S→L'): {'Rank-1': 11.35, 'mAP': 15.03},
    ('caj', 'R+L→S'): {'Rank-1': 10.90, 'mAP': 11.18},
    ('caj', 'L+S→R'): {'Rank-1': 16.55, 'mAP': 17.40},
    ('agw', 'R+S→L'): {'Rank-1': 9.08, 'mAP': 12.37},
    ('agw', 'R+L→S'): {'Rank-1': 9.59, 'mAP': 10.42},
    ('lba', 'R+S→L'): {'Rank-1': 8.38, 'mAP': 12.20},
    ('lba', 'R+L→S'): {'Rank-1': 8.09, 'mAP': 9.55},
    ('lba', 'L+S→R'): {'Rank-1': 12.01, 'mAP': 11.69},
    ('dns', 'R+S→L'): {'Rank-1': 10.14, 'mAP': 13.55},
    ('dns', 'R+L→S'): {'Rank-1': 11.75, 'mAP': 11.77},
    ('dns', 'L+S→R'): {'Rank-1': 18.87, 'mAP': 18.36},
}


def transfer_numbers(records, setting, fusion):
    """{metric: mean %} of Rank-1 and mAP over every trial of every record (seeds, RegDB splits)
    of one training and target, or None without a record."""
    if not records:
        return None
    by_metric = {metric: [value for record in records
                          for value in record['results'][setting][fusion][metric][2]]
                 for metric in ('Rank-1', 'mAP')}
    return {metric: 100 * float(np.mean(values)) for metric, values in by_metric.items()}


def cross_dataset_markdown(method, rows, fusion):
    """The leave-one-out table: per protocol ours (mean over trials and seeds), L2RW's and the
    difference; rows: [{protocol, seeds, ours, published}]."""
    lines = [f'### {method}: trained on two datasets, tested on the third (IR→VIS, fusion '
             f'{fusion}, %)', '',
             '| protocol | seeds | ours Rank-1 | ours mAP | L2RW Rank-1 | L2RW mAP | Δ Rank-1 '
             '| Δ mAP |', '|---|---|---|---|---|---|---|---|']
    for row in rows:
        ours, paper = row['ours'] or {}, row['published'] or {}
        delta = {m: ours[m] - paper[m] for m in ('Rank-1', 'mAP') if m in ours and m in paper}
        cells = [_cell(ours.get('Rank-1')), _cell(ours.get('mAP')), _cell(paper.get('Rank-1')),
                 _cell(paper.get('mAP')), _cell(delta.get('Rank-1'), True),
                 _cell(delta.get('mAP'), True)]
        lines.append(f'| {row["protocol"]} | {_listed(row["seeds"]) or "-"} | ' + ' | '.join(cells)
                     + ' |')
    return '\n'.join(lines + ['', f'Source: {L2RW_SOURCE}.', '', f'Caveats: {L2RW_CAVEATS}', ''])


def transfer_markdown(method, numbers):
    """The transfer matrix as a table: a row per training dataset, a column per target, each cell
    Rank-1 / mAP in % (the diagonal in-domain)."""
    targets = numbers['targets']
    lines = [f'### {method}: train on one dataset, test on each (IR→VIS, fusion '
             f'{numbers["fusion"]}, Rank-1 / mAP %, the diagonal in-domain)', '',
             '| trained on \\ tested on | ' + ' | '.join(_title(t) for t in targets) + ' |',
             '|---|' + '---|' * len(targets)]
    for source, row in zip(numbers['sources'], numbers['cells']):
        cells = [f'{cell["Rank-1"]:.2f} / {cell["mAP"]:.2f}' if cell else '-' for cell in row]
        lines.append(f'| {_title(source)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines + [''])
