"""One recipe per method: the trunk it wraps the backbone in, its heads, its loss, where its source images come
from, and its epoch hooks. The loop (loop.py) only calls these; it never tests a method's name. A recipe is given
data (Given, and each hook's arguments), never the loop's state."""
import dataclasses
import os

import torch
import torch.nn as nn

from tlkernels.nn import L2SP, SoftJointLoss


class Net(nn.Module):
    """trunk (the backbone without its classifier, maybe wrapped by SpotTune/AdaFilter) + target head
    (+ a source head when the method keeps a source loss). classifier: the dotted name of the backbone's
    classifier, where plain.pt puts the target head."""

    def __init__(self, trunk, feat_dim, n_target, source_head=None, classifier="fc"):
        super().__init__()
        self.trunk, self.head, self.source_head = trunk, nn.Linear(feat_dim, n_target), source_head
        self.classifier = classifier

    def forward(self, x, n_target=None):
        """x alone: target logits. n_target: the first n_target images are target images, the rest source
        images, each through its head; n_target == len(x): both heads on the same (target) images."""
        f = self.trunk(x)
        if n_target is None:
            return self.head(f)
        return self.head(f[:n_target]), self.source_head(f[n_target:] if n_target < f.shape[0] else f)


def source_head(fc, source_classes, pretrained_classes):
    """The pre-trained classifier when its classes provably are the source set's (same names, same order),
    else a fresh one over the source classes (Gaussian init, std 0.01, as the selective joint fine-tuning code)."""
    if pretrained_classes is not None and list(pretrained_classes) == list(source_classes):
        return fc, False
    head = nn.Linear(fc.in_features, len(source_classes))
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    return head, True


@dataclasses.dataclass(frozen=True)
class Given:
    """What a recipe is given of the run: the data sets (source None without --source), the pre-trained backbone
    (with its classifier) and what that classifier predicts (None: unknown), the device, the number of ranks and
    of loader workers, and `amp`: the autocast context of --amp (a callable returning a context manager)."""
    target: object
    source: object
    backbone: nn.Module
    pretrained_classes: list
    device: torch.device
    world: int
    workers: int
    amp: object


class Recipe:
    """Plain fine-tuning; the other methods override what differs."""
    uses_source = False  # draws images of the --source set
    keeps_source_head = False  # trains a source head beside the target head
    plain = True  # the trained model is the unmodified architecture (plain.pt export)

    def __init__(self, cfg, l2sp):
        self.cfg, self.with_l2sp = cfg, l2sp
        self.new = ["head"]  # parameter-name prefixes of what pre-training did not provide

    def wrap(self, backbone):
        """The trunk: the backbone itself, or wrapped by the method (SpotTune, AdaFilter)."""
        return backbone

    def build(self, backbone, n_target, source_classes=None, pretrained_classes=None):
        """The model: a copy of the pre-trained backbone, its classifier taken out (backbones.split_classifier),
        in the method's trunk, with the heads."""
        import copy

        from tlkernels.train.backbones import depth_units, split_classifier
        backbone, fc, name = split_classifier(copy.deepcopy(backbone))
        self.units = depth_units(backbone)  # (before the method wraps it: --layer_decay's depth order)
        head = None
        if self.keeps_source_head and not self.uses_source:  # its targets are over the pre-trained classes
            head = fc
        elif self.keeps_source_head:
            head, fresh = source_head(fc, source_classes, pretrained_classes)
            if fresh:
                self.new.append("source_head")
        return Net(self.wrap(backbone), fc.in_features, n_target, head, name)

    def l2sp(self, net, given=None):
        """The L2-SP penalty anchored at net's current (pre-trained) weights, or None; with --l2sp_fisher N
        L2-SP-Fisher, its weights the Fisher diagonal of the source task on N source images."""
        if not self.with_l2sp:
            return None
        reg = L2SP(net, alpha=self.cfg.l2sp_alpha, beta=self.cfg.l2sp_beta, head=self.new)
        if self.cfg.l2sp_fisher:
            reg.set_fisher(self.source_fisher(net, given, set(reg.names)))
        return reg

    def source_fisher(self, net, given, penalised):
        """{net parameter name: Fisher diagonal} for the `penalised` names, from the pre-trained model (with its
        classifier) on the first --l2sp_fisher source images and their labels: the source task's Fisher
        information."""
        import copy

        from tlkernels.nn import estimate_fisher
        from tlkernels.train import data
        classes = given.pretrained_classes
        if given.source is None or classes is None or list(classes) != list(given.source.classes):
            raise SystemExit("tlkernels-train: --l2sp_fisher needs --source images labelled with the pre-trained "
                             "classifier's classes (the Fisher information of the source task); the demo has them")
        n = min(self.cfg.l2sp_fisher, len(given.source.train_eval))
        model = copy.deepcopy(given.backbone).to(given.device)
        batches = ([t.to(given.device) for t in data.take(given.source.train_eval, list(range(i, min(i + 64, n))))]
                   for i in range(0, n, 64))
        fisher = {f"trunk.{k}": v for k, v in estimate_fisher(model, batches).items() if f"trunk.{k}" in penalised}
        if not fisher:
            raise SystemExit("tlkernels-train: --l2sp_fisher: no penalised tensor of this method's model is a tensor "
                             "of the pre-trained network (use it with l2sp)")
        return fisher

    def objective(self, total_steps, loss_options):
        """The loss (a SoftJointLoss) over `total_steps` steps; loss_options: the target loss's options."""
        return SoftJointLoss("constant", lambda0=0.0, **loss_options)

    def param_groups(self, net, weight_decay):
        """The optimizer's parameter groups."""
        return [dict(params=[p for p in net.parameters() if p.requires_grad], weight_decay=weight_decay)]

    def setup(self, given):
        """Before the first step: what the recipe keeps of `given` (a Given)."""
        self.given = given

    def draw_sources(self, target_idx, generator):
        """Source partners of the planned target images (None: the method uses no source images)."""
        return None

    def sample_weights(self):
        """Per target image, how often the next epoch draws it relative to the others (None: each once)."""
        return None

    def source_batch(self, xt, xs, ys):
        """(source images or None, source targets or None) of a step, given its target images on the device
        and the planned source images and labels (None when the method draws none)."""
        return xs, ys

    def wants_predictions(self, epoch):
        """Whether epoch_end(epoch, ...) needs the model's predictions on the whole target training set."""
        return False

    def epoch_end(self, epoch, predictions=None):
        """After each epoch; predictions: (logits, labels) of the eval model on the whole target training set
        (on every rank) when wants_predictions(epoch). Returns entries for the metrics record."""
        return {}

    def gates(self, net):
        """Gate usage per layer for the metrics record, or None."""
        return None

    def export_model(self, net):
        """The module torch.export traces for model.pt2 (eval mode)."""
        return net

    def plain_net(self, net):
        """The trained model as the unmodified architecture (trunk + head), for plain.pt (when `plain`)."""
        return net

    def state(self):
        """What a resumed run needs of the recipe (tensors, numbers: loads with weights_only=True)."""
        return {}

    def load_state(self, state):
        """Restore what state() returned."""

    def plots(self, out):
        """The method's own plots into `out`."""


class L2SPRecipe(Recipe):
    """Fine-tuning with the L2-SP penalty (applied by the fused optimizer step)."""
    def __init__(self, cfg, l2sp):
        super().__init__(cfg, True)


class Soft(Recipe):
    """L = CE_target + lambda(t) CE_source, lambda decaying to 0. --soft_source images: CE of the source head
    on random source images and their labels; distill: CE of the (pre-trained) source head on the target
    images against the frozen pre-trained model's softmax on them (no source set needed)."""
    keeps_source_head = True

    def __init__(self, cfg, l2sp):
        super().__init__(cfg, l2sp)
        self.uses_source = cfg.soft_source == "images"

    def source_batch(self, xt, xs, ys):
        if self.uses_source:
            return xs, ys
        with torch.no_grad(), self.given.amp():
            return None, torch.softmax(self.teacher(xt).float(), 1)

    def objective(self, total_steps, loss_options):
        return SoftJointLoss(self.cfg.soft_schedule, lambda0=self.cfg.soft_lambda0, total_steps=total_steps,
                             **loss_options)

    def setup(self, given):
        import copy
        super().setup(given)
        if self.uses_source:
            self.n_source = len(given.source.train)
        else:
            self.teacher = copy.deepcopy(given.backbone).to(given.device).eval().requires_grad_(False)

    def draw_sources(self, target_idx, generator):
        if not self.uses_source:
            return None
        return torch.randint(self.n_source, (len(target_idx),), generator=generator)


def hard_images(logits, labels, criterion, quantile):
    """Indices of the hard target images: misclassified, or prediction entropy above the `quantile`."""
    if criterion == "misclassified":
        return (logits.argmax(1) != labels).nonzero().squeeze(1)
    logp = torch.log_softmax(logits.double(), 1)
    entropy = -(logp.exp() * logp).sum(1)
    return (entropy > torch.quantile(entropy, quantile)).nonzero().squeeze(1)


class Selective(Recipe):
    """L = 1/2 CE_target + 1/2 CE_source on the retrieved neighbours of each target image, in rounds: after each
    round but the last, every hard target image climbs a level (up to --selective_max_level); an image at level
    l has l x k neighbours and is drawn l times as often in the next round (the official iterative mining)."""
    uses_source = keeps_source_head = True

    def objective(self, total_steps, loss_options):
        return SoftJointLoss("constant", lambda0=0.5, target_weight=0.5, **loss_options)

    def setup(self, given):
        from tlkernels.filters import from_model, gabor_bank
        from tlkernels.select import SourceSelector
        super().setup(given)
        cfg = self.cfg
        if cfg.selective_bank == "model":
            bank = from_model(given.backbone, layers=2)
        else:
            bank = gabor_bank(scales=2, orientations=4, size=7, in_channels=given.target.channels)
        self.selector = SourceSelector(bank, bins=cfg.selective_bins, fine_bins=16 * cfg.selective_bins,
                                       cache_dir=os.path.join(cfg.cache_dir, f"selective-{cfg.selective_bank}-seed{cfg.seed}"),
                                       progress=not cfg.quiet, device=given.device, num_workers=given.workers,
                                       memory_gb=cfg.selective_memory_gb)
        self.selector.fit(given.target.train_eval)
        self.selector.describe(given.target.train_eval, "target")
        if given.world > 1:  # each rank describes its share of the source set; the searches are sharded
            self.selector.describe_shard(given.source.train_eval)
        else:
            self.selector.describe(given.source.train_eval, "source")
        self.selector.select(min(cfg.selective_k, len(given.source.train)))
        self.neighbours = self.selector.neighbours()
        # last epoch of each round but the last
        self.round_ends = {round(r * cfg.epochs / cfg.selective_rounds) - 1 for r in range(1, cfg.selective_rounds)}

    def sample_weights(self):
        return self.selector.levels.double()

    def draw_sources(self, target_idx, generator):
        return torch.stack([nb[torch.randint(len(nb), (1,), generator=generator)][0]
                            for nb in (self.neighbours[int(j)] for j in target_idx)])

    def wants_predictions(self, epoch):
        return epoch in self.round_ends

    def epoch_end(self, epoch, predictions=None):
        if epoch not in self.round_ends:
            return {}
        logits, labels = predictions
        hard = hard_images(logits, labels, self.cfg.selective_hardness, self.cfg.selective_entropy_quantile)
        levels = self.selector.levels.clone()
        levels[hard] = torch.clamp(levels[hard] + 1, max=self.cfg.selective_max_level)
        self.neighbours = self.selector.set_levels(levels)
        return {"hard": int(hard.numel()), "mean_level": float(levels.double().mean())}

    def state(self):
        return {"levels": self.selector.levels}

    def load_state(self, state):
        if "levels" in state:
            self.neighbours = self.selector.set_levels(state["levels"])

    def plots(self, out):
        from tlkernels.train import plots
        target, source = self.given.target, self.given.source
        plots.retrieval_grid(target.train_eval, source.train_eval, self.neighbours, os.path.join(out, "retrieved.png"),
                             target.mean, target.std)


class AdaFilterRecipe(Recipe):
    """AdaFilter around the backbone; its LSTM controller is new (beta under +l2sp)."""
    plain = False

    def wrap(self, backbone):
        from tlkernels.methods import AdaFilter
        self.new.append("trunk.controller")
        return AdaFilter(backbone, hidden_size=self.cfg.adafilter_hidden)

    def gates(self, net):
        return net.trunk.gate_usage()

    def export_model(self, net):
        from tlkernels.train.export import fold_batchnorm
        return fold_batchnorm(net)  # the branch BNs folded into the filters (AdaFilter.fold_bn_)


class SpotTuneRecipe(Recipe):
    """SpotTune around the backbone; the policy net trains with its own learning rate."""
    plain = False

    def wrap(self, backbone):
        from tlkernels.methods import SpotTune
        self.new.append("trunk.policy")
        return SpotTune(backbone, policy=self.cfg.spottune_policy, tau=self.cfg.spottune_tau)

    def param_groups(self, net, weight_decay):
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        policy = [p for n, p in named if n.startswith("trunk.policy.")]
        rest = [p for n, p in named if not n.startswith("trunk.policy.")]
        return [dict(params=rest, weight_decay=weight_decay),  # the official policy settings:
                dict(params=policy, lr=self.cfg.policy_lr, weight_decay=1e-3)]

    def gates(self, net):
        return {f"block{i}": float(u) for i, u in enumerate(net.trunk.gate_usage(reset=True))}

    def export_model(self, net):
        from tlkernels.train.export import fold_batchnorm
        return fold_batchnorm(net)  # the BNs folded into the policy's and copies' convolutions (SpotTune.fold_bn_)


class SpotTuneGlobalRecipe(SpotTuneRecipe):
    """One block choice for the whole data set; trained, it is a plain network (plain.pt, model.pt2 of it)."""
    plain = True

    def wrap(self, backbone):
        from tlkernels.methods.spottune import SpotTuneGlobal
        self.new.append("trunk.logits")
        return SpotTuneGlobal(backbone, tau=self.cfg.spottune_tau, budget=self.cfg.spottune_budget or None)

    def param_groups(self, net, weight_decay):
        named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
        return [dict(params=[p for n, p in named if n != "trunk.logits"], weight_decay=weight_decay),
                dict(params=[p for n, p in named if n == "trunk.logits"], lr=self.cfg.policy_lr, weight_decay=0.0)]

    def gates(self, net):
        return {f"block{i}": float(u) for i, u in enumerate(net.trunk.gate_usage())}

    def plain_net(self, net):
        import copy
        plain = copy.deepcopy(net)
        plain.trunk = net.trunk.to_plain()
        return plain

    def export_model(self, net):
        return self.plain_net(net)


RECIPES = {"finetune": Recipe, "l2sp": L2SPRecipe, "soft": Soft, "selective": Selective,
           "adafilter": AdaFilterRecipe, "spottune": SpotTuneRecipe, "spottune_global": SpotTuneGlobalRecipe}


def recipe(cfg, base, l2sp):
    """The recipe of method `base` (a key of RECIPES), with the L2-SP penalty when l2sp."""
    return RECIPES[base](cfg, l2sp)
