"""Options every command shares, declared once: the model (weights, device) and the natural data.

Each command that reads natural images takes the same ``--data``,
``--class-index`` and ``--natural-limit`` and hands them to
`fvtrust.data.natural`, so a user's folder means the same thing everywhere.
"""
from __future__ import annotations

import click

DATA_HELP = ("Natural images: fashion-mnist[:train|test] (the embedded default's), an ImageNet-style folder "
             "(one sub-folder per class; synset folders are mapped to the model's classes), or pictures "
             "(scikit-image, unlabelled). Default: the model's own data (fashion-cnn: Fashion-MNIST).")


def data_options(f):
    """--data, --class-index, --natural-limit, --data-dir."""
    opts = [
        click.option("--data", default=None, help=DATA_HELP),
        click.option("--class-index", default=None, type=click.Path(dir_okay=False),
                     help='JSON {"folder name": class index} mapping --data folders to the model\'s outputs.'),
        click.option("--natural-limit", default=None, type=int,
                     help="Use at most N natural images from each part (fit / held-out / evaluation)."),
        click.option("--data-dir", default=None, type=click.Path(file_okay=False),
                     help="Folder with the Fashion-MNIST IDX files (default: the Debian package's)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def load_natural(model, data, class_index=None, natural_limit=None, data_dir=None, seed: int = 0):
    """The NaturalData for a command's options (see fvtrust.data.natural)."""
    from .data import natural

    return natural(data, model=model, limit=natural_limit, class_index=class_index, data_dir=data_dir, seed=seed)


def device_of(device):
    from .models import resolve_device

    return resolve_device(device)


RAY_HELP = ("Spread the independent shards of this command over a Ray cluster: auto (RAY_ADDRESS, else a "
            "cluster started here with `ray start`, else a new local one), local[:N] (a new local one with N CPU "
            "slots) or an address (ray://head:10001). Needs the ray extra; results are the same as without it, "
            "and an interrupted run resumes from the finished shards.")


def ray_option(f):
    """--ray auto|local[:N]|ADDRESS: run the command's shards on Ray (`fvtrust.scale.workers`); without it
    nothing changes and Ray is not imported."""
    import functools

    @functools.wraps(f)
    def with_workers(*args, ray=None, **kwargs):
        from .scale import workers

        with workers(ray):
            return f(*args, **kwargs)

    return click.option("--ray", default=None, metavar="auto|local[:N]|ADDRESS", help=RAY_HELP)(with_workers)
