"""Finding a served request in the request log (what `POST /v1/feedback` does), against reading the whole log.

    python bench/request_log.py                # 100 segments of 1,000 records
    python bench/request_log.py --records 20000

A log of `--records` requests, each with a ~500-word shared system prompt, in a temporary artifact home; the newest
and the oldest request looked up by id with `find_record` (from the newest segment back, parsing only the lines that
hold the id) and by reading every record (`read_records`), side by side: seconds and peak Python memory of each, and
the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import tracemalloc
import uuid

SYSTEM = " ".join(f"Policy rule {i}: answer politely, precisely and only about the order asked." for i in range(40))


def write_log(records: int) -> tuple[str, str, float]:
    """`records` requests of task `shop` in segments of SEGMENT_RECORDS; returns (the oldest id, the newest id, MB)."""
    from ftpipe.core.server.request_log import SEGMENT_RECORDS, requests_dir

    folder = requests_dir("shop")
    folder.mkdir(parents=True)
    ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(records)]
    for start in range(0, records, SEGMENT_RECORDS):
        with (folder / f"{start:012d}-1-bench.jsonl").open("w") as segment:
            for i in range(start, min(start + SEGMENT_RECORDS, records)):
                asked = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Where is my order {i}?"}]
                segment.write(json.dumps({"request_id": ids[i], "task": "shop", "model": "shop", "version": 1,
                                          "status": 200, "messages": asked, "output": "It ships tomorrow."}) + "\n")
    return ids[0], ids[-1], sum(p.stat().st_size for p in folder.iterdir()) / 1e6


def measured(lookup, request_id: str) -> tuple[float, float]:
    """(seconds, peak MB of Python memory) of `lookup(request_id)`, which must find the request."""
    tracemalloc.start()
    started = time.perf_counter()
    assert lookup(request_id)["request_id"] == request_id
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        os.environ["FTPIPE_HOME"] = home
        from ftpipe.core.server.request_log import find_record, read_records

        oldest, newest, size = write_log(args.records)
        print(f"{args.records:,} logged requests, {size:.0f} MB")
        whole = lambda request_id: next(r for r in read_records("shop") if r["request_id"] == request_id)  # noqa: E731
        for name, request_id in (("newest", newest), ("oldest", oldest)):
            found, found_peak = measured(lambda rid: find_record("shop", rid), request_id)
            read, read_peak = measured(whole, request_id)
            print(f"the {name} request: find_record {found:.3f} s (peak {found_peak:.0f} MB), the whole log read "
                  f"{read:.2f} s (peak {read_peak:.0f} MB): {read / found:.1f}x")


if __name__ == "__main__":
    main()
