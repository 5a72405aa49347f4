"""The serving request log: segments finished by count, by age and at close, never overwritten, a crashed writer's
torn last line left out, content kept as hashes for a task that asks for it, and a record found by its id without
reading the whole log."""

import os
import time

from ftpipe.core.server.request_log import RequestLog, find_record, read_records, redacted, segments


def entry(number: int, task: str = "bank") -> dict:
    return {"task": task, "request_id": f"r{number}", "messages": [{"role": "user", "content": f"hi {number}"}],
            "output": f"answer {number}", "status": 200}


def test_segments_finish_by_count_age_and_close_and_two_logs_never_collide():
    log = RequestLog(segment_records=3)
    for number in range(7):
        log.append(entry(number))
    assert [p.name.endswith(".open") for p in segments("bank")] == [False, False, True]
    log.rotate(now=time.time() + 3600)
    assert not any(p.name.endswith(".open") for p in segments("bank"))
    other = RequestLog()  # a second writer in the same second
    other.append(entry(7))
    other.close()
    assert [r["request_id"] for r in read_records("bank")] == [f"r{n}" for n in range(8)]


def test_a_torn_last_line_is_left_out_and_content_can_be_kept_as_hashes():
    log = RequestLog(without_content={"private"})
    log.append(entry(1))
    log.append(entry(2, task="private"))
    [open_segment] = segments("bank")
    with open_segment.open("a") as handle:  # what a writer killed mid-line leaves
        handle.write('{"task": "bank", "request_id": "r2", "mess')
    assert [r["request_id"] for r in read_records("bank")] == ["r1"]
    [hidden] = read_records("private")
    assert hidden["output"] == redacted("answer 2") and hidden["messages"]["chars"] > 0
    assert "hi 2" not in segments("private")[0].read_text()


def test_a_record_is_found_by_its_id_newest_first_and_segments_older_than_a_window_are_not_read():
    log = RequestLog(segment_records=3)
    for number in range(12):
        log.append(entry(number))
    log.append({**entry(12), "messages": [{"role": "user", "content": "about r4: it was wrong"}]})
    log.close()
    assert find_record("bank", "r1")["output"] == "answer 1", "not r10 or r11, whose ids hold its id"
    assert find_record("bank", "r4")["output"] == "answer 4", "not the later request whose message names it"
    assert find_record("bank", "r99") is None and find_record("other", "r1") is None
    oldest = segments("bank")[0]
    os.utime(oldest, (time.time() - 7200,) * 2)  # last written two hours ago
    assert [r["request_id"] for r in read_records("bank", since=time.time() - 3600)] == [f"r{n}" for n in range(3, 13)]
    assert len(read_records("bank")) == 13


def test_a_stream_the_client_closes_early_is_logged_as_closed_by_the_client_and_its_decoding_ends() -> None:
    import asyncio

    from ftpipe.core.server import app

    class Answering:  # the part of a Completion the stream uses: chunks of an answer of three pieces
        recorded: list[tuple] = []
        cancelled = False

        def cancel(self):
            Answering.cancelled = True

        def chunk(self, delta, finish_reason=None):
            return f"data: {delta}\n\n"

        async def pieces(self):
            for piece in ("a", "b", "c"):
                yield piece

        def record(self, status, error=None):
            self.recorded.append((status, error))

    async def read_two_chunks_and_close():
        stream = app._stream(Answering())
        [await anext(stream) for _ in range(2)]
        await stream.aclose()

    asyncio.run(read_two_chunks_and_close())
    assert Answering.recorded == [(499, "the client closed the stream before the answer ended")]
    assert Answering.cancelled, "its decoding ends too"
