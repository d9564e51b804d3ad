"""The exception tree of airlock.

Every failure that crosses a module boundary is one of these types.  The S3
layer maps them to HTTP status + S3 error code in exactly one place
(`airlock.s3.errors`); the CLI maps them to a one-line message and a non-zero
exit.  S3-level errors carry their S3 code and status as class attributes so
that the storage layers can raise "NoSuchKey" without knowing about HTTP.
"""
from __future__ import annotations


class AirlockError(Exception):
    """Root of every error airlock raises on purpose."""


# --------------------------------------------------------------------------
# Storage-level errors (chunk store, log, index, link)
# --------------------------------------------------------------------------
class IntegrityError(AirlockError):
    """Stored bytes do not match their digest."""

    def __init__(self, what: str, expected: str, actual: str):
        super().__init__(f"{what}: digest mismatch (expected {expected}, got {actual})")
        self.what = what
        self.expected = expected
        self.actual = actual


class FormatError(AirlockError, ValueError):
    """A persisted or wire structure has bad magic, an unknown version or is malformed."""


class ReplicationError(AirlockError):
    """The change could not be made durable in the vault."""


class VaultUnavailable(ReplicationError):
    """No connection to the vault."""


class VaultRejected(ReplicationError):
    """The vault refused the request."""


class AckTimeout(ReplicationError):
    """The vault did not acknowledge in time."""


class PolicyError(AirlockError):
    """An operation is refused by configuration or policy."""


class ConfigError(AirlockError):
    """The configuration file or command line is invalid."""


# --------------------------------------------------------------------------
# S3-level errors: code + status, mapped to XML by airlock.s3.errors
# --------------------------------------------------------------------------
class S3Error(AirlockError):
    code = "InternalError"
    status = 500
    default_message = "We encountered an internal error. Please try again."

    def __init__(self, message: str | None = None, **extra: str):
        self.message = message or self.default_message
        self.extra = {k: str(v) for k, v in extra.items() if v is not None}
        super().__init__(self.message)


def _s3(name: str, status: int, message: str, code: str | None = None) -> type[S3Error]:
    cls = type(name, (S3Error,), {"code": code or name, "status": status, "default_message": message})
    cls.__module__ = __name__
    return cls


InternalError = _s3("InternalError", 500, "We encountered an internal error. Please try again.")
ServiceUnavailable = _s3("ServiceUnavailable", 503, "Please reduce your request rate.")


class PrimaryStorageFull(ServiceUnavailable):
    """The primary's disk is full, or below its free-space reserve: nothing
    was stored; the client may retry once there is room."""
    default_message = "The primary's storage is full; nothing was stored. Retry later."


SlowDown = _s3("SlowDown", 503, "Please reduce your request rate.")
NotImplementedS3 = _s3("NotImplementedS3", 501, "A header you provided implies functionality that is not implemented.", "NotImplemented")
MethodNotAllowed = _s3("MethodNotAllowed", 405, "The specified method is not allowed against this resource.")

# authentication
AccessDenied = _s3("AccessDenied", 403, "Access Denied")
SignatureDoesNotMatch = _s3(
    "SignatureDoesNotMatch", 403,
    "The request signature we calculated does not match the signature you provided. "
    "Check your key and signing method.")
InvalidAccessKeyId = _s3("InvalidAccessKeyId", 403, "The AWS Access Key Id you provided does not exist in our records.")
RequestTimeTooSkewed = _s3("RequestTimeTooSkewed", 403, "The difference between the request time and the current time is too large.")
AuthorizationHeaderMalformed = _s3("AuthorizationHeaderMalformed", 400, "The authorization header is malformed.")
AuthorizationQueryParametersError = _s3("AuthorizationQueryParametersError", 400, "Error parsing the X-Amz-Credential parameter.")
MissingSecurityHeader = _s3("MissingSecurityHeader", 400, "Your request is missing a required header.")
XAmzContentSHA256Mismatch = _s3("XAmzContentSHA256Mismatch", 400, "The provided 'x-amz-content-sha256' header does not match what was computed.")

# request shape
InvalidRequest = _s3("InvalidRequest", 400, "Invalid Request")
BadRequest = _s3("BadRequest", 400, "Bad Request")
InvalidTag = _s3("InvalidTag", 400, "The tag provided was not a valid tag.")
InvalidArgument = _s3("InvalidArgument", 400, "Invalid Argument")
MalformedXML = _s3("MalformedXML", 400, "The XML you provided was not well-formed or did not validate against our published schema.")
InvalidDigest = _s3("InvalidDigest", 400, "The Content-MD5 you specified was invalid.")
BadDigest = _s3("BadDigest", 400, "The Content-MD5 you specified did not match what we received.")
IncompleteBody = _s3("IncompleteBody", 400, "You did not provide the number of bytes specified by the Content-Length HTTP header.")
MissingContentLength = _s3("MissingContentLength", 411, "You must provide the Content-Length HTTP header.")
EntityTooLarge = _s3("EntityTooLarge", 400, "Your proposed upload exceeds the maximum allowed object size.")
EntityTooSmall = _s3("EntityTooSmall", 400, "Your proposed upload is smaller than the minimum allowed object size.")
InvalidChunkSizeError = _s3("InvalidChunkSizeError", 400, "Only the last chunk is allowed to have a size less than 8192 bytes")
MalformedTrailerError = _s3("MalformedTrailerError", 400, "The request contained trailing data that was not well-formed or did not conform to our published schema.")
KeyTooLongError = _s3("KeyTooLongError", 400, "Your key is too long")
MetadataTooLarge = _s3("MetadataTooLarge", 400, "Your metadata headers exceed the maximum allowed metadata size.")
InvalidRange = _s3("InvalidRange", 416, "The requested range is not satisfiable")
InvalidLocationConstraint = _s3("InvalidLocationConstraint", 400, "The specified location-constraint is not valid")
IllegalLocationConstraintException = _s3("IllegalLocationConstraintException", 400, "The location constraint is incompatible for the region specific endpoint this request was sent to.")
InvalidPartNumber = _s3("InvalidPartNumber", 416, "The requested partnumber is not satisfiable")
InvalidBucketName = _s3("InvalidBucketName", 400, "The specified bucket is not valid.")
InvalidPart = _s3("InvalidPart", 400, "One or more of the specified parts could not be found.  The part may not have been uploaded, or the specified entity tag may not match the part's entity tag.")
InvalidPartOrder = _s3("InvalidPartOrder", 400, "The list of parts was not in ascending order. The parts list must be specified in order by part number.")
InvalidStorageClass = _s3("InvalidStorageClass", 400, "The storage class you specified is not valid")
InvalidBucketState = _s3("InvalidBucketState", 409, "The request is not valid with the current state of the bucket.")
InvalidObjectState = _s3("InvalidObjectState", 403, "The operation is not valid for the current state of the object.")

# resources
NoSuchBucket = _s3("NoSuchBucket", 404, "The specified bucket does not exist")
NoSuchKey = _s3("NoSuchKey", 404, "The specified key does not exist.")
NoSuchUpload = _s3("NoSuchUpload", 404, "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.")
NoSuchTagSet = _s3("NoSuchTagSet", 404, "The TagSet does not exist")
NoSuchVersion = _s3("NoSuchVersion", 404, "The specified version does not exist.")
BucketAlreadyExists = _s3("BucketAlreadyExists", 409, "The requested bucket name is not available. The bucket namespace is shared by all users of the system. Please select a different name and try again.")
BucketAlreadyOwnedByYou = _s3("BucketAlreadyOwnedByYou", 409, "Your previous request to create the named bucket succeeded and you already own it.")
BucketNotEmpty = _s3("BucketNotEmpty", 409, "The bucket you tried to delete is not empty")

# bucket configuration airlock does not keep: S3's answers for a bucket on
# which the feature is not configured (s3/configuration.py)
NoSuchBucketPolicy = _s3("NoSuchBucketPolicy", 404, "The bucket policy does not exist")
NoSuchCORSConfiguration = _s3("NoSuchCORSConfiguration", 404, "The CORS configuration does not exist")
NoSuchLifecycleConfiguration = _s3("NoSuchLifecycleConfiguration", 404, "The lifecycle configuration does not exist")
NoSuchWebsiteConfiguration = _s3("NoSuchWebsiteConfiguration", 404,
                                 "The specified bucket does not have a website configuration")
ReplicationConfigurationNotFoundError = _s3("ReplicationConfigurationNotFoundError", 404,
                                            "The replication configuration was not found")
ServerSideEncryptionConfigurationNotFoundError = _s3("ServerSideEncryptionConfigurationNotFoundError", 404,
                                                     "The server side encryption configuration was not found")
ObjectLockConfigurationNotFoundError = _s3("ObjectLockConfigurationNotFoundError", 404,
                                           "Object Lock configuration does not exist for this bucket")
NoSuchPublicAccessBlockConfiguration = _s3("NoSuchPublicAccessBlockConfiguration", 404,
                                           "The public access block configuration was not found")
NoSuchConfiguration = _s3("NoSuchConfiguration", 404, "The specified configuration does not exist.")
OwnershipControlsNotFoundError = _s3("OwnershipControlsNotFoundError", 404,
                                     "The bucket ownership controls were not found")

# conditions
PreconditionFailed = _s3("PreconditionFailed", 412, "At least one of the pre-conditions you specified did not hold")
ConditionalRequestConflict = _s3("ConditionalRequestConflict", 409, "The conditional request cannot succeed due to a conflicting operation against this resource.")


class NotModified(S3Error):
    """304 for GET/HEAD conditionals: not an error body, but it ends the request the same way."""

    code = "NotModified"
    status = 304
    default_message = "Not Modified"
