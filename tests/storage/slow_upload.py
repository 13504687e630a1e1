"""Upload a file through S3Storage slowly (one part at a time, a pause after each), to be killed mid-upload.

Prints "part stored" after each part the server has accepted.

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

    def announce_then_pause(**_) -> None:  # the test kills us once a part is stored: on any server, listing or not
        print("part stored", flush=True)
        time.sleep(0.5)

    storage.client.meta.events.register("after-call.s3.UploadPart", announce_then_pause)
    storage.upload_file(Path(path), key, pointer=pointer)
    print("finished", flush=True)  # the test kills us long before this
