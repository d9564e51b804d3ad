"""Flexible checksums, Content-MD5 and multipart checksums, checked against botocore's own code."""
from __future__ import annotations

import base64
import hashlib

import pytest
from botocore.httpchecksum import (
    Crc32Checksum,
    CrtCrc32cChecksum,
    CrtCrc64NvmeChecksum,
    Sha1Checksum,
    Sha256Checksum,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from airlock.errors import BadDigest, InvalidDigest, InvalidRequest, NotImplementedS3
from airlock.s3.checksums import (
    ALGORITHMS,
    DIGEST_SIZES,
    check_content_md5,
    composite_checksum,
    full_object_checksum,
    header_name,
    new_checksum,
    parse_content_md5,
    requested_checksum,
    trailer_names,
    verify_checksum,
)

BOTOCORE = {
    "CRC32": Crc32Checksum,
    "CRC32C": CrtCrc32cChecksum,
    "CRC64NVME": CrtCrc64NvmeChecksum,
    "SHA1": Sha1Checksum,
    "SHA256": Sha256Checksum,
}


def b64_of(alg, data):
    c = new_checksum(alg)
    c.update(data)
    return c.b64()


def digest_of(alg, data):
    c = new_checksum(alg)
    c.update(data)
    return c.digest()


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_checksums_match_botocore_and_have_s3_sizes(alg):
    data = b"The quick brown fox jumps over the lazy dog" * 1000
    ours = new_checksum(alg)
    for i in range(0, len(data), 777):
        ours.update(memoryview(data)[i:i + 777])
    theirs = BOTOCORE[alg]()
    theirs.update(data)
    assert ours.b64() == theirs.b64digest()
    assert len(ours.digest()) == DIGEST_SIZES[alg]


def test_known_answer_vectors():
    assert b64_of("CRC32", b"123456789") == base64.b64encode(bytes.fromhex("cbf43926")).decode()
    assert b64_of("CRC32C", b"123456789") == base64.b64encode(bytes.fromhex("e3069283")).decode()
    assert b64_of("CRC64NVME", b"123456789") == base64.b64encode(bytes.fromhex("ae8b14860a799888")).decode()
    assert b64_of("SHA256", b"") == base64.b64encode(hashlib.sha256(b"").digest()).decode()


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=3000), cut=st.integers(0, 3000), alg=st.sampled_from(ALGORITHMS))
def test_incremental_update_equals_one_shot(data, cut, alg):
    c = new_checksum(alg)
    c.update(data[:cut])
    c.update(data[cut:])
    assert c.digest() == digest_of(alg, data)


def test_algorithm_names_are_case_insensitive_and_unknown_is_refused():
    assert new_checksum("crc32c").algorithm == "CRC32C"
    with pytest.raises(InvalidRequest):
        new_checksum("MD4")


def test_header_name():
    assert header_name("CRC64NVME") == "x-amz-checksum-crc64nvme"


# ---------------------------------------------------------------------------
# what the client asked for
# ---------------------------------------------------------------------------
def test_no_checksum_requested():
    assert requested_checksum(CIMultiDict({"Content-Type": "x"})) == (None, None, False)


def test_checksum_header_is_returned_with_its_value():
    v = b64_of("SHA256", b"abc")
    got = requested_checksum(CIMultiDict({"X-Amz-Checksum-SHA256": v, "x-amz-sdk-checksum-algorithm": "SHA256"}))
    assert got == ("SHA256", v, False)
    assert got.algorithm == "SHA256" and got.expected_b64 == v and not got.from_trailer


def test_checksum_in_trailer_is_announced_by_x_amz_trailer():
    got = requested_checksum(CIMultiDict({"x-amz-trailer": "x-amz-checksum-crc64nvme",
                                          "x-amz-sdk-checksum-algorithm": "CRC64NVME"}))
    assert got == ("CRC64NVME", None, True)


@pytest.mark.parametrize("value", ["not base64!", "AAAA", base64.b64encode(b"12345").decode(), ""])
def test_malformed_checksum_value_is_invalid_request(value):
    with pytest.raises(InvalidRequest, match="Value for x-amz-checksum-crc32 header is invalid."):
        requested_checksum(CIMultiDict({"x-amz-checksum-crc32": value}))


def test_two_checksums_are_invalid_request():
    with pytest.raises(InvalidRequest, match="Multiple checksum"):
        requested_checksum(CIMultiDict({"x-amz-checksum-crc32": b64_of("CRC32", b""),
                                        "x-amz-checksum-sha1": b64_of("SHA1", b"")}))
    with pytest.raises(InvalidRequest):
        requested_checksum(CIMultiDict({"x-amz-checksum-crc32": b64_of("CRC32", b""),
                                        "x-amz-trailer": "x-amz-checksum-sha1"}))


def test_sdk_algorithm_without_checksum_is_invalid_request():
    with pytest.raises(InvalidRequest, match="no corresponding"):
        requested_checksum(CIMultiDict({"x-amz-sdk-checksum-algorithm": "CRC32"}))


def test_sdk_algorithm_disagreeing_with_header_is_invalid_request():
    with pytest.raises(InvalidRequest):
        requested_checksum(CIMultiDict({"x-amz-sdk-checksum-algorithm": "CRC32C",
                                        "x-amz-checksum-crc32": b64_of("CRC32", b"")}))


def test_unsupported_checksum_algorithm_is_not_implemented_rather_than_skipped():
    with pytest.raises(NotImplementedS3):
        requested_checksum(CIMultiDict({"x-amz-checksum-xxhash64": "AAAAAAAAAAA="}))


def test_checksum_type_and_mode_headers_are_not_checksums():
    assert requested_checksum(CIMultiDict({"x-amz-checksum-type": "FULL_OBJECT",
                                           "x-amz-checksum-mode": "ENABLED"})) == (None, None, False)


def test_trailer_names_are_lower_cased_and_split():
    assert trailer_names(CIMultiDict({"X-Amz-Trailer": "X-Amz-Checksum-CRC32, x-amz-foo"})) == [
        "x-amz-checksum-crc32", "x-amz-foo"]


def test_verify_checksum_mismatch_is_bad_digest_with_s3_message():
    with pytest.raises(BadDigest, match="The CRC32 you specified did not match the calculated checksum."):
        verify_checksum("CRC32", b64_of("CRC32", b"a"), digest_of("CRC32", b"b"))
    c = new_checksum("CRC32")
    c.update(b"a")
    verify_checksum("CRC32", b64_of("CRC32", b"a"), c)


def test_verify_checksum_with_malformed_trailer_value_is_invalid_request():
    with pytest.raises(InvalidRequest):
        verify_checksum("SHA1", "AAAA", digest_of("SHA1", b""), source="x-amz-checksum-sha1")


# ---------------------------------------------------------------------------
# Content-MD5
# ---------------------------------------------------------------------------
def test_content_md5_round_trip():
    md5 = hashlib.md5(b"body").digest()
    assert parse_content_md5(base64.b64encode(md5).decode()) == md5
    check_content_md5(md5, hashlib.md5(b"body").digest())


@pytest.mark.parametrize("value", ["", "zzz", base64.b64encode(b"short").decode(), hashlib.md5(b"").hexdigest()])
def test_malformed_content_md5_is_invalid_digest(value):
    with pytest.raises(InvalidDigest):
        parse_content_md5(value)


def test_content_md5_mismatch_is_bad_digest():
    with pytest.raises(BadDigest):
        check_content_md5(hashlib.md5(b"a").digest(), hashlib.md5(b"b").digest())


# ---------------------------------------------------------------------------
# multipart
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ALGORITHMS)
def test_composite_checksum_is_checksum_of_part_checksums_with_count(alg):
    parts = [b"a" * 100, b"b" * 50, b"c"]
    digests = [digest_of(alg, p) for p in parts]
    want = base64.b64encode(digest_of(alg, b"".join(digests))).decode() + "-3"
    assert composite_checksum(alg, digests) == want


@pytest.mark.parametrize("alg", ["CRC32", "CRC32C", "CRC64NVME"])
def test_full_object_checksum_equals_crc_of_whole_object(alg):
    parts = [b"x" * 1000, b"", b"yz" * 333, b"q"]
    assert full_object_checksum(alg, [(digest_of(alg, p), len(p)) for p in parts]) == b64_of(alg, b"".join(parts))


def test_full_object_checksum_refuses_sha():
    with pytest.raises(InvalidRequest):
        full_object_checksum("SHA256", [])
