"""--compile is real: test.py and the evaluation during training extract features with a
torch.compile'd network (observed: the compiled module type and the graphs Dynamo captured),
compiled once per run, and give the numbers of the uncompiled network. Inductor, the default
backend, compiles each graph to C++ on the CPU, about 40 s per graph on our 2 cores (README,
"Several GPUs or nodes"); these tests compile with the aot_eager backend instead: the same Dynamo
capture and AOTAutograd graphs, run by eager kernels."""
import json

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.utils import counters

import evaluation
import inference
import test as test_script
import training
from tiny_runs import seeded_checkpoint, train_argv

LLCM_CLASSES = 6  # conftest's LLCM_TINY training identities


@pytest.fixture
def compiled(monkeypatch):
    """Every torch.compile call, as (module compiled, compiled module), made with aot_eager."""
    calls, real_compile = [], torch.compile

    def compile_aot_eager(model, **kwargs):
        result = real_compile(model, backend='aot_eager', **kwargs)
        calls.append((model, result))
        return result

    monkeypatch.setattr(torch, 'compile', compile_aot_eager)
    torch._dynamo.reset()
    counters.clear()
    yield calls
    torch._dynamo.reset()


def flat_numbers(value, prefix=''):
    """{path: number} of every number in nested dicts and lists."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat_numbers(item, f'{prefix}/{key}').items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat_numbers(item, f'{prefix}/{i}').items()}
    return {prefix: value} if isinstance(value, (int, float)) else {}


def test_test_py_compile_extracts_with_a_compiled_network_and_the_same_numbers(
        compiled, llcm_root, tmp_path):
    checkpoint = tmp_path / 'model.pth'
    seeded_checkpoint(checkpoint, 'llcm', LLCM_CLASSES, random_batchnorm=True)
    argv = ['--dataset', 'llcm', '--data-path', str(llcm_root), '--resume', str(checkpoint),
            '--device', 'cpu', '--workers', '0', '--test-batch', '256', '--trial', '0']
    assert test_script.main(argv + ['--output', str(tmp_path / 'eager.json')]) == 0
    assert compiled == []
    assert test_script.main(argv + ['--output', str(tmp_path / 'compiled.json'), '--compile']) == 0
    assert len(compiled) == 1  # one network, compiled once for both modalities and all splits
    network, module = compiled[0]
    assert type(network).__name__ == 'DEEN' and isinstance(module, OptimizedModule)
    assert counters['stats']['unique_graphs'] >= 2  # a graph per stem: the forward ran compiled
    eager, result = (json.load(open(tmp_path / f'{name}.json'))['results'] for name in ('eager', 'compiled'))
    assert flat_numbers(result) == pytest.approx(flat_numbers(eager), abs=1e-5)
    assert len(flat_numbers(eager)) > 20


def test_training_compiles_the_evaluation_network_once_per_run(compiled, llcm_root, tmp_path):
    out = str(tmp_path)
    assert training.main(train_argv('llcm', llcm_root, out, '--epochs', 2, '--max-steps', 1,
                                    '--compile')) == 0
    # the training network and the extraction network, not one per epoch's evaluation
    assert len(compiled) == 2 and all(isinstance(m, OptimizedModule) for _, m in compiled)
    assert compiled[0][0] is compiled[1][0]  # both share the one set of weights
    history = [json.loads(line) for line in open(tmp_path / 'logs' / 'llcm_deen_history.jsonl')]
    assert [r['epoch'] for r in history] == [0, 1] and all(r['metrics'] for r in history)
    model, _ = inference.load_trained_model(str(tmp_path / 'models' / 'llcm_deen_last.pth'), 'llcm')
    args = training.parse_args(train_argv('llcm', llcm_root, out))
    eager = evaluation.selection_rank1(model, 'llcm', str(llcm_root), 1, 'all', args,
                                       torch.device('cpu'))
    for key in ('rank1', 'mAP', 'mINP'):
        assert history[-1]['metrics'][key] == pytest.approx(eager[key], abs=1e-5)
