"""reproduce.py --table benchmark: the LLCM benchmark's rows (every method of the DEEN paper's
Table 3, those not in this codebase listed with their published numbers only), the dry run that
writes nothing, the report and figure from the published numbers alone, its refusals, and the
transcribed README table against the published numbers elsewhere in paper_results."""
import json

import pytest
from PIL import Image

import figures
import paper_results
import reproduce
from paper_results import BENCHMARK_ROWS, LLCM_README, PUBLISHED
from utils import UserError

LABELS = ['DDAG', 'LbA', 'AGW', 'AGW*', 'CAJ', 'MMN', 'MRCN', 'DART', 'DEEN']


def test_dry_run_lists_every_row_and_writes_nothing(tmp_path, capsys):
    out, data = tmp_path / 'out', tmp_path / 'demo'
    assert reproduce.main(['--table', 'benchmark', '--dataset', 'demo', '--dry-run', '--out',
                           str(out), '--data-path', str(data)]) == 0
    printed = capsys.readouterr().out
    for row in BENCHMARK_ROWS:
        trained = row.recipe in reproduce.training.RECIPES
        line = (f'demo {row.recipe} [{row.label}] seed 0: train and test' if trained
                else f'[-] demo {row.label}: ')
        assert line in printed, line
    assert 'demo MRCN: not trained by this codebase' in printed
    assert not out.exists() and not data.exists()


def test_sysu_runs_the_rows_that_publish_numbers_there(tmp_path, capsys):
    assert reproduce.main(['--table', 'benchmark', '--dataset', 'sysu', '--dry-run', '--out',
                           str(tmp_path / 'out')]) == 0
    printed = capsys.readouterr().out
    planned = [row.label for row in paper_results.benchmark_dataset_rows('sysu')]
    assert {'DDAG', 'CAJ', 'DEEN'} <= set(planned) and 'AGW' not in planned
    assert '[-] sysu AGW: no published numbers on sysu: not run' in printed
    assert 'sysu deen [DEEN] seed 0: train and test' in printed


@pytest.mark.parametrize('extra, dest', [(['--method', 'ddag'], '--method'),
                                         (['--fusion', 'att'], '--fusion')])
def test_a_method_or_fusion_flag_is_refused_in_one_sentence(extra, dest):
    with pytest.raises(UserError) as error:
        reproduce.parse_args(['--table', 'benchmark', *extra])
    message = str(error.value)
    assert dest in message and 'its own recipe' in message and message.count('. ') == 0


def test_report_without_trainings_writes_the_published_rows_and_the_figure(tmp_path, capsys):
    out = tmp_path / 'out'
    assert reproduce.main(['--table', 'benchmark', '--dataset', 'demo', '--report', '--out',
                           str(out), '--data-path', str(tmp_path / 'demo')]) == 0
    table = json.loads((out / 'benchmark' / 'demo_benchmark.json').read_text())
    assert [row['label'] for row in table['rows']] == LABELS
    by_label = {row['label']: row for row in table['rows']}
    assert all(row['ours'] == {} for row in table['rows'])
    assert by_label['DDAG']['fusion'] == 'att' and by_label['DEEN']['fusion'] == 'pool+feat'
    assert by_label['MRCN']['published']['ir_to_vis']['readme-benchmark']['Rank-1'] == 51.32
    assert by_label['AGW']['published']['vis_to_ir'] == {
        'paper-table3': {'Rank-1': 51.5, 'mAP': 55.3}}
    assert by_label['AGW*']['published']['released_vis_to_ir']['readme-benchmark']['mAP'] == 47.21
    figure = json.loads((out / 'benchmark' / 'demo_benchmark_figure.json').read_text())
    assert [panel['title'].split(' ')[-2:] for panel in figure['panels']] == [['Rank-1', '(%)'],
                                                                           ['mAP', '(%)']] * 2
    first = figure['panels'][0]
    assert first['series']['ours'] == [None] * len(LABELS)
    assert first['series']['DEEN README'][0] == 42.36 and first['methods'][6] == 'MRCN (not trained)'
    with Image.open(out / 'benchmark' / 'demo_benchmark.png') as png:
        assert png.size == figures.figure_size(len(figure['panels']))
    markdown = (out / 'benchmark' / 'demo_benchmark.md').read_text()
    assert '| MRCN | ours | not trained by this codebase' in markdown
    assert 'readme-benchmark' in markdown and '| published: DEEN README | 42.36 |' in markdown


def test_ours_and_the_difference_in_the_markdown():
    ours = {metric: {'mean': 40.0, 'std': 1.0} for metric in paper_results.METRICS}
    row = {'label': 'DDAG', 'recipe': 'ddag', 'fusion': 'att', 'state': 'done',
           'ours': {'ir_to_vis': ours},
           'published': {'ir_to_vis': {'readme-benchmark': LLCM_README['DDAG']['ir_to_vis']}}}
    markdown = paper_results.benchmark_markdown('llcm', [row], [0])
    assert '| DDAG | ours (ddag, att) | 40.00 ± 1.00 | 40.00 ± 1.00 | 40.00 ± 1.00 | 40.00 ± 1.00 |' in markdown
    assert '|  | ours − DEEN README | -2.36 | -32.69 | -40.63 | -8.97 |' in markdown


def test_the_readme_table_agrees_with_the_published_numbers():
    readme_row = {'readme-ddag': 'DDAG', 'readme-agw': 'AGW', 'readme-caj': 'CAJ',
                  'readme-da47925': 'DEEN'}
    checked = 0
    for (_, dataset, setting), by_source in PUBLISHED.items():
        for source, numbers in by_source.items():
            if source in readme_row and dataset == 'llcm':
                assert numbers == LLCM_README[readme_row[source]][setting], (source, setting)
                checked += 1
    assert checked == 8
    assert [row.label for row in BENCHMARK_ROWS] == LABELS
    assert [row.readme for row in BENCHMARK_ROWS if row.readme] == list(LLCM_README)
