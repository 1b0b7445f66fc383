"""Runs train.py under torchrun and records, per process and step, a hash of the weights after
the optimiser step and the identities trained on; tests/test_distributed.py reads the records."""
import hashlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import training  # noqa: E402


def weights_hash(model):
    digest = hashlib.sha1()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def instrument(records):
    """Wrap Trainer so that each step appends its identities and the resulting weights' hash."""
    original_init = training.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        step, criterion = self.optimizer.step, self.criterion

        def recorded_step(*step_args, **step_kwargs):
            result = step(*step_args, **step_kwargs)
            records['weights'].append(weights_hash(self.model))
            return result

        def recorded_criterion(output, labels):
            if not records['plan']:
                records['plan'] = self.sampler.batch_plan().tolist()
            records['ids'].append(sorted(set(labels.tolist())))
            return criterion(output, labels)

        self.optimizer.step, self.criterion = recorded_step, recorded_criterion

    training.Trainer.__init__ = init


def main():
    records = {'weights': [], 'ids': [], 'plan': []}
    instrument(records)
    code = training.main(sys.argv[1:])
    with open(os.path.join(os.environ['PROBE_OUT'], f'probe_rank{os.environ["RANK"]}.json'), 'w') as f:
        json.dump(records, f)
    return code


if __name__ == '__main__':
    sys.exit(main())
