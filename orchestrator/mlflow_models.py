"""sspctl's models as MLflow models: logged on their runs, registered by name, loaded back by ``models:/`` URI.

- A fine-tuned cell logs ``segmenter`` (``mlflow.pyfunc``, ``SegmenterModel``): its artifacts are the
  cell's ``model.pt`` and ``model.json``; ``predict`` takes a DataFrame with the column ``image``
  (path of a short-axis NIfTI) and optional ``output`` (where to write the labels) and returns the
  written label paths.
- A pretraining run logs each exported part (``encoder``; MIM also ``encoder_decoder``) as a pyfunc
  (``EncoderModel``: ``(N, H, W)`` float32 slices -> ``(N, C)`` pooled bottleneck features) whose
  artifacts are the part's ``.pt`` file (and its best-epoch file, if any) and the run's ``manifest.json``, and registers it as
  ``sspctl-<method>-<part>`` (``encoder_decoder`` is spelled ``encoder-decoder``): one version per
  run, tagged ``sspctl.dataset_hash`` and ``sspctl.run_id``.
- ``fetch_model("models:/NAME/VERSION" | "models:/NAME/latest" | "models:/NAME@ALIAS", ...)``
  downloads a version once into ``<workspace>/models/NAME/vVERSION/``, checks every weights file
  against the sha256 its ``manifest.json``/``model.json`` records, and returns the folder: the same
  layout as a run directory on disk, so the usual loaders (``torch.load(weights_only=True)``) read it.

Only state-dict files travel: nothing is unpickled but plain tensors. Logging never fails a run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("sspctl.mlflow_models")

MODELS_SCHEME = "models:/"
#: Name of a cell's logged model (not "model": the worker already logs the artifact folder model/).
CELL_MODEL_NAME = "segmenter"
#: Version tags of a registered pretrained part.
VERSION_DATASET_TAG, VERSION_RUN_TAG = "sspctl.dataset_hash", "sspctl.run_id"
_PIP = ["torch", "numpy", "pandas", "nibabel", "monai", "sspctl"]
_LOGGED = re.compile(r"^models:/m-[0-9a-f]+/?$")  # a logged model's id (not registered)
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")


class ModelUriError(ValueError):
    """A ``models:/`` URI cannot be resolved or its files fail their checks; one line."""


def registered_name(method: str, part: str) -> str:
    """Registry name of a pretrained part: ``sspctl-simclr-encoder``, ``sspctl-mim-encoder-decoder``."""
    return f"sspctl-{method}-{part.replace('_', '-')}"


@contextmanager
def mlflow_uris(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking and registry URIs at ``tracking_uri`` for the block only.

    ``mlflow.set_tracking_uri`` (needed by ``mlflow.start_run`` and ``log_model``) also exports
    ``MLFLOW_TRACKING_URI``, which ``Workspace.tracking_uri`` reads: left behind, it would send every
    later command of this process (another workspace's pretraining, a test) to this backend. The
    globals and both variables are put back as they were, unset ones unset.
    """
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {name: os.environ.get(name) for name in names}
    saved = tracking_utils._tracking_uri, registry_utils._registry_uri
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])  # type: ignore[arg-type] - None unsets it
        mlflow.set_registry_uri(saved[1])  # type: ignore[arg-type]
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- pyfunc wrappers (loaded by MLflow's tooling: mlflow.pyfunc.load_model, mlflow models serve) --------


def _python_model_base() -> type:
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


# MLflow warns, when a PythonModel subclass is defined, that ``predict`` has no type hints; its hint
# schemas cannot express "a frame of NIfTI paths" and the signatures are given when logging. It
# resets the warning filters around that check, so the one warning is muted at its output hook.
with warnings.catch_warnings():
    warnings.showwarning = lambda *args, **kwargs: None

    class SegmenterModel(_python_model_base()):  # type: ignore[misc]
        """pyfunc of a fine-tuned cell: segments NIfTI files named in the input frame."""

        def load_context(self, context):  # noqa: ANN001, ANN201 - MLflow reads type hints as a schema
            from trainers.inference import load_segmenter

            self.segmenter = load_segmenter(Path(context.artifacts["model.json"]).parent)

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            """``model_input``: DataFrame ``image`` (NIfTI path), optional ``output``; returns ``output`` paths."""
            import pandas as pd

            from trainers.inference import predict_nifti

            frame = pd.DataFrame(model_input)
            outputs = []
            for row in frame.to_dict(orient="records"):
                image = Path(str(row["image"]))
                target = row.get("output") or str(image.with_name(image.name.split(".nii")[0] + "_labels.nii.gz"))
                outputs.append(str(predict_nifti(self.segmenter, image, target, progress=False)))
            return pd.DataFrame({"output": outputs})


    class EncoderModel(_python_model_base()):  # type: ignore[misc]
        """pyfunc of a pretrained part: mean-pooled bottleneck features of ``(N, H, W)`` slices."""

        def load_context(self, context):  # noqa: ANN001, ANN201
            from trainers.models.unet import UNet2d
            from trainers.weights import load_pretrained, read_manifest

            folder = Path(context.artifacts["manifest"]).parent
            manifest = read_manifest(folder)
            self.model = UNet2d(manifest.image_size, 4, width=manifest.model_width).eval()
            load_pretrained(self.model, context.artifacts["weights"], "encoder")

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            """``model_input``: float32 ``(N, H, W)`` z-scored slices; returns ``(N, C)`` features."""
            import numpy as np
            import torch

            slices = torch.as_tensor(np.asarray(model_input, dtype=np.float32))[:, None]
            with torch.no_grad():
                return self.model.encoder(slices)[-1].mean(dim=(2, 3)).numpy()


def _log_pyfunc(tracking_uri: str, run_id: str, name: str, python_model: Any, artifacts: dict[str, str],
                signature: Any, input_example: Any, registered: str | None = None) -> Any:
    """``mlflow.pyfunc.log_model`` onto the existing run ``run_id`` (its status is left as it was)."""
    import mlflow

    client = _client(tracking_uri)
    status = client.get_run(run_id).info.status
    # MLflow warns that a pyfunc object is cloudpickled (sspctl's own loaders never unpickle it) and,
    # for the segmenter, that its example paths do not exist at logging time: both are expected.
    loggers = [logging.getLogger(n) for n in ("mlflow.pyfunc", "mlflow.models.model")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with mlflow_uris(tracking_uri), mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=python_model, artifacts=artifacts, signature=signature,
                input_example=input_example, pip_requirements=_PIP, registered_model_name=registered,
            )
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    if status != "FINISHED":  # start_run's exit ended the run: give it back its state
        client.update_run(run_id, status=status)
    return info


def _warn(what: str, run_id: str, exc: Exception) -> None:
    log.warning("could not log %s on MLflow run %s (%s)", what, run_id,
                str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)


def log_cell_model(tracking_uri: str, run_id: str, model_dir: str | Path) -> str | None:
    """Log a fine-tuned model directory (``model.pt`` + ``model.json``) as the run's pyfunc model.

    Returns the logged model's URI (``models:/<model id>``), or ``None`` after a warning.
    """
    try:
        import pandas as pd
        from mlflow.models import infer_signature

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "model.json").read_text())
        example = pd.DataFrame({"image": ["scan_sa.nii.gz"], "output": ["scan_sa_labels.nii.gz"]})
        signature = infer_signature(example, pd.DataFrame({"output": ["scan_sa_labels.nii.gz"]}))
        info = _log_pyfunc(
            tracking_uri, run_id, CELL_MODEL_NAME, SegmenterModel(),
            {"model.pt": str(model_dir / meta.get("file", "model.pt")), "model.json": str(model_dir / "model.json")},
            signature, example,
        )
        return str(info.model_uri)
    except Exception as exc:  # noqa: BLE001 - tracking must never fail a cell
        _warn("the fine-tuned model", run_id, exc)
        return None


def register_pretrained(tracking_uri: str, run_id: str, run_dir: str | Path) -> dict[str, str]:
    """Log and register every exported part of a finished pretraining run directory.

    One version per run: a part already registered from ``run_id`` is not registered again.
    Returns ``{part: "models:/NAME/VERSION"}`` for the parts registered (now or before).
    """
    import numpy as np
    from mlflow.models import infer_signature

    from trainers.weights import read_manifest

    run_dir = Path(run_dir)
    done: dict[str, str] = {}
    try:
        manifest = read_manifest(run_dir)
        client = _client(tracking_uri)
    except Exception as exc:  # noqa: BLE001
        _warn("the pretrained weights", run_id, exc)
        return done
    for part, file in manifest.files.items():
        name = registered_name(manifest.method, part)
        try:
            existing = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
            if existing:
                done[part] = f"{MODELS_SCHEME}{name}/{existing[0].version}"
                continue
            example = np.zeros((1, manifest.image_size, manifest.image_size), dtype=np.float32)
            signature = infer_signature(example, np.zeros((1, 8), dtype=np.float32))
            artifacts = {"weights": str(run_dir / file), "manifest": str(run_dir / "manifest.json")}
            if manifest.best is not None and part in manifest.best.files:  # fine-tuning may start from it
                artifacts["weights_best"] = str(run_dir / manifest.best.files[part])
            info = _log_pyfunc(tracking_uri, run_id, part, EncoderModel(), artifacts, signature, example,
                               registered=name)
            version = str(info.registered_model_version)
            client.set_model_version_tag(name, version, VERSION_DATASET_TAG, manifest.dataset_hash)
            client.set_model_version_tag(name, version, VERSION_RUN_TAG, run_id)
            done[part] = f"{MODELS_SCHEME}{name}/{version}"
        except Exception as exc:  # noqa: BLE001 - the files on disk stay usable without the registry
            _warn(f"the {part} as {name}", run_id, exc)
    return done


# -- loading back --------------------------------------------------------------------------------


def _client(tracking_uri: str) -> Any:
    from orchestrator.study_tracking import client_for

    return client_for(tracking_uri)


def is_model_uri(text: str | Path) -> bool:
    return str(text).startswith(MODELS_SCHEME)


def resolve_version(uri: str, tracking_uri: str) -> tuple[str, str]:
    """``(name, version)`` of ``models:/NAME/VERSION``, ``models:/NAME/latest`` or ``models:/NAME@ALIAS``.

    A logged model ``models:/m-<id>`` gives ``("m-<id>", "")``.

    Raises:
        ModelUriError: malformed URI, unknown model, version or alias.
    """
    if _LOGGED.match(uri):
        return uri[len(MODELS_SCHEME):].rstrip("/"), ""
    match = _URI.match(uri)
    if not match:
        raise ModelUriError(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    name, version, alias = match["name"], match["version"], match["alias"]
    client = _client(tracking_uri)
    try:
        if alias:
            return name, str(client.get_model_version_by_alias(name, alias).version)
        if version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise ModelUriError(f"{uri}: no registered model {name!r} in {tracking_uri}")
            return name, str(max(int(v.version) for v in versions))
        return name, str(client.get_model_version(name, version).version)
    except ModelUriError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow's errors are multi-line; keep the first
        raise ModelUriError(f"{uri}: {str(exc).splitlines()[0][:300]} (registry {tracking_uri})") from None


def verify_folder(folder: Path, source: str) -> Path:
    """Check the weights in ``folder`` against their recorded sha256; return the folder.

    A pretrained part has ``manifest.json`` (``sha256``: file -> digest), a fine-tuned model
    ``model.json`` (``file`` and ``sha256``).

    Raises:
        ModelUriError: no manifest, a missing file, or a digest that differs.
    """
    if (folder / "manifest.json").is_file():
        meta = json.loads((folder / "manifest.json").read_text())
        expected = dict(meta.get("sha256") or {})
        listed = set(meta.get("files", {}).values()) | set((meta.get("best") or {}).get("files", {}).values())
        expected = {f: d for f, d in expected.items() if f in listed and (folder / f).exists()}
    elif (folder / "model.json").is_file():
        meta = json.loads((folder / "model.json").read_text())
        expected = {meta.get("file", "model.pt"): meta.get("sha256")}
    else:
        raise ModelUriError(f"{source}: holds neither manifest.json nor model.json (not an sspctl model)")
    if not expected or not all(expected.values()):
        raise ModelUriError(f"{source}: its manifest records no sha256 for the weights; refusing to load them")
    for file, digest in expected.items():
        path = folder / file
        if not path.is_file():
            raise ModelUriError(f"{source}: weights file {file} is missing")
        from trainers.weights import _sha256  # the digest the weights files were written with

        if _sha256(path) != digest:
            raise ModelUriError(f"{source}: {file} does not match the sha256 in its manifest (corrupt or altered)")
    return folder


def _flatten_download(downloaded: Path, target: Path) -> None:
    """Move the weights and manifest of a downloaded pyfunc (under ``artifacts/``) into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    for path in downloaded.rglob("*"):
        if path.is_file() and (path.suffix == ".pt" or path.name in ("manifest.json", "model.json")):
            shutil.copy2(path, target / path.name)


def fetch_model(uri: str, tracking_uri: str, cache_root: str | Path) -> Path:
    """Download (once) and verify the registered model ``uri``; return the local folder.

    The folder is ``<cache_root>/NAME/vVERSION/`` (``<cache_root>/m-<id>/logged/`` for a logged model; deterministic, so a fine-tuning cell built on it
    keeps its identity across reruns).

    Raises:
        ModelUriError: see ``resolve_version`` and ``verify_folder``, or a failed download.
    """
    name, version = resolve_version(uri, tracking_uri)
    target = Path(cache_root) / name / (f"v{version}" if version else "logged")
    source = f"{MODELS_SCHEME}{name}/{version}" if version else f"{MODELS_SCHEME}{name}"
    if not target.is_dir():
        import mlflow

        Path(cache_root).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_root))
        try:
            with mlflow_uris(tracking_uri):  # models:/ resolves through the registry URI
                downloaded = Path(mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=str(staging / "raw"), tracking_uri=tracking_uri))
            _flatten_download(downloaded, staging / "model")
            verify_folder(staging / "model", source)
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / "model").rename(target)
        except ModelUriError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelUriError(f"{source}: download failed ({str(exc).splitlines()[0][:300]})") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return verify_folder(target, source)
