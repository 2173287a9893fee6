import pytest

from hastore.config import parse_duration
from hastore.config.durations import format_duration


@pytest.mark.parametrize(
    "text, ms",
    [
        ("200ms", 200), ("1s", 1000), ("1.5", 1500), ("2", 2000), ("0.1", 100), (".5", 500),
        ("1000ms", 1000), ("1000000us", 1000), ("499us", 0), ("501us", 1), ("500 ms", 500),
        ("2MS", 2), ("2min", 120000), ("3sec", 3000), ("10msec", 10), (" 30 ", 30000), ("0.0015", 2),
    ],
)
def test_parse_duration(text, ms):
    assert parse_duration(text) == ms


@pytest.mark.parametrize("text", ["", "ms", "-1", "1h", "abc", "1.2.3", "1 s s", "8d", "1e3", "9999999"])
def test_parse_duration_rejects_with_a_sentence(text):
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


def test_parse_duration_rejects_non_strings():
    with pytest.raises(ValueError, match="as a string"):
        parse_duration(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("ms, text", [(1000, "1s"), (1500, "1500ms"), (0, "0s"), (120000, "120s")])
def test_format_duration_round_trips(ms, text):
    assert format_duration(ms) == text
    assert parse_duration(text) == ms
