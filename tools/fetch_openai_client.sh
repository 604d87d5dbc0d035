#!/usr/bin/env bash
# Installs the official OpenAI Python client (pinned with hashes in tools/openai-client.txt)
# under target/py-openai, for the test that drives `pipefuse serve` with it. Cached: a second run
# downloads nothing. Needs python3 with pip and PyPI. Prints the folder to put on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/py-openai
stamp="$dest/.installed-$(sha256sum tools/openai-client.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    rm -rf "$dest"
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --require-hashes \
        --only-binary=:all: --target "$dest" -r tools/openai-client.txt >&2 || {
        echo "error: could not install the OpenAI client in tools/openai-client.txt (python3 -m pip, PyPI)" >&2
        exit 1
    }
    touch "$stamp"
fi
echo "$PWD/$dest"
