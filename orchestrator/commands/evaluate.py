"""``sspctl evaluate`` and ``sspctl predict``: use a fine-tuned model on a store or on a NIfTI scan.

A fine-tuned model is a directory with ``model.pt`` + ``model.json`` (``docs/evaluation.md``); both
commands also accept the ``model.pt`` file itself, or a cell name looked up under the workspace.
Heavy imports (torch, MONAI) happen inside the commands.
"""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.commands._common import fail, path_arg

MODEL_HELP = (
    "Fine-tuned model: a directory holding model.pt + model.json (a finetune cell's output), the model.pt "
    "file, the name of such a directory under the workspace (--output), or an MLflow model URI: "
    "models:/NAME/VERSION, models:/NAME/latest, models:/NAME@ALIAS (registered) or models:/m-ID (a cell's logged model)."
)


def resolve_model(model: str, output: Path | None) -> Path:
    """``model`` as an existing path, else the unique ``<workspace>/**/<model>/model.json`` directory.

    A ``models:/`` URI (a registered version ``models:/NAME/VERSION``, ``/latest`` or ``@ALIAS``, or a
    cell's logged model ``models:/m-<id>``) is downloaded once under ``<workspace>/models/`` and its
    ``model.pt`` checked against the sha256 in ``model.json``.

    Raises:
        ValueError: nothing or several directories match, or the URI fails (one line).
    """
    from orchestrator.workspace import Workspace

    if model.startswith("models:/"):
        from orchestrator.mlflow_models import fetch_model

        workspace = Workspace.resolve(output)
        return fetch_model(model, workspace.tracking_uri, workspace.root / "models")
    path = Path(model).expanduser()
    if path.exists():
        return path.absolute()
    from orchestrator.workspace import Workspace

    root = Workspace.resolve(output, create=False).root  # a lookup never creates the workspace
    found = sorted({p.parent for p in root.glob(f"**/{model}/model.json")})
    if not found:
        raise ValueError(f"--model {model}: no such file or directory, and no fine-tuned model named so under {root}")
    if len(found) > 1:
        raise ValueError(f"--model {model}: {len(found)} models with that name under {root}; pass the directory")
    return found[0]


def _device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    store: str = typer.Option(..., "--store", help="Slice store (path or fsspec URL) holding the subjects' native volumes."),
    split: Path = typer.Option(..., "--split", help="Split YAML; its subjects of --part are evaluated."),
    part: str = typer.Option("test", "--part", help="Which subjects of the split: test, valid or train."),
    out: Path | None = typer.Option(None, "--out", help="Folder for <part>_dice3d.csv, <part>_dice2d.csv and <part>_overlay.png. Default: <model>/evaluation."),
    device: str = typer.Option("auto", "--device", help="Torch device: auto (CUDA if present), cpu, cuda, cuda:1 ..."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root, to find --model by name. Default: $SSPCTL_HOME or ./runs."),
) -> None:
    """3D Dice in native space (per subject x ED/ES x LV/MYO/RV) of a fine-tuned model on a split's subjects.

    Each volume is resampled to the model grid centred on the image centre, predicted, and the class scores are mapped back to the native grid before the argmax (docs/evaluation.md).
    """
    from datastore.splits import SplitError, load_split
    from datastore.store import SliceStore, StoreError
    from trainers.evaluation import evaluate_store, model_scores_fn
    from trainers.inference import InferenceError, load_segmenter, model_dir

    if part not in ("test", "valid", "train"):
        fail(f"--part: expected test, valid or train, got {part!r}")
    store = path_arg(store, "--store", kind="dir")
    split = Path(path_arg(split, "--split", kind="file"))
    out = Path(path_arg(out, "--out", must_exist=False)) if out else None
    try:
        segmenter = load_segmenter(resolve_model(model, output), _device(device))
        opened = SliceStore.open(store)
        subjects = load_split(split).subjects(part)  # type: ignore[arg-type]
        if opened.image_size != segmenter.image_size:
            typer.echo(f"note: store slices are {opened.image_size} px, the model grid is {segmenter.image_size} px; "
                       "native evaluation resamples to the model grid", err=True)
        result = evaluate_store(model_scores_fn(segmenter.model, segmenter.device), opened, subjects,
                                segmenter.image_size, segmenter.spacing_mm)
    except (InferenceError, StoreError, SplitError, ValueError, KeyError) as exc:
        fail(str(exc).strip("'\""))
    target = out or model_dir(resolve_model(model, output)) / "evaluation"
    paths = result.write(target, prefix=part)
    summary = result.summary()
    per_class = ", ".join(f"{k[5:]} {v:.4f}" for k, v in summary.items() if k != "dice_mean")
    typer.echo(f"{part}: {len(subjects)} subjects, mean 3D Dice {summary.get('dice_mean', float('nan')):.4f} ({per_class})")
    typer.echo(f"wrote {', '.join(str(p) for p in paths)}")


def predict(
    model: str = typer.Option(..., "--model", help=MODEL_HELP),
    input_path: Path = typer.Option(..., "--input", "-i", help="Short-axis NIfTI (.nii/.nii.gz): a 3D volume (X, Y, Z) or a 4D cine (X, Y, Z, T)."),
    out: Path = typer.Option(..., "--out", "-o", help="Label NIfTI to write, with exactly the shape and affine of --input."),
    labels: str = typer.Option(
        "input", "--labels",
        help="Label convention of the output: input (ACDC order 1 RV 2 MYO 3 LV for ACDC files patientNNN_4d/_frameXX, "
        "else M&Ms order), mnms (1 LV 2 MYO 3 RV), acdc, or a manifest label_map such as 1:3,2:2,3:1.",
    ),
    device: str = typer.Option("auto", "--device", help="Torch device: auto (CUDA if present), cpu, cuda, cuda:1 ..."),
    output: Path | None = typer.Option(None, "--output", help="Workspace root, to find --model by name. Default: $SSPCTL_HOME or ./runs."),
) -> None:
    """Segment every frame of a short-axis NIfTI (cine or single phase, any ingested layout) and write a label NIfTI."""
    from trainers.inference import InferenceError, load_segmenter, predict_nifti

    input_path = Path(path_arg(input_path, "--input", kind="file"))
    out = Path(path_arg(out, "--out", must_exist=False))
    try:
        segmenter = load_segmenter(resolve_model(model, output), _device(device))
        written = predict_nifti(segmenter, input_path, out, labels=labels)
    except (InferenceError, ValueError) as exc:
        fail(str(exc))
    typer.echo(f"wrote {written}")


def register(app: typer.Typer) -> None:
    """Add ``evaluate`` and ``predict`` to the root app."""
    app.command("evaluate")(evaluate)
    app.command("predict")(predict)
