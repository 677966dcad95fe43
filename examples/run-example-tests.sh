#!/bin/sh
# Install the example third-party plugin and run its own tests, as a plugin author would.
# Called by .ci/run; run it from anywhere.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
# --no-build-isolation: build with the hatchling already installed, no download needed
python -m pip install --quiet --root-user-action=ignore --no-build-isolation --no-deps "$here/automator-example-plugin"
python -m pytest -q -p no:cacheprovider "$here/automator-example-plugin/tests" "$@"
