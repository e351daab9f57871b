"""Turn generated token ids into streamed text deltas, honouring stop strings.

Text is always re-decoded from all generated ids (tokenizers merge bytes across tokens), and a
delta is released only when it cannot change any more: an incomplete UTF-8 character (decoded as
U+FFFD at the end) and any tail that could still grow into a stop string are held back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(stop)
        self._token_ids: list[int] = []
        self.text = ""  # text released so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return newly released text ('' if none). Sets `stopped` on a stop string."""
        self._token_ids.append(token_id)
        full = self._decode(self._token_ids)
        for stop in self._stop:
            # search from where a stop string could begin that was not visible before
            at = full.find(stop, max(0, len(self.text) - len(stop) + 1))
            if at >= 0:
                self.stopped = True
                return self._release(full[:at])
        end = len(full)
        if full.endswith("\ufffd"):
            end -= 1
        end -= self._stop_prefix_length(full[:end])
        return self._release(full[: max(end, len(self.text))])

    def finish(self) -> str:
        """Release everything still held back (the stream ended without a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._token_ids))

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, text: str) -> str:
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += delta
        return delta
