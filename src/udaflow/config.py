"""Typed run configuration, loaded from params.yaml.

params.yaml holds every parameter (DVC reads it too). A profile (`quick`, `full`) is a partial
config deep-merged over the base; `--set a.b=value` overrides are applied last. Every model is
`extra="forbid"`, so a misspelt key fails with its dotted path instead of being ignored; a value
of the wrong type or out of range fails the same way: `params.yaml: train.lr: must be > 0 (got -1)`.

`methods.<name>` holds each method's options; their models (`MethodConfig` subclasses, one per
method file) are checked by `udaflow.preflight.validate_run`, which also checks the names that
need a registry (method, validators, backbone) and that the domains exist.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from udaflow.data.manifest import DOMAIN_NAME, DOMAIN_NAME_RULE


class _Loader(yaml.SafeLoader):
    """YAML as DVC reads params.yaml (1.2): `3e-3` is a number. PyYAML's 1.1 floats need a dot (`3.0e-3`),
    so `--set methods.adamatch.tau=5e-1` was the text '5e-1', which the strict method options refused.
    A key given twice in one mapping is refused, as DVC's parser refuses it: PyYAML kept the last, so a
    second `train:` block silently dropped the first one's keys while `dvc repro` stopped on the file."""

    def construct_mapping(self, node, deep=False):
        first_line: dict = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges
                continue
            key = self.construct_object(key_node)
            if (type(key), key) in first_line:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} is given twice (first at line {first_line[type(key), key]})", key_node.start_mark)
            first_line[type(key), key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader with one more float form


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A parser error as `line:column: not valid YAML: problem (context)`, where the parser stopped."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{mark.line + 1}:{mark.column + 1}:" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        context = f"{context} at line {context_mark.line + 1}"
    return f"{where} not valid YAML: {problem}" + (f" ({context})" if context else "")


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the file and key, `hint`
    (when one fits better than the CLI's general one) what to do."""

    def __init__(self, message: str, hint: str | None = None, key: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.key = key  # the dotted key the message names first, when known (`blame` reads it)


class _Strict(BaseModel):
    # allow_inf_nan: `--set train.lr=.inf` passed every gt=0 bound and trained to NaN losses, then a traceback
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _true_false_and_numbers_apart(cls, value: Any, info) -> Any:
        """true / false are not numbers, nor 0 / 1 booleans: pydantic's lax mode read `train.adapt_steps=true`
        as 1 (method options are strict throughout, MethodConfig)."""
        types = _types(cls.model_fields[info.field_name].annotation)
        if isinstance(value, bool) and bool not in types and {int, float} & types:
            raise ValueError("expected a number")
        if types == {bool} and not isinstance(value, bool) and value is not None:
            raise ValueError("expected true or false")
        return value


class MethodConfig(BaseModel):
    """Base of every method's `Config` (params.yaml `methods.<name>`): an unknown key, a wrong type
    or a value out of its range is refused. Types are strict (no "0.5" for a number, no 1 for
    true) except that an integer is fine for a float; YAML has lists only, so a list is read as a
    tuple where the field is one."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _lists_as_tuples(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        def is_tuple(key: str) -> bool:
            field = cls.model_fields.get(key)
            return field is not None and (get_origin(field.annotation) or field.annotation) is tuple
        return {k: tuple(v) if isinstance(v, list) and is_tuple(k) else v for k, v in values.items()}


class DataConfig(_Strict):
    root: Path = Path("data/raw")  # where domains live: <root>/<domain>/<class>/<file> + manifest.csv
    synth_size: int = Field(10000, gt=0)  # images rendered for the built-in `synth` domain
    build_seed: int = Field(0, ge=0)  # the built-in domains' rendering and split seed (`udaflow data build`, dvc.yaml's build stages)
    holdout_fraction: float = Field(0.2, gt=0, lt=1)  # per-domain stratified split: source val / target test
    image_size: int = Field(32, gt=0)  # every image is resized to this square size when loaded
    min_per_class: int = Field(5, ge=1)  # validation: fewest source images a class may have
    stream: bool = True  # decode each split once per image size into <work_dir>/cache/images and read it per batch (flat memory); false: hold it in memory


class ModelConfig(_Strict):
    backbone: str = "udaflow_vit_tiny3"  # any timm model name
    pretrained: str | None = None  # path to a local weights file, or "timm" for the local timm/HF cache
    backbone_args: dict[str, Any] = Field(default_factory=dict)  # extra kwargs for timm.create_model


class AugmentConfig(_Strict):
    translate: int = Field(3, ge=0)  # random shift in pixels of a 32 px image (pad + crop), scaled with the input size
    color: bool = True  # random brightness/contrast/channel mix per image
    invert: float = Field(0.5, ge=0, le=1)  # probability of inverting an image
    rotate: float = Field(0.0, ge=0, le=180)  # random rotation up to +-degrees (0 with scale 0: integer shift only)
    scale: float = Field(0.0, ge=0, lt=1)  # random zoom in [1 - scale, 1 + scale]
    # the strong view only (adamatch's): random rotation (+-degrees) and shear (+-, as tan of the angle),
    # one affine warp after the colour jitter, before cutout; never in source pretraining. Off (README)
    strong_rotate: float = Field(0.0, ge=0, le=180)
    strong_shear: float = Field(0.0, ge=0, le=1)


class PseudoLabelConfig(_Strict):
    """Denoising shared by the methods that train on their own target predictions (pseudo_labels.py)."""

    balance: bool = True  # class-balanced thresholds (FlexMatch-style learning status per class)
    agreement: bool = False  # keep a pseudo-label only when a second view / teacher agrees
    neighbours: int = Field(0, ge=0)  # k > 0: average each prediction with its k nearest target images' (a memory of the pool)


class TrainConfig(_Strict):
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = Field(64, gt=0)  # per domain: a step sees batch_size source + batch_size target images
    lr: float = Field(2e-3, gt=0)  # peak AdamW learning rate for source pretraining
    adapt_lr: float = Field(1e-3, gt=0)  # peak learning rate when adapting from the source checkpoint
    weight_decay: float = Field(0.05, ge=0)
    warmup_steps: int = Field(100, ge=0)  # linear warm-up, then cosine decay to 0
    grad_clip: float = Field(1.0, gt=0)
    pretrain_steps: int = Field(1500, ge=0)  # source pretraining steps (shared by the methods of a shift)
    swap_retries: int = Field(0, ge=0)  # adapt again, with another seed, when the adapted model's classes look swapped (shift.class_swaps)
    adapt_steps: int = Field(2000, ge=0)  # adaptation steps per method
    eval_every: int = Field(200, gt=0)  # steps between label-free validator evaluations (checkpoint candidates)
    checkpoint_every: int = Field(200, gt=0)  # steps between atomic checkpoint writes (resume points)
    deterministic: bool = True  # torch deterministic algorithms + fixed seeds (CPU runs are bit-identical)
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    compile: bool = False  # torch.compile the backbone in place (same state_dict keys); measured on CPU: no gain (637 -> 630 img/s)
    num_threads: int | None = Field(None, gt=0)  # torch intra-op threads on CPU; None = torch's default
    nproc: int = Field(1, ge=1)  # training processes (torchrun data parallel; gloo on CPU, nccl on GPU); batch_size stays the global batch
    progress: bool = True  # progress: a bar on a terminal, a line every 5% in a log file
    rotation_weight: float = Field(0.0, ge=0)  # adaptation only: self-supervised rotation prediction on target images (0 = off)
    rotation_batch: int | None = Field(None, gt=0)  # target images per step for the rotation task; None = batch_size
    rotation_source: float = Field(0.0, ge=0, lt=1)  # share of the rotation batch drawn from the source (0 = target only)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    pseudo_labels: PseudoLabelConfig = Field(default_factory=PseudoLabelConfig)  # adaptation only

    @field_validator("device")
    @classmethod
    def _device(cls, name: str) -> str:  # torch's own parse error of `--device gpu` came as a traceback
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
            raise ValueError("use auto, cpu, cuda or cuda:N")
        return name


class BenchConfig(_Strict):
    protocol: Literal["transductive", "holdout"] = "transductive"  # default of `udaflow bench --protocol`


class TrackingConfig(_Strict):
    uri: str = "sqlite:///mlflow/mlflow.db"  # MLflow tracking + registry store
    artifact_root: Path = Path("mlflow/artifacts")  # where runs' artifacts and logged models go: a folder here

    @field_validator("uri")
    @classmethod
    def _not_a_file_store(cls, uri: str) -> str:
        """MLflow 3 refuses its file store (`./mlruns`, `file:///...`) unless MLFLOW_ALLOW_FILE_STORE is set: it
        came out as a traceback from the first registry call, after the run's flow had started."""
        from urllib.parse import urlparse

        scheme = urlparse(uri).scheme
        allowed = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("1", "true")
        if (scheme == "file" or not scheme) and not allowed:
            raise ValueError("a folder is MLflow's file store, which MLflow 3 refuses: use a database (sqlite:///mlflow/mlflow.db, "
                             "the default, or postgresql://...) or a tracking server's http:// URL (`mlflow migrate-filestore` "
                             "moves an existing ./mlruns into a database)")
        if scheme == "sqlite" and not uri.startswith("sqlite:///"):  # SQLAlchemy's "Invalid SQLite URL" came as a traceback
            raise ValueError("a SQLite store is sqlite:/// and its file: sqlite:///mlflow/mlflow.db (relative to where udaflow "
                             "runs) or sqlite:////absolute/path/mlflow.db")
        return uri

    @field_validator("artifact_root", mode="before")
    @classmethod
    def _a_folder_here(cls, value: Any) -> Any:
        """A folder on this machine; `file://` (MLflow's spelling of one) is read as its path. A store's URI
        (`s3://bucket/mlflow`, as `mlflow server --default-artifact-root` takes) was read as the relative
        path `s3:/bucket/mlflow`: every artifact and model went to a local folder of that name, silently."""
        text = str(value) if isinstance(value, (str, Path)) else None
        if text is None:
            return value
        if text.startswith("file://"):
            from urllib.parse import unquote, urlparse

            return Path(unquote(urlparse(text).path))
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):
            raise ValueError("a folder on this machine, not a store's URI: artifacts in S3 go through an MLflow "
                             "tracking server started with `--artifacts-destination s3://...`, which MLFLOW_TRACKING_URI "
                             "(or tracking.uri) names (README, \"A team's servers\")")
        return value


class PromotionConfig(_Strict):
    source_tolerance: float = Field(1.0, ge=0)  # most source val accuracy (points) a challenger may lose vs champion
    validator: str | None = None  # label-free score the gate compares without target labels; None = `validator`
    min_diversity: float = Field(0.5, ge=0, le=1)  # below this x the source-only model's: collapsed (normalised entropy of the predicted-class histogram on the pool)


class DriftConfig(_Strict):
    """When new target data is ingested: is it shifted from the data the champion was adapted on?"""

    max_images: int = Field(500, ge=20)  # images per side (sampled, seeded) the champion's features are taken on
    permutations: int = Field(500, ge=50)  # the MMD's and the validator drop's permutation tests
    alpha: float = Field(0.01, gt=0, lt=1)  # a p-value (PAD's or MMD's test) below alpha / 2 ...
    min_pad: float = Field(0.2, ge=0, le=2)  # ... and a proxy A-distance at least this: a significant shift
    validator_drop: float = Field(0.05, ge=0)  # or the champion's validator fell by more than this on the new data, and by more than chance (p < alpha / 2)

    @model_validator(mode="after")
    def _enough_permutations(self) -> "DriftConfig":
        # the smallest p-value a permutation test can give is 1 / (1 + permutations)
        if 1.0 / (1 + self.permutations) >= self.alpha / 2:
            raise ValueError(f"permutations: {self.permutations} cannot give a p-value under alpha / 2 = {self.alpha / 2:g} "
                             f"(need at least {int(2 / self.alpha)})")
        return self


class Config(_Strict):
    seed: int = Field(0, ge=0)  # numpy's generators take no negative seed
    source: str = "synth"
    target: str = "mnist"
    method: str = "cdtrans"
    validator: str = "im"  # label-free score the engine uses to keep its best checkpoint
    work_dir: Path = Path("runs")  # checkpoints and per-run outputs
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    methods: dict[str, dict[str, Any]] = Field(default_factory=dict)  # per-method options, see methods/*.py
    bench: BenchConfig = Field(default_factory=BenchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    # where load_config read it: the params file, and each overridden key -> the option that gave it
    _params_file: str | None = PrivateAttr(default=None)
    _given: dict[str, str] = PrivateAttr(default_factory=dict)
    _read: frozenset[str] = PrivateAttr(default=frozenset())  # the dotted keys the file, its profile or an override gave

    def __eq__(self, other: object) -> bool:  # the settings, not where they were read from
        return isinstance(other, Config) and self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, as pydantic's own models

    @property
    def image_cache(self) -> Path | None:
        """Where decoded images are kept as files of rows (data.stream), or None to hold them in memory."""
        return Path(self.work_dir) / "cache" / "images" if self.data.stream else None

    @field_validator("source", "target")
    @classmethod
    def _domain_name(cls, name: str) -> str:
        if not DOMAIN_NAME.match(name):
            raise ValueError(f"not a domain name: {DOMAIN_NAME_RULE} (a folder under data.root)")
        return name


def _types(annotation) -> set:
    """The plain types an annotation admits: int | None -> {int, NoneType}."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return {get_origin(a) or a for a in args}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.lr=0.001` -> (["train", "lr"], 0.001); the value is read as YAML, except where params.yaml
    holds text (a domain, a method, a path): `target=2024-06-01` and `target=017` stay the names they
    are, not a date and the octal number 15."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.lr=0.001")
    key, raw = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):  # `=5`, `train..lr=1`, `train.=1`: it said "unknown key" with the blank part unnamed
        raise ConfigError(f"--set {item!r}: {'no key before =' if not key.strip() else 'an empty part in the key'}; expected key=value, e.g. train.lr=0.001")
    try:
        value = read_yaml(raw)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({where})") from None
    if value is not None and not isinstance(value, str) and _holds_text(keys):
        value = raw.strip()
    return keys, value


def _holds_text(keys: list[str]) -> bool:
    """Whether the Config field at `keys` is text (str or a path, optional or not)."""
    model: Any = Config
    annotation: Any = None
    for k in keys:
        field = model.model_fields.get(k) if model is not None else None
        if field is None:
            return False
        annotation = field.annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    kinds = set(get_args(annotation)) - {type(None)} if get_origin(annotation) in (Union, UnionType) else {annotation}
    return bool(kinds) and kinds <= {str, Path}


_EXPECTED = {
    "float_type": "a number", "float_parsing": "a number", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "an integer", "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "a string", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "tuple_type": "a list", "list_type": "a list", "path_type": "a path",
}
_YAML_KIND = {"int": "number", "float": "number", "bool": "boolean", "date": "date", "datetime": "date"}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"), "less_than_equal": ("le", "<=")}


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML (true, null, 1.5, 'text'), kept short."""
    if isinstance(value, bool) or value is None:
        text = {True: "true", False: "false", None: "null"}[value]
    else:
        text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _known_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys the (sub)model at `loc`'s parent accepts, for an unknown key's message."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if model is not None else None
        annotation = field.annotation if field is not None else None
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model is not None else []


def error_key(err: ValidationError, prefix: str = "") -> str:
    """The full dotted key of a pydantic validation's first error: `methods.ssrt.layers[1]`."""
    key = prefix
    for part in err.errors(include_url=False)[0]["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    return key


def explain(err: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """The first error of a pydantic validation as one line naming the full dotted key:
    `methods.adamatch.tau: must be <= 1 (got 1.5)`. `prefix` is the key of the validated mapping
    (e.g. `methods.adamatch`); `model` the validated class, for the known keys of an unknown one."""
    first = err.errors(include_url=False)[0]
    loc = tuple(first["loc"])
    key = error_key(err, prefix)
    kind, ctx = first["type"], first.get("ctx") or {}
    if kind == "extra_forbidden":
        known = _known_keys(model, loc)
        return f"{key}: unknown key" + (f" (known: {', '.join(known)})" if known else "")
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        why = f"must be {op} {_number(ctx[name])}"
    elif kind == "string_type" and first["input"] is not None and not isinstance(first["input"], (dict, list)):
        # `target: 2024-06-01` in params.yaml: YAML read a date (or a number, a boolean) where a name goes
        got = first["input"]
        text = got.isoformat() if hasattr(got, "isoformat") else "..."
        return f"{key}: expected a string (got {_show(got)}: YAML read it as a {_YAML_KIND.get(type(got).__name__, type(got).__name__)}; quote it: {loc[-1]}: \"{text}\")"
    elif kind in _EXPECTED:
        why = f"expected {_EXPECTED[kind]}"
    elif kind == "finite_number":
        why = "must be a finite number"
    elif kind == "value_error":
        why = str(ctx.get("error") or first["msg"].removeprefix("Value error, "))
    else:
        msg = first["msg"].replace("Input should be", "must be")
        why = msg[:1].lower() + msg[1:]
    return f"{key}: {why} (got {_show(first['input'])})"


def load_config(
    path: str | Path = "params.yaml",
    profile: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    flags: dict[str, str] | None = None,
) -> Config:
    """Read params.yaml, merge the profile and the `key=value` overrides, validate.

    An invalid value names where it came from: the params file, or `--set` for an override (`flags`
    maps an override's key to the option a CLI took it from instead, e.g. train.device -> --device)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {'a folder, not a params file' if path.is_dir() else 'no such params file'}",
                          "the current folder's params.yaml is there: leave --params out to use it, or pass the path of another file"
                          if Path("params.yaml").is_file() else
                          "the current folder has no params.yaml: run from the repository root (where dvc.yaml is), or pass --params PATH")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # a Latin-1 byte, or a copy a Windows editor saved as UTF-16
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})",
                          "save the params file as UTF-8") from None
    except yaml.YAMLError as exc:  # one line, as every other error: the parser's own spans five with carets
        raise ConfigError(f"{path}:{_yaml_problem(exc)}") from None
    if raw is None:  # the code's defaults are not params.yaml's (another method, learning rate, ...)
        raise ConfigError(f"{path}: the params file is empty", "every run parameter lives in params.yaml: copy it and change what you need")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    profiles = raw.pop("profiles", {}) or {}
    if not isinstance(profiles, dict):
        raise ConfigError(f"{path}: profiles: expected a mapping of profile names to parameters (got {_show(profiles)})")
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(map(str, profiles))) or "none"
            raise ConfigError(f"--profile {profile}: {path} has no such profile (known: {known})",
                              f"a profile is a mapping under `profiles:` in {path}, merged over the rest of it")
        if not isinstance(profiles[profile] or {}, dict):
            raise ConfigError(f"{path}: profiles.{profile}: expected a mapping of parameters (got {_show(profiles[profile])})")
        raw = deep_merge(raw, profiles[profile] or {})
    given: dict[str, str] = {}  # dotted key -> where its value came from
    for item in overrides:
        keys, value = parse_override(item)
        given[".".join(map(str, keys))] = (flags or {}).get(".".join(map(str, keys)), "--set")
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: '{k}' is not a section")
        node[keys[-1]] = value
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    if env_uri and not any(item.split("=", 1)[0].strip() == "tracking.uri" for item in overrides):
        # MLflow's own variable points udaflow at a shared server, as it does every MLflow client
        tracking = raw.setdefault("tracking", {})
        if isinstance(tracking, dict):
            tracking["uri"] = env_uri
            given["tracking.uri"] = "MLFLOW_TRACKING_URI"  # an error in it names the variable, not params.yaml
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        loc = ".".join(str(part) for part in exc.errors(include_url=False)[0]["loc"])
        raise ConfigError(f"{_where(str(path), given, loc)} {explain(exc, model=Config)}") from None
    cfg._params_file, cfg._given, cfg._read = str(path), given, frozenset(flatten(raw))
    return cfg


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1, 'augment': {}}} -> {'train.lr': 1}: the dotted keys that hold a value."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def left_to_defaults(cfg: Config, project: Config) -> list[tuple[str, Any, Any]]:
    """(key, the code's default cfg took, project's value): the keys the params file `cfg` was read from
    left out (no value in it, its profile or an override) where project's params.yaml has another value.

    The code's defaults are the plain methods, not params.yaml's recipe (`method` cdtrans, no rotation task,
    plain CDTrans, ...): they stay so that a run recorded before a key existed re-runs as it ran. So a
    `--params` file of a few keys trains something params.yaml does not describe, and only the end of a
    run said so. A method's options count for the methods params.yaml names."""
    from udaflow.methods import get_method_class

    ours, theirs = flatten(cfg.model_dump(mode="json")), flatten(project.model_dump(mode="json"))
    out = []
    for key, value in theirs.items():
        if any(key == k or key.startswith(k + ".") for k in cfg._read):
            continue
        if key in ours:
            default = ours[key]
        elif key.startswith("methods.") and key.count(".") == 2:  # a method option: its Config's default
            _, name, option = key.split(".")
            try:
                default = getattr(get_method_class(name).Config(), option)
            except (KeyError, ValueError, AttributeError):
                continue  # a method or option this code does not know: preflight names it
            default = list(default) if isinstance(default, tuple) else default
        else:
            continue
        if default != value:
            out.append((key, default, value))
    return out


def _where(params_file: str, given: dict[str, str], key: str) -> str:
    """`params.yaml:`, `--set` or `--device:`: where the value at dotted `key` came from. The override
    that set this key or a mapping above it (the last one: it won), or a key below a section whose own
    check failed (`drift`'s validator reads drift.permutations); else the params file."""
    origin = next((flag for k, flag in reversed(given.items())
                   if key == k or key.startswith(k + ".") or (key and k.startswith(key + "."))), None)
    return f"{params_file}:" if origin is None else "--set" if origin == "--set" else f"{origin}:"


def blame(cfg: Config, key: str, message: str) -> str:
    """`message` (which names `key` first) prefixed, as load_config's own errors are, with where the
    value came from when `cfg` was read by load_config: a check made after loading (an unknown method
    or validator, a method's options, a backbone argument) names `--set`, the CLI option or the params
    file too. A Config made in code has no such place: the message is returned as it is."""
    if cfg._params_file is None:
        return message
    return f"{_where(cfg._params_file, cfg._given, key)} {message}"
