"""Keep the training libraries offline and quiet: no downloads, no auto-installs, no telemetry.

Imported by every trainer before its library; values already set by the user win.
"""

import os

for _key, _value in {
    "YOLO_AUTOINSTALL": "false",  # Ultralytics would pip-install missing extras at run time
    "YOLO_OFFLINE": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}.items():
    os.environ.setdefault(_key, _value)
