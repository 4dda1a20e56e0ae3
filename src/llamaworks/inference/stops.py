"""Stop strings over streamed text: the text a client may see, cut at the first stop string.

Each stop string is matched by a Knuth-Morris-Pratt automaton whose state (the length of
the longest prefix of the stop string that ends the text so far) carries over from one
token to the next. A token then costs time linear in its own new text (amortised), however
long the stop strings and the text already generated, and the text to withhold is read off
the states instead of being searched for: the longest suffix of the text that could still
grow into a stop string is exactly the largest state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence


def first_stop(text: str, stop: Sequence[str]) -> int:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


class StopAutomaton:
    """Knuth-Morris-Pratt matching of one non-empty string over text fed piece by piece."""

    __slots__ = ("target", "border", "state")

    def __init__(self, target: str):
        assert target, "an empty stop string matches everywhere; callers drop them"
        # border[i]: the length of the longest proper prefix of target[: i + 1] that is also
        # its suffix, where the match falls back to when the next character disagrees.
        border = [0] * len(target)
        k = 0
        for i in range(1, len(target)):
            while k and target[i] != target[k]:
                k = border[k - 1]
            if target[i] == target[k]:
                k += 1
            border[i] = k
        self.target, self.border, self.state = target, border, 0

    def feed(self, text: str) -> int:
        """Index in `text` just past the first complete match, or -1; without a match the
        state is then the longest prefix of the target that ends all the text fed so far."""
        target, border, k, n = self.target, self.border, self.state, len(self.target)
        first = target[0]
        j, end = 0, len(text)
        while j < end:
            if k == 0:
                # Nothing is partially matched: jump to the next possible start at C speed,
                # which is the common case (most text contains no stop string's first character).
                j = text.find(first, j)
                if j < 0:
                    break
                k, j = 1, j + 1
            else:
                c = text[j]
                while k and c != target[k]:
                    k = border[k - 1]
                if c == target[k]:
                    k += 1
                j += 1
            if k == n:
                self.state = k
                return j
        self.state = k
        return -1


class StopMatcher:
    """Incremental text of one sequence, cut at the first stop string.

    Text that could still be the start of a stop string is held back, so a streaming
    client never sees part of a stop string it should not see. When several stop strings
    complete within the same new text, the one that starts first wins.
    """

    def __init__(self, tokenizer, prefix_ids: list[int], stop: Sequence[str]):
        self.decoder = tokenizer.stream_decoder(prefix_ids)
        self.stop = [s for s in stop if s]
        self._automata = [StopAutomaton(s) for s in self.stop]
        self._emitted: list[str] = []  # final text, in the pieces it was released in
        # Withheld text, kept as the pieces it was decoded in so that releasing its head
        # costs the released length, not the length held (which can approach the longest
        # stop string's).
        self._held: deque[str] = deque()
        self._held_len = 0
        self.stopped = False

    @property
    def text(self) -> str:
        """The final text released so far."""
        return "".join(self._emitted)

    @property
    def pending(self) -> str:
        """Decoded text withheld because it could still begin a stop string."""
        return "".join(self._held)

    def push(self, token: int) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        return self._take(self.decoder.push(token), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._take(self.decoder.flush(), final=True)[0]

    def _take(self, new: str, final: bool) -> tuple[str, bool]:
        before = self._held_len
        cut = -1
        for a in self._automata:
            end = a.feed(new)
            if end >= 0:
                # The partial match the automaton carried in was at most `before` long (the
                # held text is the longest such prefix), so the match starts in the held text
                # or the new text, never in text already released.
                start = before + end - len(a.target)
                assert start >= 0, (start, before, end)
                cut = start if cut < 0 else min(cut, start)
        if new:
            self._held.append(new)
            self._held_len += len(new)
        if cut >= 0:
            delta = self.pending[:cut]
            self._held.clear()
            self._held_len = 0
            self.stopped = True
        elif final or not self._automata:
            delta = self._release(self._held_len)
        else:
            hold = max(a.state for a in self._automata)
            delta = self._release(self._held_len - hold)
        if delta:
            self._emitted.append(delta)
        return delta, self.stopped

    def _release(self, n: int) -> str:
        """Remove and return the first n characters of the held text."""
        assert 0 <= n <= self._held_len, (n, self._held_len)
        out = []
        left = n
        while left:
            head = self._held[0]
            if len(head) <= left:
                out.append(self._held.popleft())
                left -= len(head)
            else:
                out.append(head[:left])
                self._held[0] = head[left:]
                left = 0
        self._held_len -= n
        return "".join(out)
