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
