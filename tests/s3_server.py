"""A real S3 endpoint for tests: moto's server (PyPI ``moto[server]``) on 127.0.0.1.

``S3Server.start()`` serves on a free loopback port in a thread of the test process; the
other processes of a test (Ray workers, ``python -m`` children) reach it over HTTP like any
store.  ``env`` is what a process needs to use it through s3fs/boto3: set it in
``os.environ`` before Ray or a child process starts (they inherit it) or pass it to them.

    server = S3Server.start()
    server.create_bucket("shards")
    server.upload("shards", {"val-000000.tar": path, ...})
    with server.environment():  # os.environ += server.env, fresh s3fs clients
        load_dataset("s3://shards/val-{000000..000001}.tar", None)
    server.stop()
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    server: Any = field(repr=False)

    @classmethod
    def start(cls) -> S3Server:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        return cls(f"http://{host}:{port}", server)

    def stop(self) -> None:
        self.server.stop()

    @property
    def env(self) -> dict[str, str]:
        """Credentials moto accepts and the endpoint: botocore (and so s3fs's aiobotocore)
        reads ``AWS_ENDPOINT_URL``; fsspec reads ``FSSPEC_S3_ENDPOINT_URL`` at import."""
        return {
            "AWS_ACCESS_KEY_ID": "cardrunner-test",
            "AWS_SECRET_ACCESS_KEY": "cardrunner-test",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "FSSPEC_S3_ENDPOINT_URL": self.endpoint,
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="cardrunner-test",
                            aws_secret_access_key="cardrunner-test")

    def create_bucket(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def upload(self, bucket: str, objects: dict[str, Path | bytes],
               public: bool = False) -> list[str]:
        """Put each ``key: file or bytes``; returns the ``s3://`` URLs.  ``public`` objects
        can also be read anonymously over plain HTTP at ``http_url``."""
        client = self.client()
        acl = {"ACL": "public-read"} if public else {}
        for key, body in objects.items():
            data = body if isinstance(body, bytes) else Path(body).read_bytes()
            client.put_object(Bucket=bucket, Key=key, Body=data, **acl)
        return [f"s3://{bucket}/{key}" for key in objects]

    def upload_folder(self, bucket: str, folder: Path, prefix: str = "",
                      public: bool = False) -> list[str]:
        """Every file of ``folder`` (not recursive) under ``prefix``."""
        files = {f"{prefix}{p.name}": p for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.upload(bucket, files, public)

    def http_url(self, bucket: str, key: str) -> str:
        """A public object's plain HTTP address (path-style, as moto serves it)."""
        return f"{self.endpoint}/{bucket}/{key}"

    @contextmanager
    def environment(self) -> Iterator[dict[str, str]]:
        """``env`` in ``os.environ`` for the block, with s3fs's cached clients dropped
        before and after (a client keeps the endpoint it was made with)."""
        import s3fs

        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield self.env
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            s3fs.S3FileSystem.clear_instance_cache()
