"""The ``cladapt`` command line (click). Parse -> call a library function -> render; no logic here.

Errors: every :class:`~cladapt.errors.CladaptError` is printed with its hint and exits with its
``exit_code`` (1, or 2 for usage errors); a traceback appears only with ``-v``.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from cladapt import __version__
from cladapt.cli import bench, data, gate, hub, methods, registry, route, train
from cladapt.cli import eval as eval_cli
from cladapt.cli import serve as serve_cli
from cladapt.cli.common import err_console, mute_followers
from cladapt.errors import CladaptError


class _Group(click.Group):
    """Turns cladapt errors into clean messages and exit codes."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except CladaptError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                err_console.print_exception()
            err_console.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            if exc.hint:
                err_console.print(f"[bold]hint:[/] {exc.hint}", highlight=False)
            sys.exit(exc.exit_code)


def _setup_logging(verbose: int) -> None:
    import warnings

    from rich.logging import RichHandler

    if verbose < 2:
        # deprecation chatter from the libraries we call, not actionable for a user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")

    level = logging.DEBUG if verbose > 1 else logging.INFO
    handler = RichHandler(console=err_console, show_path=verbose > 0, markup=False, rich_tracebacks=verbose > 0)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("cladapt").setLevel(level)
    # library chatter (transformers' per-step dicts, datasets' caching) stays at warning level
    for noisy in ("transformers", "datasets", "peft", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose < 2 else logging.INFO)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="cladapt")
@click.option("-v", "--verbose", count=True, help="more logs; -v also shows tracebacks, -vv debug logs")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """cladapt: parameter-efficient adapters for continual fine-tuning.

    Train one adapter per task on a frozen base model with a continual-learning method, keep every
    version in a registry with its lineage and metrics, evaluate forgetting, and serve adapters.
    The registry is --registry, $CLADAPT_REGISTRY, or ./.cladapt.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbose"] = verbose
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(verbose)
    mute_followers()  # torchrun / accelerate launch: standard output from process 0 only


for _module in (train, registry, methods, data, eval_cli, gate, bench, hub, route, serve_cli):
    for _command in _module.commands:
        cli.add_command(_command)


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="cladapt")
