"""The real aws-cli (`python -m awscli`) against a real gateway process.

One gateway per module; each test uses its own bucket.  The 100 MiB copy
exercises the CLI's multipart path (8 MiB parts by default) both ways.
"""
from __future__ import annotations

import hashlib
import json
import os
from itertools import count
from pathlib import Path

import pytest
from conftest import Gateway

MIB = 1024 * 1024
_names = count()


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    g = Gateway(tmp_path_factory.mktemp("awscli") / "primary").start()
    yield g
    g.stop()


@pytest.fixture
def bkt(gw):
    """A new bucket for the test, made with boto3: `aws s3 mb` is
    test_mb_ls_rb's subject, and a CLI start costs ~0.6 s."""
    name = f"cli-{next(_names)}-{os.getpid()}"
    gw.client().create_bucket(Bucket=name)
    return name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def _api(gw, *args) -> dict:
    out = gw.aws("s3api", *args, "--output", "json").stdout
    return json.loads(out) if out.strip() else {}


def _fails(gw, *args) -> str:
    r = gw.aws(*args, check=False)
    assert r.returncode != 0, r.stdout
    return r.stderr.decode(errors="replace")


# ---------------------------------------------------------------------------- s3 high-level
def test_mb_ls_rb(gw):
    name = f"cli-mb-{os.getpid()}"
    r = gw.aws("s3", "mb", f"s3://{name}")
    assert f"make_bucket: {name}" in r.stdout.decode()
    assert name in gw.aws("s3", "ls").stdout.decode().split()
    assert "BucketAlreadyOwnedByYou" in _fails(gw, "s3", "mb", f"s3://{name}")
    r = gw.aws("s3", "rb", f"s3://{name}")
    assert f"remove_bucket: {name}" in r.stdout.decode()
    assert name not in gw.aws("s3", "ls").stdout.decode().split()


def test_cp_small_roundtrips(gw, bkt, tmp_path):
    src = tmp_path / "small.txt"
    src.write_bytes(b"hello airlock\n")
    gw.aws("s3", "cp", str(src), f"s3://{bkt}/dir/small.txt")
    dst = tmp_path / "back.txt"
    gw.aws("s3", "cp", f"s3://{bkt}/dir/small.txt", str(dst))
    assert dst.read_bytes() == b"hello airlock\n"
    # stdin / stdout streaming
    gw.aws("s3", "cp", "-", f"s3://{bkt}/stdin.bin", input=b"from stdin")
    assert gw.aws("s3", "cp", f"s3://{bkt}/stdin.bin", "-").stdout == b"from stdin"


def test_cp_100mib_roundtrips_byte_identical(gw, bkt, tmp_path):
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(100):
            f.write(os.urandom(MIB))
    gw.aws("s3", "cp", str(src), f"s3://{bkt}/big.bin")
    head = _api(gw, "head-object", "--bucket", bkt, "--key", "big.bin")
    assert head["ContentLength"] == 100 * MIB
    assert head["ETag"].endswith('-13"')     # aws-cli's 8 MiB parts: 12 full + 1
    dst = tmp_path / "big.out"
    gw.aws("s3", "cp", f"s3://{bkt}/big.bin", str(dst))
    assert _sha256(dst) == _sha256(src)


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"a", "sub/b.txt": b"bb", "sub/deeper/c.bin": os.urandom(3000),
             "sub/deeper/d e.txt": b"space", "z/ünï.txt": b"unicode"}
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def test_sync_up_is_idempotent_and_sync_down_restores_tree(gw, bkt, tmp_path):
    up = tmp_path / "up"
    files = _make_tree(up)
    r = gw.aws("s3", "sync", str(up), f"s3://{bkt}/tree")
    assert r.stdout.decode().count("upload:") == len(files)
    r = gw.aws("s3", "sync", str(up), f"s3://{bkt}/tree")
    assert "upload:" not in r.stdout.decode()
    (up / "sub" / "b.txt").write_bytes(b"changed size")
    r = gw.aws("s3", "sync", str(up), f"s3://{bkt}/tree")
    assert r.stdout.decode().count("upload:") == 1
    files["sub/b.txt"] = b"changed size"
    down = tmp_path / "down"
    gw.aws("s3", "sync", f"s3://{bkt}/tree", str(down))
    got = {str(p.relative_to(down)): p.read_bytes() for p in down.rglob("*") if p.is_file()}
    assert got == files
    r = gw.aws("s3", "sync", f"s3://{bkt}/tree", str(down))
    assert "download:" not in r.stdout.decode()


def test_ls_prefixes_and_recursive(gw, bkt, tmp_path):
    _make_tree(tmp_path / "t")
    gw.aws("s3", "sync", str(tmp_path / "t"), f"s3://{bkt}/")
    top = gw.aws("s3", "ls", f"s3://{bkt}/").stdout.decode().splitlines()
    assert sorted(line.split()[-1] for line in top if "PRE" in line) == ["sub/", "z/"]
    assert any(line.endswith(" a.txt") for line in top)
    sub = gw.aws("s3", "ls", f"s3://{bkt}/sub/").stdout.decode().splitlines()
    assert [line.split()[-1] for line in sub if "PRE" in line] == ["deeper/"]
    rec = gw.aws("s3", "ls", "--recursive", f"s3://{bkt}").stdout.decode().splitlines()
    keys = sorted(line.split(None, 3)[3] for line in rec)
    assert keys == sorted(["a.txt", "sub/b.txt", "sub/deeper/c.bin", "sub/deeper/d e.txt", "z/ünï.txt"])


def test_rm_recursive_then_rb(gw, bkt, tmp_path):
    _make_tree(tmp_path / "t")
    gw.aws("s3", "sync", str(tmp_path / "t"), f"s3://{bkt}/")
    assert "BucketNotEmpty" in _fails(gw, "s3", "rb", f"s3://{bkt}")
    r = gw.aws("s3", "rm", "--recursive", f"s3://{bkt}/sub/")
    assert r.stdout.decode().count("delete:") == 3
    rest = gw.aws("s3", "ls", "--recursive", f"s3://{bkt}").stdout.decode()
    assert "sub/" not in rest and "a.txt" in rest
    gw.aws("s3", "rm", "--recursive", f"s3://{bkt}")
    assert gw.aws("s3", "ls", "--recursive", f"s3://{bkt}").stdout.strip() == b""
    gw.aws("s3", "rb", f"s3://{bkt}")
    assert "NoSuchBucket" in _fails(gw, "s3", "ls", f"s3://{bkt}")


def test_rb_force_removes_contents(gw, bkt, tmp_path):
    _make_tree(tmp_path / "t")
    gw.aws("s3", "sync", str(tmp_path / "t"), f"s3://{bkt}/")
    gw.aws("s3", "rb", "--force", f"s3://{bkt}")
    assert bkt not in gw.aws("s3", "ls").stdout.decode().split()


def test_mv_between_keys(gw, bkt):
    gw.aws("s3", "cp", "-", f"s3://{bkt}/from", input=b"moving")
    gw.aws("s3", "mv", f"s3://{bkt}/from", f"s3://{bkt}/to")
    assert gw.aws("s3", "cp", f"s3://{bkt}/to", "-").stdout == b"moving"
    assert "404" in _fails(gw, "s3api", "head-object", "--bucket", bkt, "--key", "from")


# ---------------------------------------------------------------------------- s3api
def test_s3api_put_object_metadata_content_type_and_head(gw, bkt, tmp_path):
    body = tmp_path / "body"
    body.write_bytes(b"<html></html>")
    put = _api(gw, "put-object", "--bucket", bkt, "--key", "page.html", "--body", str(body),
               "--content-type", "text/html", "--metadata", "author=ada,rev=7",
               "--cache-control", "no-store")
    assert put["ETag"] == f'"{hashlib.md5(b"<html></html>").hexdigest()}"'
    head = _api(gw, "head-object", "--bucket", bkt, "--key", "page.html")
    assert head["ContentType"] == "text/html"
    assert head["Metadata"] == {"author": "ada", "rev": "7"}
    assert head["CacheControl"] == "no-store"
    assert head["ContentLength"] == len(b"<html></html>")


def test_s3api_get_object_range(gw, bkt, tmp_path):
    data = bytes(range(256)) * 4
    gw.aws("s3", "cp", "-", f"s3://{bkt}/r", input=data)
    out = tmp_path / "part"
    r = _api(gw, "get-object", "--bucket", bkt, "--key", "r", "--range", "bytes=10-19", str(out))
    assert out.read_bytes() == data[10:20]
    assert r["ContentRange"] == f"bytes 10-19/{len(data)}" and r["ContentLength"] == 10


def test_s3api_list_objects_v2_pagination(gw, bkt, tmp_path):
    keys = [f"p/{i:02d}" for i in range(11)]
    for k in keys:
        (tmp_path / k).parent.mkdir(exist_ok=True)
        (tmp_path / k).write_bytes(b"")
    gw.aws("s3", "sync", str(tmp_path), f"s3://{bkt}/")
    full = _api(gw, "list-objects-v2", "--bucket", bkt, "--page-size", "3")
    assert [o["Key"] for o in full["Contents"]] == keys      # CLI follows tokens page by page
    first = _api(gw, "list-objects-v2", "--bucket", bkt, "--max-items", "4", "--page-size", "3")
    assert [o["Key"] for o in first["Contents"]] == keys[:4]
    token = first["NextToken"]
    second = _api(gw, "list-objects-v2", "--bucket", bkt, "--max-items", "4", "--page-size", "3",
                  "--starting-token", token)
    assert [o["Key"] for o in second["Contents"]] == keys[4:8]
    delim = _api(gw, "list-objects-v2", "--bucket", bkt, "--delimiter", "/")
    assert delim["CommonPrefixes"] == [{"Prefix": "p/"}]


def test_s3api_multipart_upload(gw, bkt, tmp_path):
    p1, p2 = tmp_path / "p1", tmp_path / "p2"
    p1.write_bytes(os.urandom(5 * MIB))
    p2.write_bytes(os.urandom(1000))
    up = _api(gw, "create-multipart-upload", "--bucket", bkt, "--key", "mp", "--content-type", "x/y")["UploadId"]
    e1 = _api(gw, "upload-part", "--bucket", bkt, "--key", "mp", "--upload-id", up, "--part-number", "1",
              "--body", str(p1))["ETag"]
    e2 = _api(gw, "upload-part", "--bucket", bkt, "--key", "mp", "--upload-id", up, "--part-number", "2",
              "--body", str(p2))["ETag"]
    parts = _api(gw, "list-parts", "--bucket", bkt, "--key", "mp", "--upload-id", up)["Parts"]
    assert [(p["PartNumber"], p["ETag"]) for p in parts] == [(1, e1), (2, e2)]
    mpu = json.dumps({"Parts": [{"PartNumber": 1, "ETag": e1}, {"PartNumber": 2, "ETag": e2}]})
    done = _api(gw, "complete-multipart-upload", "--bucket", bkt, "--key", "mp", "--upload-id", up,
                "--multipart-upload", mpu)
    want = hashlib.md5(hashlib.md5(p1.read_bytes()).digest() + hashlib.md5(p2.read_bytes()).digest()).hexdigest()
    assert done["ETag"] == f'"{want}-2"'
    out = tmp_path / "out"
    gw.aws("s3", "cp", f"s3://{bkt}/mp", str(out))
    assert out.read_bytes() == p1.read_bytes() + p2.read_bytes()
    assert _api(gw, "head-object", "--bucket", bkt, "--key", "mp")["ContentType"] == "x/y"


def test_s3api_delete_objects(gw, bkt):
    for k in ("x1", "x2", "keep"):
        _api(gw, "put-object", "--bucket", bkt, "--key", k)
    r = _api(gw, "delete-objects", "--bucket", bkt, "--delete",
             json.dumps({"Objects": [{"Key": "x1"}, {"Key": "x2"}]}))
    assert sorted(d["Key"] for d in r["Deleted"]) == ["x1", "x2"]
    left = _api(gw, "list-objects-v2", "--bucket", bkt)
    assert [o["Key"] for o in left["Contents"]] == ["keep"]


def test_s3api_copy_object(gw, bkt):
    gw.aws("s3", "cp", "-", f"s3://{bkt}/orig", input=b"copy me")
    _api(gw, "put-object", "--bucket", bkt, "--key", "meta", "--metadata", "k=v")
    r = _api(gw, "copy-object", "--bucket", bkt, "--key", "copy", "--copy-source", f"{bkt}/orig")
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"copy me").hexdigest()}"'
    assert gw.aws("s3", "cp", f"s3://{bkt}/copy", "-").stdout == b"copy me"
    _api(gw, "copy-object", "--bucket", bkt, "--key", "meta2", "--copy-source", f"{bkt}/meta",
         "--metadata-directive", "REPLACE", "--metadata", "k=w")
    assert _api(gw, "head-object", "--bucket", bkt, "--key", "meta2")["Metadata"] == {"k": "w"}
    # server-side copy between buckets with the high-level command
    other = f"cli-other-{next(_names)}-{os.getpid()}"
    gw.aws("s3", "mb", f"s3://{other}")
    gw.aws("s3", "cp", f"s3://{bkt}/orig", f"s3://{other}/orig")
    assert gw.aws("s3", "cp", f"s3://{other}/orig", "-").stdout == b"copy me"


def test_s3api_errors_are_reported_by_code(gw, bkt):
    assert "NoSuchKey" in _fails(gw, "s3api", "get-object", "--bucket", bkt, "--key", "missing", os.devnull)
    assert "NoSuchBucket" in _fails(gw, "s3api", "list-objects-v2", "--bucket", "no-such-bucket-cli")
    assert "InvalidAccessKeyId" in gw.aws("s3", "ls", check=False, access_key="AKIANOSUCHKEY0000000").stderr.decode()
