"""The one exception type a user ever sees.

A SynthError carries a message that is already a complete sentence for the user: what was wrong,
where (file, stage, key, row), and what to do. The CLI prints it on one line and exits with code 2.
Anything else that escapes is a bug in synth, and is shown as a traceback.
"""


class SynthError(Exception):
    """A user's mistake or an environmental condition the user must act on (exit code 2)."""


class StoreLocked(SynthError):
    """Another process held the store's write lock for longer than the lock timeout."""


class MissingValue(SynthError):
    """A template variable whose value is null (None, NaN) or absent in one input row. Not a mistake in
    the pipeline: the generate stage records that row as an error row (cause `missing_value`) and goes
    on; a template that declares a default (`{{ x | default('') }}`) renders it."""

    def __init__(self, message: str, column: str | None):
        super().__init__(message)
        self.column = column


def one_line(value: object) -> str:
    """`str(value)` with each run of whitespace (newlines included) as one space: an exception's text
    made fit for a one-line error message or a stored error column."""
    return " ".join(str(value).split())


def decode_utf8(raw: bytes, path: object, line: int | None = None) -> str:
    """`raw` as UTF-8 text, or a SynthError naming the file, the line (`line`, else the one holding the
    first bad byte) and that byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line if line is not None else raw[:exc.start].count(b"\n") + 1
        raise SynthError(f"{path}:{at}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
