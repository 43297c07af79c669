"""The format check of data on disk: every problem, named by file, line and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lightning_metric.data import (
    ImageFolderDataModule,
    ManifestDataModule,
    check_image_folder,
    check_manifest,
)
from lightning_metric.data.format_check import SHOWN, FormatProblem, raise_problems


def _image(path: Path, size=(20, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), 99, np.uint8)).save(path)


HEADER = "path,label,split,is_query,is_gallery,category,bbox_x1,bbox_y1,bbox_x2,bbox_y2"
LINES = [                                       # line numbers as an editor shows them
    "img/0.png,A,train,1,1,tops,,,,",           # 2  fine
    "img/1.png,A,train,1,1,tops,,,,",           # 3  fine
    "img/missing.png,A,train,1,1,tops,,,,",     # 4  path: not found
    "img/broken.png,A,train,1,1,tops,,,,",      # 5  path: unreadable
    "img/2.png,,train,1,1,tops,,,,",            # 6  label: empty
    "img/3.png,A,training,1,1,tops,,,,",        # 7  split: bad value
    "img/4.png,A,train,yes,1,tops,,,,",         # 8  is_query: bad boolean
    "img/5.png,A,train,1,1,tops,abc,0,5,5",     # 9  bbox_x1: not a number
    "img/6.png,A,train,1,1,tops,8,0,3,5",       # 10 bbox_x2 <= bbox_x1
    "img/7.png,A,train,1,1,tops,0,0,50,5",      # 11 bbox_x2 outside the 20 x 10 image
    ",A,train,1,1,tops,,,,",                    # 12 path: empty
    "",                                         # 13 a blank line
    'img/8.png,A,train,1,1,"two',               # 14 a quoted category over two lines
    'lines",,,,',                               # 15
    "img/9.png,A,train,1,1,,,,,",               # 16 category: empty
    "img/10.png,D,train,1,1,tops,,,,",          # 17 label D: one training item
    "img/11.png,C,test,1,0,tops,,,,",           # 18 query without a gallery item of C
    "img/12.png,C,test,1,0,tops,,,,",           # 19 the same
    "img/13.png,E,test,1,1,tops,,,,",           # 20 E: a query and its gallery item ...
    "img/14.png,E,test,0,1,tops,,,,",           # 21 ... fine
]
EXPECTED = [
    (4, "path", "image file not found"),
    (5, "path", "image file unreadable"),
    (6, "label", "empty label"),
    (7, "split", "split must be one of ['train', 'val', 'test'], got 'training'"),
    (8, "is_query", "must be one of 1/0/true/false, got 'yes'"),
    (9, "bbox_x1", "must be a number (all four or none), got 'abc'"),
    (10, "bbox_x2", "bbox_x2 (3) must be greater than bbox_x1 (8)"),
    (11, "bbox_x2", "bbox_x2=50 is outside the image (20 x 10 pixels)"),
    (12, "path", "empty path"),
    (16, "category", "empty category"),
    (17, "label", "label 'D' has a single item in the train split"),
    (18, "is_query", "query of label 'C' has no gallery item of its label in the test split"),
    (19, "is_query", "query of label 'C' has no gallery item"),
]


@pytest.fixture
def manifest(tmp_path) -> Path:
    for i in range(15):
        _image(tmp_path / "img" / f"{i}.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    path = tmp_path / "items.csv"
    path.write_text("\n".join([HEADER, *LINES]) + "\n")
    return path


def test_check_manifest_names_file_line_and_column_of_every_problem(manifest):
    problems = check_manifest(manifest)
    found = {(p.line, p.column) for p in problems}
    for line, column, message in EXPECTED:
        assert (line, column) in found, (line, column, [str(p) for p in problems])
        matching = [str(p) for p in problems if (p.line, p.column) == (line, column)]
        assert any(message in text for text in matching), (message, matching)
        assert all(text.startswith(f"{manifest}, line {line}, column {column!r}: ")
                   for text in matching)
    assert len(problems) == len(EXPECTED)      # nothing else: lines 2, 3, 14, 20, 21 are fine


def test_the_datamodule_raises_one_error_listing_every_problem(manifest):
    with pytest.raises(ValueError) as error:
        ManifestDataModule(manifest, num_workers=0, m_per_class=2, batch_size=4).setup()
    message = str(error.value)
    assert message.startswith(f"{len(EXPECTED) - 3} problems in data.path=")
    for line, column, _ in EXPECTED[:-3]:       # the rows; splits cannot be built from them
        assert f"{manifest}, line {line}, column {column!r}" in message


def test_pair_problems_come_with_the_row_problems_once_the_splits_can_be_built(tmp_path):
    for i in range(7):
        _image(tmp_path / f"{i}.png")
    rows = "\n".join(["path,label,split", "0.png,a,train", "1.png,a,train", "2.png,b,train",
                      "missing.png,a,train", "4.png,a,test", "5.png,a,test", "6.png,c,test"])
    path = tmp_path / "m.csv"
    path.write_text(rows + "\n")
    with pytest.raises(ValueError) as error:
        ManifestDataModule(path, num_workers=0, m_per_class=2, batch_size=4).setup()
    message = str(error.value)
    assert message.startswith("3 problems in data.path=")
    assert "m.csv, line 5, column 'path': image file not found" in message
    assert ("m.csv, line 4, column 'label': label 'b' has a single item in the train split, "
            "which needs two or more (class-balanced batches with data.m_per_class=2)") in message
    assert ("m.csv, line 8, column 'label': label 'c' has a single item in the test split, "
            "which needs two or more (every item is a query retrieving among the others)"
            ) in message
    # random batches need no pairs in training
    problems = check_manifest(path, sampler="random")
    assert [(p.line, p.column) for p in problems] == [(5, "path"), (8, "label")]


@pytest.mark.parametrize(
    ("header", "column", "message"),
    [
        ("path,name", "label", "missing required column 'label' (columns found: path, name)"),
        ("label,path,text", "path", "both a 'path' and a 'text' column"),
        ("label,name", "path", "missing required column: 'path' (image files) or 'text' "
                               "(texts) (columns found: label, name)"),
        ("label,path,bbox_x1,bbox_y1", "bbox_x2", "crop boxes need all of"),
    ],
)
def test_column_problems_name_the_header_line_and_the_columns_found(tmp_path, header, column,
                                                                     message):
    path = tmp_path / "m.csv"
    path.write_text(header + "\n" + ",".join(["x"] * len(header.split(","))) + "\n")
    problems = check_manifest(path)
    assert any(str(p).startswith(f"{path}, line 1, column {column!r}: ") and message in str(p)
               for p in problems), [str(p) for p in problems]
    with pytest.raises(ValueError, match="line 1, column"):
        ManifestDataModule(path)


def test_parquet_problems_name_the_row_and_text_problems_the_text_column(tmp_path):
    path = tmp_path / "texts.parquet"
    pd.DataFrame({"text": ["a cup", "", "a book", "a pen"],
                  "label": [1.0, 1.0, float("nan"), 1.0]}).to_parquet(path)
    problems = check_manifest(path)
    assert [str(p) for p in problems] == [
        f"{path}, row 2, column 'text': empty text",
        f"{path}, row 3, column 'label': empty label",
    ]


def test_tsv_lines_and_a_clean_manifest(tmp_path):
    for i in range(4):
        _image(tmp_path / f"{i}.png")
    path = tmp_path / "m.tsv"
    # is_gallery alone: every item is a query; 4 and 5 are queries only
    path.write_text("label\tpath\tis_gallery\n" + "".join(
        f"{i % 2}\t{i % 4}.png\t{'true' if i < 4 else 'False'}\n" for i in range(6))
        + "1\t9.png\t1\n")
    problems = check_manifest(path, sampler="random")
    assert [str(p) for p in problems] == [
        f"{path}, line 8, column 'path': image file not found: {tmp_path / '9.png'}"]


def test_image_folders_report_unreadable_images_by_file(tmp_path):
    for i in range(6):
        _image(tmp_path / "root" / ("a" if i % 2 else "b") / f"{i}.png")
    broken = tmp_path / "root" / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not a jpeg")
    problems = check_image_folder(tmp_path / "root")
    assert len(problems) == 1 and problems[0].file == str(broken)
    assert str(problems[0]).startswith(f"{broken}: image file unreadable")
    with pytest.raises(ValueError, match=r"(?s)1 problems in the images of data.root=.*"
                                         r"broken\.jpg"):
        ImageFolderDataModule(tmp_path / "root", num_workers=0).setup()


def test_long_problem_lists_are_cut_in_the_message_but_counted():
    problems = [FormatProblem("m.csv", line, "label", "empty label") for line in range(500)]
    with pytest.raises(ValueError) as error:
        raise_problems(problems, "data.path='m.csv'")
    message = str(error.value)
    assert message.startswith("500 problems in data.path='m.csv':")
    assert f"... and {500 - SHOWN} more" in message and message.count("empty label") == SHOWN
    raise_problems([], "nothing")   # no problem, no error


def test_an_image_folder_lists_unreadable_images_and_lonely_classes_together(tmp_path):
    root = tmp_path / "trees"
    for split, counts in (("train", {"a": 4, "b": 4}), ("val", {"a": 2, "b": 2}),
                          ("test", {"a": 2, "b": 1})):
        for name, count in counts.items():
            for i in range(count):
                _image(root / split / name / f"{i}.png")
    (root / "train" / "a" / "bad.png").write_bytes(b"nope")
    with pytest.raises(ValueError) as error:
        ImageFolderDataModule(root, num_workers=0, batch_size=4, m_per_class=2).setup()
    message = str(error.value)
    assert message.startswith("2 problems in the images of data.root=")
    assert f"{root / 'train' / 'a' / 'bad.png'}: image file unreadable" in message
    assert (f"{root / 'test' / 'b' / '0.png'}: label 'b' has a single item in the test split"
            in message)


def test_ragged_and_empty_tables_fail_naming_the_file(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("label,text\na,one\nb,two,three\n")
    with pytest.raises(ValueError, match=r"data.path=.*ragged.csv.* cannot be read as a CSV "
                                         r"table: .*line 3"):
        check_manifest(ragged)
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.tsv.* cannot be read as a TSV table"):
        check_manifest(empty)
    text = tmp_path / "items.txt"
    text.write_text("label\n")
    with pytest.raises(ValueError, match="must be a .csv, .tsv, .jsonl or .parquet file"):
        check_manifest(text)


def test_a_byte_order_mark_and_empty_manifest(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufefflabel,text\na,one\na,two\n".encode())
    assert check_manifest(path, sampler="random") == []
    only_header = tmp_path / "header.csv"
    only_header.write_text("label,text\n")
    assert [str(p) for p in check_manifest(only_header)] == [
        f"{only_header}, line 1: the manifest has no items"]
