"""The published numbers of DEEN, AGW (with and without random erasing) and CAJ, in one table
with their sources, and the comparison of our results with them: ours as mean ± std over trials and seeds, the difference, the protocol;
L2RW's cross-dataset numbers and the tables of reproduce.py --table cross-dataset | transfer."""
import os

import numpy as np

from data_manager import dataset_facts, layout_of
from evaluation import describe_setting, write_results
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
                    'AGW, AGW* (with random erasing) and CAJ: Rank-1 and mAP of IR->VIS and '
                    'VIS->IR (read here as the standard VIS->IR; the paper does not say which '
                    'gallery its VIS->IR draws)',
    'caj-readme': 'Ye et al., "Channel Augmented Joint Learning for Visible-Infrared '
                  'Recognition", ICCV 2021, released code README (results table), '
                  'https://github.com/mangye16/Cross-Modal-Re-ID-baseline/blob/'
                  '26bc0ce088eb97867ff489dceda386b8092b9fde/ICCV21_CAJ/README.md; SYSU-MM01 '
                  'all-search; RegDB: the README names no direction, its testa.py tests visible '
                  'queries against the thermal gallery by default (vis_to_ir)',
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
        'readme-da47925': {'Rank-1': 55.52, 'Rank-10': 83.88, 'Rank-20': 89.98, 'mAP': 62.07}},
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


def comparison_markdown(comparison):
    """The comparison as a Markdown section: a table per dataset and method with ours (mean ±
    std), the seed spread, each published value and the difference, then sources and provenance."""
    seeds = comparison['seeds']
    trial_word = 'splits' if comparison['dataset'] == 'regdb' else 'gallery trials'
    lines = [f'## {comparison["title"]}, {comparison["method"].upper()}', '',
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
