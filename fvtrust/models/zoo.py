"""Resolve a model spec to an FvModel.

Specs: ``fashion-cnn`` (embedded default), ``torchvision:NAME``,
``timm:NAME`` (when timm is installed), ``lucent:inceptionv1`` (when
torch-lucent is installed), ``py:path/to/file.py:factory`` (your own code), or
a directory saved by fvtrust. Weights: None = the spec's default (packaged weights for
fashion-cnn, torchvision's DEFAULT enum otherwise), ``random`` = random init
(drawn under RANDOM_INIT_SEED, so every load gives the same network and the
caller's global random state is left as it was), an enum name such as
``IMAGENET1K_V1``, or a local weights file.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from ..errors import FvtrustError, nearest
from .fashion_cnn import FASHION_CLASSES, FASHION_MEAN, FASHION_STD, FashionCNN
from .wrappers import FvModel

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SPEC = "fashion-cnn"
TORCHVISION_EXAMPLES = ["googlenet", "resnet50", "resnet18", "vgg16", "alexnet", "mobilenet_v3_small",
                        "efficientnet_b0", "convnext_tiny", "vit_b_16"]


def packaged_weights_path() -> Path:
    return Path(str(resources.files("fvtrust.models") / "weights" / "fashion_cnn.safetensors"))


def list_specs() -> list[dict]:
    """The specs `load_model` accepts, for `fvtrust models`."""
    out = [{"spec": "fashion-cnn", "description": "embedded default: Conv-BN-ReLU CNN on Fashion-MNIST, 1x28x28",
            "available": packaged_weights_path().is_file()}]
    try:
        from torchvision.models import list_models

        names = list_models(module=__import__("torchvision").models)
    except Exception:  # noqa: BLE001
        names = TORCHVISION_EXAMPLES
    out += [{"spec": f"torchvision:{n}", "description": "torchvision ImageNet classifier, 3x224x224",
             "available": True} for n in names]
    try:
        import lucent  # noqa: F401

        have_lucent = True
    except ImportError:
        have_lucent = False
    out.append({"spec": "lucent:inceptionv1", "description": "lucid's Inception-V1 (the paper's model), needs torch-lucent",
                "available": have_lucent})
    out.append({"spec": "DIR", "description": "a model directory saved by fvtrust (e.g. a fooled model)",
                "available": True})
    return out


def _load_weights_file(net: torch.nn.Module, path: Path) -> None:
    from .saved import load_state_checked

    if not path.is_file():
        raise FvtrustError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise FvtrustError(f"cannot read weights file {path}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    load_state_checked(net, state, str(path))


def fashion_cnn(weights=None) -> FvModel:
    net = FashionCNN()
    if weights in (None, "default", "DEFAULT"):
        path = packaged_weights_path()
        if not path.is_file():
            raise FvtrustError("packaged fashion-cnn weights are missing; run `fvtrust train-default`")
        _load_weights_file(net, path)
    elif weights != "random":
        _load_weights_file(net, Path(weights))
    return FvModel(net, mean=FASHION_MEAN, std=FASHION_STD, input_shape=(1, 28, 28), spec="fashion-cnn",
                   num_classes=10, class_names=FASHION_CLASSES, default_data="fashion-mnist")


def _torchvision_enum(tvm, name: str, weights):
    """The weights enum member for `weights` (None/'default' -> DEFAULT), with a one-line error otherwise."""
    enum_cls = tvm.get_model_weights(name)
    key = "DEFAULT" if weights in (None, "default", "DEFAULT") else str(weights).split(".")[-1]
    try:
        return enum_cls.DEFAULT if key == "DEFAULT" else enum_cls[key]
    except KeyError:
        raise FvtrustError(f"unknown weights {weights!r} for {name}; choose one of: "
                           f"{', '.join(w.name for w in enum_cls)}, random, or a file path") from None


def _drop_aux_heads(net) -> None:
    """GoogLeNet / Inception-V3 auxiliary classifiers: unused in eval; removed so random and pretrained
    models have the same layers (torchvision's builders demand aux_logits=True when weights are given)."""
    if hasattr(net, "aux_logits"):
        net.aux_logits = False
        for attr in ("aux1", "aux2", "AuxLogits"):
            if hasattr(net, attr):
                setattr(net, attr, None)


def torchvision_model(name: str, weights=None) -> FvModel:
    """A torchvision classifier; pretrained weights come from the torch hub cache ($TORCH_HOME).

    The input size, normalization and class names are read from the weights
    enum's metadata (for random init too: they describe the architecture's
    training set, and ImageNet-folder labels are mapped through them).
    """
    import torchvision.models as tvm

    try:
        names = tvm.list_models(module=tvm)
    except Exception:  # noqa: BLE001
        names = TORCHVISION_EXAMPLES
    if name not in names:
        raise FvtrustError(f"unknown torchvision model {name!r}; nearest: {nearest(name, names)}")
    is_file = weights is not None and Path(str(weights)).suffix in (".pt", ".pth", ".safetensors", ".bin")
    enum = None if weights == "random" or is_file else _torchvision_enum(tvm, name, weights)
    meta_enum = enum or tvm.get_model_weights(name).DEFAULT
    tf = getattr(meta_enum.transforms, "keywords", {}) or {}
    crop = tf.get("crop_size", 224)
    crop = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
    mean, std = tuple(tf.get("mean", IMAGENET_MEAN)), tuple(tf.get("std", IMAGENET_STD))
    aux = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    if enum is not None:
        try:
            net = tvm.get_model(name, weights=enum)
        except Exception as e:  # noqa: BLE001 - offline without a cached file
            raise FvtrustError(f"cannot load {name} weights {enum.name} ({type(e).__name__}: {str(e)[:120]}); "
                               "offline, place the file in the torch hub cache ($TORCH_HOME/hub/checkpoints), "
                               "pass --weights FILE, or use --weights random") from None
    else:
        net = tvm.get_model(name, weights=None, **aux)
        if is_file:
            _load_weights_file(net, Path(weights))
    _drop_aux_heads(net)
    categories = meta_enum.meta.get("categories")
    from .wrappers import _probe_classes

    num_classes = _probe_classes(net.eval(), (3, crop, crop)) or len(categories or []) or None
    if categories is not None and len(categories) != num_classes:
        categories = None
    return FvModel(net, mean=mean, std=std, input_shape=(3, crop, crop),
                   spec=f"torchvision:{name}", num_classes=num_classes, class_names=categories)


def timm_model(name: str, weights=None) -> FvModel:
    """A timm model (optional dependency). weights: None/'default' = pretrained from the user's cache
    (Hugging Face / torch hub cache, offline), 'random', or a local checkpoint file."""
    try:
        import timm
    except ImportError:
        raise FvtrustError("timm:NAME needs timm (pip install 'fvtrust[timm]')") from None
    if name not in timm.list_models():
        raise FvtrustError(f"unknown timm model {name!r}; nearest: {nearest(name, timm.list_models())}")
    kwargs = {}
    if weights == "random":
        pretrained = False
    elif weights not in (None, "default", "DEFAULT"):
        if not Path(str(weights)).is_file():
            raise FvtrustError(f"weights file not found: {weights}")
        pretrained, kwargs = True, {"pretrained_cfg_overlay": {"file": str(weights)}}
    else:
        pretrained = True
    try:
        net = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - offline without a cached file, or a bad checkpoint
        raise FvtrustError(f"cannot load timm {name} ({type(e).__name__}: {str(e)[:120]}); offline, put the "
                           "weights in your Hugging Face cache, pass --weights FILE, or use --weights random") from None
    cfg = timm.data.resolve_data_config({}, model=net)
    shape = tuple(int(v) for v in cfg["input_size"])
    n = getattr(net, "num_classes", None)
    names = None
    if n == 1000:
        try:
            info = timm.data.ImageNetInfo()
            names = [info.index_to_description(i) for i in range(1000)]
        except Exception:  # noqa: BLE001 - older timm: no label metadata
            names = None
    return FvModel(net, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), input_shape=shape, spec=f"timm:{name}",
                   num_classes=n, class_names=names)


def py_model(target: str, weights=None) -> FvModel:
    """``py:path/to/file.py:factory``: the user's own code. factory() returns the net and its input shape
    (``(net, (C, H, W))``), or a dict with ``net``, ``input_shape`` and optionally ``mean``, ``std``,
    ``class_names``, or an FvModel (e.g. from fvtrust.wrap)."""
    import importlib.util
    import sys

    from .wrappers import wrap

    path, sep, factory = target.rpartition(":")
    if not sep or not path or not factory:
        raise FvtrustError(f"bad py: spec {'py:' + target!r}: use py:path/to/file.py:factory")
    file = Path(path)
    if not file.is_file():
        raise FvtrustError(f"py: model file not found: {file}")
    try:
        mod_name = f"fvtrust_user_{abs(hash(str(file.resolve())))}"
        spec = importlib.util.spec_from_file_location(mod_name, file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failed to import
        raise FvtrustError(f"cannot import {file}: {type(e).__name__}: {str(e)[:160]}") from None
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise FvtrustError(f"{file} has no function {factory!r}")
    try:
        made = fn()
    except Exception as e:  # noqa: BLE001
        raise FvtrustError(f"{file}:{factory}() raised {type(e).__name__}: {str(e)[:160]}") from None
    if isinstance(made, FvModel):
        model = made
    elif isinstance(made, dict) and "net" in made:
        model = wrap(made["net"], input_shape=made.get("input_shape"), mean=made.get("mean"), std=made.get("std"),
                     class_names=made.get("class_names"))
    elif isinstance(made, (tuple, list)) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        model = wrap(made[0], input_shape=made[1])
    else:
        raise FvtrustError(f"{file}:{factory}() must return (net, (C, H, W)), a dict with net and input_shape, "
                           f"or fvtrust.wrap(...); got {type(made).__name__}")
    if weights not in (None, "default", "DEFAULT", "random"):
        _load_weights_file(model.net, Path(weights))
    model.spec = f"py:{file.resolve()}:{factory}"
    return model


def lucent_model(name: str, weights=None) -> FvModel:
    """lucent's port of lucid's Inception-V1 (the paper's model), with 1000 standard-order logits.

    lucid's network has 1008 outputs in lucid's label order (0 a dummy,
    1..1000 the classes in the ILSVRC2012 devkit order, 1001..1007 unused)
    and ends in a softmax. Natural labels (ImageFolder, torchvision) are in
    the standard order (sorted synsets), so here the classifier
    ``softmax2_pre_activation_matmul`` becomes a 1024 -> 1000 linear layer
    whose unit k is standard class k (lucid's rows re-ordered; the dummy and
    unused outputs dropped, see :mod:`fvtrust.models.lucid_labels`), and
    ``softmax2`` passes the logits through, like torchvision's models.
    Layer names stay lucid's. ``class_names`` are torchvision's.
    """
    try:
        from lucent.modelzoo import inceptionv1
    except ImportError:
        raise FvtrustError("lucent:inceptionv1 needs torch-lucent (pip install torch-lucent)") from None
    if name != "inceptionv1":
        raise FvtrustError(f"unknown lucent model {name!r}; available: inceptionv1")
    from .lucid_labels import standard_class_names, standard_order_head

    try:
        net = inceptionv1(pretrained=weights != "random")
    except Exception as e:  # noqa: BLE001
        raise FvtrustError(f"cannot load lucent inceptionv1 weights ({type(e).__name__}); "
                           "offline, use --weights random") from None
    net.softmax2_pre_activation_matmul = standard_order_head(net.softmax2_pre_activation_matmul)
    net.softmax2 = torch.nn.Identity()  # logits out, as every other model fvtrust hands out
    # lucid's Inception-V1 expects x*255 - 117: mean 117/255, std 1/255
    return FvModel(net, mean=(117 / 255,) * 3, std=(1 / 255,) * 3, input_shape=(3, 224, 224),
                   spec="lucent:inceptionv1", num_classes=1000, class_names=standard_class_names())


def resolve_device(device=None) -> torch.device:
    """The torch device to run on: `device` if usable, else CUDA when available, else CPU.

    Asking for a GPU that is not there is an input error (one line), not a
    silent fallback: a run the user meant for a GPU should not crawl on CPU.
    """
    if device is None or str(device) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise FvtrustError(f"unknown device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FvtrustError(f"--device {device}: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FvtrustError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise FvtrustError(f"unsupported device {device!r}: use cpu, cuda, cuda:N or auto")
    return dev


RANDOM_INIT_SEED = 0  # weights="random": the seed of the init, so a random-init baseline is one network, not a draw


def load_model(spec: str = DEFAULT_SPEC, weights=None, device=None) -> FvModel:
    """Resolve `spec` to an FvModel in eval mode ([0, 1] NCHW in, normalizes inside).

    weights="random" builds the architecture under `torch.manual_seed(RANDOM_INIT_SEED)` inside a forked CPU
    random state: two loads are the same network (a rerun of a random-init audit or sanity check is exact),
    and the caller's random stream does not move.
    """
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            return _load_model(spec, weights, device)
    return _load_model(spec, weights, device)


def _load_model(spec, weights, device) -> FvModel:
    from .saved import is_model_dir, load_saved

    spec = str(spec)
    if device is not None:
        device = resolve_device(device)
    if spec == "fashion-cnn":
        model = fashion_cnn(weights)
    elif spec.startswith("torchvision:"):
        model = torchvision_model(spec.split(":", 1)[1], weights)
    elif spec.startswith("lucent:"):
        model = lucent_model(spec.split(":", 1)[1], weights)
    elif spec.startswith("timm:"):
        model = timm_model(spec.split(":", 1)[1], weights)
    elif spec.startswith("py:"):
        model = py_model(spec.split(":", 1)[1], weights)
    elif is_model_dir(spec):
        return load_saved(spec, device=device)
    else:
        hint = " (a directory, but without fvtrust-model.json)" if Path(spec).is_dir() else ""
        raise FvtrustError(f"unknown model spec {spec!r}{hint}; nearest: "
                           f"{nearest(spec, ['fashion-cnn', 'torchvision:googlenet', 'torchvision:resnet50', 'lucent:inceptionv1', 'timm:NAME', 'py:FILE.py:FACTORY'])}"
                           " or a saved model directory")
    model.base_spec = model.spec if spec.startswith("py:") else spec
    model.eval()
    return model.to(device) if device is not None else model
