"""One settings model for every command: sections, defaults (the seed's), validation, precedence.

Precedence: CLI option > --config file > the run's saved settings.json > defaults.
Each field carries its CLI option name (kebab-case; a section prefix where a bare name would be
ambiguous), so cli/options.py generates the options instead of writing them out per command.
"""

from __future__ import annotations

import codecs
import json
import os
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from newllm_cli.runtime.errors import UsageError, first_line


def opt(default: Any, help: str, cli: str | None = None, aliases: tuple[str, ...] = (), **kw: Any) -> Any:
    """A field with its help text, its CLI name when the bare kebab name would be ambiguous or too long
    for an 80-column help, and older names still accepted (hidden from help)."""
    extra: dict[str, Any] | None = {k: v for k, v in (("cli", cli), ("aliases", list(aliases))) if v} or None
    return Field(default, description=help, json_schema_extra=extra, **kw)


FLOAT32_MAX = 3.4028234663852886e38


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        """`context_dim = true` in a config file is a mistake, not 1."""
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and {int, float} & {annotation, *get_args(annotation)}:
            raise ValueError("expected a number, not true or false")
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _fits_the_arithmetic(cls, value: Any) -> Any:
        """A number the tensors can hold: float32 for reals (1e300 would overflow to inf), 64 bits
        for integers (a seed of 2**64 is no seed torch takes)."""
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise ValueError(f"{value:g} does not fit in float32 (at most {FLOAT32_MAX:.3g})")
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
            raise ValueError("does not fit in a 64-bit integer")
        return value


class ModelSettings(Section):
    context_dim: int = opt(16, "Context vector size C.", gt=0, le=4096)
    embed_dim: int = opt(16, "Token embedding size E.", gt=0, le=4096)
    num_layers: int = opt(2, "Number of context blocks L.", gt=0, le=64)
    layers_per_block: int = opt(1, "Linear+ReLU layers inside each block (residual).", gt=0, le=16)
    architecture: Literal["residual", "context"] = opt(
        "residual",
        "Context network: residual (blocks updating context and token) or context (ContextLayers "
        "c' = LN(c + phi(W (c, X) + b)) updating the context only; --num-layers of them).",
    )
    token_input: Literal["every", "first"] = opt(
        "every", "context: the token input goes to every layer, or to the first only (widths shrink to C)."
    )
    input_tokens: int = opt(1, "context: k tokens X_{t-k+1}..X_t as input, zero before a start.", ge=1, le=16)
    activation: Literal["relu", "gelu"] = opt("relu", "context: phi.")
    init_std: float = opt(0.02, "Std of the initial Linear and Embedding weights (their recipe: 0.1).", gt=0)
    init_bias_std: float = opt(0.0, "Std of the initial Linear biases (their recipe: 0.01).", ge=0)
    context_blocks: int = opt(
        1, "Context networks side by side, block b trained on the b-th share of the training stream.", ge=1, le=16
    )

    embeddings: str | None = opt(
        None,
        "Token embeddings (V x E) from FILE.npy, FILE.safetensors or 'gpt2' (the hub's wte); unset: drawn at init.",
    )
    embeddings_tensor: str | None = opt(
        None, "The tensor's name in a .safetensors file (unset: its only tensor, or GPT-2's wte.weight)."
    )

    _home = field_validator("embeddings")(classmethod(lambda cls, v: _expand(v)))

    @property
    def context_width(self) -> int:
        """Width of the saved contexts: C per side-by-side network."""
        return self.context_dim * self.context_blocks


TrainSource = Literal["sample", "ultrachat", "text_file", "text_dir"]
ValSource = Literal["auto_split", "manual", "sample", "ultrachat", "text_file", "text_dir"]
TRAIN_SOURCES: tuple[str, ...] = get_args(TrainSource)
VAL_SOURCES: tuple[str, ...] = get_args(ValSource)


class DataSettings(Section):
    source: TrainSource = opt("sample", "Training text: " + ", ".join(TRAIN_SOURCES) + ".")
    path: str | None = opt(None, "File or directory for text_file / text_dir / a local ultrachat export.")
    pattern: str = opt("*.txt", "Glob for text_dir (recursive).")
    num_samples: int | None = opt(None, "Use at most this many training documents (all if unset).", gt=0)
    val_source: ValSource = opt("auto_split", "Validation text: " + ", ".join(VAL_SOURCES) + ".")
    val_path: str | None = opt(None, "File or directory for the validation source.")
    val_num_samples: int | None = opt(None, "Use at most this many validation documents.", gt=0)
    val_offset: int = opt(0, "Skip this many documents of the validation source first (UltraChat by index).", ge=0)
    val_ratio: float = opt(0.2, "Share of training documents held out by auto_split.", gt=0.0, lt=1.0)
    split_seed: int = opt(
        42,
        "Seed of auto_split (separate from --seed, so changing the training or sampling seed keeps the same data).",
        ge=0,
    )
    ultrachat_dataset: str = opt("HuggingFaceH4/ultrachat_200k", "Hub id of the UltraChat dataset.")
    ultrachat_split: str = opt("train_sft", "Split of the UltraChat dataset.")
    val_duplicates: Literal["drop", "keep"] = opt(
        "drop",
        "Validation documents equal to a training document "
        "or an earlier validation one (whitespace aside): drop or keep.",
    )
    encoding: str = opt("utf-8", "Text encoding of text_file / text_dir sources (utf-8, latin-1, cp1252, ...).")
    tokenizer: str = opt("bpe", "bpe (trained offline on the training text), byte, gpt2, or a tokenizer.json path.")
    tokenizer_vocab_size: int = opt(4096, "Vocabulary size of the trained bpe tokenizer.", ge=260, le=1_000_000)

    _home = field_validator("path", "val_path")(classmethod(lambda cls, v: _expand(v)))

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, name: str) -> str:
        try:
            codecs.lookup(name)
        except LookupError:
            raise ValueError(f"unknown encoding {name!r} (try utf-8, latin-1 or cp1252)") from None
        if "\n".encode(name) != b"\n":  # documents are split at line breaks, byte by byte
            raise ValueError(f"encoding {name!r} is not supported: its line breaks are not single bytes")
        return name


class Phase1Settings(Section):
    # 100 iterations and no "diverging" stop, not the seed's 10 and 2 drops: on real text training
    # needs 35-100 iterations to settle after its first, disruptive Adam steps, and the converged
    # share wobbles on the way (docs/EXPERIMENTS.md).
    max_iterations: int = opt(
        100,
        "Most CVFP iterations (also the cap of the no-update solve that follows unconverged training).",
        cli="phase1-max-iterations",
        ge=2,
    )
    stop_on_drops: int = opt(
        0,
        "Stop training when the converged share fell by over a point this many "
        "iterations running (0: never; the seed used 2).",
        cli="phase1-stop-on-drops",
        ge=0,
    )
    min_iterations: int = opt(
        1, "Optimizer steps required before convergence may stop training.", cli="phase1-min-iterations", ge=0
    )
    convergence_threshold: float = opt(0.02, "A token has converged when mean (Q-P)^2 is below this.", gt=0)
    min_converged_ratio: float = opt(0.95, "Stop when this share of tokens has converged.", gt=0, le=1)
    lr_warmup: float = opt(0.002, "Learning rate for iterations 0-3.", gt=0)
    lr_medium: float = opt(0.0005, "Learning rate for iterations 4-8.", gt=0)
    lr_finetune: float = opt(0.0001, "Learning rate from iteration 9 on.", gt=0)
    dist_reg_weight: float = opt(0.2, "Weight w of the distribution regularizer (0..1).", ge=0, le=1)
    use_distribution_reg: bool = opt(
        True, "Use the distribution regularizer.", cli="dist-reg", aliases=("use-distribution-reg",)
    )
    scheme: Literal["sequential", "parallel"] = opt("sequential", "sequential (Gauss-Seidel) or parallel (Jacobi).")
    diversity: Literal["none", "mcdl", "oacd", "odcm", "sdl", "nuc"] = opt(
        "none", "Diversity term D of the loss (1 - w) CVFP-and-regularizer + w D.", cli="phase1-diversity"
    )
    diversity_weight: float = opt(0.9, "Its weight w (1: diversity only).", ge=0, le=1)
    centroid_weight: float = opt(0.1, "oacd: weight of |mean_t Q|^2.", ge=0, cli="oacd-centroid-weight")
    diversity_batch: int = opt(0, "Define D per batch of B tokens of the stream, averaged (0: over all tokens).", ge=0)
    start: Literal["carry", "zero"] = opt(
        "carry",
        "Each document's start context: the carry-over c_N of the last iteration, or zero (then the saved "
        "contexts are one pass from zero).",
        cli="phase1-start",
    )
    first_iteration: Literal["sequential", "random"] = opt(
        "sequential", "Training's iteration 0: a sequential pass, or sigma0 * randn.", cli="phase1-iteration0"
    )
    first_sigma: float = opt(0.01, "sigma0 of a random iteration 0.", gt=0, cli="phase1-sigma0")
    noise: float = opt(0.0, "Std of Gaussian noise on the incoming contexts of training steps (parallel).", ge=0,
                       cli="phase1-noise")  # fmt: skip
    grad_clip: float = opt(0.0, "Clip the gradient's norm to this (0: no clipping).", ge=0, cli="phase1-grad-clip")
    concat: bool = opt(False, "Treat all documents as one stream, like the original program.")
    # anderson by default (docs/EXPERIMENTS.md): the saved contexts are fixed points to a stated
    # tolerance, not wherever the iterate stopped moving; iterate is the seed's rule, for comparison
    fixed_point_solver: Literal["iterate", "plain", "anderson"] = opt(
        "anderson",
        "How the no-update solves (validation, the final solve after training, the control) end: "
        "plain / anderson: every document's carry-over c_0 = c_N solved to --fixed-point-tol (anderson "
        "accelerates); iterate: until --min-converged-ratio of tokens stop moving (the seed's rule).",
        cli="fixed-point-solver",
    )
    fixed_point_tol: float = opt(
        1e-4, "Relative carry-over residual |c_N - c_0| / |c_N| of a solved document.", cli="fixed-point-tol", gt=0
    )
    fixed_point_unique: bool = opt(
        False,
        "After a solve to --fixed-point-tol, solve again from another start (zeros, or Gaussian when the "
        "first started from zeros) and report how far apart the two fixed points are.",
        cli="two-starts",
    )
    kernel: Literal["auto", "numba", "torch"] = opt(
        "auto",
        "Sweep: numba (one document per thread) or torch "
        "(documents in lockstep, BLAS); auto picks by C, "
        "document lengths and device.",
    )


class Phase2Settings(Section):
    # The linear head is fitted to the optimum of a convex problem (training/head_fit.py), so it has no learning
    # rate, batch size or epoch count to tune: only the penalty, chosen on held-out documents. tokenblock has them.
    l2: float | None = opt(
        None, "L2 penalty of the head (unset: chosen on held-out training documents).", cli="phase2-l2", gt=0
    )
    max_iterations: int = opt(200, "Most L-BFGS iterations per fit.", cli="phase2-max-iterations", gt=0)
    head_init: Literal["zero", "unigram"] = opt("unigram", "Prior of the head's bias: zero or add-one log-unigram.")
    head_input: Literal["context", "context+token"] = opt("context", "What the head reads.")
    control: bool = opt(True, "Also fit the head on an untrained network's contexts (the control).")
    zero_control: bool = opt(
        True, "Also fit the predictor with every context set to zero (the zero-context control).", cli="zero-ctx"
    )
    predictor: Literal["linear", "tokenblock"] = opt(
        "linear",
        "linear: a softmax head fitted to its convex optimum; tokenblock: LN(h + phi(W (ctx, h) + b)) from "
        "h_0 = X_t, output tied to the embedding, trained by Adam with early stopping.",
    )
    # tokenblock's training (ignored by the linear head, which has none)
    token_layers: int = opt(1, "tokenblock: layers L_t.", ge=1, le=16)
    previous_contexts: int = opt(0, "tokenblock: reads c_t, ..., c_{t-p} (zero before a start).", ge=0, le=16)
    untied: bool = opt(False, "tokenblock: an untied Linear(E -> V) output instead of h W_E^T.")
    embedding: Literal["frozen", "trained"] = opt(
        "frozen", "tokenblock: its copy of the embedding (and so the tied output).", cli="phase2-embedding"
    )
    lr: float = opt(1e-3, "tokenblock: Adam's learning rate.", cli="phase2-lr", gt=0)
    batch_size: int = opt(512, "tokenblock: pairs per Adam step.", cli="phase2-batch-size", ge=1)
    epochs: int = opt(20, "tokenblock: most epochs.", cli="phase2-epochs", ge=1)
    patience: int = opt(1, "tokenblock: epochs without a held-out gain before stopping.", cli="phase2-patience", ge=1)
    min_gain: float = opt(
        1e-3, "tokenblock: a held-out gain below this (nats per pair) does not count.", cli="phase2-min-gain", ge=0
    )
    order: Literal["stream", "shuffled"] = opt("stream", "tokenblock: minibatches in stream order or shuffled.",
                                               cli="phase2-order")  # fmt: skip
    grad_clip: float = opt(1.0, "tokenblock: gradient norm clip (0: none).", cli="phase2-grad-clip", ge=0)


def _expand(path: str | None) -> str | None:
    return os.path.expanduser(path) if path else path


class RuntimeSettings(Section):
    seed: int = opt(42, "Random seed.", ge=0)
    device: Literal["auto", "cpu", "cuda"] = opt("auto", "auto uses CUDA when present.")
    workspace: str = opt("cache", "Directory for datasets and runs.")
    run: str = opt("default", "Run name: its directory under WORKSPACE/runs.", pattern=r"^[A-Za-z0-9_.-]+$")
    memory_budget: float = opt(
        1.0,
        "GiB for corpus-sized data (Phase 1 contexts, Phase 2 pairs); beyond "
        "it they go to files in the run directory, processed in chunks.",
        gt=0,
    )
    threads: int = opt(0, "CPU threads for torch and numba (0: one per core, shared among a machine's ranks).", ge=0)
    save_every: float = opt(
        10.0,
        "Minutes between resume points of phase1 and phase2, which a killed run continues from (0: only on Ctrl-C).",
        ge=0,
    )

    _home = field_validator("workspace")(classmethod(lambda cls, v: _expand(v)))

    @field_validator("run")
    @classmethod
    def _not_a_directory_alias(cls, run: str) -> str:
        if run in (".", ".."):
            raise ValueError(f"{run!r} names a directory, not a run")
        return run

    tensorboard: bool = opt(
        False,
        "Also write each stage's figures as TensorBoard events under "
        "runs/NAME/tensorboard (needs the tensorboard extra).",
    )


class Settings(Section):
    model: ModelSettings = ModelSettings()
    data: DataSettings = DataSettings()
    phase1: Phase1Settings = Phase1Settings()
    phase2: Phase2Settings = Phase2Settings()
    runtime: RuntimeSettings = RuntimeSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        d = self.data
        if d.source in ("text_file", "text_dir") and not d.path:
            raise ValueError(f"--source {d.source} needs --path (the file or directory to read)")
        if d.val_source in ("manual", "text_file", "text_dir") and not d.val_path:
            raise ValueError(f"--val-source {d.val_source} needs --val-path (the file or directory to read)")
        m, p1 = self.model, self.phase1
        if m.architecture == "residual":
            for name in ("token_input", "input_tokens", "activation"):
                if getattr(m, name) != _default("model", name):
                    raise ValueError(f"--{cli_name('model', name)} is an option of --architecture context")
        if p1.noise > 0 and p1.scheme != "parallel":
            raise ValueError("--phase1-noise perturbs the parallel scheme's incoming contexts: add --scheme parallel")
        if d.val_offset and d.val_source in ("auto_split", "manual"):
            raise ValueError(
                "--val-offset skips documents of a text --val-source (ultrachat, sample, text_file, text_dir)"
            )
        p2 = self.phase2
        if p2.predictor == "linear":
            for name in TOKENBLOCK_ONLY:
                if getattr(p2, name) != _default("phase2", name):
                    raise ValueError(f"--{cli_name('phase2', name)} is an option of --predictor tokenblock")
        if m.embeddings_tensor and not m.embeddings:
            raise ValueError("--embeddings-tensor names a tensor of --embeddings FILE.safetensors: give --embeddings")
        return self


TOKENBLOCK_ONLY = ("token_layers", "previous_contexts", "untied", "embedding", "lr", "batch_size", "epochs",
                   "patience", "min_gain", "order", "grad_clip")  # fmt: skip


SETTINGS_LIMIT = 1 << 20  # bytes: a settings file or settings.json is a few kilobytes
PROBE_ROWS = 2_000
# decodability probe positions per split: about a tenth of `full` on pydoc (EXPERIMENTS)

SOURCE_GROUPS = (("source", "path", "pattern"), ("val_source", "val_path"))
SECTIONS: dict[str, type[Section]] = {name: f.annotation for name, f in Settings.model_fields.items()}  # type: ignore[misc]


def _extra(section: str, field: str) -> dict[str, Any]:
    extra = SECTIONS[section].model_fields[field].json_schema_extra
    return extra if isinstance(extra, dict) else {}


def cli_name(section: str, field: str) -> str:
    return str(_extra(section, field).get("cli") or field.replace("_", "-"))


def flag_index() -> dict[str, tuple[str, str]]:
    """Every option name (without --), aliases included, to its (section, field)."""
    return {
        flag: (section, name)
        for section, model in SECTIONS.items()
        for name in model.model_fields
        for flag in (cli_name(section, name), *cli_aliases(section, name))
    }


def cli_aliases(section: str, field: str) -> list[str]:
    return list(_extra(section, field).get("aliases", []))


def read_config_file(path: Path) -> dict:
    """A settings file: JSON or TOML, nested by section."""
    from newllm_cli.runtime import nofollow

    try:
        text = nofollow.read_text(path, SETTINGS_LIMIT)
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError, RecursionError) as e:
        raise UsageError(
            f"config file {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {first_line(e)[:200]}"
        ) from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold an object of sections")
    for name, section in data.items():
        if not isinstance(section, dict):
            raise UsageError(f"config file {path}: section {str(name)[:40]!r} must be a table of settings")
    return data


def merge(*layers: dict) -> dict:
    """Merge section dicts, later layers winning field by field."""
    out: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = {**out[key], **value}
            else:
                out[key] = value
    return out


def validate(data: dict) -> Settings:
    """Validate merged settings; every problem becomes one line naming the setting."""
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None


_WORDS = {  # pydantic's error types in our words; {ctx keys} come from the error
    "int_parsing": "expected a whole number",
    "finite_number": "expected a finite number",
    "int_from_float": "expected a whole number",
    "float_parsing": "expected a number",
    "bool_parsing": "expected true or false",
    "greater_than": "must be greater than {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be less than {lt}",
    "less_than_equal": "must be at most {le}",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "may hold only letters, digits, '_', '.' and '-'",
    "extra_forbidden": "is not a setting",
    "model_type": "must be a table of settings",
    "dict_type": "must be a table of settings",
}


def _one_line(e: ValidationError, prefix: str = "") -> str:
    """Each problem as `--option VALUE: what is wrong (section.field)`, the option being what people
    type and the dotted name what config files hold."""
    parts = []
    for err in e.errors():
        loc = f"{prefix}{'.'.join(str(p) for p in err['loc'])}".split(".")
        ctx = err.get("ctx", {})
        words = str(ctx["error"]) if err["type"] == "value_error" else _WORDS.get(err["type"], err["msg"]).format(**ctx)
        if len(loc) != 2 or loc[0] not in SECTIONS or loc[1] not in SECTIONS[loc[0]].model_fields:
            parts.append(f"{'.'.join(loc)} {words}" if loc != [""] else words)
            continue
        given = err.get("input")
        shown = (
            ""
            if isinstance(given, (dict, list))
            else f" {given}"
            if not isinstance(given, str) or (given.isprintable() and given.strip() == given and given)
            else f" {given!r}"
        )
        parts.append(f"--{cli_name(*loc)}{shown}: {words} ({'.'.join(loc)})")
    return "; ".join(parts)


def resolve(options: dict, config: Path | None, saved_path_for, preset: str | None = None) -> Settings:
    """Apply the precedence rules. `saved_path_for(workspace, run)` locates a run's settings.json;
    a `preset` (presets.py) sits between the saved settings and --config.

    A run's saved data settings describe what it was made of: when this command names another
    source (or validation source, path or pattern), none of them is carried into the new one, and
    every setting that is taken from the run and differs from its default is said on stderr."""
    file_layer = read_config_file(config) if config else {}
    # where the run lives must be valid before its saved settings can be read
    try:
        runtime = RuntimeSettings.model_validate(merge(file_layer, options).get("runtime", {}))
    except ValidationError as e:
        raise UsageError(_one_line(e, "runtime.")) from None
    saved = {}
    saved_file = saved_path_for(runtime.workspace, runtime.run)
    if saved_file is not None and saved_file.exists():
        saved = _saved(saved_file)
        for key in ("workspace", "run"):  # where a run lives is never read from the run itself
            saved.get("runtime", {}).pop(key, None)
        given = {**file_layer.get("data", {}), **options.get("data", {})}
        old = saved.get("data", {})
        changed = [
            k for group in SOURCE_GROUPS for k in group if k in given and given[k] != old.get(k, _default("data", k))
        ]
        if changed:  # another source: the old one's sample counts, tokenizer, ... do not apply to it
            from newllm_cli.runtime.progress import info

            info(
                f"run {runtime.run!r} was made of other data (--{cli_name('data', changed[0])} differs): "
                "its saved data settings are not carried over"
            )
            saved.pop("data", None)
    from newllm_cli import presets

    recipe = presets.layer(preset, _default)
    settings = validate(merge(saved, recipe, file_layer, options))
    _say_inherited(saved, [recipe, file_layer, options], runtime.run)
    return settings


def _default(section: str, field: str) -> Any:
    return SECTIONS[section].model_fields[field].default


def _say_inherited(saved: dict, given: list[dict], run: str) -> None:
    """One stderr line naming the settings taken from the run's settings.json that are not defaults."""
    taken = [
        f"{field} = {json.dumps(value)}"
        for section, values in saved.items()
        if section in SECTIONS
        for field, value in values.items()
        if field in SECTIONS[section].model_fields
        and value != _default(section, field)
        and not any(field in layer.get(section, {}) for layer in given)
    ]
    if taken:
        from newllm_cli.runtime.progress import info

        info(f"settings from run {run!r}: {', '.join(taken)}")


def _saved(path: Path) -> dict:
    """A run's settings.json, or nothing when it is damaged: every stage writes it again, so a bad
    copy must not lock the run (a mismatch with its artifacts is still refused, by provenance)."""
    from newllm_cli.runtime import nofollow
    from newllm_cli.runtime.progress import warn

    try:
        saved = json.loads(nofollow.read_text(path, SETTINGS_LIMIT))
        validate(saved)
        return saved
    except (OSError, ValueError, UsageError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        warn(f"ignoring damaged {path} ({str(e).splitlines()[0][:100]})")
        return {}


def effective(s: Settings) -> dict:
    """The settings in force for a run (options > --config > saved > defaults), as TOML that --config
    accepts: edit it and pass it back. A named run that does not exist is refused (the defaults
    are what `newllm config` prints for the default run of a new workspace)."""
    from newllm_cli.store.artifacts import Workspace

    ws = Workspace(s.runtime.workspace, s.runtime.run)
    if s.runtime.run != _default("runtime", "run") and not ws.started():
        raise ws.no_such_run()
    lines = []
    for section, values in s.model_dump().items():
        lines.append(f"[{section}]")
        for key, value in values.items():  # JSON literals are TOML for strings, numbers and booleans
            lines.append(f"# {key}: unset" if value is None else f"{key} = {json.dumps(value)}")
        lines.append("")
    return {"toml": "\n".join(lines), "settings": s.model_dump()}
