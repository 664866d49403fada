"""Stop sequences and UTF-8 boundaries, with the real model's tokenizer."""

from oracle.engine.detokenizer import TextAssembler


def stream(tokenizer, text, stop):
    a = TextAssembler(tokenizer, stop)
    pieces = []
    for t in tokenizer.encode(text):
        pieces.append(a.push(t))
        if a.stopped:
            break
    pieces.append(a.flush())
    return pieces, a


def test_plain_text_round_trips(tokenizer):
    text = "Hello, world! Ünïcödé and emoji 🚀 work; 12345."
    pieces, a = stream(tokenizer, text, [])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_across_token_boundaries_never_leaks(tokenizer):
    text = "The answer is forty-two. Then more text follows."
    pieces, a = stream(tokenizer, text, ["forty-two"])
    assert a.stopped
    assert "".join(pieces) == "The answer is "
    assert not any("forty" in p for p in pieces)


def test_partial_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    pieces, a = stream(tokenizer, "one two three", ["two thousand"])
    assert not a.stopped
    assert "".join(pieces) == "one two three"


def test_earliest_of_several_stops_wins(tokenizer):
    pieces, a = stream(tokenizer, "alpha beta gamma", ["gamma", "beta"])
    assert "".join(pieces) == "alpha "
