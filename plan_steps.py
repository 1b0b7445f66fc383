"""What every table of reproduce.py does with a part of its plan: say where the plan stands, and
train a part that is not finished (resuming its `last`), saying how to continue an interrupted one."""
import training


def announce(ctx, text):
    """One line of the plan's progress, on the main process."""
    if ctx.is_main:
        print(f'\n==> {text}', flush=True)


def train_unfinished(part, status, header, ctx, resumed=''):
    """Train `part` (its train_argv and checkpoint) unless `status` says it is finished; returns 0,
    or training.main's code when the training was interrupted (130)."""
    if status.finished:
        return 0
    announce(ctx, f'{header}: training ({status.epochs} epochs{resumed})')
    code = training.main(part.train_argv(resume=status.resumable))
    if code != 0:
        announce(ctx, f'{header}: training interrupted; run the same reproduce.py command again '
                      f'to continue from {part.checkpoint("last")}')
    return code
