"""DEEN (Zhang & Wang, CVPR 2023) as a method: its network (model.DEEN) with the paper's ablation
switches, its criterion (id + batch-hard triplet + CPM + orthogonal), the released recipe and the
flags that only DEEN takes."""
import argparse
from dataclasses import asdict

from loss import build_criterion
from methods.base import Method
from model import ATTENTIONS, DEE_STAGES, DEEN, SWITCHES, NetworkSwitches
from utils import UserError, flag

# loss weight -> (its default, the generated embeddings its term needs)
LOSS_WEIGHTS = {'lambda_1': (0.8, 1), 'lambda_2': (0.01, 2)}


def dee_stage_value(text):
    """--dee-stage's value: 0..4 or 'none'."""
    if text.lower() == 'none':
        return 'none'
    if text.isdigit() and int(text) in DEE_STAGES:
        return int(text)
    raise argparse.ArgumentTypeError(f'expected 0..4 or none, got {text!r}')


class DEENMethod(Method):
    name, title = 'deen', 'DEEN'
    summary = ('Two-stream ResNet-50 with MFA blocks after stages 1-3 and a DEE module that '
               'generates two extra embeddings per image; id + triplet + CPM + orthogonal loss.')
    # The released DEEN train.py (ZYK100/LLCM DEEN/train.py) and METHOD.md's recipe.
    recipe = dict(lr=0.1, batch_size=6, num_pos=4, img_h=384, img_w=144, epochs=151,
                  lr_steps=(20, 80), warmup=10, grayscale=0.5, erasing=(0.02, 0.4), pad=10)
    dataset_recipes = {'sysu': dict(erasing=(0.2, 0.8))}
    own_flags = (*SWITCHES, 'lambda_1', 'lambda_2')
    released_image_size = (384, 144)

    def add_arguments(self, group):
        group.add_argument('--lambda_1', type=float, help='weight of the CPM loss (default: 0.8)')
        group.add_argument('--lambda_2', type=float, help='weight of the orthogonal loss (default: '
                           '0.01, as the released code; the paper states 0.1)')
        group.add_argument('--cpm-margin', type=float, default=0.2, help='CPM margin alpha')
        group.add_argument('--dee-stage', type=dee_stage_value, help='where DEE sits: 0 (after the '
                           'modality stem), 1..4 (after ResNet stage k), or none (one embedding '
                           'per image, no L_cpm / L_ort) (default: 3, RegDB 2, as released)')
        group.add_argument('--dee-embeddings', type=int, help='embeddings DEE generates (default: '
                           '2)')
        group.add_argument('--attention', choices=ATTENTIONS, help='block after ResNet stages 1-3 '
                           '(RegDB 1-2): mfa, nonlocal (a standard non-local block) or none '
                           '(default: mfa)')
        group.add_argument('--nonlocal-reduction', type=int, help='--attention nonlocal: its '
                           'blocks have C / this inter-channels (default: 2, the standard '
                           'non-local block)')

    def foreign_flags_message(self, given, method):
        names = [flag(dest) for dest in given]
        if set(given) <= set(SWITCHES):
            return (f'{", ".join(names)} switch(es) DEEN\'s parts; use them with '
                    f'{flag("method")} deen, not {method.name}.')
        return (f'{", ".join(names)} weigh(s) DEEN\'s loss terms; use them with {flag("method")} '
                f'deen, not {method.name}.')

    def resolve(self, args):
        """Fill DEEN's switches (unset: the released network of the dataset) and the loss
        weights: a term whose embeddings the network lacks (L_cpm without DEE, L_ort with fewer
        than two generated) is off, and an explicit non-zero weight for it is refused."""
        if args.dee_stage == 'none' and args.dee_embeddings is not None:
            raise UserError(f'{flag("dee_embeddings")} sets how many embeddings DEE generates, but '
                            f'{flag("dee_stage")} none turns DEE off; pass one of them.')
        released = asdict(NetworkSwitches.released(args.dataset == 'regdb'))
        for dest in SWITCHES:
            if getattr(args, dest) is None:
                setattr(args, dest, released[dest])
        switches = NetworkSwitches.from_args(args)
        switches.check(args.dataset == 'regdb')
        generated = switches.num_branches - 1
        for dest, (default, needed) in LOSS_WEIGHTS.items():
            value = getattr(args, dest)
            if generated >= needed:
                setattr(args, dest, default if value is None else value)
            elif value:
                raise UserError(f'{flag(dest)} {value} weighs a loss term this network cannot have: '
                                f'it needs {needed} generated embedding(s), and '
                                f'{switches.describe()} gives {generated}; pass {flag(dest)} 0 or '
                                f'change {flag("dee_stage")} / {flag("dee_embeddings")}.')
            else:
                setattr(args, dest, 0.0)

    def network_settings(self, args):
        return asdict(NetworkSwitches.from_args(args))

    def recorded_settings(self, dataset, recorded):
        return asdict(NetworkSwitches.of(dataset, recorded))

    def describe_network(self, args):
        switches = NetworkSwitches.from_args(args)
        off = [name for name, dest in (('L_cpm', 'lambda_1'), ('L_ort', 'lambda_2'))
               if LOSS_WEIGHTS[dest][1] > switches.num_branches - 1]
        line = (f'DEEN network: {switches.describe()}, {switches.num_branches} embedding(s) per '
                f'image')
        if off:
            line += (f'; {" and ".join(off)} off ({switches.num_branches - 1} generated '
                     f'embedding(s): L_cpm needs one, L_ort two)')
        return line

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        switches = NetworkSwitches.of(dataset, settings)
        return DEEN(num_classes, regdb=dataset == 'regdb', arch=arch, switches=switches)

    def build_criterion(self, args, views):
        return build_criterion('deen', margin=args.margin, lambda_1=args.lambda_1,
                               lambda_2=args.lambda_2, cpm_margin=args.cpm_margin,
                               views=len(views))

    def is_released_state_dict(self, keys):
        return any(key.startswith(('mfa1.', 'dee.')) for key in keys)


DEEN_METHOD = DEENMethod()
