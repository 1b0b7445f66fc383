"""What a method declares (its network, training views, criterion, recipe, per-epoch state, test
features and fusions, released checkpoints), with the defaults every method inherits. The trainer,
the inference layer and the tools call these and never name a method."""
from data_loader import training_views
from model import load_backbone
from utils import flag

# Weights of the two feature kinds in the similarity (METHOD.md "Test-time features"): DEEN's two
# fusions, the defaults of every method whose eval features are (pooled, BNNeck).
POOL_FEAT_FUSIONS = {'pool+feat': (1.0, 1.0), '0.1pool+0.9feat': (0.1, 0.9)}
# One feature alone, compared re-normalised (a cosine), as CAJ's test does.
SINGLE_FEATURE_FUSIONS = {'pool': (1.0, 0.0), 'feat': (0.0, 1.0)}

# The schedule of the AGW family (AGW, CAJ, DDAG, MMN, LbA, DART: each released train script's
# adjust_learning_rate): warm-up over 10 epochs, x0.1 at 20, x0.01 at 50, pad 10 then crop.
AGW_SCHEDULE = dict(lr=0.1, warmup=10, lr_steps=(20, 50), pad=10)


class Method:
    """A VI-ReID method as this codebase trains and tests it. Subclasses override what differs.

    Network contract: model(visible=None, infrared=None, **extra) runs each modality through its
    own stem; in train mode it returns what the criterion consumes, in eval mode two
    L2-normalised features (the `feature_kinds`), each [k N, D] with rows [branch 0; branch 1;
    ...], each branch [visible; infrared]; model.num_branches = k, model.embed_dim = D.
    Criterion contract: criterion(output, labels) -> (total, {part: detached tensor}), labels in
    view order; optionally an nn.Module (moved to the device, its state_dict saved in every
    checkpoint and restored on resume), with end_epoch(epoch) after an epoch's last step and
    start_epoch(epoch, run) before its first (run: the training run, training.Run)."""

    name = ''                        # the --method value
    title = ''                       # in messages and tables
    summary = ''                     # what it does, in two lines
    recipe = {}                      # train.py's defaults for it (the released ones)
    dataset_recipes = {}             # {dataset: {flag dest: value}} on top of the recipe
    named_recipes = {}               # reproduce.py's rows besides the method itself: name -> flags
    own_flags = ()                   # train.py dests that only this method takes
    head_prefixes = ('bottleneck.', 'classifier.')  # parameters trained at the base lr
    needs_indices = False            # the criterion reads each row's training-set index (DART):
                                     # forward_train gets them as indices=
    fusions = POOL_FEAT_FUSIONS      # what test.py reports: name -> weights or callable (with
                                     # a distance_bound: visualize.py's histogram range)
    headline = 'pool+feat'           # the fusion of model selection and of the comparisons
    feature_kinds = ('pool', 'feat')  # the two features of the eval forward
    released_image_size = None       # (h, w) of the method's released checkpoints

    # -- flags ------------------------------------------------------------------------------
    def add_arguments(self, group):
        """Add this method's own train.py flags (their dests are in own_flags)."""

    def resolve(self, args):
        """Fill and check this method's own flags once the recipe has filled the others."""

    def foreign_flags_message(self, given, method):
        """The sentence refusing this method's own flags `given` (dests) to another `method`."""
        names = ', '.join(flag(dest) for dest in given)
        return (f'{names} belong(s) to {flag("method")} {self.name}; {flag("method")} '
                f'{method.name} does not take {"it" if len(given) == 1 else "them"}.')

    def network_settings(self, args):
        """What a checkpoint records of the network beyond method, trunk and class count (a
        JSON-able dict, or None): build_network rebuilds the network from it."""
        return None

    def recorded_settings(self, dataset, recorded):
        """The network settings a checkpoint records, completed (None or missing keys, as in
        older or released checkpoints: the method's default network for `dataset`)."""
        return recorded

    def describe_network(self, args):
        """One log line on the network a run trains."""
        return f'{self.title} network'

    # -- training ---------------------------------------------------------------------------
    def build_network(self, num_classes, dataset, arch='resnet50', settings=None):
        """The randomly initialised network (pretrained weights are loaded afterwards)."""
        raise NotImplementedError

    def load_pretrained(self, model, state, source):
        """Load a torchvision ResNet state dict into the network's stems and trunk."""
        load_backbone(model, state, source)

    def training_views(self, args):
        """The views of a training sample (data_loader.View), from the recipe's flags."""
        return training_views(args.img_h, args.img_w, args.erasing, args.grayscale, args.pad,
                              args.erasing_kind, args.channel_aug)

    def build_criterion(self, args, views):
        """criterion(output, labels) -> (total, parts); see the class docstring."""
        raise NotImplementedError

    def training_caches(self, args, caches, run):
        """The training caches [(images, labels) visible, (images, labels) infrared] the run
        trains on (DART injects its label noise here); run: the Trainer (log, name, ctx)."""
        return caches

    def forward_train(self, model, visible, infrared, labels):
        """The training forward pass of a step (labels of the views in order)."""
        return model(visible=visible, infrared=infrared)

    # -- released checkpoints ---------------------------------------------------------------
    def is_released_state_dict(self, keys):
        """Whether the keys (in our layout, converted) are those of this method's network."""
        return False

    def fusion_names(self):
        return tuple(self.fusions)
