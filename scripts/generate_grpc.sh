#!/usr/bin/env bash
# Regenerate the Python module of the Open Inference Protocol's gRPC binding
# (src/mirage/serve/oip/) from grpc_predict_v2.proto (messages only: mirage.serve.grpc registers the service). Needs grpcio-tools (pip install grpcio-tools);
# the generated modules are committed, so serving needs only grpcio and protobuf.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../src"
"${PYTHON:-python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
  mirage/serve/oip/grpc_predict_v2.proto
