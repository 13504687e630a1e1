"""Upload a file through S3Storage slowly (one part at a time, a pause after each), to be killed mid-upload.

python tests/storage/slow_upload.py BUCKET PREFIX FILE KEY POINTER
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from boto3.s3.transfer import TransferConfig

from infra.storage.s3 import S3Storage

MB = 1024 * 1024

if __name__ == "__main__":
    bucket, prefix, path, key, pointer = sys.argv[1:6]
    config = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB, max_concurrency=1)
    storage = S3Storage(bucket, prefix, transfer=config)
    storage.client.meta.events.register("after-call.s3.UploadPart", lambda **_: time.sleep(0.5))
    storage.upload_file(Path(path), key, pointer=pointer)
    print("finished", flush=True)  # the test kills us long before this
