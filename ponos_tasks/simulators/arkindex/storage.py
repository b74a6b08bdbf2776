"""The simulator's S3 side: buckets, objects and pre-signed URLs, through boto3.

Every client is built by `ponos_tasks.simulators.s3.s3_client`, which always passes the
endpoint URL and explicit dummy credentials, so nothing can reach a real AWS endpoint.
"""

from __future__ import annotations

from ponos_tasks.simulators.s3 import ensure_bucket, s3_client

# Pre-signed URLs live as long as SigV4 allows (7 days): the agent caches a task's
# definition, and with it the logs URL, for the whole life of the task.
URL_LIFETIME = 7 * 24 * 3600


class Storage:
    def __init__(self, endpoint_url: str, buckets: list[str]):
        self.endpoint_url = endpoint_url
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
            "put_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=URL_LIFETIME
        )

    def presign_get(self, bucket: str, key: str, content_type: str | None = None) -> str:
        params = {"Bucket": bucket, "Key": key}
        if content_type:
            # Forces the response Content-Type (S3's response-content-type override), so
            # that a model archive is served as application/zstd whatever it was stored as.
            params["ResponseContentType"] = content_type
        return self.client.generate_presigned_url(
            "get_object", Params=params, ExpiresIn=URL_LIFETIME
        )
