"""Entry point: a click group whose commands are imported only when run (fast start-up)."""

from __future__ import annotations

import importlib
from typing import Any

import click

from signgate import __version__
from signgate.errors import Error

# name -> "module:attribute"; a command's module is imported only when that command runs.
COMMANDS = {
    "generate-key-pair": "signgate.cli.keys:generate_key_pair",
    "import-key-pair": "signgate.cli.keys:import_key_pair",
    "public-key": "signgate.cli.keys:public_key",
    "sign": "signgate.cli.images:sign",
    "verify": "signgate.cli.images:verify",
    "triangulate": "signgate.cli.images:triangulate",
    "tree": "signgate.cli.images:tree",
    "clean": "signgate.cli.images:clean",
    "inventory": "signgate.cli.rotation:inventory",
    "rotate": "signgate.cli.rotation:rotate",
    "check": "signgate.cli.check:check",
    "serve": "signgate.cli.serve:serve",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command


class SigngateGroup(LazyGroup):
    """Turns every signgate error into one line on stderr and its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Error as e:
            click.echo(f"signgate: {e.diagnostics()}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("signgate: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=SigngateGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="signgate")
def cli() -> None:
    """Sign container images and verify them, compatible with cosign."""


def main() -> None:
    cli(prog_name="signgate")


if __name__ == "__main__":
    main()
