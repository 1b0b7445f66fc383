"""Runs train.py under torchrun and records, per process and step, a hash of the weights after
the optimiser step, the identities trained on, and the augmentation seed of every training sample
fetched (which names its global batch); PROBE_SIGNAL="KILL@3" (or TERM@3) makes the process of
rank PROBE_SIGNAL_RANK (default 0; "any": every process of the launcher) send itself that signal
during its 3rd step, in the first attempt of an elastic run only, and "NODE@3" SIGKILLs its
launcher (the torchrun agent, its parent) and then itself, as when a node dies; PROBE_LATE_RANK="0" makes that rank join each restarted attempt
2 s after the others, as a process that starts slowly does. tests/test_distributed.py reads the
records."""
import hashlib
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data_loader  # noqa: E402
import training  # noqa: E402


def weights_hash(model):
    digest = hashlib.sha1()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def new_records():
    return {'weights': [], 'ids': [], 'plan': [], 'seeds': []}


def planned_signal():
    """(signal, step number) that PROBE_SIGNAL asks of this process, or None."""
    wanted = os.environ.get('PROBE_SIGNAL')
    first_attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0'
    this_rank = os.environ.get('PROBE_SIGNAL_RANK', '0') in ('any', os.environ.get('RANK', '0'))
    if not (wanted and first_attempt and this_rank):
        return None
    name, step = wanted.split('@')
    return (name if name == 'NODE' else getattr(signal, 'SIG' + name)), int(step)


def send(planned):
    """Send the planned signal to this process ('NODE': SIGKILL its launcher first)."""
    if planned == 'NODE':
        os.kill(os.getppid(), signal.SIGKILL)
        planned = signal.SIGKILL
    os.kill(os.getpid(), planned)


def instrumented_init(records, original_init):
    """Trainer.__init__ that also makes each step append its identities and the resulting
    weights' hash to records (and send PROBE_SIGNAL's signal)."""
    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        step, criterion, planned = self.optimizer.step, self.criterion, planned_signal()

        def recorded_step(*step_args, **step_kwargs):
            result = step(*step_args, **step_kwargs)
            records['weights'].append(weights_hash(self.model))
            return result

        def recorded_criterion(output, labels):
            if not records['plan']:
                batches = self.sampler.batches + self.ctx.world_size  # past the end, too
                records['plan'] = self.sampler.batch_plan(batches).tolist()
            records['ids'].append(sorted(set(labels.tolist())))
            if planned and len(records['ids']) == planned[1]:
                send(planned[0])
            return criterion(output, labels)

        self.optimizer.step, self.criterion = recorded_step, recorded_criterion
    return init


def recording_getitem(records, original_getitem):
    """CrossModalTrainSet.__getitem__ that appends each sample's augmentation seed to records."""
    def getitem(self, index):
        records['seeds'].append(int(index[2]))
        return original_getitem(self, index)
    return getitem


def join_late_on_restart():
    """Sleep 2 s before joining the group in a restarted attempt if PROBE_LATE_RANK names this
    process's rank: the others then read the store before this rank publishes its address."""
    restarted = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0'
    if restarted and os.environ.get('PROBE_LATE_RANK') == os.environ.get('RANK'):
        time.sleep(2)


def main():
    join_late_on_restart()
    records = new_records()
    training.Trainer.__init__ = instrumented_init(records, training.Trainer.__init__)
    dataset = data_loader.CrossModalTrainSet
    dataset.__getitem__ = recording_getitem(records, dataset.__getitem__)
    code = training.main(sys.argv[1:])
    with open(os.path.join(os.environ['PROBE_OUT'], f'probe_rank{os.environ["RANK"]}.json'), 'w') as f:
        json.dump(records, f)
    return code


if __name__ == '__main__':
    sys.exit(main())
