"""Offline sentence splitting: Arabic and Chinese ends, newline keeping, no download ever."""

import nltk
import pytest

from megatron_ext.data.sentences import (
    SentenceSplitter,
    check_language,
    load_punkt_params,
    save_punkt_params,
    train_punkt,
)
from tests.helpers import read_texts


@pytest.fixture(autouse=True)
def no_nltk_data(monkeypatch):
    """Megatron-LM's splitter downloads punkt and hangs offline; ours must never try."""

    def refuse(*args, **kwargs):
        raise AssertionError("sentence splitting must not download or load NLTK data")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "load", refuse)


def test_arabic_question_mark_and_urdu_full_stop():
    split = SentenceSplitter("ar", keep_newlines=False, params=None).split
    assert split("هل ذهبت إلى السوق؟ نعم ذهبت. ثم عدت۔ وماذا بعد!") == [
        "هل ذهبت إلى السوق؟",
        "نعم ذهبت.",
        "ثم عدت۔",
        "وماذا بعد!",
    ]
    # English rules alone would not split at the Arabic question mark.
    assert len(SentenceSplitter("en", False, None).split("هل ذهبت؟ نعم ذهبت.")) == 1


def test_iso_639_3_codes_get_their_languages_rules_and_unknown_names_are_refused():
    text = "هل ذهبت؟ نعم ذهبت."
    for lang in ("arb", "arz", "ckb"):  # Modern Standard, Egyptian Arabic; Sorani Kurdish
        assert SentenceSplitter(lang, False, None).split(text) == ["هل ذهبت؟", "نعم ذهبت."]
    for lang in ("ar", "Arabic", "arb", "sw", "french"):
        check_language(lang)
    for lang in ("arabc", "ar_web", "", "en-US"):
        with pytest.raises(ValueError, match="is not a language"):
            check_language(lang)


def test_chinese_ends_without_spaces_and_closing_quotes():
    split = SentenceSplitter("zh", keep_newlines=False, params=None).split
    text = "床前明月光。疑是地上霜！「舉頭望明月？」低頭思故鄉"
    assert split(text) == ["床前明月光。", "疑是地上霜！", "「舉頭望明月？」", "低頭思故鄉"]
    assert SentenceSplitter("chinese", False, None).split(text) == split(text)


@pytest.mark.parametrize("lang", ["en", "ar", "zh"])
def test_keep_newlines_loses_no_character(corpora, lang):
    splitter = SentenceSplitter(lang, keep_newlines=True, params=None)
    texts = read_texts(corpora / lang / "train.jsonl")[:40]
    count = 0
    for text in texts:
        sentences = splitter.split(text)
        assert "".join(sentences) == text
        count += len(sentences)
    assert count > 2 * len(texts)


def test_training_learns_abbreviations_and_round_trips(tmp_path, corpora):
    texts = read_texts(corpora / "en" / "train.jsonl")[:200]
    texts.append("Dr. Smith met Mr. Jones. They spoke. " * 20)
    params = train_punkt(texts, "en")
    assert {"dr", "mr"} <= params.abbrev_types
    trained = SentenceSplitter("en", False, params)
    assert trained.split("I met Mr. Jones today. He was well.") == [
        "I met Mr. Jones today.",
        "He was well.",
    ]
    path = tmp_path / "punkt.json"
    save_punkt_params(params, path)
    loaded = load_punkt_params(path)
    assert loaded.abbrev_types == params.abbrev_types
    assert loaded.sent_starters == params.sent_starters
    assert dict(loaded.ortho_context) == dict(params.ortho_context)


def test_missing_params_fail_fast(tmp_path):
    with pytest.raises(ValueError, match="cannot read Punkt parameters"):
        load_punkt_params(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("lang", "text"),
    [
        ("hi", "मैं घर गया। फिर लौटा।"),
        ("ur", "میں گھر گیا۔ پھر واپس آیا۔"),
        ("fa", "کجا رفتی؟ به خانه رفتم."),
        ("ps", "ته چیرته ځې؟ کور ته ځم."),
        ("am", "ሰላም ነው። ደህና ነህ፧"),
        ("hy", "Բարեւ։ Ինչպես ես։"),
        ("my", "မင်္ဂလာပါ။ နေကောင်းလား။"),
    ],
)
def test_each_scripts_own_sentence_end(lang, text):
    """Written by hand: two sentences that Latin rules alone read as one."""
    assert len(SentenceSplitter(lang, False, None).split(text)) == 2
    assert len(SentenceSplitter("en", False, None).split(text)) == 1


def test_chinese_end_runs_half_width_marks_and_closing_brackets():
    split = SentenceSplitter("zh", keep_newlines=False, params=None).split
    assert split("真的吗？！是的。") == ["真的吗？！", "是的。"]
    assert split("好!再见?") == ["好!", "再见?"]
    assert split("（好。）下雨了。") == ["（好。）", "下雨了。"]


@pytest.mark.parametrize(
    ("lang", "text"),
    [("en", " \nHello there. Bye.\n"), ("ar", " \nمرحبا. وداعا.\n"), ("zh", " \n你好。再见。\n")],
)
def test_keep_newlines_keeps_leading_and_trailing_whitespace(lang, text):
    sentences = SentenceSplitter(lang, keep_newlines=True, params=None).split(text)
    assert "".join(sentences) == text and len(sentences) == 2
