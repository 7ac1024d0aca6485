"""Great Expectations (1.x) checks over the image manifest and the splits.

Row-level expectations (readable, size, colour mode) carry `mostly = 1 - max_quarantine_share`: the rows they
reject are quarantined (listed with a reason, excluded downstream, never deleted) and the stage only fails when
too many are. Table-level expectations (label set, empty classes, escaping symlinks, class shares) fail hard.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.data_context.types.base import ProgressBarsConfig

from components.config import ManifestParams, ProjectError, ValidateParams
from components.images import PLAIN_MODES

log = logging.getLogger(__name__)


class ValidationFailed(ProjectError):
    """A hard expectation failed; the message names each one."""


@dataclass
class CheckResult:
    name: str
    success: bool
    failures: list[str] = field(default_factory=list)  # one readable line per failed expectation
    unexpected: dict[str, list[Any]] = field(default_factory=dict)  # expectation -> offending index values
    docs_dir: Path | None = None


def _describe(expectation: dict[str, Any]) -> str:
    kwargs = {k: v for k, v in expectation["kwargs"].items() if k not in ("batch_id",)}
    return f"{expectation['type']}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def run_checkpoint(name: str, frame: pd.DataFrame, expectations: list[gxe.Expectation], index_column: str,
                   docs_dir: Path) -> CheckResult:
    """Validate one table through a GX Checkpoint whose action writes HTML Data Docs into docs_dir."""
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    for site in list(context.get_config().data_docs_sites or {}):
        context.delete_data_docs_site(site)
    docs_dir.mkdir(parents=True, exist_ok=True)
    context.add_data_docs_site(site_name="reports", site_config={
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    batch = context.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    checkpoint = context.checkpoints.add(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="update_data_docs", site_names=["reports"])],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index_column]},
    ))
    outcome = checkpoint.run(batch_parameters={"dataframe": frame.reset_index(drop=True)})
    result = CheckResult(name=name, success=bool(outcome.success), docs_dir=docs_dir)
    for validation in outcome.run_results.values():
        for item in validation.results:
            config = item.expectation_config.to_json_dict()
            key = _describe(config)
            offenders = [row[index_column] for row in item.result.get("unexpected_index_list") or []]
            if offenders:
                result.unexpected[key] = offenders
            if not item.success:
                observed = item.result.get("observed_value", item.result.get("partial_unexpected_list"))
                if item.exception_info and item.exception_info.get("raised_exception"):
                    observed = item.exception_info.get("exception_message")
                where = f" at {index_column} {offenders[:5]}" + (" ..." if len(offenders) > 5 else "") if offenders else ""
                result.failures.append(f"{key}: observed {observed!r}{where}")
    return result


def manifest_expectations(params: ValidateParams, classes: list[str]) -> tuple[list, list]:
    """(hard, row_level) expectations over the manifest."""
    mostly = 1.0 - params.max_quarantine_share
    hard = [
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=classes),
        gxe.ExpectColumnValuesToBeInSet(column="link_escapes", value_set=[False]),
    ]
    row_level = [
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True], mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=params.min_side, max_value=params.max_side,
                                          mostly=mostly),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=params.min_side, max_value=params.max_side,
                                          mostly=mostly),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=params.allowed_modes, mostly=mostly),
    ]
    return hard, row_level


def provenance_expectations(params: ValidateParams) -> list:
    """Hard expectations over the manifest's provenance: every scan names its source, and a stated MRI weighting is
    one of validate.weightings (a scan may state none)."""
    return [gxe.ExpectColumnValuesToNotBeNull(column="source"),
            gxe.ExpectColumnValuesToBeInSet(column="weighting", value_set=params.weightings)]


def quarantine_table(manifest: pd.DataFrame, check: CheckResult) -> pd.DataFrame:
    """One row per rejected file with every reason; the manifest's decode error is the most specific one."""
    reasons: dict[str, list[str]] = {}
    for expectation, paths in check.unexpected.items():
        for path in paths:
            reasons.setdefault(path, []).append(f"failed {expectation}")
    errors = manifest.set_index("path")["error"]
    rows = [{"path": path, "label": manifest.loc[manifest.path == path, "label"].iloc[0],
             "reason": "; ".join(([errors[path]] if isinstance(errors.get(path), str) else []) + why)}
            for path, why in sorted(reasons.items())]
    return pd.DataFrame(rows, columns=["path", "label", "reason"])


def class_summary(manifest: pd.DataFrame, quarantined: set[str], classes: list[str]) -> pd.DataFrame:
    usable = manifest[~manifest.path.isin(quarantined)]
    table = pd.DataFrame({"label": classes})
    table["files"] = table.label.map(manifest.label.value_counts()).fillna(0).astype(int)
    table["usable"] = table.label.map(usable.label.value_counts()).fillna(0).astype(int)
    table["share"] = table.usable / max(int(table.usable.sum()), 1)
    table["quarantine_share"] = 1 - table.usable / table.files.clip(lower=1)
    return table


def validate_manifest(manifest: pd.DataFrame, params: ValidateParams, classes: list[str], reports_dir: Path,
                      quarantine_out: Path, summary_out: Path) -> dict[str, Any]:
    """Run both checkpoints, write the quarantine list and the summary, then raise if a hard expectation failed."""
    hard, row_level = manifest_expectations(params, classes)
    rows = run_checkpoint("manifest", manifest, hard + provenance_expectations(params) + row_level, "path",
                          reports_dir)
    quarantine = quarantine_table(manifest, rows)
    classes_check = run_checkpoint("class_balance", class_summary(manifest, set(quarantine.path), classes), [
        gxe.ExpectColumnValuesToBeBetween(column="files", min_value=1),
        gxe.ExpectColumnValuesToBeBetween(column="share", min_value=params.min_class_share,
                                          max_value=params.max_class_share),
        gxe.ExpectColumnValuesToBeBetween(column="quarantine_share", max_value=params.max_quarantine_share),
    ], "label", reports_dir)
    readable = manifest[manifest.readable]
    summary = {
        "success": rows.success and classes_check.success,
        "files": len(manifest),
        "quarantined": len(quarantine),
        "normalised": int((~readable["mode"].isin(PLAIN_MODES)).sum()),
        "modes": readable["mode"].value_counts().to_dict(),
        "failed_expectations": rows.failures + classes_check.failures,
        "data_docs": str(reports_dir / "index.html"),
    }
    quarantine_out.parent.mkdir(parents=True, exist_ok=True)
    quarantine.to_csv(quarantine_out, index=False)
    summary_out.parent.mkdir(parents=True, exist_ok=True)
    summary_out.write_text(json.dumps(summary, indent=2) + "\n")
    if not summary["success"]:
        raise ValidationFailed("data validation failed:\n  " + "\n  ".join(summary["failed_expectations"])
                               + f"\nsee {reports_dir / 'index.html'}; quarantined files are in {quarantine_out}")
    return summary


class OutsideInputRoot(ProjectError):
    pass


def checked_folder(folder: str | Path, root: Path) -> Path:
    """`folder` resolved, once it is known to be a folder under the flows' input root (params flow.inference_root)."""
    resolved, root = Path(folder).resolve(), Path(root).resolve()
    if not resolved.is_relative_to(root):
        raise OutsideInputRoot(f"{folder} is outside the input root {root} (params flow.inference_root); "
                               "copy the scans under it or change flow.inference_root")
    if not resolved.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return resolved


def screen_folder(folder: Path, manifest_params: ManifestParams, params: ValidateParams, classes: list[str],
                  reports: Path) -> tuple[list[str], pd.DataFrame]:
    """(paths that pass, quarantine table) of a folder of new, unlabelled scans: the manifest's row-level checks run
    through a GX checkpoint, with its Data Docs in `reports`. An unusable file is quarantined, never fatal."""
    from components.manifest import scan_folder

    manifest = scan_folder(folder, manifest_params)
    if manifest.empty:
        return [], pd.DataFrame(columns=["path", "label", "reason"])
    _, row_level = manifest_expectations(params.model_copy(update={"max_quarantine_share": 1.0}), classes)
    escapes = manifest_expectations(params, classes)[0][1]
    check = run_checkpoint("batch", manifest, [escapes, *row_level], "path", reports)
    quarantine = quarantine_table(manifest, check)
    good = manifest[~manifest.path.isin(set(quarantine.path))]
    return [str(Path(folder) / p) for p in good.path], quarantine


def check_split_leakage(train_val: pd.DataFrame, test: pd.DataFrame, reports_dir: Path) -> CheckResult:
    """GX check that no test image has a byte-identical copy in train or val."""
    frame = train_val[["path", "content_hash"]].assign(
        copy_of_test_image=train_val.content_hash.isin(set(test.content_hash)))
    check = run_checkpoint("split_leakage", frame,
                           [gxe.ExpectColumnValuesToBeInSet(column="copy_of_test_image", value_set=[False])],
                           "path", reports_dir)
    if not check.success:
        raise ValidationFailed("split leaks test images into train/val:\n  " + "\n  ".join(check.failures))
    return check
