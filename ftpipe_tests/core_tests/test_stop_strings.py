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



def test_an_answer_the_token_budget_cuts_inside_a_character_ends_before_it_streamed_or_not() -> None:
    """Byte-level tokens split a Japanese character or an emoji into several tokens: the character the budget cut
    short is left out, not sent as U+FFFD."""
    import asyncio
    from types import SimpleNamespace

    from ftpipe.core.server.app import Completion
    from ftpipe_tests.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    whole = tokenizer.encode("R2の保証期間😊", add_special_tokens=False)
    cut = next(n for n in range(len(whole), 0, -1) if tokenizer.decode(whole[:n]).endswith("\ufffd"))

    async def answer():
        completion = Completion(None, SimpleNamespace(tokenizer=tokenizer), SimpleNamespace(stop=[]), [])
        for token in [*whole[:cut], None]:
            completion.queue.put_nowait(token)
        return [piece async for piece in completion.pieces()], completion.text

    pieces, text = asyncio.run(answer())
    assert "".join(pieces) == text and "\ufffd" not in text and "R2の保証期間😊".startswith(text) and text
