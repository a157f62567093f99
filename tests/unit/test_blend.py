"""Blend manifests: what a user writes is read as meant, and mistakes are named."""

import pytest

from megatron_ext.data.blend import ManifestError, load_manifest


def _manifest(tmp_path, text: str):
    (tmp_path / "en.jsonl").write_text('{"text": "a"}\n')
    path = tmp_path / "blend.yaml"
    path.write_text(text)
    return path


def test_a_manifest_is_read_as_written(tmp_path):
    path = _manifest(
        tmp_path,
        "train_tokens: 2e9\n"  # YAML reads this as a string, not a number
        "output_prefix: data/mix\n"
        "languages:\n"
        "  en: {inputs: en.jsonl, share: 1, normalize: nfkc}\n"
        "  msa: {inputs: [en.jsonl], share: 3, lang: ar, normalize: [nfkc, arabic]}\n",
    )
    manifest = load_manifest(path)
    assert manifest.train_tokens == 2_000_000_000
    assert manifest.output_prefix == "data/mix"
    en, msa = manifest.languages
    assert (en.name, en.share, en.normalize) == ("en", 1, ["nfkc"])
    assert en.inputs == [str(tmp_path / "en.jsonl")]  # relative to the manifest
    assert (msa.lang, msa.share, msa.normalize) == ("ar", 3, ["nfkc", "arabic"])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("languages:\n  en: {inputs: en.jsonl, share: 0}\n", "'share' must be a positive"),
        ("languages:\n  en: {inputs: en.jsonl, share: -1}\n", "'share' must be a positive"),
        ("languages:\n  en: {inputs: en.jsonl, share: yes}\n", "'share' must be a positive"),
        ("langauges:\n  en: {inputs: en.jsonl, share: 1}\n", "'languages' mapping"),
        (
            "languages:\n  en: {inputs: en.jsonl, share: 1}\ntrain_token: 5\n",
            "unknown keys train_token",
        ),
        ("languages:\n  en: {input: en.jsonl, share: 1}\n", "unknown keys input"),
        ("languages:\n  en: {share: 1}\n", "'inputs' must be a path"),
        ("train_tokens: lots\nlanguages:\n  en: {inputs: en.jsonl, share: 1}\n", "a number"),
        # The second en was preprocessed as en; the first vanished.
        (
            "languages:\n  en: {inputs: en.jsonl, share: 1}\n  ar: {inputs: en.jsonl, share: 3}\n"
            "  en: {inputs: en.jsonl, share: 2}\n",
            r"blend\.yaml: line 4: 'en' is given twice",
        ),
        ("languages: [en\n", r"blend\.yaml: line 2: expected ',' or ']'"),
    ],
)
def test_manifest_mistakes_are_named(tmp_path, text, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(_manifest(tmp_path, text))
