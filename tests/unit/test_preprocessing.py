"""mlserve.preprocessing: clean_text / clean_texts under each CleaningConfig option."""

from __future__ import annotations

import pydantic
import pytest

from mlserve.preprocessing import CleaningConfig, clean_text, clean_texts

DEFAULT = CleaningConfig()
ALL_OFF = CleaningConfig(
    unescape_html=False,
    unicode_nfkc=False,
    lowercase=False,
    strip_special=False,
    collapse_whitespace=False,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("I&#039;ve been taking it", "i've been taking it"),
        ("I&amp;#039;ve been taking it", "i've been taking it"),  # double-escaped (drugsCom)
        ("Tom &amp; Jerry", "tom jerry"),  # & unescaped, then stripped as special
        ("&quot;Great&quot; drug", "great drug"),
        ("5 &lt; 6", "5 6"),
        ("caf&eacute;", "café"),
    ],
)
def test_html_entities(raw: str, expected: str) -> None:
    assert clean_text(raw, DEFAULT) == expected


def test_html_entities_kept_when_unescape_off() -> None:
    cfg = CleaningConfig(unescape_html=False, strip_special=False)
    assert clean_text("I&#039;ve", cfg) == "i&#039;ve"
    # With stripping on, the raw entity's '&', '#' and ';' become spaces instead.
    assert clean_text("I&#039;ve", CleaningConfig(unescape_html=False)) == "i 039 ve"


def test_lowercase() -> None:
    assert clean_text("GREAT Film, ÉTÉ", DEFAULT) == "great film, été"
    assert clean_text("GREAT Film, ÉTÉ", CleaningConfig(lowercase=False)) == "GREAT Film, ÉTÉ"


def test_special_characters_replaced_by_spaces_and_basic_punctuation_kept() -> None:
    raw = "wow!!! is it good? yes, very. don't-stop <b>#1</b> @home $5 50% (ok) 😀"
    assert clean_text(raw, DEFAULT) == "wow!!! is it good? yes, very. don't-stop b 1 b home 5 50 ok"


def test_special_characters_kept_when_strip_off() -> None:
    cfg = CleaningConfig(strip_special=False)
    assert clean_text("a@b #c 😀", cfg) == "a@b #c 😀"


def test_letters_in_other_scripts_survive_stripping() -> None:
    assert clean_text("Привет мир 你好 ñandú", DEFAULT) == "привет мир 你好 ñandú"


def test_whitespace_collapsed_and_trimmed() -> None:
    raw = "  lots\tof \n\n  space\u00a0here \r\n"
    assert clean_text(raw, DEFAULT) == "lots of space here"


def test_whitespace_kept_when_collapse_off() -> None:
    cfg = CleaningConfig(collapse_whitespace=False)
    assert clean_text("  a \t b\n", cfg) == "  a \t b\n"
    # Stripping replaces one character with one space; nothing then collapses them.
    assert clean_text("a@@b", cfg) == "a  b"


def test_nfkc_normalisation() -> None:
    raw = "ＦＵＬＬ ｗｉｄｔｈ ﬁne ①"
    assert clean_text(raw, DEFAULT) == "full width fine 1"
    no_nfkc = CleaningConfig(unicode_nfkc=False, strip_special=False)
    assert clean_text(raw, no_nfkc) == "ｆｕｌｌ ｗｉｄｔｈ ﬁne ①"


def test_all_options_off_is_identity() -> None:
    raw = "  I&amp;#039;VE <b>Ｗｏｗ</b>\t\n 😀 "
    assert clean_text(raw, ALL_OFF) == raw


def test_each_option_off_individually_changes_only_its_step() -> None:
    raw = "  I&amp;#039;ve   GOT ｗｉｄｅ @@ text  "
    assert clean_text(raw, DEFAULT) == "i've got wide text"
    assert clean_text(raw, CleaningConfig(unescape_html=False)) == "i amp 039 ve got wide text"
    assert clean_text(raw, CleaningConfig(unicode_nfkc=False)) == "i've got ｗｉｄｅ text"
    assert clean_text(raw, CleaningConfig(lowercase=False)) == "I've GOT wide text"
    assert clean_text(raw, CleaningConfig(strip_special=False)) == "i've got wide @@ text"
    assert clean_text(raw, CleaningConfig(collapse_whitespace=False)) == (
        "  i've   got wide    text  "
    )


@pytest.mark.parametrize(
    "raw",
    [
        "I&amp;#039;ve &amp;amp;lt; TRIPLE",
        "  Hello,   WORLD!!  😀  ",
        "ＦＵＬＬ ﬁ ½ ① İstanbul STRASSE ẞ",
        "a\u0301 e\u0307 combining",
        "<p>tags &nbsp; and\tTabs</p>",
        "",
        "   ",
    ],
)
def test_cleaning_twice_equals_cleaning_once(raw: str) -> None:
    once = clean_text(raw, DEFAULT)
    assert clean_text(once, DEFAULT) == once


def test_clean_texts_applies_clean_text_to_each() -> None:
    texts = ["A&amp;#039;B", "  x  y ", ""]
    assert clean_texts(texts, DEFAULT) == ["a'b", "x y", ""]
    assert clean_texts([], DEFAULT) == []


def test_config_is_frozen_and_strict() -> None:
    with pytest.raises(pydantic.ValidationError):
        CleaningConfig(lowercase=False, unknown_option=True)
    with pytest.raises(pydantic.ValidationError):
        DEFAULT.lowercase = False  # type: ignore[misc]
    # Round-trips through its stored (JSON) form, as saved in model metadata.
    cfg = CleaningConfig(strip_special=False, lowercase=False)
    assert CleaningConfig.model_validate_json(cfg.model_dump_json()) == cfg
