"""`batcher plan`: what a run of a spec would do and cost, before it makes a single request.

    plan = make_plan(load_spec("jobs/demo.yaml"))
    print(plan.cost_low_usd, plan.cost_high_usd, plan.wall_s)

The module owns the estimate. It reads the input exactly as the run does (`Source.check()`, then `Source.batches()`,
which renders each row's template), skips the rows an earlier run of the same spec already answered (the state
folder's journal, read, never compacted or changed), builds each row's body as the run would, and adds up:

- prompt tokens, estimated as characters / 4 (`CHARS_PER_TOKEN`), the usual rule of thumb for English text
  with OpenAI-style BPE tokenizers. Measured against the local gateway on samples/reviews.parquet with the demo
  template (jobs/demo.yaml), the estimate is 16,538 for 14,759 actual prompt tokens: +12.1% in total, per row
  -0.5% to +32%. That gateway counts ceil(words * 4/3) tokens, itself a rule of thumb, so this calibrates
  against a simulator, not a tokenizer: real tokenizers differ, and code, numbers or non-Latin scripts take
  more tokens per character (chars/4 can then undercount by 2x or more). The plan states the estimate as
  +/-`PROMPT_TOLERANCE` (25%), which covers English prose; pass `chars_per_token` when you know better.
- completion tokens, an upper bound: max_tokens (default `spec.DEFAULT_MAX_TOKENS`) x n per row, plus the
  thinking budget when thinking is enabled (the local gateway bills reasoning on top of max_tokens; providers
  that count it inside max_tokens only make the bound looser, never too low).
- cost, a range from the price table (shipped, then the spec's `prices:`, then `prices`, as the run does):
  low = prompt tokens at the low end of the estimate and no completion at all, at the cheapest model a row may
  be billed on (its model or a fallback); high = prompt tokens at the high end plus the full completion bound,
  at the dearest. It assumes no response-cache hit, no provider prompt caching and no billed retry. A model
  without a price is flagged as unpriced and its rows are left out of the range: unknown, never free.
- wall time: the run is paced by the slowest of three limits. requests_per_minute allows rows/rpm minutes;
  tokens_per_minute is enforced on what the run's limiter is charged per call, len(prompt)/3 + max_tokens x n
  (see `runner._Job.prepare`), not on the tokens later billed; concurrency allows concurrency calls per
  `latency_ms` (an assumption, default 1000 ms per call: say what your endpoint does with --latency-ms).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .attachments import IMAGE_TOKENS, IMAGE_TOKENS_BOUND, media_tokens
from .errors import SpecError
from .limits import limiter_tokens as _limiter_tokens
from .prices import Price, PriceTable
from .routing import plan_for
from .runner import run_fingerprint
from .shapes import shape_of_job
from .sinks import RunState, input_identity, read_journal, state_dir_for
from .sources import Source
from .spec import JobSpec, load_spec

__all__ = ["CHARS_PER_TOKEN", "PROMPT_TOLERANCE", "ModelEstimate", "Plan", "add_parser", "make_plan"]

CHARS_PER_TOKEN = 4.0
# A sane range: no tokenizer is near either end, and outside it the estimate under- or overflows (5e-324 -> inf).
CHARS_PER_TOKEN_RANGE = (0.1, 100.0)
_CPT_RANGE_TEXT = "from 0.1 to 100 characters per token"
# The stated error of the prompt-token estimate (measured: +12.1% against the local gateway, see above).
PROMPT_TOLERANCE = 0.25
DEFAULT_LATENCY_MS = 1000.0


@dataclass(frozen=True, slots=True)
class ModelEstimate:
    """The rows a model is asked first (a load balancer's pick, or an OpenAI batch line's own model)."""

    model: str
    rows: int
    prompt_chars: int
    prompt_tokens: int
    completion_tokens_max: int
    billed_on: tuple[str, ...]  # the model, then the fallbacks that may answer instead
    cost_low_usd: float | None  # None: no price for any model these rows may be billed on
    cost_high_usd: float | None
    unpriced: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    job: str
    input: str
    output: str
    rows: int  # rows the run would consider: the input's, or the first `limit`
    done: int  # answered by an earlier run of this spec (resumed: not sent again)
    to_send: int  # rows that would be sent (one first attempt each)
    input_errors: int  # rows that would become error rows without a call (missing variable, empty prompt, ...)
    prompt_chars: int
    prompt_tokens: int  # estimate: prompt_chars / chars_per_token
    chars_per_token: float
    prompt_tolerance: float
    completion_tokens_max: int
    max_tokens: int
    n: int
    models: tuple[ModelEstimate, ...]
    unpriced: tuple[str, ...]
    unpriced_rows: int  # rows whose first model has no price: outside the cost range
    cost_low_usd: float | None
    cost_high_usd: float | None
    prices_source: str
    concurrency: int
    latency_ms: float
    requests_per_minute: float | None
    tokens_per_minute: float | None
    limiter_tokens: float  # what the tokens_per_minute limiter will be charged in all
    wall_s_concurrency: float
    wall_s_requests: float | None
    wall_s_tokens: float | None
    wall_s: float
    bound_by: str  # concurrency | requests_per_minute | tokens_per_minute
    notes: tuple[str, ...] = field(default=())
    attachments: int = 0  # image, audio and file parts of the rows to send
    attachment_tokens: int = 0  # their share of prompt_tokens (attachments.media_tokens)
    max_tokens_field: str = "max_tokens"  # the request field `max_tokens` is read from (chat: max_completion_tokens)

    @property
    def prompt_tokens_low(self) -> int:
        return math.floor(self.prompt_tokens * (1 - self.prompt_tolerance))

    @property
    def prompt_tokens_high(self) -> int:
        return math.ceil(self.prompt_tokens * (1 + self.prompt_tolerance))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["prompt_tokens_low"] = self.prompt_tokens_low
        data["prompt_tokens_high"] = self.prompt_tokens_high
        return data


@dataclass(slots=True)
class _Tally:
    rows: int = 0
    chars: int = 0
    media: int = 0  # image/audio/file parts
    media_tokens: int = 0  # their estimate (attachments.media_tokens)
    completion: int = 0
    limiter: float = 0.0


def _done_ids(spec: JobSpec, output: Path, rows: int, limit: int | None, fresh: bool,
              notes: list[str], files: list[str] | None = None) -> tuple[list[Any], bool]:
    """The ids a resumed run would skip, and whether the run would find nothing to do; mirrors the run's
    pre-flight, but only reads: the run compacts the journal, the plan must not touch it."""
    state_dir = state_dir_for(output)
    state = RunState.load(state_dir)
    if state is None:
        return [], False
    if fresh:
        notes.append(f"--fresh: the earlier run in {state_dir} would be discarded")
        return [], False
    if state.fingerprint != run_fingerprint(spec):
        kind = "a finished" if state.status == "finished" else "a partial"
        notes.append(f"{state_dir} holds {kind} run of a different spec: the run would stop (exit 5) "
                     "unless given --fresh; counted as nothing done")
        return [], False
    # An edited input (with ids: rows replaced, same count) is not finished whatever run.json says.
    same_input = state.input == input_identity(spec.input.path, files)
    if not same_input and spec.input.id_column is None and spec.input.resolved_format != "openai_batch":
        notes.append(f"the input changed since the run in {state_dir} and its rows are known by position: the run "
                     "would stop (exit 5) unless given --fresh; counted as nothing done")
        return [], False
    if state.status == "finished" and state.rows == rows and output.exists() and limit is None and same_input:
        return [], True
    seen: set[Any] = set()
    ids: list[Any] = []
    for rec in read_journal(state_dir / "journal.jsonl"):
        rid = rec.get("id")
        # Only answered rows count: the run retries error rows of an earlier pass.
        if rec.get("status") == "ok" and rid is not None and rid not in seen:
            seen.add(rid)
            ids.append(rid)
    return ids, False


def _reasoning_budget(body: dict[str, Any]) -> int:
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool):
            return budget
    return 0


def _cost_range(billed_on: Iterable[str], prices: PriceTable, prompt_low: float, prompt_high: float,
                completion: int) -> tuple[float | None, float | None, tuple[str, ...]]:
    priced: list[Price] = []
    unpriced: list[str] = []
    for m in billed_on:
        p = prices.get(m)
        if p is None:
            unpriced.append(m)
        else:
            priced.append(p)
    if not priced:
        return None, None, tuple(unpriced)
    low = min(prompt_low * p.prompt for p in priced) / 1e6
    high = max(prompt_high * p.prompt + completion * p.completion for p in priced) / 1e6
    return low, high, tuple(unpriced)


def _prices_label(spec: JobSpec, prices: PriceTable | None) -> str:
    shipped = PriceTable.default()
    parts = [f"shipped table of {shipped.date}" if shipped.date else "shipped table"]
    if spec.prices:
        parts.append(f"the spec's prices: ({len(spec.prices)} model(s))")
    if prices is not None:
        parts.append(prices.source or "--prices")
    return " + ".join(parts)


def _output_path(spec: JobSpec, output: Path | None) -> Path:
    if output is None:
        return spec.output.path
    if output.suffix.lower() not in (".parquet", ".jsonl", ".ndjson"):
        raise SpecError(f"--output {output}: use a .parquet or .jsonl file")
    return output


def make_plan(
    spec: JobSpec,
    *,
    output: Path | None = None,
    prices: PriceTable | None = None,
    latency_ms: float = DEFAULT_LATENCY_MS,
    limit: int | None = None,
    fresh: bool = False,
    chars_per_token: float = CHARS_PER_TOKEN,
) -> Plan:
    """Read the input and the resume state, and estimate the run; no request is made.

    `output`, `prices`, `limit` and `fresh` mean what they mean for `batcher run` (`RunOptions`).
    """
    if not (math.isfinite(latency_ms) and latency_ms > 0):
        raise SpecError(f"--latency-ms must be a finite number greater than 0, got {latency_ms:g}")
    if not (math.isfinite(chars_per_token) and CHARS_PER_TOKEN_RANGE[0] <= chars_per_token <= CHARS_PER_TOKEN_RANGE[1]):
        raise SpecError(f"--chars-per-token must be a finite number greater than 0 ({_CPT_RANGE_TEXT}), "
                        f"got {chars_per_token:g}")
    out = _output_path(spec, output)
    notes: list[str] = []
    table = PriceTable.default().overridden(
        {m: Price(p.prompt, p.completion, p.cached_prompt) for m, p in (spec.prices or {}).items()}
    ).overridden(prices)
    source = Source(spec.input, spec.output.keep_columns, spec.endpoint.api)
    info = source.check()
    route = plan_for(spec.request, spec.endpoint.api)
    shape = shape_of_job(spec)
    fallbacks = [f.model for f in (spec.request.routing("fallbacks") or [])]

    ids, nothing_to_do = _done_ids(spec, out, info.rows, limit, fresh, notes, source.files)
    considered = info.rows if limit is None else min(limit, info.rows)
    tallies: dict[str, _Tally] = {}
    input_errors = 0
    no_model = 0
    if nothing_to_do:
        notes.append(f"{out} is complete: the run would have nothing to do (--fresh starts over)")
        done = considered
    else:
        seen = 0  # rows the run would consider and not skip; the rest were answered (ids no longer in an
        # edited input do not count)
        done_ids = pa.array(ids, type=info.id_type) if ids else None
        for batch in source.batches(done_ids):
            # The same cut as the run's feeder: rows before `limit`, by position in the file.
            rows = batch if limit is None else [r for r in batch if r.index < limit]
            if not rows:
                break
            seen += len(rows)
            for row in rows:
                if row.error is not None or row.prompt is None:
                    input_errors += 1
                    continue
                model = row.model or route.primary_for(row.id)
                if not model:
                    # An OpenAI batch line naming no model, and no request.model: the run makes it an error row.
                    no_model += 1
                    input_errors += 1
                    continue
                body = shape.body(row.prompt, model, row.inputs, row.body)
                text = shape.prompt_text(body)  # a chat row: the text of all its messages
                t = tallies.setdefault(model, _Tally())
                t.rows += 1
                t.chars += len(text)
                n_media, media_est, _ = media_tokens(body)
                t.media += n_media
                t.media_tokens += media_est
                t.completion += int(body.get("max_completion_tokens") or body.get("max_tokens") or 0) * int(
                    body.get("n") or 1) + _reasoning_budget(body)
                # What runner._Job.prepare charges the tokens_per_minute limiter for this call.
                t.limiter += _limiter_tokens(text, body)

        done = considered - seen

    models: list[ModelEstimate] = []
    unpriced: set[str] = set()
    unpriced_rows = 0
    lows: list[float] = []
    highs: list[float] = []
    for model, t in sorted(tallies.items()):
        est = t.chars / chars_per_token + t.media_tokens
        billed_on = tuple(dict.fromkeys([model, *fallbacks]))
        low, high, missing = _cost_range(billed_on, table, est * (1 - PROMPT_TOLERANCE),
                                         est * (1 + PROMPT_TOLERANCE), t.completion)
        unpriced.update(missing)
        if table.get(model) is None:
            unpriced_rows += t.rows
        if low is not None and high is not None:
            lows.append(low)
            highs.append(high)
        models.append(ModelEstimate(model, t.rows, t.chars, round(est), t.completion, billed_on, low, high, missing))
    unpriced_fallbacks = [f for f in dict.fromkeys(fallbacks) if f in unpriced]
    if unpriced_fallbacks:
        notes.append(f"fallback {', '.join(unpriced_fallbacks)} has no price and may answer some rows: "
                     "their cost is not in the range")
    if no_model:
        notes.append(f"{no_model:,} line(s) name no model and request.model is unset: they become error rows")

    calls = sum(t.rows for t in tallies.values())
    limits = spec.limits
    limiter_tokens = sum(t.limiter for t in tallies.values())
    wall_conc = calls * (latency_ms / 1000.0) / limits.concurrency
    wall_req = calls / limits.requests_per_minute * 60.0 if limits.requests_per_minute else None
    wall_tok = limiter_tokens / limits.tokens_per_minute * 60.0 if limits.tokens_per_minute else None
    bounds = {"concurrency": wall_conc, "requests_per_minute": wall_req, "tokens_per_minute": wall_tok}
    bound_by, wall = max(((k, v) for k, v in bounds.items() if v is not None), key=lambda kv: kv[1])

    if limits.max_cost_usd is not None:
        # The run's pre-flight (runner._Job._preflight) checks the spec's own models, whatever the rows: so
        # does the plan, or a 0-row input would plan "nothing to send" for a run that refuses to start.
        spec_models = {m for m in (*route.models, *(m for m, _ in route.load_balancer)) if m}
        refused = sorted(m for m in spec_models if table.get(m) is None)
        if refused:
            notes.append(f"limits.max_cost_usd is set but {refused[0]!r} has no price: "
                         "the run would refuse to start (exit 2)")
        elif unpriced:
            # A model named by the input's own lines: the run makes each of its rows a budget error row.
            notes.append(f"limits.max_cost_usd is set but {sorted(unpriced)[0]!r} has no price: its rows "
                         "would become error rows (the budget cannot be enforced on them)")
        elif highs and sum(highs) > limits.max_cost_usd:
            notes.append(f"the high cost estimate passes limits.max_cost_usd (${limits.max_cost_usd:g}): "
                         "the run may stop at the budget")
    env = spec.endpoint.api_key_env
    if spec.endpoint.base_url != "local" and spec.endpoint.api == "orq" and env and not os.environ.get(env):
        notes.append(f"{env} is not set: the run would stop before the first request")

    return Plan(
        job=spec.job_name,
        input=str(spec.input.path),
        output=str(out),
        rows=considered,
        done=done,
        to_send=calls,
        input_errors=input_errors,
        prompt_chars=sum(t.chars for t in tallies.values()),
        prompt_tokens=round(sum(t.chars / chars_per_token + t.media_tokens for t in tallies.values())),
        attachments=sum(t.media for t in tallies.values()),
        attachment_tokens=sum(t.media_tokens for t in tallies.values()),
        chars_per_token=chars_per_token,
        prompt_tolerance=PROMPT_TOLERANCE,
        completion_tokens_max=sum(t.completion for t in tallies.values()),
        max_tokens=spec.request.effective_max_tokens,
        max_tokens_field="max_completion_tokens" if spec.is_chat and spec.request.max_tokens is None else "max_tokens",
        n=spec.request.n or 1,
        models=tuple(models),
        unpriced=tuple(sorted(unpriced)),
        unpriced_rows=unpriced_rows,
        # Nothing to send costs nothing: a known $0, not an unknown price.
        cost_low_usd=sum(lows) if lows or not tallies else None,
        cost_high_usd=sum(highs) if highs or not tallies else None,
        prices_source=_prices_label(spec, prices),
        concurrency=limits.concurrency,
        latency_ms=latency_ms,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
        limiter_tokens=limiter_tokens,
        wall_s_concurrency=wall_conc,
        wall_s_requests=wall_req,
        wall_s_tokens=wall_tok,
        wall_s=wall,
        bound_by=bound_by,
        notes=tuple(notes),
    )


# -------------------------------------------------------------------------------------------------- rendering


def _usd(value: float | None) -> str:
    if value is None:
        return "unpriced"
    if 0 < value < 0.00005:
        return "<$0.0001"  # not "$0.0000": a priced call is never free
    return f"${value:.4f}" if value < 100 else f"${value:,.2f}"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value == int(value) else f"{value:,g}"


def _range(low: float | None, high: float | None) -> str:
    return "unpriced" if low is None or high is None else f"{_usd(low)} - {_usd(high)}"


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 3.6e9 else f"{seconds / 3600:.3g} h"


def render_text(plan: Plan) -> str:
    tol = f"{plan.prompt_tolerance:.0%}"
    if plan.rows == 0:
        return "\n".join([f"plan: {plan.job}: {plan.input} -> {plan.output} (no request made)",
                          "  rows           0 rows in the input: nothing to send, nothing to pay",
                          *(f"  note: {n}" for n in plan.notes)])
    lines = [
        f"plan: {plan.job}: {plan.input} -> {plan.output} (no request made)",
        f"  rows           {plan.rows:,} to consider, {plan.done:,} done by an earlier run, {plan.to_send:,} to send"
        + (f", {plan.input_errors:,} become error rows without a call" if plan.input_errors else ""),
        f"  prompt tokens  ~{plan.prompt_tokens:,} ({plan.prompt_tokens_low:,} - {plan.prompt_tokens_high:,}): "
        f"{plan.prompt_chars:,} chars / {plan.chars_per_token:g}, stated error +/-{tol}",
        "                 (measured +12.1% vs the local gateway on samples/reviews.parquet; real tokenizers differ)",
        *([f"                 includes ~{plan.attachment_tokens:,} for {plan.attachments:,} attachment(s): "
           f"{IMAGE_TOKENS:,} an image, bytes / 4 for audio and files (the budget bounds an image at "
           f"{IMAGE_TOKENS_BOUND:,}, audio and files at a token a byte)"] if plan.attachments else []),
        f"  completion     <= {plan.completion_tokens_max:,} tokens ({plan.max_tokens_field} {plan.max_tokens} x n {plan.n} per row)",
    ]
    if plan.to_send == 0:
        lines.append("  cost           $0: nothing to send")
    elif plan.cost_low_usd is None:
        lines.append("  cost           unknown: no model of this job has a price")
    else:
        lines.append(f"  cost           {_range(plan.cost_low_usd, plan.cost_high_usd)}  (low: prompt only; "
                     f"high: prompt + every completion token; prices: {plan.prices_source})")
    if plan.unpriced:
        lines.append(f"  UNPRICED       {', '.join(plan.unpriced)}: no price, cost unknown (not free); "
                     f"{plan.unpriced_rows:,} row(s) left out of the range; add prices: or --prices FILE")
    if len(plan.models) > 1 or plan.unpriced:
        width = max(len(m.model) for m in plan.models)
        for m in plan.models:
            lines.append(f"    {m.model.ljust(width)}  {m.rows:>8,} rows  ~{m.prompt_tokens:>10,} prompt  "
                         f"<= {m.completion_tokens_max:>10,} completion  {_range(m.cost_low_usd, m.cost_high_usd)}")
    pace = [f"concurrency {plan.concurrency} at an assumed {plan.latency_ms:g} ms per call (--latency-ms) "
            f"-> {_duration(plan.wall_s_concurrency)}"]
    if plan.wall_s_requests is not None:
        pace.append(f"requests_per_minute {_num(plan.requests_per_minute)} -> {_duration(plan.wall_s_requests)}")
    if plan.wall_s_tokens is not None:
        pace.append(f"tokens_per_minute {_num(plan.tokens_per_minute)} (charged ~{plan.limiter_tokens:,.0f}) "
                    f"-> {_duration(plan.wall_s_tokens)}")
    lines.append(f"  wall time      ~{_duration(plan.wall_s)}, bound by {plan.bound_by}; no retries counted")
    lines += [f"                 {p}" for p in pace]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def load_price_file(path: str) -> PriceTable:
    """`--prices FILE` for plan and report: checked like a spec's `prices:` (a SpecError, exit 2, naming the file
    and the entry; see PriceTable.from_file)."""
    return PriceTable.from_file(path)


def _chars_per_token(text: str) -> float:
    """--chars-per-token: `_positive`, and within `CHARS_PER_TOKEN_RANGE` (5e-324 would make the estimate infinite)."""
    value = _positive(text)
    if not CHARS_PER_TOKEN_RANGE[0] <= value <= CHARS_PER_TOKEN_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0 ({_CPT_RANGE_TEXT}), got {text!r}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a finite number greater than 0 (nan, inf, 0 and negatives are refused, exit 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (a finite number greater than 0)") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {text!r}")
    return value


def _plan(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    plan = make_plan(
        spec,
        output=Path(args.output) if args.output else None,
        prices=load_price_file(args.prices) if args.prices else None,
        latency_ms=args.latency_ms,
        limit=args.limit,
        fresh=args.fresh,
        chars_per_token=args.chars_per_token,
    )
    print(json.dumps(plan.to_json(), indent=1) if args.format == "json" else render_text(plan))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="rows, tokens, cost range and wall time of a job, without making a request",
        description="Reads the input as the run would (and the state of an interrupted run) and estimates "
        "prompt tokens (chars/4), the completion bound, the cost range and the wall time. Makes no request.",
    )
    p.add_argument("spec", help="job spec (.yaml or .json)")
    p.add_argument("--output", help="the output the run would write (its resume state is read)")
    p.add_argument("--limit", type=int, metavar="N", help="as for run: only the first N rows")
    p.add_argument("--fresh", action="store_true", help="as for run: ignore an earlier partial run")
    p.add_argument("--prices", metavar="FILE", help="price table overriding the shipped one (as for run)")
    p.add_argument("--latency-ms", type=_positive, default=DEFAULT_LATENCY_MS, metavar="MS",
                   help=f"assumed time of one call (default {DEFAULT_LATENCY_MS:g})")
    p.add_argument("--chars-per-token", type=_chars_per_token, default=CHARS_PER_TOKEN, metavar="X",
                   help=f"prompt characters per token, {_CPT_RANGE_TEXT} (default {CHARS_PER_TOKEN:g})")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=_plan)
