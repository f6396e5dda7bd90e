#!/usr/bin/env bash
# Regenerate the Python module of the Open Inference Protocol's gRPC binding (src/mirage/serve/oip/)
# from grpc_predict_v2.proto: the messages only, as mirage.serve.grpc_service registers the service.
# The module is committed, so serving needs only grpcio and protobuf. Generate with grpcio-tools
# 1.75 (protobuf 6 gencode, which the pinned protobuf 6 runtime reads), in a throwaway venv:
#   python3 -m venv /tmp/gen && /tmp/gen/bin/pip install grpcio-tools==1.75.1 protobuf==6.33.6
#   PYTHON=/tmp/gen/bin/python bash scripts/generate_grpc.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../src"
"${PYTHON:-python}" -m grpc_tools.protoc -I. --python_out=. --pyi_out=. \
  mirage/serve/oip/grpc_predict_v2.proto
