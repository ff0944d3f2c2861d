"""When a completion stops: its stop tokens, the model's EOS, stop strings, its length, the model's context.

The decision is made before anything changes, so an error in it leaves the sequence as it was.  A stop
token's text is left out of the output, as is a stop string's (vLLM does the same).
"""

from __future__ import annotations

from .sequence import Sequence


class StopRules:
    def __init__(self, scheduler, eos_ids: frozenset[int], max_positions: int):
        self.scheduler, self.eos_ids, self.max_positions = scheduler, eos_ids, max_positions

    def emit(self, seq: Sequence, token: int) -> None:
        """Append ``token`` to ``seq``; finish ``seq`` if it must stop."""
        params = seq.request.params
        reason, piece = None, None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_ids):
            reason = "stop"
        elif seq.detokenizer is not None:
            piece = seq.detokenizer.preview(token)
            reason = "stop" if piece.stop_at is not None else None
        if reason is None and (seq.num_output + 1 >= params.max_new_tokens
                               or len(seq.tokens) + 1 >= self.max_positions):
            reason = "length"
        seq.append(token)
        if piece is not None:
            seq.detokenizer.commit(token, piece)
        if reason:
            if seq.detokenizer is not None:
                seq.detokenizer.flush()
            self.scheduler.finish(seq, reason)
