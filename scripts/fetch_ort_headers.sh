#!/usr/bin/env bash
# Fetches the onnxruntime C/C++ API headers from Debian 13 (trixie)'s libonnxruntime-dev without
# installing anything or touching the system's apt configuration (a private sources list, state
# and cache under the cache folder), and prints the include folder, i.e. the one holding
# onnxruntime_cxx_api.h. Use it as
#   ORT_INCLUDE_DIR=$(scripts/fetch_ort_headers.sh) pip install .
#
# Usage: scripts/fetch_ort_headers.sh [CACHE_DIR]   (default: .cache/ort-headers)
# Needs apt-get, dpkg-deb and the Debian archive keyring (/usr/share/keyrings/debian-archive-keyring.gpg).
set -euo pipefail

cache="${1:-.cache/ort-headers}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
inc="$cache/x/usr/include/onnxruntime"

if [[ -f "$inc/onnxruntime_cxx_api.h" && -f "$inc/onnxruntime_c_api.h" ]]; then
  echo "$inc"
  exit 0
fi

keyring=/usr/share/keyrings/debian-archive-keyring.gpg
for tool in apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "fetch_ort_headers: $tool is required" >&2; exit 1; }
done
[[ -f "$keyring" ]] || { echo "fetch_ort_headers: $keyring is missing (package debian-archive-keyring)" >&2; exit 1; }

apt_dir="$cache/apt"
mkdir -p "$apt_dir/etc/apt/sources.list.d" "$apt_dir/etc/apt/preferences.d" \
  "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial"
printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: trixie\nComponents: main\nSigned-By: %s\n' \
  "$keyring" >"$apt_dir/etc/apt/sources.list.d/trixie.sources"
apt_opts=(
  -o "Dir::Etc::SourceList=/dev/null"
  -o "Dir::Etc::SourceParts=$apt_dir/etc/apt/sources.list.d"
  -o "Dir::Etc::Preferences=/dev/null"
  -o "Dir::Etc::PreferencesParts=$apt_dir/etc/apt/preferences.d"
  -o "Dir::State::Lists=$apt_dir/state/lists"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::State::status=/dev/null"
  -o "Debug::NoLocking=1"
)

[[ $EUID -eq 0 ]] && apt_opts+=(-o "APT::Sandbox::User=root")  # no _apt user needed for a private cache

# Progress goes to stderr: stdout carries only the include folder.
apt-get "${apt_opts[@]}" update >&2
rm -f "$cache"/libonnxruntime-dev_*.deb
(cd "$cache" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2)
deb=$(ls "$cache"/libonnxruntime-dev_*.deb | head -n 1)
rm -rf "$cache/x.tmp"
dpkg-deb -x "$deb" "$cache/x.tmp"
[[ -f "$cache/x.tmp/usr/include/onnxruntime/onnxruntime_cxx_api.h" ]] ||
  { echo "fetch_ort_headers: $deb holds no usr/include/onnxruntime/onnxruntime_cxx_api.h" >&2; exit 1; }
rm -rf "$cache/x"
mv "$cache/x.tmp" "$cache/x"
echo "$inc"
