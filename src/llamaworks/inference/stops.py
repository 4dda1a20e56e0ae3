"""Stop strings over streamed text: the text a client may see, cut at the first stop string."""

from __future__ import annotations

from collections.abc import Sequence


def first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1



class StopMatcher:
    """Incremental text of one sequence, cut at the first stop string.

    Text that could still be the start of a stop string is held back, so a streaming
    client never sees part of a stop string it should not see.
    """

    def __init__(self, tokenizer, prefix_ids: list[int], stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder(prefix_ids)
        self.stop = [s for s in stop if s]
        self.text = ""  # final text emitted so far
        self.pending = ""  # decoded but withheld
        self.stopped = False

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.pending += self.decoder.push(token)
        return self._emit(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        cut = first_stop(self.pending, self.stop)
        if cut >= 0:
            delta, self.pending, self.stopped = self.pending[:cut], "", True
        elif final or not self.stop:
            delta, self.pending = self.pending, ""
        else:
            # Hold back the longest suffix that is a proper prefix of some stop string.
            hold = max((k for s in self.stop for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
            delta = self.pending[: len(self.pending) - hold]
            self.pending = self.pending[len(delta):]
        self.text += delta
        return delta, self.stopped
