"""Typed view of params.yaml. Every component takes one of these sections, never a raw dict."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_PARAMS = Path("params.yaml")


class ProjectError(RuntimeError):
    """An error the user can fix (bad params, a missing input, commands run out of order). The CLI prints its
    message alone; any other exception is a bug and keeps its traceback."""


class ParamsError(ProjectError, ValueError):
    """params.yaml, or an override of it, is invalid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(Section):
    raw: Path
    manifest: Path
    quarantine: Path
    validation_reports: Path
    validation_summary: Path
    splits: Path
    split_report: Path
    split_removed: Path
    split_validation: Path
    models: Path
    predictions: Path
    metrics: Path
    plots: Path
    checkpoints: Path
    registered: Path
    evaluation_report: Path
    style: Path
    audit_report: Path
    reference: Path


class Preprocess(Section):
    """The model input from a decoded image (components.images.normalise and fit_to)."""
    grayscale: bool
    crop_to_head: bool
    head_margin: float = Field(ge=0, le=0.5)
    keep_aspect: bool
    standardise: bool
    percentiles: tuple[float, float]

    @model_validator(mode="after")
    def _ordered(self) -> Preprocess:
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ValueError(f"data.preprocess.percentiles = {list(self.percentiles)}: need 0 <= low < high <= 100")
        return self

    @classmethod
    def plain(cls) -> Preprocess:
        """A plain stretch to the square: what versions registered before data.preprocess existed were fed."""
        return cls(grayscale=False, crop_to_head=False, head_margin=0, keep_aspect=False, standardise=False,
                   percentiles=(0, 100))


class DataParams(Section):
    classes: list[str]
    preprocess: Preprocess


class ManifestParams(Section):
    hash_size: int = Field(gt=1)
    max_image_pixels: int = Field(gt=0)
    workers: int = Field(ge=1)
    base_source: str = Field(min_length=1)


class ValidateParams(Section):
    min_side: int
    max_side: int
    allowed_modes: list[str]
    weightings: list[str] = Field(min_length=1)
    min_class_share: float = Field(ge=0, le=1)
    max_class_share: float = Field(ge=0, le=1)
    max_quarantine_share: float = Field(ge=0, le=1)


class SplitParams(Section):
    near_duplicate_distance: int = Field(ge=0)
    clean_distance: int = Field(ge=0)
    val_fraction: float = Field(gt=0, lt=1)
    stack_fraction: float = Field(gt=0, lt=1)
    gate_fraction: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def _holdouts_leave_training(self) -> SplitParams:
        total = self.val_fraction + self.stack_fraction + self.gate_fraction
        if total >= 1:
            raise ValueError(f"split.val_fraction + split.stack_fraction + split.gate_fraction = {total} leaves "
                             "nothing to train on; their sum must be below 1")
        return self


class TrainParams(Section):
    cache: Literal["memory", "disk", "none"]
    deterministic: bool
    shuffle_buffer: int = Field(gt=0)
    monitor: str
    early_stopping_patience: int = Field(ge=0)
    lr_schedule: Literal["plateau", "cosine"]
    warmup_epochs: int = Field(ge=0)
    optimizer: Literal["adam", "adamw"]
    weight_decay: float = Field(ge=0)
    label_smoothing: float = Field(ge=0, lt=1)
    use_ema: bool
    ema_momentum: float = Field(gt=0, lt=1)
    plateau_factor: float = Field(gt=0, lt=1)
    plateau_patience: int = Field(ge=0)
    min_learning_rate: float = Field(ge=0)
    class_weights: bool
    style_balance: bool
    style_balance_max_weight: float = Field(ge=1)
    head_dropout: float = Field(ge=0, lt=1)
    head_units: int = Field(ge=0)
    mixed_precision: bool
    xla: bool
    eval_batch_size: int = Field(gt=0)
    run_eagerly: bool


class Augmentation(Section):
    flip: bool
    rotation: float = Field(ge=0)
    zoom: float = Field(ge=0)
    contrast: float = Field(ge=0)
    gamma: float = Field(ge=0)
    invert: float = Field(ge=0, le=1)
    blur: float = Field(ge=0, le=1)
    noise: float = Field(ge=0, le=1)
    low_resolution: float = Field(ge=0, le=1)
    low_resolution_min_scale: float = Field(gt=0, le=1)


class ModelParams(Section):
    image_size: int = Field(ge=32)
    batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    head_epochs: int = Field(ge=0)
    learning_rate: float = Field(gt=0)
    fine_tune_learning_rate: float = Field(gt=0)
    weights: str
    unfreeze_layers: int = Field(ge=-1)
    bn_momentum: float = Field(gt=0, lt=1)
    cpu_bfloat16: bool
    filters: list[int] = Field(default_factory=list)  # custom_cnn only
    augmentation: Augmentation


# components.models builds these without a Keras application backbone: there are no pretrained weights to load.
NO_BACKBONE = frozenset({"custom_cnn"})


def is_pretrained(model: str, weights: str) -> bool:
    """The one definition: a model starts from pretrained weights when it has a backbone and `weights` is not
    "none". Training (one phase or head + fine-tune), the model builder and the report all ask this."""
    return weights != "none" and model not in NO_BACKBONE


class StackParams(Section):
    models: list[str] = Field(min_length=1)
    entropy_and_margin: bool
    time_budget: float = Field(gt=0)
    metric: str
    estimators: list[str] = Field(min_length=1)
    folds: int = Field(ge=2)
    calibration: Literal["temperature", "none"]


class EvaluateParams(Section):
    """Settings every report shares: evaluate, audit, evaluate-external, the results page, the ablation."""
    gradcam_examples: int = Field(ge=0)
    calibration_bins: int = Field(ge=2)
    tumor_threshold: float = Field(gt=0, lt=1)
    interval_below: int = Field(ge=0)
    confidence: float = Field(gt=0, lt=1)


class RegisterParams(Section):
    model_prefix: str
    new_version_alias: str


class PromoteParams(Section):
    model: str
    min_accuracy: float = Field(ge=0, le=1)
    min_class_sensitivity: float = Field(ge=0, le=1)
    alpha: float = Field(gt=0, lt=1)
    tie_rule: Literal["keep_champion", "challenger_if_not_worse"]


class ServeParams(Section):
    max_rows: int = Field(gt=0)
    max_image_bytes: int = Field(gt=0)
    max_image_pixels: int = Field(gt=0)


class FlowParams(Section):
    runner: Literal["local", "ray"]
    device_stages: list[str]
    retries: int = Field(ge=0)
    retry_delay_seconds: float = Field(ge=0)
    promote: bool
    cron: str
    timezone: str
    lock_timeout: float = Field(ge=0)
    log_tail_lines: int = Field(ge=1)
    inference_root: Path
    predictions_dir: Path
    server_startup_timeout: int = Field(ge=1)
    ray_address: str | None
    shared_workspace: bool
    git_remote: str
    dvc_remote: str | None
    ray_stage_resources: dict[str, float]
    ray_node_retries: int = Field(ge=0)


class DeviceParams(Section):
    gpus: Literal["auto"] | list[int]
    cpu_concurrency: int = Field(ge=1)


class ReportParams(Section):
    out: Path
    figures: Path
    base_model_target: float = Field(ge=0, le=1)
    model_targets: dict[str, float] = Field(default_factory=dict)
    stack_target: float = Field(ge=0, le=1)
    tumor_sensitivity_target: float = Field(ge=0, le=1)
    tumor_specificity_target: float = Field(ge=0, le=1)
    ece_target: float = Field(ge=0, le=1)
    counter_shortcut_gap_points: float = Field(ge=0)
    t1_healthy_specificity_target: float = Field(ge=0, le=1)
    clean_gap_points: float = Field(ge=0)
    seed_spread_points: float = Field(ge=0)
    stack_seed_spread_points: float = Field(ge=0)
    external_sensitivity_target: float = Field(ge=0, le=1)
    external_specificity_target: float = Field(ge=0, le=1)
    external_accuracy_target: float = Field(ge=0, le=1)
    external_reports: list[Path]
    runs_dir: Path
    training_budget_minutes: float = Field(gt=0)


class StyleParams(Section):
    """Each scan's acquisition style and MRI weighting (components.style)."""
    hand_labels: Path
    min_hand_labels: int = Field(ge=2)
    regularisation: float = Field(gt=0)
    t2_ratio: float = Field(gt=0)
    folds: int = Field(ge=2)


class AuditParams(Section):
    folds: int = Field(ge=2)


class ExternalParams(Section):
    out_dir: Path


class MonitorParams(Section):
    """Drift monitoring of incoming batches (components.monitor) and the reference profile it compares them with
    (components.reference)."""
    embedding_model: str
    ood_neighbours: int = Field(ge=1)
    ood_percentile: float = Field(gt=0, le=100)
    out_dir: Path
    min_scans: int = Field(ge=4)
    false_alarm_rate: float = Field(gt=0, lt=1)
    calibration_sizes: list[int] = Field(min_length=1)
    calibration_draws: int = Field(ge=20)
    calibration_splits: list[Literal["val", "stack", "gate"]] = Field(min_length=1)
    after_batch_predict: bool
    retrain_on_drift: bool
    retrain_on_new_data: bool
    event: str = Field(min_length=1)

    @model_validator(mode="after")
    def _val_calibrates(self):
        if "val" not in self.calibration_splits:
            raise ValueError(f"monitor.calibration_splits = {self.calibration_splits} leaves out val: the class-mix "
                             "check is calibrated on val (the only held-out split the stack predicted); add val")
        return self


class QuickParams(Section):
    """`braintumor quick`: the whole pipeline once on a sample at a small size, in a scratch checkout (flows.quick)."""
    worktree: Path
    data: Path
    sample: int = Field(ge=4)
    append: Path | None
    append_labels: str
    append_classes: list[str]
    append_sample: int = Field(ge=1)
    external: list[Path]
    overrides: list[str]


class TrackingParams(Section):
    experiment: str
    tracking_uri: str
    artifact_root: str
    smoke: bool


class PostgresServiceParams(Section):
    port: int = Field(ge=1, le=65535)
    bin_dir: str
    run_as: str


class MlflowServiceParams(Section):
    host: str
    port: int = Field(ge=1, le=65535)
    workers: int = Field(ge=1)
    artifacts: Path
    auth_config: Path
    allowed_hosts: str
    auth_cache_ttl: int = Field(ge=0)


class PrefectServiceParams(Section):
    host: str
    port: int = Field(ge=1, le=65535)


class ServicesParams(Section):
    dir: Path
    startup_timeout: float = Field(gt=0)
    stop_timeout: float = Field(gt=0)
    postgres: PostgresServiceParams
    mlflow: MlflowServiceParams
    prefect: PrefectServiceParams

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServicesParams:
        ports = [self.postgres.port, self.mlflow.port, self.prefect.port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"services: postgres.port, mlflow.port and prefect.port must differ, got {ports}")
        return self


class Params(Section):
    seed: int
    paths: Paths
    data: DataParams
    manifest: ManifestParams
    validate_: ValidateParams = Field(alias="validate")
    split: SplitParams
    style: StyleParams
    train: TrainParams
    models: dict[str, ModelParams]
    stack: StackParams
    evaluate: EvaluateParams
    audit: AuditParams
    register_: RegisterParams = Field(alias="register")
    promote: PromoteParams
    serve: ServeParams
    flow: FlowParams
    devices: DeviceParams
    tracking: TrackingParams
    report: ReportParams
    services: ServicesParams
    external: ExternalParams
    monitor: MonitorParams
    quick: QuickParams
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    # `validate` and `register` are pydantic/ABC attribute names, so those sections are stored with a suffix.
    @property
    def validate_params(self) -> ValidateParams:
        return self.validate_

    @property
    def register_params(self) -> RegisterParams:
        return self.register_

    @model_validator(mode="after")
    def _weights_need_a_backbone(self) -> Params:
        for name in NO_BACKBONE & set(self.models):
            if self.models[name].weights != "none":
                raise ValueError(f"models.{name}.weights = {self.models[name].weights!r}: {name} has no pretrained "
                                 f"backbone to load weights into; set models.{name}.weights: none")
        return self

    def model(self, name: str) -> ModelParams:
        if name not in self.models:
            raise ParamsError(f"params.yaml has no models.{name}; known models: {', '.join(self.models)}")
        return self.models[name]

    def pretrained(self, name: str) -> bool:
        return is_pretrained(name, self.model(name).weights)

    def digest(self) -> str:
        """Short hash of every value, recorded on MLflow runs and registered versions."""
        text = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (values parsed as YAML), as `dvc exp run -S` does."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ParamsError(f"override {override!r} is not of the form section.key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise ParamsError(f"override {override!r}: params has no section {part!r}")
            node = node[part]
        if leaf not in node:
            raise ParamsError(f"override {override!r}: params has no key {key!r}")
        node[leaf] = yaml.safe_load(value)
    return raw


def load_params(path: Path | str = DEFAULT_PARAMS, overrides: list[str] | None = None) -> Params:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run from the project root or pass --params PATH")
    raw = apply_overrides(yaml.safe_load(path.read_text()) or {}, overrides or [])
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(f"{path} is invalid:\n{exc}") from None


Split = Literal["train", "val", "gate", "test"]


def write_overrides(path: Path, overrides: list[str]) -> None:
    """Write `section.key=value` overrides into the params file, keeping its comments (like `dvc exp run -S`)."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    document = yaml_rt.load(Path(path).read_text())
    apply_overrides(document, overrides)
    load_params_from = dict(yaml.safe_load(_dump(yaml_rt, document)))
    try:  # refuse an override that makes params invalid, before writing
        Params.model_validate(load_params_from)
    except ValidationError as exc:
        raise ParamsError(f"overrides {overrides} would make {path} invalid:\n{exc}") from None
    Path(path).write_text(_dump(yaml_rt, document))


def _dump(yaml_rt, document) -> str:
    import io

    buffer = io.StringIO()
    yaml_rt.dump(document, buffer)
    return buffer.getvalue()
