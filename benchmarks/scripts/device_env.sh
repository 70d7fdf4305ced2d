# Source on the GPU machine from the repo root: installs the carried wheels (.whl: the server's and xgrammar's
# packages, absent from that image) into /tmp/site and points Python at them and at the carried test assets.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PAGEDLLM_ASSETS=$PWD/.assets
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
