#!/usr/bin/env bash
# Install the system libraries a headless napari/Qt test run needs (virtual X server,
# xcb and GL libraries). Does nothing when they are already present; needs root/apt.
set -euo pipefail
pkgs=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-image0
      libxcb-render-util0 libxcb-shape0 libxcb-randr0 libxcb-cursor0 libxkbcommon-x11-0
      libgl1 libegl1 libfontconfig1 libdbus-1-3)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]} and no apt-get here: install them with your package manager." >&2
  exit 1
fi
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
