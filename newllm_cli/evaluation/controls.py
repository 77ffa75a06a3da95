"""What Phase 2's head is compared with: the baselines and controls, one entry each.

Each Control scores the same validation pairs (x_t, x_{t+1}) as the head and gives a loss per pair;
the stage adds its perplexity and a paired verdict against the head, and phase2.json, the printed
table, the figures and `compare` list every entry in this order. A new control is one
`register(Control(...))` here; its `run` gets a Bench (the data, the settings, and the stage's own
way to fit the head on other contexts) and returns an Outcome, or None when it is switched off.
Nothing heavy is imported here (numpy neither), so that help and reports stay fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported when a control runs: help and reports stay fast
    import numpy as np


@dataclass
class Bench:
    """What a control is given."""

    train_tokens: np.ndarray
    train_offsets: np.ndarray
    val_tokens: np.ndarray
    val_offsets: np.ndarray
    targets: np.ndarray  # x_{t+1} of every validation pair, in the head's order
    vocab: int
    settings: Any  # the run's Settings
    fit_untrained: Callable[[], tuple[Any, list[dict[str, Any]]]]  # the head on an untrained network: (fit, curves)
    fit_zero: Callable[[], tuple[Any, list[dict[str, Any]]]]  # the same predictor with every context zero
    advice: Callable[[Any, str], list[str]]  # the chosen predictor's words on a fit's ending
    record: Callable[[Any], dict[str, Any]]  # its own fields of a fit (a penalty, or epochs)


@dataclass
class Outcome:
    losses: np.ndarray  # nats per validation pair
    entry: dict[str, Any]  # its fields in phase2.json's "baselines": "accuracy" (top-1, when it has
    # one), a smoothing "k", a fit's "l2" and "selection"...
    curves: list[dict[str, Any]] | None = None  # fitting curves, stored under phase2.json's curves[Control.curve]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Control:
    key: str  # in phase2.json's "baselines"
    label: str  # in tables, verdicts and warnings
    short: str  # in figures
    column: str  # compare's column
    abbrev: str  # the runs table's narrow header
    run: Callable[[Bench], Outcome | None]
    curve: str | None = None  # its key in phase2.json's "curves", when it fits something


CONTROLS: list[Control] = []


def register(control: Control) -> Control:
    CONTROLS[:] = [c for c in CONTROLS if c.key != control.key] + [control]
    return control


def unconverged_mark(row: dict[str, Any], column: str) -> str:
    """The mark of a table cell whose control's own solve did not converge (a runs/compare row)."""
    return "*" if column == "control" and row.get("control_converged") is False else ""


def label(key: str) -> str:
    """A control's name in words (the key itself for one no longer registered)."""
    return next((c.label for c in CONTROLS if c.key == key), key)


def _unigram(b: Bench) -> Outcome:
    import numpy as np

    from newllm_cli.evaluation.baselines import unigram_log_probs

    logp = unigram_log_probs(b.train_tokens, b.vocab)
    return Outcome(-logp[b.targets], {"accuracy": float(np.mean(b.targets == np.argmax(logp)))})


def _bigram(b: Bench) -> Outcome:
    from newllm_cli.evaluation.baselines import bigram_perplexity

    found = bigram_perplexity(b.train_tokens, b.train_offsets, b.val_tokens, b.val_offsets, b.vocab)
    return Outcome(-found["log_probs"], {"k": found["k"], "accuracy": found["accuracy"]})


def _interpolated(order: int) -> Callable[[Bench], Outcome]:
    def run(b: Bench) -> Outcome:
        from newllm_cli.evaluation.baselines import interpolated

        found = interpolated(b.train_tokens, b.train_offsets, b.val_tokens, b.val_offsets, b.vocab, order)
        return Outcome(-found["log_probs"], {"lambdas": found["lambdas"], "accuracy": found["accuracy"]})

    return run


def _fitted(fit_: Callable[[Bench], tuple[Any, list[dict[str, Any]]]], label: str) -> Callable[[Bench], Outcome]:
    """A control that is the chosen predictor fitted on other contexts."""

    def run(b: Bench) -> Outcome:
        fit, curves = fit_(b)
        entry = {"accuracy": fit.val["accuracy"], **{k: v for k, v in b.record(fit).items() if k != "epochs"}}
        return Outcome(fit.val_losses, entry, curves, b.advice(fit, label))

    return run


def _untrained(b: Bench) -> Outcome | None:
    return _fitted(lambda b: b.fit_untrained(), "control")(b) if b.settings.phase2.control else None


def _zero(b: Bench) -> Outcome | None:
    return _fitted(lambda b: b.fit_zero(), "zero context")(b) if b.settings.phase2.zero_control else None


register(Control("unigram_add_one", "add-one unigram", "add-one unigram", "unigram", "uni", _unigram))
register(Control("bigram_add_k", "add-k bigram", "add-k bigram", "bigram", "bi", _bigram))
register(Control("bigram_interpolated", "interpolated bigram", "interp. bigram", "bigram_jm", "jm2", _interpolated(2)))
register(
    Control("trigram_interpolated", "interpolated trigram", "interp. trigram", "trigram_jm", "jm3", _interpolated(3))
)
register(
    Control(
        "untrained_network",
        "untrained network (control)",
        "untrained control",
        "control",
        "ctrl",
        _untrained,
        "control",
    )
)
register(Control("zero_context", "zero context", "zero context", "zero_ctx", "zero", _zero, "zero_context"))
