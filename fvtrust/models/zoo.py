"""Resolve a model spec to an FvModel.

Specs: ``fashion-cnn`` (embedded default), ``torchvision:NAME``,
``lucent:inceptionv1`` (when torch-lucent is installed), or a directory saved
by fvtrust. Weights: None = the spec's default (packaged weights for
fashion-cnn, torchvision's DEFAULT enum otherwise), ``random`` = random init,
an enum name such as ``IMAGENET1K_V1``, or a local weights file.
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
                   num_classes=10, class_names=FASHION_CLASSES)


def torchvision_model(name: str, weights=None) -> FvModel:
    import torchvision.models as tvm

    try:
        names = tvm.list_models(module=tvm)
    except Exception:  # noqa: BLE001
        names = TORCHVISION_EXAMPLES
    if name not in names:
        raise FvtrustError(f"unknown torchvision model {name!r}; nearest: {nearest(name, names)}")
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        kwargs = {"aux_logits": False, "init_weights": True}
    enum = None
    path = None
    if weights == "random":
        pass
    elif weights is not None and Path(str(weights)).suffix in (".pt", ".pth", ".safetensors", ".bin"):
        path = Path(weights)
    else:
        enum_cls = tvm.get_model_weights(name)
        key = "DEFAULT" if weights in (None, "default") else str(weights).split(".")[-1]
        try:
            enum = enum_cls[key] if key != "DEFAULT" else enum_cls.DEFAULT
        except KeyError:
            raise FvtrustError(f"unknown weights {weights!r} for {name}; choose one of: "
                               f"{', '.join(w.name for w in enum_cls)}, random, or a file path") from None
        kwargs.pop("init_weights", None)
    if enum is not None:
        try:
            net = tvm.get_model(name, weights=enum, **kwargs)
        except Exception as e:  # noqa: BLE001 - offline without a cached file
            raise FvtrustError(f"cannot load {name} weights {enum.name} ({type(e).__name__}: {str(e)[:120]}); "
                               "offline, place the file in the torch hub cache, pass --weights FILE, "
                               "or use --weights random") from None
        categories = enum.meta.get("categories")
    else:
        net = tvm.get_model(name, weights=None, **kwargs)
        categories = None
        if path is not None:
            _load_weights_file(net, path)
    num_classes = getattr(getattr(net, "fc", None), "out_features", None) or 1000
    return FvModel(net, mean=IMAGENET_MEAN, std=IMAGENET_STD, input_shape=(3, 224, 224),
                   spec=f"torchvision:{name}", num_classes=num_classes, class_names=categories)


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


def load_model(spec: str = DEFAULT_SPEC, weights=None, device=None) -> FvModel:
    """Resolve `spec` to an FvModel in eval mode ([0, 1] NCHW in, normalizes inside)."""
    from .saved import is_model_dir, load_saved

    spec = str(spec)
    if spec == "fashion-cnn":
        model = fashion_cnn(weights)
    elif spec.startswith("torchvision:"):
        model = torchvision_model(spec.split(":", 1)[1], weights)
    elif spec.startswith("lucent:"):
        model = lucent_model(spec.split(":", 1)[1], weights)
    elif is_model_dir(spec):
        return load_saved(spec, device=device)
    else:
        hint = " (a directory, but without fvtrust-model.json)" if Path(spec).is_dir() else ""
        raise FvtrustError(f"unknown model spec {spec!r}{hint}; nearest: "
                           f"{nearest(spec, ['fashion-cnn', 'torchvision:googlenet', 'torchvision:resnet50', 'lucent:inceptionv1'])}"
                           " or a saved model directory")
    model.base_spec = spec
    model.eval()
    return model.to(device) if device is not None else model
