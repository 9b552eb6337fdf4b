#!/usr/bin/env bash
# Regenerate the Python code for every .proto under proto/kvtier_proto/v1/.
# The only writer of *_pb2.py / *_pb2_grpc.py / *_pb2.pyi: never edit those by hand.
#   usage: proto/gen.sh [OUT_DIR]   (default: proto/, i.e. in place)
set -euo pipefail
GRPCIO_TOOLS_VERSION=1.85.1
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
py="${PYTHON:-python3}"
if [ -x "$here/../.venv/bin/python" ] && [ -z "${PYTHON:-}" ]; then py="$here/../.venv/bin/python"; fi
have="$("$py" -c 'import importlib.metadata as m; print(m.version("grpcio-tools"))' 2>/dev/null || true)"
if [ "$have" != "$GRPCIO_TOOLS_VERSION" ]; then
  echo "gen.sh: needs grpcio-tools==$GRPCIO_TOOLS_VERSION (found '${have:-none}');" \
       "pip install grpcio-tools==$GRPCIO_TOOLS_VERSION" >&2
  exit 1
fi
cd "$here"
mapfile -t protos < <(find kvtier_proto/v1 -name '*.proto' | LC_ALL=C sort)
mkdir -p "$out"
"$py" -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" "${protos[@]}"
