"""What the engine hands back: a finished request's output, and each step's deltas for streaming.

Text comes from each sequence's incremental detokenizer (generation/detokenizer.py), so streamed
deltas always concatenate to the final output's text.
"""

from __future__ import annotations

from collections.abc import Iterable

from .sequence import CompletionDelta, CompletionOutput, Request, RequestDelta, RequestOutput, Sequence, Status


def request_output(request: Request) -> RequestOutput:
    """A finished request's completions in index order (none if it failed)."""
    outs = [] if request.error is not None else [
        completion(s) for s in sorted(request.sequences, key=lambda s: s.index)]
    return RequestOutput(request.request_id, request.prompt_ids, outs, request.metrics, request.error)


def completion(seq: Sequence) -> CompletionOutput:
    text = seq.detokenizer.output_text if seq.detokenizer is not None else None  # no tokenizer: ids only
    return CompletionOutput(seq.index, seq.output_ids, text, seq.finish_reason)


def request_deltas(requests: Iterable[Request]) -> list[RequestDelta]:
    """What each request gained since the last call; a finished request reports once more, then never."""
    deltas = []
    for request in requests:
        if request.reported:
            continue
        outputs = [d for d in (completion_delta(s) for s in request.sequences) if d is not None]
        if outputs or request.finished:
            request.reported = request.finished
            deltas.append(RequestDelta(request.request_id, outputs, request.finished, request.metrics,
                                       request.error))
    return deltas


def completion_delta(seq: Sequence) -> CompletionDelta | None:
    """New token ids and text of one completion (text held back while it may start a stop string)."""
    finished = seq.status is Status.FINISHED
    new = seq.output_ids[seq.num_reported:]
    text = seq.detokenizer.take(finished) if seq.detokenizer is not None else None
    if not new and not text and (not finished or seq.reported_finish):
        return None
    seq.num_reported = seq.num_output
    seq.reported_finish = finished
    return CompletionDelta(seq.index, new, text, seq.finish_reason if finished else None)


def finish_metrics(request: Request, now: float) -> None:
    """Stamp a request's finish: its time, output tokens and completions."""
    m = request.metrics
    m.finish_time = now
    m.num_output_tokens = sum(s.num_output for s in request.sequences)
    m.num_completions = len(request.sequences)
