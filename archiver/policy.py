"""Retention policies: ordered rules that say when a top-level run expires.

A rule matches runs by flow name, deployment name, tags, state type, work pool
and work queue. Every field a rule gives must match (a list matches any of its
values; ``tags_all`` needs all of its tags); a rule without match fields
matches every run. A rule then does exactly one thing:

* ``retention = "P30D"``: archive the runs that ended longer ago than that;
* ``keep = "forever"``: never archive them;
* ``keep_last = N``: keep the N most recent matching runs of each deployment
  (or of each flow, with ``per = "flow"``), whatever their age. Older runs are
  not claimed by the rule and go on to the rules after it. Runs without a
  deployment are not claimed by a per-deployment rule.

The first rule that matches a run decides; the runs no rule matches fall to
the default rule, which archives after ``retention_period``. Separately, a run
tree in which any flow run carries the legal-hold tag is never archived.

This module only models and validates rules (pure, no I/O). Validation rejects
a rule that can never match because an earlier rule already claims every run
it would. ``archiver.source.retention`` turns a policy into SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: The shortest retention a rule or the settings (retention_period, events) accept.
MIN_RETENTION = timedelta(hours=1)
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
DEFAULT_RULE = "default"
DEFAULT_LEGAL_HOLD_TAG = "legal-hold"
#: The fields a rule matches on, in the order they are described.
MATCH_FIELDS = ("flow", "deployment", "tags_any", "tags_all", "state", "work_pool", "work_queue")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _states(value: Any) -> Any:
    states = [str(state).upper() for state in _as_list(value)]
    for state in states:
        if state not in TERMINAL_STATES:
            raise ValueError(
                f"state {state} is never archived; use one of {', '.join(TERMINAL_STATES)}"
            )
    return states


Names = Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_as_list)]
States = Annotated[list[str], BeforeValidator(_states)]


class Rule(BaseModel):
    """One retention rule. See the module docstring for the semantics."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="", description="Named in plan output and manifests (rule-N).")
    flow: Names | None = Field(default=None, min_length=1, description="Flow names.")
    deployment: Names | None = Field(
        default=None, min_length=1, description="Deployment names, or flow-name/deployment-name."
    )
    tags_any: Names | None = Field(default=None, min_length=1, description="Any of these tags.")
    tags_all: Names | None = Field(default=None, min_length=1, description="All of these tags.")
    state: States | None = Field(
        default=None, min_length=1, description="COMPLETED, FAILED, CANCELLED, CRASHED."
    )
    work_pool: Names | None = Field(default=None, min_length=1, description="Work pool names.")
    work_queue: Names | None = Field(default=None, min_length=1, description="Work queue names.")
    retention: timedelta | None = Field(
        default=None, description="Archive matching runs that ended longer ago than this."
    )
    keep: Literal["forever"] | None = Field(default=None, description="Never archive them.")
    keep_last: int | None = Field(
        default=None, ge=1, le=10_000, description="Keep the N most recent per deployment/flow."
    )
    per: Literal["deployment", "flow"] | None = Field(
        default=None, description="What keep_last counts per (default: deployment)."
    )

    @model_validator(mode="after")
    def _one_action(self) -> Self:
        actions = [f for f in ("retention", "keep", "keep_last") if getattr(self, f) is not None]
        if len(actions) != 1:
            given = f" (it has {' and '.join(actions)})" if actions else ""
            raise ValueError(
                f'{self._label} needs exactly one of retention, keep = "forever" or keep_last'
                + given
            )
        if self.retention is not None and self.retention < MIN_RETENTION:
            raise ValueError(f"{self._label}: retention must be at least 1 hour")
        if self.per is not None and self.keep_last is None:
            raise ValueError(f"{self._label}: per is only for keep_last")
        return self

    @property
    def _label(self) -> str:
        return f"rule {self.name!r}" if self.name else "a rule"

    @property
    def keep_last_per(self) -> Literal["deployment", "flow"]:
        return self.per or "deployment"

    @property
    def matches_everything(self) -> bool:
        return all(getattr(self, f) is None for f in MATCH_FIELDS)

    def describe_match(self) -> str:
        parts = []
        for name in MATCH_FIELDS:
            values = getattr(self, name)
            if values is not None:
                parts.append(f"{name}={','.join(values)}")
        return " ".join(parts) or "every run"

    def describe_action(self) -> str:
        if self.keep is not None:
            return "keep forever"
        if self.keep_last is not None:
            return f"keep last {self.keep_last} per {self.keep_last_per}"
        assert self.retention is not None
        return f"archive after {_duration(self.retention)}"

    def claims_all_of(self, later: Rule) -> bool:
        """Whether this rule matches every run ``later`` matches (so ``later`` never decides).

        Conservative: True only when it follows from the fields alone. A keep_last
        rule claims only some of its runs, so it never shadows another rule.
        """
        if self.keep_last is not None:
            return False
        for name in ("flow", "deployment", "state", "work_pool", "work_queue"):
            mine, theirs = getattr(self, name), getattr(later, name)
            if mine is not None and (theirs is None or not set(theirs) <= set(mine)):
                return False
        if self.tags_all is not None and (
            later.tags_all is None or not set(self.tags_all) <= set(later.tags_all)
        ):
            return False
        if self.tags_any is not None:
            covered = (
                later.tags_any is not None and set(later.tags_any) <= set(self.tags_any)
            ) or (later.tags_all is not None and bool(set(later.tags_all) & set(self.tags_any)))
            if not covered:
                return False
        return True


def _duration(value: timedelta) -> str:
    if value % timedelta(days=1) == timedelta(0):
        return f"{value.days} day{'' if value.days == 1 else 's'}"
    return f"{value.total_seconds() / 3600:g} hours"


def validate_rules(rules: list[Rule] | tuple[Rule, ...]) -> tuple[Rule, ...]:
    """Name unnamed rules ``rule-N`` (1-based) and reject rules that can never match.

    Raises ValueError with one line naming the rule.
    """
    named = tuple(
        rule if rule.name else rule.model_copy(update={"name": f"rule-{position}"})
        for position, rule in enumerate(rules, start=1)
    )
    seen: set[str] = set()
    for rule in named:
        if rule.name == DEFAULT_RULE:
            raise ValueError(
                f"rule name {DEFAULT_RULE!r} is reserved for the rule that applies "
                "retention_period to runs no rule matches; pick another name"
            )
        if rule.name in seen:
            raise ValueError(f"two rules are named {rule.name!r}; rule names must be unique")
        seen.add(rule.name)
    for position, later in enumerate(named):
        for earlier in named[:position]:
            if earlier.claims_all_of(later):
                raise ValueError(
                    f"rule {later.name!r} can never match: rule {earlier.name!r} before it "
                    "matches every run it would (the first matching rule wins); reorder or "
                    "remove one"
                )
    return named


@dataclass(frozen=True)
class RetentionPolicy:
    """The rules, the default retention for runs no rule matches, and the legal hold.

    ``legal_hold_tag=None`` turns the legal hold off. Rules are validated (and
    named) on construction; a bad rule raises ValueError.
    """

    rules: tuple[Rule, ...] = ()
    default_retention: timedelta = timedelta(days=90)
    legal_hold_tag: str | None = DEFAULT_LEGAL_HOLD_TAG

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", validate_rules(self.rules))

    @property
    def default_rule(self) -> Rule:
        # not validated: a library caller may use a retention under the 1-hour minimum
        return Rule.model_construct(name=DEFAULT_RULE, retention=self.default_retention)

    @property
    def effective_rules(self) -> tuple[Rule, ...]:
        """The rules in order, then the default rule unless a catch-all rule leaves it no run."""
        if any(rule.matches_everything and rule.keep_last is None for rule in self.rules):
            return self.rules
        return (*self.rules, self.default_rule)
