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

