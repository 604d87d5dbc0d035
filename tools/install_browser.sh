#!/usr/bin/env bash
# Installs Debian's Chromium and ChromeDriver (packages chromium, chromium-driver) when they are
# missing, for the web page's browser test (cli/tests/web_page_browser.rs). Needs root (or sudo)
# and Debian's package mirror. Nothing happens when both are already there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
    exit 0
fi
as_root=()
[ "$(id -u)" -eq 0 ] || as_root=(sudo)
echo "installing chromium and chromium-driver (Debian) for the browser test" >&2
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >&2 || {
    "${as_root[@]}" apt-get update -q >&2
    "${as_root[@]}" apt-get install -y -q --no-install-recommends chromium chromium-driver >&2
}
