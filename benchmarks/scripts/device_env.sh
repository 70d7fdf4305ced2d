# Source on the GPU machine from the repo root: installs the carried wheels (.whl: the server's and xgrammar's
# packages, absent from that image: fastapi, starlette, uvicorn, pydantic, pydantic-core, annotated-types,
# typing-inspection, opentelemetry-api (fastapi 0.165 imports it), gguf, xgrammar, apache-tvm-ffi (xgrammar 0.2
# imports it), pyzmq, msgspec, uvloop, httptools, py-spy (its binary lands in /tmp/site/bin); fetch them with
# `pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl ...`)
# into /tmp/site and points Python at them and at the carried test assets.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDLLM_ASSETS=$PWD/.assets
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
