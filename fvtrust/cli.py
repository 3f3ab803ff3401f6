"""The `fvtrust` command: a thin layer over the Python API.

Every command parses its options, calls the API, and prints or writes the
result. Any FvtrustError becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .cli_common import data_options, ray_option
from .errors import FvtrustError


class _Group(click.Group):
    """Turn FvtrustError, OS errors and usage errors into one clean line (no traceback), exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:  # bad option value, unknown option or command: one line, not usage + hint
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"fvtrust: error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"fvtrust: error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(2 if e.exit_code == 1 else e.exit_code)
        except click.Abort:
            click.echo("fvtrust: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FvtrustError as e:
            click.echo(f"fvtrust: error: {e}", err=True)
            ctx.exit(2)
        except OSError as e:  # a full or read-only disk, a vanished file: one line, not a traceback
            where = f": {e.filename}" if e.filename else ""
            click.echo(f"fvtrust: error: {e.strerror or e}{where}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("fvtrust: interrupted (completed work is kept; rerun to resume)", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fvtrust")
def main():
    """Can I trust this feature visualization? (Geirhos et al., ICML 2024)"""


def _echo_json(obj):
    from .io import to_json

    click.echo(to_json(obj))


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise FvtrustError(f"bad {what} {text!r}: use comma-separated integers") from None


weights_option = click.option("--weights", default=None,
                              help="Weights: default, random, a torchvision enum name (IMAGENET1K_V1) or a file.")
device_option = click.option("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")


def _device(device):
    from .models import resolve_device

    return resolve_device(device)


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models_cmd(as_json):
    """List the model specs fvtrust can load."""
    from .models import list_specs

    specs = list_specs()
    if as_json:
        _echo_json(specs)
        return
    for s in specs:
        flag = "" if s["available"] else "  (not available here)"
        click.echo(f"{s['spec']:<40} {s['description']}{flag}")


@main.command("layers")
@click.argument("spec")
@click.option("--weights", default="random", show_default=True, help="Shapes do not depend on weights.")
@click.option("--json", "as_json", is_flag=True)
def layers_cmd(spec, weights, as_json):
    """List every hookable layer of SPEC: name, output shape, units."""
    from .models import list_layers, load_model

    layers = list_layers(load_model(spec, weights=weights))
    if as_json:
        _echo_json([info.to_dict() for info in layers])
        return
    width = max(len(i.name) for i in layers)
    for i in layers:
        click.echo(f"{i.name:<{width}}  {i.type:<20} {str(tuple(i.shape)):<20} units={i.units}")


@main.command("evaluate")
@click.argument("spec")
@data_options
@click.option("--limit", default=None, type=int, help="Evaluate only the first N images (after --natural-limit).")
@click.option("--batch-size", default=256, show_default=True)
@weights_option
@device_option
@click.option("--json", "as_json", is_flag=True)
def evaluate_cmd(spec, data, class_index, natural_limit, data_dir, limit, batch_size, weights, device, as_json):
    """Top-1 / top-5 accuracy of SPEC on natural data (the evaluation part of --data)."""
    from .cli_common import load_natural
    from .evaluate import evaluate
    from .models import load_model

    model = load_model(spec, weights=weights, device=_device(device))
    part = load_natural(model, data, class_index, natural_limit, data_dir).evaluation
    res = evaluate(model, part, batch_size=batch_size, limit=limit)
    desc = part.describe()
    out = {"spec": spec, "data": desc["path"] or desc["source"], "natural_data": desc, "n": res["n"],
           "top1": res["top1"], "top5": res["top5"]}
    if as_json:
        _echo_json(out)
    else:
        click.echo(f"{spec} on {out['data']}: top-1 {out['top1']:.4f}, top-5 {out['top5']:.4f} (n={out['n']})")


@main.command("train-default")
@click.option("--out", default=None, type=click.Path(), help="Write weights here instead of the package.")
@click.option("--data-dir", default=None, type=click.Path())
@click.option("--epochs", default=None, type=int, help="Override the recipe's epochs.")
@click.option("--seed", default=None, type=int)
def train_default_cmd(out, data_dir, epochs, seed):
    """Re-create the embedded fashion-cnn weights from the recipe."""
    from .models.train import train_default

    info = train_default(out, data_dir=data_dir, epochs=epochs, seed=seed)
    click.echo(f"wrote {info['weights']}: test top-1 {info['test_top1']:.4f}, top-5 {info['test_top5']:.4f}")


@main.command("visualize")
@ray_option
@click.argument("spec")
@click.argument("layer")
@click.option("--units", default="all", show_default=True, help="0,1,2 or 0-9 or all.")
@click.option("--steps", default=512, show_default=True)
@click.option("--thresholds", default=None, help="Snapshot steps, e.g. 1,8,32,128,512 (default: steps).")
@click.option("--objective", default="neuron", show_default=True, help="neuron, channel, diversity; prefix - to minimize.")
@click.option("--param", default="fft", show_default=True, type=click.Choice(["fft", "pixel", "raw", "maco"]))
@click.option("--data", default=None, help="maco: natural data for the magnitude spectrum (default: Fashion-MNIST "
              "train for 28-px models; an ImageNet-style folder otherwise).")
@click.option("--relu", default="standard", show_default=True, type=click.Choice(["standard", "redirect"]),
              help="redirect: lucid's redirected ReLU gradient for the first --redirect-steps steps.")
@click.option("--redirect-steps", default=16, show_default=True)
@click.option("--alpha", is_flag=True, help="Also write transparency masks (accumulated |d objective / d image|).")
@click.option("--no-decorrelate", is_flag=True, help="Skip colour decorrelation.")
@click.option("--transforms", default=None, type=click.Choice(["standard", "maco", "none"]),
              help="Random transforms: standard (lucent's; the default), maco (Fel et al.'s 6 crops + noise per "
              "step; the default with --param maco), none.")
@click.option("--lr", default=None, type=float, help="Learning rate (default 0.05; 1.0 with --param maco, MACO's recipe).")
@click.option("--optimizer", default=None, type=click.Choice(["adam", "nadam", "sgd"]),
              help="Default adam; nadam with --param maco (MACO's recipe).")
@click.option("--seed", default=0, show_default=True)
@click.option("--shared-start", is_flag=True, help="Start every unit from the same noise (compare units fairly).")
@click.option("--chunk-size", default=None, type=int, help="Images per optimization batch (default: automatic).")
@click.option("--no-fast", is_flag=True, help="Skip the verified Conv-BN folding / channels-last fast path.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16"]),
              help="bf16: the model's forward/backward under bfloat16 autocast (faster on large CPU/GPU models).")
@click.option("--shard-units", default=16, show_default=True,
              help="With --ray: units per shard (each shard is cached in OUT/.cache; a rerun resumes from them).")
@weights_option
@device_option
@click.option("--out", required=True, type=click.Path(), help="Output directory.")
def visualize_cmd(spec, layer, units, steps, thresholds, objective, param, data, relu, redirect_steps, alpha,
                  no_decorrelate, transforms, lr, optimizer, seed, shared_start, chunk_size, no_fast, precision, shard_units,
                  weights, device, out):
    """Visualize UNITS of LAYER: PNGs per unit and threshold, a grid, visualization.json."""
    from .models import load_model
    from .visualize import visualize
    from .visualize.output import save_visualization

    model = load_model(spec, weights=weights, device=_device(device))
    th = _parse_ints(thresholds, "thresholds") if thresholds else None
    if param == "maco":  # the spectrum of the user's --data (else the model's own natural data)
        from .visualize.maco import Maco

        param = Maco(data=data if data is not None else getattr(model, "default_data", None))
    # transforms / lr / optimizer left unset take the parameterization's recipe (visualize.recipe_for)
    options = dict(steps=steps, thresholds=th, objective=objective, param=param, decorrelate=not no_decorrelate,
                   transforms=transforms or "auto", lr=lr, optimizer=optimizer, seed=seed, chunk_size=chunk_size, shared_start=shared_start,
                   fast=not no_fast, relu=relu, redirect_steps=redirect_steps, precision=precision)
    from .scale import current

    if current() is not None:  # --ray: groups of units on the workers, each cached in OUT/.cache
        from .visualize.shards import visualize_sharded

        res = visualize_sharded(model, layer, units, shard_units=shard_units, cache_dir=Path(out) / ".cache",
                                alpha=alpha, **options)
    else:
        if alpha:
            from .visualize.alpha import visualize_transparent as visualize  # noqa: F811  same call, plus .alpha
        res = visualize(model, layer, units, **options)
    meta = save_visualization(res, out, spec=spec)
    if res.alpha is not None:
        from .io import save_png

        for ui, u in enumerate(res.units):
            save_png(Path(out) / f"alpha_unit{u:04d}_{ui}.png", res.alpha[ui])
    click.echo(f"wrote {len(meta['files'])} images, {meta['grid']} and visualization.json to {out}")


# (command name, module, attribute): each capability's subpackage owns its CLI.
OPTIONAL_COMMANDS = [("theory", "fvtrust.theory.cli", "theory_command"), ("fool", "fvtrust.fool.cli", "fool_group"),
                     ("sanity-check", "fvtrust.sanity.cli", "sanity_command"),
                     ("linearity", "fvtrust.linearity.cli", "linearity_command"),
                     ("reproduce", "fvtrust.report.cli", "reproduce_command"),
                     ("compare-methods", "fvtrust.compare.cli", "compare_command"),
                     ("audit", "fvtrust.audit.cli", "audit_command")]


def _register_optional():
    """Register the capability commands; one whose module fails to import becomes an error naming why."""
    from .commands import register_commands

    register_commands(main, OPTIONAL_COMMANDS)


_register_optional()


def _guarded(callback):
    """Wrap a command body: check --out is writable (creating nothing) and hold its lock while it runs."""
    import functools

    @functools.wraps(callback)
    def run(*args, **kwargs):
        out = kwargs.get("out")
        if out is None:
            return callback(*args, **kwargs)
        from .cache import check_writable_dir, output_lock

        check_writable_dir(out)
        with output_lock(out):
            return callback(*args, **kwargs)

    run._fvtrust_guarded = True
    return run


def guard_outputs(group: click.Group) -> None:
    """Every command (here and in sub-groups) with an --out gets `_guarded`: one place, not one per command."""
    for cmd in group.commands.values():
        if isinstance(cmd, click.Group):
            guard_outputs(cmd)
        elif cmd.callback is not None and any(p.name == "out" for p in cmd.params) \
                and not getattr(cmd.callback, "_fvtrust_guarded", False):
            cmd.callback = _guarded(cmd.callback)


guard_outputs(main)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
