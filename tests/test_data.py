"""Text sources and window sampling."""

import json

import pytest
import torch

from conftest import NEWS, latin1_news, synthetic_text, tiny_tokenizer
from losa_cli.core.config import CalibrationConfig
from losa_cli.core.data import (
    bos_token_to_prepend,
    consecutive_windows,
    document_windows,
    load_documents,
    read_documents,
    sample_windows,
)
from losa_cli.core.errors import ConfigError, DataError, render
from losa_cli.runtime import EvalConfig

NEWS_DOCUMENTS = [doc.strip() for doc in NEWS.split("\n\n")]


def test_txt_blank_line_documents(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one doc\nstill one\n\nsecond doc\n\n\nthird\n")
    assert read_documents(str(path)) == ["one doc\nstill one", "second doc", "third"]


def test_txt_one_document_per_line(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first\nsecond\nthird\n")
    assert read_documents(str(path)) == ["first", "second", "third"]


def test_jsonl_text_and_instruction_records(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"text": "plain"}) + "\n" + json.dumps({"instruction": "Add.", "input": "1 1", "output": "2"}) + "\n"
    )
    docs = read_documents(str(path))
    assert docs[0] == "plain"
    assert "### Instruction:\nAdd." in docs[1] and "### Input:\n1 1" in docs[1] and docs[1].endswith("### Response:\n2")


def test_jsonl_malformed_line_reports_line_number(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"a.jsonl:2: not valid JSON"):
        read_documents(str(path))


def test_saved_dataset_folder(tmp_path):
    from datasets import Dataset

    Dataset.from_dict({"text": ["alpha beta", "", "gamma"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_documents(str(tmp_path / "ds")) == ["alpha beta", "gamma"]


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_documents(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        read_documents(str(tmp_path / "empty.txt"))


def test_latin1_file_in_auto_mode_keeps_the_pound_sign_and_names_the_encoding(tmp_path):
    path = latin1_news(tmp_path / "news.txt")
    warnings: list[str] = []
    documents = load_documents(str(path), "auto", "calibration file", warnings)
    assert documents.texts == NEWS_DOCUMENTS and "£4.80" in documents.texts[0]
    assert documents.encoding == "cp1252"  # the pound sign is 0xA3 in Latin-1 and cp1252 alike
    assert warnings == [
        f"calibration file {path} is not UTF-8; read it as cp1252 (detected); pass --encoding to choose"
    ]


@pytest.mark.parametrize("encoding", ["latin-1", "cp1252"])
def test_explicit_encoding_reads_the_file_without_a_warning(tmp_path, encoding):
    path = tmp_path / "news.jsonl"
    path.write_bytes(
        b"".join(json.dumps({"text": doc}, ensure_ascii=False).encode("latin-1") + b"\n" for doc in NEWS_DOCUMENTS)
    )
    warnings: list[str] = []
    documents = load_documents(str(path), encoding, "data file", warnings)
    assert documents.texts == NEWS_DOCUMENTS and warnings == []
    assert documents.encoding == {"latin-1": "iso8859-1", "cp1252": "cp1252"}[encoding]


def test_wrong_explicit_encoding_fails_with_the_byte_offset(tmp_path):
    path = latin1_news(tmp_path / "news.txt")
    offset = NEWS.encode("latin-1").index(b"\xa3")
    with pytest.raises(DataError) as error:
        load_documents(str(path), "utf-8", "calibration file", [])
    message = str(error.value)
    assert "\n" not in message and str(path) in message and f"at byte offset {offset}" in message
    assert "0xa3" in message and "pass another --encoding" in message


@pytest.mark.parametrize("encoding", ["no-such-codec", "base64"])  # base64 is a codec, but bytes to bytes
def test_unknown_codec_fails_at_validation(encoding):
    message = f"--encoding {encoding!r} is not a text encoding Python knows"
    assert any(message in render(p) for p in CalibrationConfig(calib="x.txt", encoding=encoding).problems())
    with pytest.raises(ConfigError, match=message):
        EvalConfig(data="x.txt", encoding=encoding)
    assert CalibrationConfig(calib="x.txt", encoding="latin-1").problems() == []


@pytest.mark.parametrize("prefix", [b"", b"\xef\xbb\xbf"], ids=["plain", "byte-order-mark"])
def test_utf8_files_read_as_before_without_a_warning(tmp_path, prefix):
    path = tmp_path / "news.txt"
    path.write_bytes(prefix + NEWS.encode("utf-8"))
    warnings: list[str] = []
    documents = load_documents(str(path), "auto", "data file", warnings)
    assert documents.texts == NEWS_DOCUMENTS and documents.encoding == "utf-8" and warnings == []


@pytest.mark.parametrize("codec", ["utf-16", "utf-32"])
def test_utf16_and_utf32_byte_order_marks_are_honoured(tmp_path, codec):
    path = tmp_path / "news.txt"
    path.write_bytes(NEWS.encode(codec))  # Python writes a byte-order mark first
    warnings: list[str] = []
    documents = load_documents(str(path), "auto", "data file", warnings)
    assert documents.texts == NEWS_DOCUMENTS and documents.encoding.startswith(codec)
    assert warnings == [
        f"data file {path} is not UTF-8; read it as {documents.encoding} (byte-order mark); pass --encoding to choose"
    ]


def test_undetectable_bytes_fail_with_one_line_naming_encoding(tmp_path):
    path = tmp_path / "binary.txt"
    path.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(DataError, match=r"encoding cannot be detected .* pass --encoding") as error:
        load_documents(str(path), "auto", "data file", [])
    assert "\n" not in str(error.value)


def test_sample_windows_deterministic_distinct_and_too_short_error():
    stream = torch.arange(1000)
    a = sample_windows(stream, 5, 100, seed=3, bos=None, source="s")
    b = sample_windows(stream, 5, 100, seed=3, bos=None, source="s")
    c = sample_windows(stream, 5, 100, seed=4, bos=None, source="s")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (5, 100)
    assert len({int(row[0]) for row in a}) == 5
    assert all(torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 100)) for row in a)
    with pytest.raises(DataError, match="holds 1000 tokens = 10 windows of 100 tokens"):
        sample_windows(stream, 11, 100, seed=0, bos=None, source="s")


def test_bos_prepended_when_tokenizer_adds_it():
    with_bos, without = tiny_tokenizer(add_bos=True), tiny_tokenizer(add_bos=False)
    assert bos_token_to_prepend(with_bos) == with_bos.bos_token_id
    assert bos_token_to_prepend(without) is None
    windows = consecutive_windows(torch.arange(10, 30), 5, None, bos=1)
    assert windows.shape == (5, 5)
    assert (windows[:, 0] == 1).all() and windows[0, 1:].tolist() == [10, 11, 12, 13]
    assert consecutive_windows(torch.arange(20), 5, 2, bos=None).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def _reference_c4_windows(tokenizer, documents, nsamples, seqlen, seed):
    """The calibration loop of the Wanda / SparseGPT ``get_c4``, re-implemented here as they
    write it (global ``random``, each picked document tokenised alone)."""
    import random

    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(documents) - 1)
            encoded = tokenizer(documents[i], return_tensors="pt")
            if encoded.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, encoded.input_ids.shape[1] - seqlen - 1)
        windows.append(encoded.input_ids[:, i : i + seqlen])
    return torch.cat(windows)


@pytest.mark.parametrize("add_bos", [False, True])
def test_document_windows_are_the_reference_loaders_windows(add_bos):
    tokenizer = tiny_tokenizer(add_bos)
    # documents of 3 to 60 words: many are shorter than a window and must be skipped as theirs are
    documents = [synthetic_text(1, 3 + (7 * i) % 58, seed=i).strip() for i in range(40)]
    for seed in (0, 1, 7):
        ours = document_windows(tokenizer, documents, 12, 48, seed, "docs")
        assert torch.equal(ours, _reference_c4_windows(tokenizer, documents, 12, 48, seed)), seed
    assert not torch.equal(
        document_windows(tokenizer, documents, 12, 48, 0, "d"), document_windows(tokenizer, documents, 12, 48, 1, "d")
    )


def test_document_windows_need_one_document_longer_than_a_window():
    tokenizer = tiny_tokenizer(False)
    with pytest.raises(DataError, match="no document of docs is longer than 500 tokens"):
        document_windows(tokenizer, [synthetic_text(1, 20, seed=i) for i in range(5)], 4, 500, 0, "docs")
