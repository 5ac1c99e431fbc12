"""Tests for trainer.gcs.GcsPath: parsing gs:// paths and joining names, with no client."""

from __future__ import annotations

import pytest

from trainer import gcs
from trainer.errors import UserError
from trainer.gcs import GcsPath


@pytest.mark.parametrize(
    "path, bucket, name",
    [
        ("gs://b", "b", ""),
        ("gs://b/", "b", ""),
        ("gs://b/a/c", "b", "a/c"),
        ("gs://b/a/", "b", "a/"),
        ("gs://b/a//c*.txt", "b", "a//c*.txt"),  # The name is kept as written.
    ],
)
def test_parse_a_gs_path(path, bucket, name):
    assert gcs.parse(path) == GcsPath(bucket, name)


@pytest.mark.parametrize("path", ["/tmp/a/c", "a/c", "", "gs:/b/a", "GS://b/a", "s3://b/a"])
def test_a_local_path_parses_to_none(path):
    assert gcs.parse(path) is None


@pytest.mark.parametrize("path", ["gs://", "gs:///a/c"])
def test_a_gs_path_without_a_bucket_is_refused(path):
    with pytest.raises(UserError, match=r"no bucket name .*'gs://"):
        gcs.parse(path)


def test_str_gives_the_gs_form():
    assert str(GcsPath("b", "a/c")) == "gs://b/a/c"
    assert str(GcsPath("b", "")) == "gs://b/"  # The bucket itself.
    for path in ["gs://b/", "gs://b/a/c", "gs://b/a/"]:
        assert str(gcs.parse(path)) == path


def test_folder_ends_the_name_in_one_slash():
    assert GcsPath("b", "a").folder() == GcsPath("b", "a/")
    assert GcsPath("b", "a/").folder() == GcsPath("b", "a/")
    # The whole bucket stays unprefixed: no object name starts with "/".
    assert GcsPath("b", "").folder() == GcsPath("b", "")


def test_child_joins_with_slashes():
    assert GcsPath("b", "").child("a", "c.txt") == GcsPath("b", "a/c.txt")
    assert GcsPath("b", "job").child("ckpt", "w.h5") == GcsPath("b", "job/ckpt/w.h5")
    assert GcsPath("b", "job/").child("w.h5") == GcsPath("b", "job/w.h5")
    assert GcsPath("b", "job").child() == GcsPath("b", "job")
    assert str(GcsPath("b", "").child("a")) == "gs://b/a"


def test_a_path_is_a_hashable_value():
    path = GcsPath("b", "a")
    with pytest.raises(AttributeError):
        path.name = "other"  # type: ignore[misc]
    assert {path, GcsPath("b", "a")} == {path}
