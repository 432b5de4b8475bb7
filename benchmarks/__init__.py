"""Benchmarks: method comparison, scoring options, loader rates, throughput, bookkeeping."""


def markdown_table(rows: list[dict], cols: list[str], float_fmt: str = ".3f") -> str:
    """``rows`` as a markdown table of ``cols``; floats formatted with ``float_fmt``."""

    def fmt(v):
        return format(v, float_fmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
