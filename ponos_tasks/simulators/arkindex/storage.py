"""The simulator's S3 side: buckets, objects and pre-signed URLs, through boto3.

Every client is built by `ponos_tasks.simulators.s3.s3_client`, which always passes the
endpoint URL and explicit dummy credentials, so nothing can reach a real AWS endpoint.
"""

from __future__ import annotations

from ponos_tasks.simulators.s3 import ensure_bucket, s3_client

# How long the pre-signed URLs handed out live by default: one hour, boto3's default for
# generate_presigned_url (ExpiresIn=3600), what a Django backend presigning with boto3 gets
# unless it asks otherwise. The S3 server in front of moto (simulators/s3.py) refuses an
# expired URL with S3's 403 AccessDenied "Request has expired", so a client that keeps a
# definition (and its logs URL) longer than this must fetch a fresh one.
URL_LIFETIME = 3600


class Storage:
    def __init__(self, endpoint_url: str, buckets: list[str], url_lifetime: float = URL_LIFETIME):
        self.endpoint_url = endpoint_url
        # SigV4 allows 1 s to 7 days.
        self.url_lifetime = max(1, min(int(url_lifetime), 7 * 24 * 3600))
        self.client = s3_client(endpoint_url)
        for bucket in buckets:
            ensure_bucket(self.client, bucket)

    def put(self, bucket: str, key: str, data: bytes, content_type: str) -> None:
        self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)

    def get(self, bucket: str, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def presign_put(self, bucket: str, key: str) -> str:
        # No ContentType in the signed parameters: the uploader may send any Content-Type.
        return self.client.generate_presigned_url(
            "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=self.url_lifetime
        )

    def presign_get(self, bucket: str, key: str, content_type: str | None = None) -> str:
        params = {"Bucket": bucket, "Key": key}
        if content_type:
            # Forces the response Content-Type (S3's response-content-type override), so
            # that a model archive is served as application/zstd whatever it was stored as.
            params["ResponseContentType"] = content_type
        return self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=self.url_lifetime
        )
