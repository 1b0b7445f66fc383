"""The methods this codebase trains, found by their --method name: each is one module that declares
its network, training views, criterion, recipe, per-epoch state, test features and fusions
(methods/base.py says what a method declares). Adding a method adds its module and one entry here."""
from methods.agw import AGW_METHOD, CAJ_METHOD
from methods.dart import DART_METHOD
from methods.ddag import DDAG_METHOD
from methods.deen import DEEN_METHOD
from methods.lba import LBA_METHOD
from methods.mmn import MMN_METHOD
from model import backbone_state_dict
from utils import UserError

METHODS = {method.name: method for method in (DEEN_METHOD, AGW_METHOD, CAJ_METHOD, DDAG_METHOD,
                                             MMN_METHOD, LBA_METHOD, DART_METHOD)}


def get_method(name):
    """The Method registered under `name` (a --method value or a checkpoint's 'method')."""
    try:
        return METHODS[name]
    except KeyError:
        raise UserError(f'--method must be one of {", ".join(METHODS)}, got {name!r}.') from None


def fusion_names():
    """Every method's fusion names, in order (the choices of the tools' --fusion; what a name
    compares depends on the checkpoint's method: methods.find_fusion)."""
    return tuple(dict.fromkeys(name for method in METHODS.values() for name in method.fusions))


def find_fusion(name, method):
    """The fusion `name` of a method (a Method or its name): weights or a callable."""
    method = get_method(method) if isinstance(method, str) else method
    if name not in method.fusions:
        raise UserError(f'--fusion {name} is not reported for {method.title}; use one of '
                        f'{", ".join(method.fusions)}.')
    return method.fusions[name]


def method_of_weights(keys):
    """The method whose network a state dict's keys (in our layout) describe, or None."""
    return next((method.name for method in METHODS.values()
                 if method.is_released_state_dict(keys)), None)


def build_network(method, num_classes, dataset, pretrained=None, arch='resnet50', settings=None):
    """A method's network (a Method or its name) for `dataset`'s `num_classes` identities on the
    trunk `arch`, as `settings` (what its checkpoint records; None: the method's default) say.
    pretrained: 'imagenet', a path to a torchvision state dict of `arch`, or None / 'none'; the
    weights are read after the network is built, so a seed gives the same initial weights."""
    method = get_method(method) if isinstance(method, str) else method
    model = method.build_network(num_classes, dataset, arch, settings)
    weights = backbone_state_dict(pretrained, arch)
    if weights is not None:
        method.load_pretrained(model, weights, source=pretrained)
    return model
