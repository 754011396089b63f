#!/usr/bin/env bash
# Install Orthanc and its DICOMweb plugin (Debian packages) when missing.
# The PACS tests skip with a clear reason when this cannot be done (not root, no apt).
set -u
if command -v Orthanc >/dev/null 2>&1 && ls /usr/share/orthanc/plugins*/libOrthancDicomWeb.so >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install_orthanc: Orthanc missing and cannot install it here (needs root and apt-get); PACS tests will be skipped" >&2
  exit 0
fi
echo "install_orthanc: installing orthanc and orthanc-dicomweb (Debian packages)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends orthanc orthanc-dicomweb >/dev/null 2>&1 \
  || echo "install_orthanc: apt-get install failed; PACS tests will be skipped" >&2
# The package starts a system service on some machines; the tests start their own server.
(command -v service >/dev/null && service orthanc stop >/dev/null 2>&1) || true
exit 0
