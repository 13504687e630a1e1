// s3rver on 127.0.0.1:PORT, knowing only the key pair from the environment: its CLI has no option for keys and
// would accept its built-in S3RVER/S3RVER. tests/s3_server.py (running_s3rver) starts and stops it.
'use strict';

const S3rver = require('s3rver');
const AWSAccount = require('s3rver/lib/models/account');

const [directory, port] = process.argv.slice(2);
const { S3RVER_ACCESS_KEY_ID: accessKey, S3RVER_SECRET_ACCESS_KEY: secretKey } = process.env;
if (!directory || !port || !accessKey || !secretKey) {
  console.error('usage: S3RVER_ACCESS_KEY_ID=... S3RVER_SECRET_ACCESS_KEY=... node serve.js DIRECTORY PORT');
  process.exit(2);
}

AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
AWSAccount.DUMMY_ACCOUNT.createKeyPair(accessKey, secretKey);

// Path-style buckets only, as Trainyard addresses a custom endpoint; silent: its request log is per request.
new S3rver({ address: '127.0.0.1', port: Number(port), directory, silent: true, vhostBuckets: false })
  .run()
  .catch(error => {
    console.error(error);
    process.exit(1);
  });
