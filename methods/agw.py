"""AGW (Ye et al., TPAMI 2021) and CAJ (Ye et al., ICCV 2021) as methods: AGW's network
(model.AGW: non-local blocks, GeM, BNNeck), the ADP triplet family (AGW's weighted regularised
triplet is its square-off, alpha = gamma = 1 case), CAJ's three channel-augmented views, their
released recipes and the ADP flags they alone take."""
from loss import build_criterion
from methods.base import AGW_SCHEDULE, SINGLE_FEATURE_FUSIONS, Method
from model import AGW
from utils import flag

ADP_FLAGS = ('adp_alpha', 'adp_gamma', 'adp_square')


def adp_settings(args):
    """The ADP triplet's build_criterion arguments from resolved train.py flags."""
    return {'adp_alpha': args.adp_alpha, 'adp_gamma': args.adp_gamma,
            'adp_square': bool(args.adp_square)}


class AGWMethod(Method):
    name, title = 'agw', 'AGW'
    summary = ('Two-stream ResNet-50 with non-local blocks in stages 2-3, GeM pooling and BNNeck; '
               'identity loss + weighted regularised triplet.')
    # The released AGW train.py (ZYK100/LLCM AGW/train.py; mangye16/Cross-Modal-Re-ID-baseline).
    recipe = dict(**AGW_SCHEDULE, batch_size=8, num_pos=4, img_h=288, img_w=144, epochs=81,
                  grayscale=0.0, erasing=(0.02, 0.4), adp_alpha=1.0, adp_gamma=1.0, adp_square=0)
    # The DEEN paper's AGW row trains without random erasing (its AGW* is the released recipe).
    named_recipes = {'agw-plain': ['--no-random-erasing']}
    own_flags = ADP_FLAGS
    released_image_size = (288, 144)

    def add_arguments(self, group):
        if ADP_FLAGS[0] in {action.dest for action in group._group_actions}:
            return  # AGW and CAJ share these flags
        group.add_argument('--adp-alpha', type=float, help="ADP triplet's softmax temperature "
                           '(agw, caj; default: 1)')
        group.add_argument('--adp-gamma', type=float, help="ADP triplet's scale (agw, caj; "
                           'default: 1)')
        group.add_argument('--adp-square', type=int, choices=(0, 1),
                           help='ADP triplet squared and clamped at 88 (caj default: 1) or soft '
                           "margin (0: AGW's weighted regularised triplet)")

    def foreign_flags_message(self, given, method):
        return (f'{flag(given[0])} sets the ADP triplet of {flag("method")} agw and caj; '
                f'{method.name} does not train with it.')

    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        return AGW(num_classes, arch=arch)

    def build_criterion(self, args, views):
        return build_criterion(self.name, **adp_settings(args))

    def is_released_state_dict(self, keys):
        return any(key.startswith(('layer2_non_local.', 'layer3_non_local.')) for key in keys)


class CAJMethod(AGWMethod):
    name, title = 'caj', 'CAJ'
    summary = ("AGW's network trained on three views (visible, visible with channels exchanged, "
               'infrared with adaptive gray) with channel erasing and the squared ADP triplet.')
    # CAJ's released train_ext.py and README command (mangye16/Cross-Modal-Re-ID-baseline
    # ICCV21_CAJ): AGW's network, three views, channel erasing on each, the ADP triplet squared.
    recipe = dict(AGWMethod.recipe, epochs=100, erasing_kind='channel', channel_aug=True,
                  adp_square=1)
    named_recipes = {}
    # CAJ's test reports its pooled and its BNNeck features alone as well.
    fusions = {**AGWMethod.fusions, **SINGLE_FEATURE_FUSIONS}

    def is_released_state_dict(self, keys):
        return False  # a released CAJ checkpoint has AGW's keys: it is read as AGW's


AGW_METHOD, CAJ_METHOD = AGWMethod(), CAJMethod()
