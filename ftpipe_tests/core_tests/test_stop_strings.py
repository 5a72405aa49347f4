"""The served API's `stop` strings: where an answer ends, and what a stream holds back until the next tokens tell."""

from ftpipe.core.server.stop_strings import held_back, stop_position


def test_the_answer_ends_before_the_earliest_stop_string():
    assert stop_position("Billing.\n\nUser: and then", ["User:", "\n\n"]) == 8
    assert stop_position("Billing", ["User:"]) is None
    assert stop_position("anything", []) is None


def test_a_stream_holds_back_only_an_end_that_may_begin_a_stop_string():
    stops = ["\n\nUser:", "END"]
    assert held_back("Billing.\n\nUs", stops) == 4
    assert held_back("Billing. E", stops) == 1
    assert held_back("Billing.", stops) == 0, "nothing that could begin one"
    assert held_back("Billing.\n", stops) == 1
    assert held_back("U", ["User:"]) == 1 and held_back("", ["User:"]) == 0


def test_a_cancelled_answer_ends_its_row_at_the_next_token_and_the_others_go_on():
    import torch

    from ftpipe.core.server.engine import Job, _Rows

    emitted: dict[str, list] = {"kept": [], "cancelled": []}
    jobs = [Job(None, None, [1], 10, 0.0, 1.0, frozenset({0}), 0, emit=emitted[name].append, fail=print)
            for name in emitted]
    rows = _Rows(jobs)
    rows.put(torch.tensor([[1], [1]]))  # the prompts
    rows.put(torch.tensor([5, 6]))
    jobs[1].cancelled.set()  # a stop string reached, or the client gone
    rows.put(torch.tensor([7, 8]))
    assert emitted == {"kept": [5, 7], "cancelled": [6, None]}
    assert rows(torch.zeros(2, 1), None).tolist() == [False, True], "the batch stops decoding that row"
