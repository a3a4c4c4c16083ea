"""Kubernetes and remote-cluster commands: ``deploy render``, ``submit``, ``status``, ``logs``.

``deploy render`` writes KubeRay and MLflow manifests from one ``DeployConfig``; ``submit``/``status``/
``logs`` talk to a running Ray cluster's job API (address from ``--address``, else
``$RAY_API_SERVER_ADDRESS`` / ``$RAY_ADDRESS``, else http://127.0.0.1:8265).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from orchestrator.commands._common import fail

deploy_app = typer.Typer(
    help="Kubernetes deployment: render KubeRay, MLflow and storage manifests from one config.",
    no_args_is_help=True,
)

_ADDRESS_HELP = (
    "Ray dashboard URL of the cluster (e.g. http://127.0.0.1:8265 after "
    "`kubectl port-forward svc/<cluster>-head-svc 8265`). Default: $RAY_API_SERVER_ADDRESS, "
    "then $RAY_ADDRESS, then http://127.0.0.1:8265."
)


@deploy_app.command("render")
def render(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="DeployConfig YAML (see configs/deploy/default.yaml); default: built-in defaults."
    ),
    out: Path = typer.Option(
        Path("deploy/manifests"), "--out", "-o", help="Directory to write the manifests into (created if missing)."
    ),
) -> None:
    """Write Namespace, PVC, MLflow, RayCluster and RayJob manifests (plus a kustomization) to OUT."""
    from orchestrator.configio import ConfigError, load_config
    from orchestrator.deploy_config import DeployConfig
    from orchestrator.deploy_render import write

    try:
        deploy_config = load_config(DeployConfig, config)
    except ConfigError as exc:
        fail(str(exc))
    try:
        paths = write(deploy_config, out)
    except OSError as exc:
        fail(f"{out}: cannot write manifests ({exc.strerror or exc})")
    for path in paths:
        typer.echo(str(path))
    typer.echo(
        f"rendered {len(paths)} files for namespace {deploy_config.namespace!r}; apply with "
        f"`kubectl apply -k {out}` then `kubectl apply -f {out}/jobs/<step>.yaml`",
        err=True,
    )


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def _fmt_time(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds)) if seconds else "-"


def submit(
    command: list[str] = typer.Argument(
        ..., metavar="COMMAND", help="The command to run on the cluster, after '--' (e.g. sspctl pretrain ...)."
    ),
    address: Optional[str] = typer.Option(None, "--address", "-a", help=_ADDRESS_HELP),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Stream the job's logs until it ends; exit non-zero if it failed."
    ),
    working_dir: Optional[Path] = typer.Option(
        None,
        "--working-dir",
        help="Upload this local directory as the job's working dir (not needed: the image holds sspctl).",
    ),
    submission_id: Optional[str] = typer.Option(
        None, "--submission-id", help="Job id to use (Ray refuses a duplicate); default: generated."
    ),
    env: list[str] = typer.Option(
        [], "--env", "-e", help="KEY=VALUE environment variable for the job (repeatable; no secrets)."
    ),
    num_cpus: Optional[float] = typer.Option(None, "--num-cpus", help="CPUs reserved for the job's driver."),
    num_gpus: Optional[float] = typer.Option(None, "--num-gpus", help="GPUs reserved for the job's driver."),
) -> None:
    """Submit any command (usually an sspctl one) to a running Ray cluster and print the job id.

    Example: sspctl submit --address http://127.0.0.1:8265 --follow -- sspctl pretrain --method simclr --workers 8
    """
    from orchestrator.submit import JobClient, SubmitError

    job_id = "(not submitted)"
    try:
        client = JobClient(address)
        job_id = client.submit(
            command,
            submission_id=submission_id,
            working_dir=working_dir,
            env=_parse_env(env),
            num_cpus=num_cpus,
            num_gpus=num_gpus,
        )
        typer.echo(job_id)
        if not follow:
            typer.echo(f"follow with: sspctl logs --follow {job_id} --address {client.address}", err=True)
            return
        state = client.follow(job_id, sys.stdout)
    except SubmitError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"stopped following; job {job_id} keeps running (sspctl status {job_id})", code=130)
    if not state.succeeded:
        reason = state.message.strip().splitlines()[-1] if state.message.strip() else "no message"
        fail(f"job {job_id} {state.status}: {reason}")
    typer.echo(f"job {job_id} SUCCEEDED", err=True)


def status(
    job_id: str = typer.Argument(..., help="Job (submission) id printed by `sspctl submit`."),
    address: Optional[str] = typer.Option(None, "--address", "-a", help=_ADDRESS_HELP),
) -> None:
    """Show a job's status; exit 1 if it FAILED or was STOPPED."""
    from orchestrator.submit import JobClient, SubmitError

    try:
        state = JobClient(address).state(job_id)
    except SubmitError as exc:
        fail(str(exc))
    typer.echo(f"job:        {state.job_id}")
    typer.echo(f"status:     {state.status}")
    typer.echo(f"entrypoint: {state.entrypoint}")
    typer.echo(f"started:    {_fmt_time(state.start_time_s)}")
    typer.echo(f"ended:      {_fmt_time(state.end_time_s)}")
    if state.message:
        typer.echo(f"message:    {state.message.strip()}")
    if state.finished and not state.succeeded:
        fail(f"job {job_id} {state.status}")


def logs(
    job_id: str = typer.Argument(..., help="Job (submission) id printed by `sspctl submit`."),
    address: Optional[str] = typer.Option(None, "--address", "-a", help=_ADDRESS_HELP),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep streaming until the job ends; exit non-zero if it failed."
    ),
) -> None:
    """Print a job's logs (driver output: what the command printed)."""
    from orchestrator.submit import JobClient, SubmitError

    try:
        client = JobClient(address)
        if not follow:
            sys.stdout.write(client.logs(job_id))
            return
        state = client.follow(job_id, sys.stdout)
    except SubmitError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"stopped following; job {job_id} keeps running", code=130)
    if not state.succeeded:
        fail(f"job {job_id} {state.status}")


def register(app: typer.Typer) -> None:
    """Add ``deploy`` (sub-app) and the top-level ``submit``, ``status``, ``logs`` commands."""
    app.add_typer(deploy_app, name="deploy")
    app.command(
        "submit", context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True}
    )(submit)
    app.command("status")(status)
    app.command("logs")(logs)
