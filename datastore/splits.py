"""Subject splits: test / train / valid and nested label-budget subsets, in the published YAML format.

File format (``docs/splits.md``)::

    train: {mm1: [ids], mm2: [ids]}        # the published format (method-spec 1.3) at the top
    valid: {mm1: [...], mm2: [...]}
    test:  {mm1: [...], mm2: [...]}
    budgets: {<seed>: {<budget>: {mm1: [...], mm2: [...]}}}   # nested per seed: 10 ⊂ 15 ⊂ 25 ⊂ 50 ⊂ train
    meta: {store_hash: ..., seed: ..., created_by: ...}

Dataset keys are the published ``mm1``/``mm2``; ``DATASET_KEYS`` maps the store's ``dataset`` values
to them (any other dataset value is used as its own key). Subject ids are strings (M&Ms-2 ids keep
their zero padding: files are parsed without YAML type guessing, so ``010`` stays ``"010"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

log = logging.getLogger(__name__)

#: Store ``dataset`` value -> split-file dataset key (the published names).
DATASET_KEYS: dict[str, str] = {"mnms": "mm1", "mnms2": "mm2"}
#: The three parts of a split, in file order.
PARTS: tuple[str, ...] = ("train", "valid", "test")
DEFAULT_BUDGETS: tuple[int, ...] = (10, 15, 25, 50)
DEFAULT_BUDGET_SEEDS: tuple[int, ...] = (0, 1, 2)
#: M&Ms-2 pathologies also present in M&Ms (dropped from the M&Ms-2 train pool when M&Ms is used).
MM2_OVERLAP_PATHOLOGIES: frozenset[str] = frozenset({"NOR", "HCM", "LV"})
#: Published per-budget file name, e.g. ``default-cine-split-nr10-seed0.yaml``.
BUDGET_FILE = re.compile(r"^(?P<base>.+)-nr(?P<budget>\d+)-seed(?P<seed>\d+)\.ya?ml$")
#: Published unseen-vendor split, e.g. ``default-cine-split-Vendor-A_B.yaml`` -> named split ``vendor-A_B``.
VENDOR_FILE = re.compile(r"^(?P<base>.+)-Vendor-(?P<vendors>[A-Za-z0-9_]+)\.ya?ml$")
#: Names of named splits (file-name safe).
SPLIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

Part = Literal["train", "valid", "test"]
Groups = dict[str, list[str]]  # dataset key -> subject ids


class SplitError(ValueError):
    """A split file or request is invalid; the message is one line naming the file and key."""


def dataset_key(dataset: str) -> str:
    """Split-file key of a store ``dataset`` value (``mnms`` -> ``mm1``, ``mnms2`` -> ``mm2``)."""
    return DATASET_KEYS.get(str(dataset), str(dataset))


def _flatten(groups: Mapping[str, Sequence[str]]) -> list[str]:
    return [sid for key in groups for sid in groups[key]]


@dataclass(frozen=True)
class Split:
    """A validated split. ``parts[part][dataset_key]`` and ``budgets[seed][budget][dataset_key]`` hold
    subject ids; ``meta`` is free-form provenance (store hash, seed, creator)."""

    parts: dict[str, Groups]
    budgets: dict[int, dict[int, Groups]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = "<split>"

    def __post_init__(self) -> None:
        self.validate()

    # -- queries ------------------------------------------------------------------------------
    def subjects(self, part: Part) -> list[str]:
        """Subject ids of ``part`` ("train", "valid" or "test"), dataset by dataset."""
        if part not in PARTS:
            raise SplitError(f"{self.source}: unknown part {part!r} (expected one of {', '.join(PARTS)})")
        return _flatten(self.parts[part])

    def groups(self, part: Part) -> Groups:
        """``{dataset_key: ids}`` of ``part``."""
        return {k: list(v) for k, v in self.parts[part].items()}

    def budget(self, budget: int | str, seed: int) -> list[str]:
        """Train subjects of a label budget (``"all"`` = the whole train part) for subset ``seed``."""
        if budget == "all":
            return self.subjects("train")
        try:
            n = int(budget)
        except (TypeError, ValueError):
            raise SplitError(f"{self.source}: budget must be an integer or 'all', got {budget!r}") from None
        if seed not in self.budgets:
            raise SplitError(
                f"{self.source}: budgets: no seed {seed} (have {sorted(self.budgets) or 'none'})"
            )
        if n not in self.budgets[seed]:
            raise SplitError(
                f"{self.source}: budgets.{seed}: no budget {n} (have {sorted(self.budgets[seed])})"
            )
        return _flatten(self.budgets[seed][n])

    @property
    def budget_sizes(self) -> list[int]:
        """Budgets present for every seed, ascending."""
        sizes = [set(b) for b in self.budgets.values()]
        return sorted(set.intersection(*sizes)) if sizes else []

    @property
    def budget_seeds(self) -> list[int]:
        return sorted(self.budgets)

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``SplitError`` unless parts are disjoint, ids unique and budgets nested in train."""
        src = self.source
        seen: dict[str, str] = {}
        for part in PARTS:
            if part not in self.parts:
                raise SplitError(f"{src}: {part}: missing (a split needs train, valid and test)")
            for key, ids in self.parts[part].items():
                for sid in ids:
                    where = f"{part}.{key}"
                    qualified = f"{key}/{sid}"
                    if qualified in seen:
                        if seen[qualified] == where:
                            raise SplitError(f"{src}: {where}: subject {sid!r} listed twice")
                        raise SplitError(f"{src}: subject {key}/{sid} is in both {seen[qualified]} and {where}")
                    seen[qualified] = where
        if not self.subjects("train"):
            raise SplitError(f"{src}: train: no subjects")
        train = {(k, s) for k, ids in self.parts["train"].items() for s in ids}
        for seed, by_budget in self.budgets.items():
            previous: set[tuple[str, str]] = set()
            previous_n = 0
            for n in sorted(by_budget):
                where = f"budgets.{seed}.{n}"
                members = [(k, s) for k, ids in by_budget[n].items() for s in ids]
                chosen = set(members)
                if len(chosen) != len(members):
                    raise SplitError(f"{src}: {where}: a subject is listed twice")
                outside = sorted(f"{k}/{s}" for k, s in chosen - train)
                if outside:
                    raise SplitError(f"{src}: {where}: subjects not in train: {', '.join(outside[:5])}")
                if len(chosen) != min(n, len(train)):
                    raise SplitError(
                        f"{src}: {where}: has {len(chosen)} subjects, expected {min(n, len(train))}"
                    )
                missing = sorted(f"{k}/{s}" for k, s in previous - chosen)
                if missing:
                    raise SplitError(
                        f"{src}: {where}: not nested: budget {previous_n} subjects missing: "
                        f"{', '.join(missing[:5])}"
                    )
                previous, previous_n = chosen, n

    def check_against(self, subjects: Any, store_name: str = "store") -> None:
        """Raise ``SplitError`` naming every id of the split that is not in the subject table, or
        that is there without labels (an unlabelled subject can only be pretrained on)."""
        flags = subjects["labelled"] if "labelled" in subjects else [True] * len(subjects)
        pairs = [(dataset_key(d), str(s), _truthy(f)) for d, s, f in zip(subjects["dataset"], subjects["subject_id"], flags)]
        unlabelled = sorted(
            f"{part}.{key}: {sid}"
            for part in PARTS
            for key, ids in self.parts[part].items()
            for sid in ids
            if (key, sid, False) in set(pairs)
        )
        if unlabelled:
            shown = "; ".join(unlabelled[:10]) + (" ..." if len(unlabelled) > 10 else "")
            raise SplitError(f"{self.source}: {len(unlabelled)} subject(s) without labels in {store_name}: {shown}")
        known = {(k, s) for k, s, _ in pairs}
        unknown = sorted(
            f"{part}.{key}: {sid}"
            for part in PARTS
            for key, ids in self.parts[part].items()
            for sid in ids
            if (key, sid) not in known
        )
        if unknown:
            shown = "; ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise SplitError(f"{self.source}: {len(unknown)} subject id(s) not in {store_name}: {shown}")

    # -- output -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The file content: published parts first, then ``budgets`` and ``meta``."""
        data: dict[str, Any] = {part: {k: list(v) for k, v in self.parts[part].items()} for part in PARTS}
        data["budgets"] = {
            seed: {n: {k: list(v) for k, v in groups.items()} for n, groups in sorted(by_n.items())}
            for seed, by_n in sorted(self.budgets.items())
        }
        data["meta"] = dict(self.meta)
        return data

    def save(self, path: str | Path) -> Path:
        """Write the split file (YAML) and return its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100))
        return path

    def summary(self) -> str:
        """A few lines: counts per part and dataset, budgets per seed."""
        lines = []
        for part in PARTS:
            counts = ", ".join(f"{k} {len(v)}" for k, v in self.parts[part].items())
            lines.append(f"{part}: {len(self.subjects(part))} subjects ({counts})")
        for seed in self.budget_seeds:
            sizes = ", ".join(f"{n}" for n in sorted(self.budgets[seed]))
            lines.append(f"budgets seed {seed}: {sizes}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Making a split
# ------------------------------------------------------------------------------------------------


def make_splits(
    subjects: Any,
    test_per_vendor: int,
    seed: int,
    valid_fraction: float = 0.2,
    budgets: Iterable[int] = DEFAULT_BUDGETS,
    seeds: Iterable[int] = DEFAULT_BUDGET_SEEDS,
    exclude_mm2_overlap: bool = False,
    meta: Mapping[str, Any] | None = None,
) -> Split:
    """Draw a split from a subject table (``subject_id``, ``dataset``, ``vendor``[, ``pathology``, ``labelled``]).

    Only labelled subjects (``labelled`` True or absent) enter test, valid, train and the budgets;
    unlabelled ones are counted in ``meta["unlabelled"]`` and pretrained on (:func:`pretrain_pool`).
    * test: ``test_per_vendor`` subjects from every (dataset, vendor) group (all of a smaller group);
    * the remaining pool is shuffled and ``round(valid_fraction * n)`` subjects become valid, the
      rest train; with ``exclude_mm2_overlap`` (the published code's rule when both datasets are
      used) M&Ms-2 subjects with pathology NOR, HCM or LV are left out of the pool first;
    * per budget seed, one shuffle of train gives nested subsets: budget ``b`` = its first ``b``
      subjects (budgets above the train size clip to it, with a warning).

    Everything is drawn from ``numpy.random.default_rng`` seeded with ``seed`` (and the budget
    seed), over subjects sorted by (dataset, id), so the same table and seed give the same split.
    """
    if test_per_vendor < 0:
        raise SplitError(f"test_per_vendor must be >= 0, got {test_per_vendor}")
    if not 0 <= valid_fraction < 1:
        raise SplitError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    budget_list = sorted({int(b) for b in budgets})
    if any(b < 1 for b in budget_list):
        raise SplitError(f"budgets must be positive integers, got {budget_list}")
    for column in ("subject_id", "dataset", "vendor"):
        if column not in subjects:
            raise SplitError(f"subject table has no {column!r} column")
    labelled = [_truthy(v) for v in subjects["labelled"]] if "labelled" in subjects else [True] * len(subjects)
    rows = sorted(
        (dataset_key(d), str(s), str(v), str(p))
        for d, s, v, p, has_labels in zip(
            subjects["dataset"],
            subjects["subject_id"],
            subjects["vendor"],
            subjects["pathology"] if "pathology" in subjects else [""] * len(subjects),
            labelled,
        )
        if has_labels
    )
    if not rows:
        raise SplitError(f"subject table has no labelled subject ({len(labelled)} unlabelled): nothing to test or fine-tune on")
    if len({(k, s) for k, s, _, _ in rows}) != len(rows):
        raise SplitError("subject table lists a subject twice")
    rng = np.random.default_rng(seed)

    test: set[tuple[str, str]] = set()
    groups: dict[tuple[str, str], list[str]] = {}
    for key, sid, vendor, _ in rows:
        groups.setdefault((key, vendor), []).append(sid)
    for (key, _vendor), ids in sorted(groups.items()):
        take = min(test_per_vendor, len(ids))
        test.update((key, ids[i]) for i in sorted(rng.choice(len(ids), take, replace=False)))

    keys = {k for k, _, _, _ in rows}
    drop_overlap = exclude_mm2_overlap and {"mm1", "mm2"} <= keys
    excluded = [
        (k, s) for k, s, _, p in rows if drop_overlap and k == "mm2" and (k, s) not in test and p in MM2_OVERLAP_PATHOLOGIES
    ]
    dropped = test | set(excluded)
    pool = [(k, s) for k, s, _, _ in rows if (k, s) not in dropped]
    shuffled = [pool[i] for i in rng.permutation(len(pool))]
    n_valid = int(round(valid_fraction * len(pool)))
    valid, train = shuffled[:n_valid], shuffled[n_valid:]
    if not train:
        raise SplitError(
            f"no train subjects left ({len(rows)} subjects, {len(test)} test, {n_valid} valid, "
            f"{len(excluded)} excluded); lower --test-per-vendor"
        )
    clipped = [b for b in budget_list if b > len(train)]
    if clipped:
        log.warning("budgets %s exceed the %d train subjects and are clipped to them", clipped, len(train))

    budget_sets: dict[int, dict[int, Groups]] = {}
    for budget_seed in sorted({int(s) for s in seeds}):
        order = [train[i] for i in np.random.default_rng([seed, budget_seed]).permutation(len(train))]
        budget_sets[budget_seed] = {b: _group(order[: min(b, len(train))]) for b in budget_list}

    info = {
        "seed": int(seed),
        "test_per_vendor": int(test_per_vendor),
        "valid_fraction": float(valid_fraction),
        "excluded_mm2_overlap": [s for _, s in excluded],
        "unlabelled": int(len(labelled) - sum(labelled)),
        **dict(meta or {}),
    }
    return Split(
        parts={"train": _group(train), "valid": _group(valid), "test": _group(sorted(test))},
        budgets=budget_sets,
        meta=info,
        source="make_splits",
    )


def _truthy(value: Any) -> bool:
    """A ``labelled`` cell: missing (None/NaN, older stores) counts as labelled."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return True
    return bool(value)


def pretrain_pool(subjects: Any, split: Split | None) -> list[str]:
    """Subjects to pretrain on: every subject of the table that is not in the split's test part.

    Labelled or not, train, valid or in no part at all (unlabelled, or outside an imported split).
    Ids are plain unless two datasets share one, then ``"<dataset>/<id>"`` (what the loader takes).
    """
    test = set() if split is None else {(k, s) for k, ids in split.parts["test"].items() for s in ids}
    pairs = [(str(d), str(s)) for d, s in zip(subjects["dataset"], subjects["subject_id"])]
    counts: dict[str, int] = {}
    for _, sid in pairs:
        counts[sid] = counts.get(sid, 0) + 1
    return [
        sid if counts[sid] == 1 else f"{dataset}/{sid}"
        for dataset, sid in pairs
        if (dataset_key(dataset), sid) not in test
    ]


def _group(members: Iterable[tuple[str, str]]) -> Groups:
    """``[(key, id), ...]`` -> ``{key: [ids sorted]}`` with keys sorted (mm1 before mm2)."""
    out: Groups = {}
    for key, sid in members:
        out.setdefault(key, []).append(sid)
    return {k: sorted(out[k]) for k in sorted(out)}


# ------------------------------------------------------------------------------------------------
# Reading split files
# ------------------------------------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping with every scalar kept as a string (no int/octal/bool guessing)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SplitError(f"{path}: split file not found") from None
    except (IsADirectoryError, UnicodeDecodeError) as exc:
        raise SplitError(f"{path}: cannot read split file ({exc.__class__.__name__})") from None
    try:
        data = yaml.load(text, Loader=yaml.BaseLoader)  # noqa: S506 - BaseLoader builds only str/list/dict
    except yaml.YAMLError as exc:
        raise SplitError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SplitError(f"{path}: expected a mapping with train/valid/test at the top level")
    return data


def _groups(value: Any, where: str) -> Groups:
    if not isinstance(value, dict):
        raise SplitError(f"{where}: expected a mapping of dataset (mm1/mm2) to a list of subject ids")
    out: Groups = {}
    for key, ids in value.items():
        if not isinstance(ids, list) or not all(isinstance(s, str) and s for s in ids):
            raise SplitError(f"{where}.{key}: expected a list of subject ids")
        out[str(key)] = list(ids)
    return out


def _int_key(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SplitError(f"{where}: {value!r} is not an integer") from None


def _meta(path: Path) -> dict[str, Any]:
    """The ``meta`` section with ordinary YAML typing (numbers stay numbers)."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    meta = data.get("meta") if isinstance(data, dict) else None
    return meta if isinstance(meta, dict) else {}


def _parse(data: dict[str, Any], source: str, typed_meta: dict[str, Any] | None = None) -> Split:
    extra = sorted(set(data) - {*PARTS, "budgets", "meta"})
    if extra:
        raise SplitError(f"{source}: {extra[0]}: unknown key (expected train, valid, test, budgets, meta)")
    for part in PARTS:
        if part not in data:
            raise SplitError(f"{source}: {part}: missing (a split needs train, valid and test)")
    parts = {part: _groups(data[part], f"{source}: {part}") for part in PARTS}
    budgets: dict[int, dict[int, Groups]] = {}
    raw_budgets = data.get("budgets") or {}
    if not isinstance(raw_budgets, dict):
        raise SplitError(f"{source}: budgets: expected a mapping seed -> budget -> dataset -> ids")
    for seed, by_n in raw_budgets.items():
        where = f"{source}: budgets.{seed}"
        if not isinstance(by_n, dict):
            raise SplitError(f"{where}: expected a mapping budget -> dataset -> ids")
        budgets[_int_key(seed, where)] = {
            _int_key(n, f"{where}.{n}"): _groups(g, f"{where}.{n}") for n, g in by_n.items()
        }
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise SplitError(f"{source}: meta: expected a mapping")
    return Split(parts=parts, budgets=budgets, meta=typed_meta or meta, source=source)


def load_split(path: str | Path) -> Split:
    """Read and validate a split file (ours, or a single published one without ``budgets``)."""
    path = Path(path)
    return _parse(_read(path), str(path), _meta(path))


def import_published(paths: Sequence[str | Path], meta: Mapping[str, Any] | None = None) -> Split:
    """Build a split from published files: one base file, optionally with the per-budget files.

    ``paths`` are files or directories. A file named ``<base>-nr<B>-seed<S>.yaml`` contributes its
    ``train`` as budget ``B`` of seed ``S`` (its valid/test must equal the base's); the one other
    file is the base split. The unseen-vendor files (``*-Vendor-*.yaml``) are left to :func:`import_named`.
    """
    files: list[Path] = []
    for entry in map(Path, paths):
        if entry.is_dir():
            files.extend(sorted(p for p in entry.iterdir() if p.suffix in (".yaml", ".yml")))
        else:
            files.append(entry)
    files = [f for f in files if not VENDOR_FILE.match(f.name)]  # named splits: import_named
    budget_files = [(f, BUDGET_FILE.match(f.name)) for f in files]
    bases = [f for f, m in budget_files if m is None]
    by_budget = [(f, m) for f, m in budget_files if m is not None]
    if len(bases) > 1:
        stems = {m.group("base") for _, m in by_budget}
        preferred = [b for b in bases if b.stem in stems]
        skipped = [b.name for b in bases if b not in preferred]
        if len(preferred) == 1:
            log.warning("skipping split files that are not budget files of %s: %s", preferred[0].name, skipped)
            bases = preferred
    if len(bases) != 1:
        names = ", ".join(b.name for b in bases) or "none"
        raise SplitError(f"expected exactly one base split file among the inputs, found: {names}")
    base_path = bases[0]
    base = _parse(_read(base_path), str(base_path), _meta(base_path))
    budgets: dict[int, dict[int, Groups]] = {s: {n: g for n, g in b.items()} for s, b in base.budgets.items()}
    for path, match in by_budget:
        assert match is not None
        part = _parse(_read(path), str(path))
        for name in ("valid", "test"):
            if sorted(part.subjects(name)) != sorted(base.subjects(name)):  # type: ignore[arg-type]
                raise SplitError(f"{path}: {name}: differs from {base_path.name}")
        budgets.setdefault(int(match.group("seed")), {})[int(match.group("budget"))] = part.groups("train")
    info = {"imported_from": [str(base_path), *(str(p) for p, _ in by_budget)], **base.meta, **dict(meta or {})}
    source = str(base_path) if not by_budget else f"{base_path.parent}"
    return Split(parts=base.parts, budgets=budgets, meta=info, source=source)


def import_named(paths: Sequence[str | Path], meta: Mapping[str, Any] | None = None) -> dict[str, Split]:
    """The published unseen-vendor splits among ``paths`` (files or directories) as named splits.

    ``default-cine-split-Vendor-A_B.yaml`` (train/valid/test -> mm1/mm2 -> ids; training on vendors
    A and B, testing on the others) becomes ``{"vendor-A_B": Split}``. They have no budgets: fine-tune
    them with budget ``all``.
    """
    named: dict[str, Split] = {}
    for entry in map(Path, paths):
        candidates = sorted(entry.iterdir()) if entry.is_dir() else [entry]
        for path in candidates:
            match = VENDOR_FILE.match(path.name)
            if match is None:
                continue
            name = f"vendor-{match.group('vendors')}"
            split = _parse(_read(path), str(path), _meta(path))
            info = {"imported_from": [str(path)], "name": name, **split.meta, **dict(meta or {})}
            named[name] = Split(parts=split.parts, budgets=split.budgets, meta=info, source=str(path))
    return named


def named_split_path(path: str | Path, name: str | None) -> Path:
    """The file of split ``name`` next to the default split file ``path``.

    ``split.yaml`` + ``vendor-A_B`` -> ``split.vendor-A_B.yaml`` (what ``sspctl splits import`` writes);
    ``name`` None or ``default`` -> ``path`` itself.

    Raises:
        SplitError: an unsafe name, or no such file (the message lists the names found).
    """
    path = Path(path)
    if name in (None, "", "default"):
        return path
    if not SPLIT_NAME.match(str(name)):
        raise SplitError(f"--split-name {name!r}: letters, digits, '_', '-' and '.' only")
    target = path.with_name(f"{path.stem}.{name}{path.suffix}")
    if not target.is_file():
        found = sorted(p.name[len(path.stem) + 1 : -len(path.suffix)] for p in path.parent.glob(f"{path.stem}.*{path.suffix}"))
        raise SplitError(f"{target}: no split named {name!r} next to {path.name} (found: {', '.join(found) or 'none'})")
    return target


__all__ = [
    "DATASET_KEYS",
    "PARTS",
    "Split",
    "SplitError",
    "dataset_key",
    "import_published",
    "import_named",
    "load_split",
    "make_splits",
    "named_split_path",
    "pretrain_pool",
]
