"""``sspctl splits make|import``: subject splits with nested label budgets (docs/splits.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from orchestrator.commands._common import fail, path_arg

splits_app = typer.Typer(
    help=(
        "Subject splits: test / train / valid and nested label-budget subsets per seed.\n\n"
        "The file is YAML in the published format (train/valid/test -> mm1/mm2 -> ids) plus "
        "budgets and meta sections; see docs/splits.md."
    ),
    no_args_is_help=True,
)


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        fail(f"{option}: expected comma-separated integers, got {text!r}")
    if not values:
        fail(f"{option}: expected at least one integer")
    return values


def default_split_path(store: str, seed: int) -> Path:
    """``<store dir>/<store name>-split-seed<S>.yaml`` next to a local store; ``./split-seed<S>.yaml``
    in the current directory for a URL store."""
    name = f"split-seed{seed}.yaml"
    if "://" in store:
        return Path.cwd() / name
    path = Path(store).expanduser().resolve()
    return path.parent / f"{path.stem}-{name}"


@splits_app.command("make")
def make(
    store: str = typer.Option(..., "--store", help="Slice store (path or fsspec URL) whose subject table is split."),
    test_per_vendor: int = typer.Option(
        ..., "--test-per-vendor", help="Test subjects drawn from every dataset x vendor group (all of a smaller group)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the test/valid draw; budget subsets use (seed, budget seed)."),
    valid_fraction: float = typer.Option(
        0.2, "--valid-fraction", help="Share of the non-test pool put in valid: round(fraction * n) subjects."
    ),
    budgets: str = typer.Option(
        "10,15,25,50", "--budgets", help="Comma-separated label budgets (subjects); nested, clipped to the train size."
    ),
    budget_seeds: str = typer.Option("0,1,2", "--budget-seeds", help="Comma-separated seeds of the budget subsets."),
    exclude_mm2_overlap: bool = typer.Option(
        False,
        "--exclude-mm2-overlap",
        help=(
            "Leave M&Ms-2 NOR/HCM/LV subjects out of train/valid when M&Ms is also present "
            "(the published code's rule against patients in both datasets)."
        ),
    ),
    out: Path | None = typer.Option(
        None, "--out", help="Output file. Default: <store>-split-seed<S>.yaml next to a local store, else ./split-seed<S>.yaml."
    ),
) -> None:
    """Draw a split from the store's subject table and write it as YAML (prints where)."""
    from datastore.splits import SplitError, make_splits
    from datastore.store import SliceStore, StoreError

    store = path_arg(store, "--store", must_exist=False)  # the store module names a missing store
    out = Path(path_arg(out, "--out", must_exist=False)) if out else None
    budget_list = _int_list(budgets, "--budgets")
    seed_list = _int_list(budget_seeds, "--budget-seeds")
    try:
        opened = SliceStore.open(store)
        subjects = opened.subjects
        if not len(subjects):
            fail(f"{store}: the store has no subjects")
        if not opened.complete:
            fail(f"{store}: the ingest has not finished (the store is not complete); rerun sspctl ingest first")
        split = make_splits(
            subjects,
            test_per_vendor=test_per_vendor,
            seed=seed,
            valid_fraction=valid_fraction,
            budgets=budget_list,
            seeds=seed_list,
            exclude_mm2_overlap=exclude_mm2_overlap,
            meta={"store": store, "store_hash": opened.hash, "created_by": "sspctl splits make"},
        )
    except (SplitError, StoreError) as exc:
        fail(str(exc))
    target = split.save(out or default_split_path(store, seed))
    typer.echo(split.summary())
    typer.echo(f"wrote {target}")


@splits_app.command("import")
def import_(
    files: list[Path] = typer.Argument(
        ...,
        help=(
            "Published split file(s) or a directory: the base file (train/valid/test) plus optional "
            "<base>-nr<B>-seed<S>.yaml files that become budget B of seed S, and the unseen-vendor files "
            "<base>-Vendor-<X>.yaml that become named splits vendor-<X>."
        ),
    ),
    store: str | None = typer.Option(None, "--store", help="Check every subject id against this store's subject table."),
    out: Path = typer.Option(
        Path("split.yaml"), "--out",
        help="Output file (default ./split.yaml); a named split NAME goes next to it as <stem>.NAME.yaml "
        "(split.vendor-A_B.yaml), which `sspctl finetune --split split.yaml --split-name NAME` reads.",
    ),
) -> None:
    """Convert published split files to sspctl split files, checking ids against a store."""
    from datastore.splits import VENDOR_FILE, SplitError, import_named, import_published
    from datastore.store import SliceStore, StoreError

    files = [Path(path_arg(f, "FILES")) for f in files]
    store = path_arg(store, "--store", must_exist=False)  # the store module names a missing store
    out = Path(path_arg(out, "--out", must_exist=False))
    try:
        meta = {"created_by": "sspctl splits import"}
        opened = None
        if store is not None:
            opened = SliceStore.open(store)
            meta.update({"store": store, "store_hash": opened.hash})
        named = import_named(files, meta=meta)
        listed = [f for entry in files for f in (sorted(entry.iterdir()) if entry.is_dir() else [entry])]
        has_base = any(f.suffix in (".yaml", ".yml") and not VENDOR_FILE.match(f.name) for f in listed)
        splits = {None: import_published(files, meta=meta)} if has_base or not named else {}
        splits.update(named)
        if opened is not None:
            for split in splits.values():
                split.check_against(opened.subjects, store_name=store or "store")
    except (SplitError, StoreError) as exc:
        fail(str(exc))
    for name, split in splits.items():
        target = split.save(out if name is None else out.with_name(f"{out.stem}.{name}{out.suffix}"))
        typer.echo(f"{name or 'default'}: {split.summary()}".replace("\n", "\n  "))
        typer.echo(f"wrote {target.resolve()}")


def register(app: typer.Typer) -> None:
    """Add ``sspctl splits`` to the root app."""
    app.add_typer(splits_app, name="splits")
