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
