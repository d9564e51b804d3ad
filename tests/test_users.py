"""Several S3 users from a TOML config: isolation, owners, and authentication errors."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import Gateway

ALICE = {"access_key": "AKIAALICE00000000001", "secret_key": "alice-secret-0000000000000000000000000000",
         "user_id": "alice-canonical-id-0001", "display_name": "Alice Liddell"}
BOB = {"access_key": "AKIABOB0000000000002", "secret_key": "bob-secret-00000000000000000000000000000000",
       "user_id": "bob-canonical-id-0002", "display_name": "Bob"}


def _toml(users: list[dict]) -> str:
    out = ['[gateway]\nregion = "us-east-1"\n']
    for u in users:
        out.append("[[users]]\n" + "".join(f'{k} = "{v}"\n' for k, v in u.items()))
    return "\n".join(out)


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    cfg = d / "airlock.toml"
    cfg.write_text(_toml([ALICE, BOB]))
    g = Gateway(d / "primary", config=cfg).start()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def alice(gw):
    return gw.client(ALICE["access_key"], ALICE["secret_key"])


@pytest.fixture(scope="module")
def bob(gw):
    return gw.client(BOB["access_key"], BOB["secret_key"])


@pytest.fixture(scope="module")
def buckets(alice, bob):
    alice.create_bucket(Bucket="alice-bucket")
    alice.put_object(Bucket="alice-bucket", Key="secret.txt", Body=b"alice's")
    bob.create_bucket(Bucket="bob-bucket")
    return "alice-bucket", "bob-bucket"


def _code(call) -> tuple[str, int]:
    with pytest.raises(ClientError) as ei:
        call()
    r = ei.value.response
    return r["Error"]["Code"], r["ResponseMetadata"]["HTTPStatusCode"]


def test_each_user_lists_only_own_buckets_with_configured_owner(alice, bob, buckets):
    a = alice.list_buckets()
    assert [b["Name"] for b in a["Buckets"]] == ["alice-bucket"]
    assert a["Owner"] == {"ID": ALICE["user_id"], "DisplayName": ALICE["display_name"]}
    b = bob.list_buckets()
    assert [x["Name"] for x in b["Buckets"]] == ["bob-bucket"]
    assert b["Owner"] == {"ID": BOB["user_id"], "DisplayName": BOB["display_name"]}


def test_other_user_is_denied_every_operation_on_a_bucket_it_does_not_own(bob, buckets):
    b = "alice-bucket"
    calls = {
        "get": lambda: bob.get_object(Bucket=b, Key="secret.txt"),
        "put": lambda: bob.put_object(Bucket=b, Key="intruder", Body=b"x"),
        "list-v1": lambda: bob.list_objects(Bucket=b),
        "list-v2": lambda: bob.list_objects_v2(Bucket=b),
        "delete-object": lambda: bob.delete_object(Bucket=b, Key="secret.txt"),
        "delete-objects": lambda: bob.delete_objects(Bucket=b, Delete={"Objects": [{"Key": "secret.txt"}]}),
        "delete-bucket": lambda: bob.delete_bucket(Bucket=b),
        "create-upload": lambda: bob.create_multipart_upload(Bucket=b, Key="mp"),
        "list-uploads": lambda: bob.list_multipart_uploads(Bucket=b),
        "location": lambda: bob.get_bucket_location(Bucket=b),
        "copy-out": lambda: bob.copy_object(Bucket="bob-bucket", Key="stolen",
                                            CopySource={"Bucket": b, "Key": "secret.txt"}),
        # settings airlock does not keep: the owner check comes first
        "bucket-acl": lambda: bob.get_bucket_acl(Bucket=b),
        "object-acl": lambda: bob.get_object_acl(Bucket=b, Key="secret.txt"),
        "policy": lambda: bob.get_bucket_policy(Bucket=b),
        "put-policy": lambda: bob.put_bucket_policy(Bucket=b, Policy='{"Version": "2012-10-17"}'),
        "delete-cors": lambda: bob.delete_bucket_cors(Bucket=b),
    }
    for name, call in calls.items():
        assert _code(call) == ("AccessDenied", 403), name
    # HEAD has no body: the status is the whole answer
    assert _code(lambda: bob.head_object(Bucket=b, Key="secret.txt"))[1] == 403
    assert _code(lambda: bob.head_bucket(Bucket=b))[1] == 403


def test_denied_operations_change_nothing(alice, buckets):
    assert alice.get_object(Bucket="alice-bucket", Key="secret.txt")["Body"].read() == b"alice's"
    keys = [o["Key"] for o in alice.list_objects_v2(Bucket="alice-bucket")["Contents"]]
    assert keys == ["secret.txt"]


def test_bucket_name_taken_by_another_user_is_bucket_already_exists(bob, buckets):
    assert _code(lambda: bob.create_bucket(Bucket="alice-bucket")) == ("BucketAlreadyExists", 409)


def test_owner_in_listings_and_list_parts_is_the_configured_user(alice, buckets):
    want = {"ID": ALICE["user_id"], "DisplayName": ALICE["display_name"]}
    v1 = alice.list_objects(Bucket="alice-bucket")
    assert v1["Contents"][0]["Owner"] == want
    v2 = alice.list_objects_v2(Bucket="alice-bucket", FetchOwner=True)
    assert v2["Contents"][0]["Owner"] == want
    assert "Owner" not in alice.list_objects_v2(Bucket="alice-bucket")["Contents"][0]
    for acl in (alice.get_bucket_acl(Bucket="alice-bucket"),
                alice.get_object_acl(Bucket="alice-bucket", Key="secret.txt")):
        assert acl["Owner"] == want and acl["Grants"][0]["Grantee"]["ID"] == want["ID"]
    up = alice.create_multipart_upload(Bucket="alice-bucket", Key="mp")["UploadId"]
    try:
        alice.upload_part(Bucket="alice-bucket", Key="mp", UploadId=up, PartNumber=1, Body=b"x")
        lp = alice.list_parts(Bucket="alice-bucket", Key="mp", UploadId=up)
        assert lp["Owner"] == want and lp["Initiator"] == want
        ups = alice.list_multipart_uploads(Bucket="alice-bucket")["Uploads"]
        assert ups[0]["Owner"] == want and ups[0]["Initiator"] == want
    finally:
        alice.abort_multipart_upload(Bucket="alice-bucket", Key="mp", UploadId=up)


def test_unknown_access_key_is_invalid_access_key_id(gw):
    c = gw.client("AKIAUNKNOWN000000000", "whatever-secret")
    assert _code(c.list_buckets) == ("InvalidAccessKeyId", 403)


def test_wrong_secret_is_signature_does_not_match(gw):
    c = gw.client(ALICE["access_key"], BOB["secret_key"])
    assert _code(c.list_buckets) == ("SignatureDoesNotMatch", 403)


def test_aws_cli_as_second_user_sees_only_its_buckets(gw, buckets):
    out = gw.aws("s3", "ls", access_key=BOB["access_key"], secret_key=BOB["secret_key"]).stdout.decode()
    assert "bob-bucket" in out and "alice-bucket" not in out


def test_env_keys_without_config_give_single_default_user(tmp_path):
    ak, sk = "AKIAENVUSER000000001", "env-secret-000000000000000000000000000000"
    g = Gateway(tmp_path / "primary", extra_env={"AIRLOCK_ACCESS_KEY": ak, "AIRLOCK_SECRET_KEY": sk}).start()
    try:
        c = g.client(ak, sk)
        c.create_bucket(Bucket="env-bucket")
        r = c.list_buckets()
        assert [b["Name"] for b in r["Buckets"]] == ["env-bucket"]
        assert r["Owner"]["ID"] == hashlib.sha256(ak.encode()).hexdigest()
        assert _code(g.client().list_buckets)[0] == "InvalidAccessKeyId"   # conftest's default keys
    finally:
        g.stop()


def test_config_users_replace_env_keys(gw):
    # gw's process inherits conftest's AIRLOCK_ACCESS_KEY; with [[users]] it is not a user
    assert _code(gw.client().list_buckets)[0] == "InvalidAccessKeyId"


def test_invalid_config_refuses_to_start(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[users]]\naccess_key = "A"\n')
    g = Gateway(tmp_path / "primary", config=cfg)
    with pytest.raises(RuntimeError):
        g.start()
    g.kill()
    assert "needs access_key, secret_key and user_id" in Path(g.log_path).read_text()
