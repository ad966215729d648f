#!/usr/bin/env bash
# Source this on a machine where memcore is not pip-installed (e.g. the lent GPU box):
# it builds a folder of symlinks with the installed layout (memcore/, memcore/reference,
# memcore/backends, memcore/conformance) and puts it first on PYTHONPATH. PYTHONSAFEPATH
# keeps the repository's own memcore/ folder (which lacks the mapped subpackages) off sys.path.
repo=$(pwd)
shim=$(mktemp -d)
mkdir -p "$shim/memcore"
for f in "$repo"/memcore/*; do ln -s "$f" "$shim/memcore/"; done
ln -s "$repo/reference" "$shim/memcore/reference"
ln -s "$repo/backends" "$shim/memcore/backends"
ln -s "$repo/conformance" "$shim/memcore/conformance"
export PYTHONSAFEPATH=1
export PYTHONPATH="$shim:$repo"
