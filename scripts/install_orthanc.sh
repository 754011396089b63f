#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin (Debian packages orthanc, orthanc-dicomweb) when missing.
#
# Used by `make test` / `make orthanc` before pytest.  Idempotent and silent when both are already
# there (takes milliseconds).  Never fails the build: when it cannot install (not root and no
# password-less sudo, no apt-get, no network) it says so on one line and the PACS tests
# (tests/data/test_pull.py) skip with that reason.  The tests start their own Orthanc on free
# loopback ports, so the system service the package may start is stopped again.
set -u

have_orthanc() {
  command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || return 1
  local p
  for p in /usr/share/orthanc/plugins*/libOrthancDicomWeb.so* /usr/lib/orthanc/plugins*/libOrthancDicomWeb.so*; do
    [ -e "$p" ] && return 0
  done
  return 1
}

say() { echo "install_orthanc: $*" >&2; }

if have_orthanc; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  say "Orthanc is missing and this is not a Debian/Ubuntu system (no apt-get); install Orthanc with its DICOMweb plugin yourself, or the PACS tests will be skipped"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
    SUDO="sudo -n"
  else
    say "Orthanc is missing; run 'sudo bash scripts/install_orthanc.sh' (needs root), or the PACS tests will be skipped"
    exit 0
  fi
fi

LOG="$(mktemp "${TMPDIR:-/tmp}/install_orthanc.XXXXXX.log")"
trap 'rm -f "$LOG"' EXIT
APT=($SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q -o DPkg::Lock::Timeout=300)
PKGS=(orthanc orthanc-dicomweb)

say "installing ${PKGS[*]} (Debian packages) for the PACS tests"
# Try with the current package lists first (fast); refresh them only when that fails.
if ! "${APT[@]}" install --no-install-recommends "${PKGS[@]}" >"$LOG" 2>&1; then
  if ! { "${APT[@]}" update && "${APT[@]}" install --no-install-recommends "${PKGS[@]}"; } >"$LOG" 2>&1; then
    say "apt-get install failed; the PACS tests will be skipped. Last lines of its output:"
    tail -n 5 "$LOG" | sed 's/^/  | /' >&2
    exit 0
  fi
fi

# The package may start a system service (port 8042); the tests start their own servers.
if command -v service >/dev/null 2>&1; then
  $SUDO service orthanc stop >/dev/null 2>&1 || true
fi

if have_orthanc; then
  say "installed $(Orthanc --version 2>/dev/null | head -n 1) with the DICOMweb plugin"
else
  say "packages installed but Orthanc or its DICOMweb plugin was not found; the PACS tests will be skipped"
fi
exit 0
