"""Options shared by the commands that talk to registries, and running their async work."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from signgate.reference import ImageReference

if TYPE_CHECKING:
    from signgate.registry import RegistryOptions

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegistryFlags:
    """The registry flags as given; :meth:`options_for` names the insecure hosts."""

    insecure: bool
    username: str | None
    password: str | None
    ca_bundle: Path | None

    def options_for(self, references: Iterable[ImageReference]) -> RegistryOptions:
        # Imported here so that `signgate COMMAND --help` does not load the network stack.
        from signgate.registry import RegistryOptions
        from signgate.signatures.store import signature_repository

        hosts = set()
        if self.insecure:
            hosts = {r.registry for r in references}
            hosts |= {signature_repository(r.repository).registry for r in references}
        return RegistryOptions(
            insecure_registries=frozenset(hosts),
            username=self.username,
            password=self.password,
            ca_bundle=self.ca_bundle,
        )


def registry_options(command: F) -> F:
    """Adds cosign's registry flags; the command receives ``registry: RegistryFlags``."""

    @click.option(
        "--allow-insecure-registry",
        "insecure",
        is_flag=True,
        help="Reach the registries of the images named here over plain HTTP or unverified "
        "TLS. Loopback registries may always use plain HTTP.",
    )
    @click.option("--registry-username", envvar="SIGNGATE_REGISTRY_USERNAME", default=None)
    @click.option(
        "--registry-password",
        envvar="SIGNGATE_REGISTRY_PASSWORD",
        default=None,
        help="Prefer the SIGNGATE_REGISTRY_PASSWORD environment variable: argv is visible "
        "to every user of the machine.",
    )
    @click.option(
        "--registry-cacert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Extra CA certificate (PEM) trusted for registry TLS.",
    )
    @functools.wraps(command)
    def wrapper(
        *args: Any,
        insecure: bool,
        registry_username: str | None,
        registry_password: str | None,
        registry_cacert: Path | None,
        **kwargs: Any,
    ) -> Any:
        kwargs["registry"] = RegistryFlags(
            insecure, registry_username, registry_password, registry_cacert
        )
        return command(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def run(coroutine: Awaitable[T]) -> T:
    """Run a command's async work to completion."""

    import asyncio

    async def main() -> T:
        return await coroutine

    return asyncio.run(main())
