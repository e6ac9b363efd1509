"""serve: the admission webhook Kubernetes calls before it admits a workload."""

from __future__ import annotations

from pathlib import Path

import click

_SECONDS = click.FloatRange(min=0, min_open=True)
_SECONDS_OR_OFF = click.FloatRange(min=0)


@click.command()
@click.option(
    "--policy",
    "policy_file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The policy file (YAML): which images need which keys.",
)
@click.option(
    "--tls-cert",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serving certificate (PEM, with its chain); reloaded when the file changes.",
)
@click.option(
    "--tls-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The certificate's private key (PEM); reloaded when the file changes.",
)
@click.option(
    "--host",
    default="0.0.0.0",  # noqa: S104 - a webhook serves the cluster network
    show_default=True,
    help="Address to listen on.",
)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--deadline",
    type=_SECONDS,
    default=8.0,
    show_default=True,
    help="Seconds within which every review is answered (a denial when the registry is "
    "slower); keep it under the webhook's timeoutSeconds.",
)
@click.option(
    "--docker-config",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory holding config.json with registry credentials (a mounted "
    "kubernetes.io/dockerconfigjson Secret, its key mounted as config.json). "
    "Default: $DOCKER_CONFIG, else ~/.docker.",
)
@click.option(
    "--allow-insecure-registry",
    "insecure_registries",
    multiple=True,
    metavar="HOST[:PORT]",
    help="A registry reached over plain HTTP or unverified TLS; repeat for several.",
)
@click.option(
    "--registry-cacert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Extra CA certificate (PEM) trusted for registry TLS.",
)
@click.option(
    "--verdict-ttl",
    type=_SECONDS_OR_OFF,
    default=300.0,
    show_default=True,
    help="Seconds a verdict per (digest, rule) is cached.",
)
@click.option(
    "--tag-ttl",
    type=_SECONDS_OR_OFF,
    default=30.0,
    show_default=True,
    help="Seconds a tag's resolution to a digest is cached.",
)
@click.option(
    "--max-cache-entries",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Bound on the entries of each cache.",
)
@click.option(
    "--stale-if-error",
    type=_SECONDS_OR_OFF,
    default=0.0,
    show_default=True,
    help="Seconds a digest verified before stays allowed (with a warning) while its "
    "registry fails; 0 turns this off.",
)
@click.option(
    "--key-refresh",
    type=_SECONDS,
    default=300.0,
    show_default=True,
    help="Seconds between re-fetches of keys held in a KMS.",
)
@click.option(
    "--platform",
    default="linux/amd64",
    show_default=True,
    metavar="OS/ARCH[/VARIANT]",
    help="The nodes' platform: the image of a multi-platform index that a rule with "
    "require_child_signature verifies.",
)
@click.option(
    "--policy-reload-interval",
    type=_SECONDS,
    default=5.0,
    show_default=True,
    help="Seconds between checks of the policy file for changes (a new policy is served once "
    "it parses and its keys load).",
)
@click.option(
    "--tls-reload-interval",
    type=_SECONDS,
    default=5.0,
    show_default=True,
    help="Seconds between checks of the certificate and key files for changes.",
)
@click.option(
    "--shutdown-grace",
    type=_SECONDS,
    default=15.0,
    show_default=True,
    help="On SIGTERM, seconds the reviews in flight get to finish.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def serve(
    policy_file: Path,
    tls_cert: Path,
    tls_key: Path,
    host: str,
    port: int,
    deadline: float,
    docker_config: Path | None,
    insecure_registries: tuple[str, ...],
    registry_cacert: Path | None,
    verdict_ttl: float,
    tag_ttl: float,
    max_cache_entries: int,
    stale_if_error: float,
    key_refresh: float,
    platform: str,
    policy_reload_interval: float,
    tls_reload_interval: float,
    shutdown_grace: float,
    log_level: str,
) -> None:
    """Serve the admission webhook over TLS: POST /validate and /mutate take AdmissionReviews;
    GET /healthz, /readyz and /metrics are for probes and Prometheus."""
    from signgate.registry import RegistryOptions
    from signgate.webhook.controller import ControllerSettings
    from signgate.webhook.server import ServeSettings, read_policy_file
    from signgate.webhook.server import serve as serve_webhook

    serve_webhook(
        ServeSettings(
            policy=read_policy_file(policy_file),
            registry=RegistryOptions(
                insecure_registries=frozenset(insecure_registries),
                docker_config_dir=docker_config,
                ca_bundle=registry_cacert,
            ),
            controller=ControllerSettings(
                deadline_seconds=deadline,
                verdict_ttl_seconds=verdict_ttl,
                tag_ttl_seconds=tag_ttl,
                max_cache_entries=max_cache_entries,
                stale_if_error_seconds=stale_if_error,
                key_refresh_seconds=key_refresh,
                child_platform=platform,
            ),
            tls_cert=tls_cert,
            tls_key=tls_key,
            host=host,
            port=port,
            tls_reload_seconds=tls_reload_interval,
            policy_reload_seconds=policy_reload_interval,
            shutdown_grace_seconds=shutdown_grace,
            log_level=log_level,
        )
    )
