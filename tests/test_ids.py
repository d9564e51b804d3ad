"""Ids the gateway hands out must survive a command line: `aws s3api
upload-part --upload-id -Xb2...` fails ("expected one argument") because
argparse takes a value beginning with "-" for an option.  S3's ids never
begin with one; ours (random URL-safe base64) did, one time in 64."""
from __future__ import annotations

import re

from airlock.primary.engine import _new_upload_id, _new_version_id

URL_SAFE = re.compile(r"[A-Za-z0-9_-]+")


def test_version_and_upload_ids_never_begin_with_a_dash():
    # 4096 draws of each: the old ids began with "-" in ~64 of them
    for make, length in ((_new_version_id, 32), (_new_upload_id, 48)):
        ids = {make() for _ in range(4096)}
        assert len(ids) == 4096
        assert not [i for i in ids if i.startswith("-")]
        assert all(len(i) == length and URL_SAFE.fullmatch(i) for i in ids)


def test_new_version_ids_are_well_formed_for_the_gateways_check():
    """The S3 layer refuses a version id that is not of this form (400
    InvalidArgument); every id the engine makes must pass."""
    from airlock.primary.model import is_version_id
    assert all(is_version_id(_new_version_id()) for _ in range(1024))
    assert is_version_id("null") and not is_version_id("abc") and not is_version_id("A" * 33)
