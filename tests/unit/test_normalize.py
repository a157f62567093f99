"""Text normalisers against Unicode's own definitions."""

import unicodedata

import pytest

from megatron_ext.tokenizer.normalize import build_normalizer


def test_arabic_removes_marks_tatweel_and_letter_mark_and_unifies_alef():
    normalize = build_normalizer(["arabic"])
    text = "إِنَّمَا الْأَعْمَالُ بِالنِّيَّاتِ آمـــن ٱلله\u061cأ"
    out = normalize(text)
    assert not any(unicodedata.category(c) == "Mn" for c in out)
    assert "\u0640" not in out and "\u061c" not in out
    assert not set(out) & set("أإآٱ")
    assert out == "انما الاعمال بالنيات امن الله" + "ا"


def test_arabic_leaves_other_scripts_alone():
    text = "Hello, мир! 你好 café 123 ١٢٣"
    assert build_normalizer(["arabic"])(text) == text


def test_nfkc_matches_unicodedata_and_composes_in_order():
    text = "ﻻ ﷲ ｆｕｌｌ ﬁ"
    assert build_normalizer(["nfkc"])(text) == unicodedata.normalize("NFKC", text)
    both = build_normalizer(["nfkc", "arabic"])
    # NFKC turns the presentation-form lam-alef into letters the Arabic step then sees.
    assert both("ﻷ") == "لا"


def test_no_normalizer_and_unknown_names():
    assert build_normalizer([]) is None
    with pytest.raises(ValueError, match="unknown normalisation lowercase"):
        build_normalizer(["lowercase"])


def test_arabic_block_code_point_by_code_point():
    """Every character of the Arabic block: deleted exactly when Unicode calls it a combining
    mark (Mn) in the documented ranges, or it is tatweel or the letter mark; the letters and
    symbols among the Quranic signs (small waw and yeh, end of ayah, sajdah) stay."""
    marks = {*range(0x0610, 0x061B), *range(0x064B, 0x0660), 0x0670, *range(0x06D6, 0x06EE)}
    alef = {"\u0622", "\u0623", "\u0625", "\u0671"}
    normalize = build_normalizer(["arabic"])
    for code in range(0x0600, 0x0700):
        char = chr(code)
        if char in alef:
            expected = "\u0627"
        elif code in (0x0640, 0x061C) or (code in marks and unicodedata.category(char) == "Mn"):
            expected = ""
        else:
            expected = char
        assert normalize(f"ب{char}ب") == f"ب{expected}ب", f"U+{code:04X}"
