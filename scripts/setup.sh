#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 (bookworm) machine: system packages, the real cosign 2 and 3
# CLIs and oras in .tools/bin, and the Python venv in .venv. Safe to run again; fast when done.
#
# cosign 2 comes from Debian trixie and cosign 3 and oras from sid. They are fetched with apt
# against a private sources list (same Debian mirror as the machine, other suite) and unpacked
# with dpkg-deb into .tools: nothing from trixie or sid is installed system-wide.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS_DIR=$ROOT/.tools
TOOLS_BIN=$TOOLS_DIR/bin
APT_DIR=$TOOLS_DIR/apt
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}

SYSTEM_PACKAGES=(docker-registry apache2-utils openssl ca-certificates python3-venv
    debian-archive-keyring time softhsm2 hey)
DEBIAN_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# name in .tools/bin | Debian package | suite | version prefix | path inside the .deb
TOOLS=(
    "cosign2 cosign trixie 2. usr/bin/cosign"
    "cosign3 cosign sid 3. usr/bin/cosign"
    "oras oras sid 1. usr/bin/oras"
)

step() { printf 'setup: %s\n' "$*"; }
die() {
    printf 'setup: FAILED: %s\n' "$*" >&2
    exit 1
}
trap 'die "command failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR

install_system_packages() {
    local missing=() pkg
    for pkg in "${SYSTEM_PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        step "system packages: present"
        return
    fi
    ((EUID == 0)) || die "system packages missing (${missing[*]}); run this script as root"
    step "system packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
}

# The machine's main Debian mirror: first non-security URI of the configured sources.
debian_mirror() {
    local uri=""
    if [[ -n "${SIGNGATE_DEBIAN_URI:-}" ]]; then
        uri=$SIGNGATE_DEBIAN_URI
    elif [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
        uri=$(awk 'tolower($1) == "uris:" { for (i = 2; i <= NF; i++) print $i }' \
            /etc/apt/sources.list.d/debian.sources | grep -v -- '-security' | head -n1 || true)
    fi
    if [[ -z "$uri" && -f /etc/apt/sources.list ]]; then
        uri=$(sed -E -n 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
            /etc/apt/sources.list | grep -v -- '-security' | head -n1 || true)
    fi
    printf '%s\n' "${uri%/}"
}

PRIVATE_APT=()
prepare_private_apt() {
    local mirror
    mirror=$(debian_mirror)
    [[ -n "$mirror" ]] ||
        die "no Debian mirror in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list; set SIGNGATE_DEBIAN_URI"
    [[ -f "$DEBIAN_KEYRING" ]] || die "$DEBIAN_KEYRING missing (package debian-archive-keyring)"
    rm -rf "$APT_DIR"/download.* # left by an interrupted run
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
    cat >"$APT_DIR/sources.list" <<EOF
deb [signed-by=$DEBIAN_KEYRING] $mirror trixie main
deb [signed-by=$DEBIAN_KEYRING] $mirror sid main
EOF
    PRIVATE_APT=(
        -o "Dir::Etc::SourceList=$APT_DIR/sources.list"
        -o "Dir::Etc::SourceParts=/dev/null"
        -o "Dir::Etc::Preferences=/dev/null"
        -o "Dir::Etc::PreferencesParts=/dev/null"
        -o "Dir::State::Lists=$APT_DIR/lists"
        -o "Dir::Cache=$APT_DIR/cache"
        -o "APT::Sandbox::User=root"
    )
    step "tools: reading trixie and sid package lists from $mirror"
    apt-get "${PRIVATE_APT[@]}" update -qq --error-on=any >/dev/null || die "apt-get update of the private trixie/sid lists failed"
}

# Newest version of PACKAGE in SUITE whose version starts with PREFIX (Debian version order).
newest_version() {
    local package=$1 suite=$2 prefix=$3 version best=""
    # madison lines look like " cosign | 2.5.0-2+b5 | http://deb.debian.org/debian trixie/main amd64 Packages"
    while read -r version; do
        if [[ -z "$best" ]] || dpkg --compare-versions "$version" gt "$best"; then
            best=$version
        fi
    done < <(apt-cache "${PRIVATE_APT[@]}" madison "$package" |
        awk -F'|' -v suite="$suite" -v prefix="$prefix" '
            { gsub(/[[:space:]]/, "", $2) }
            index($2, prefix) == 1 && index($3, " " suite "/") > 0 { print $2 }')
    printf '%s\n' "$best"
}

install_tool() {
    local name=$1 package=$2 suite=$3 prefix=$4 member=$5 version work deb
    version=$(newest_version "$package" "$suite" "$prefix")
    [[ -n "$version" ]] || die "no $package $prefix* found in $suite"
    work=$(mktemp -d "$APT_DIR/download.XXXXXX")
    (cd "$work" && apt-get "${PRIVATE_APT[@]}" download -qq "$package=$version" >/dev/null) ||
        die "apt-get download $package=$version failed"
    deb=$(find "$work" -maxdepth 1 -name "${package}_*.deb" -print -quit)
    [[ -n "$deb" ]] || die "apt-get download $package=$version produced no .deb"
    dpkg-deb -x "$deb" "$work/root" || die "dpkg-deb -x $deb failed"
    [[ -f "$work/root/$member" ]] || die "$package $version has no $member"
    install -m 0755 "$work/root/$member" "$TOOLS_BIN/$name.partial"
    mv -f "$TOOLS_BIN/$name.partial" "$TOOLS_BIN/$name"
    rm -rf "$work"
    step "tools: $name = $package $version ($suite)"
}

install_tools() {
    local missing=() entry name
    for entry in "${TOOLS[@]}"; do
        name=${entry%% *}
        [[ -x "$TOOLS_BIN/$name" ]] || missing+=("$entry")
    done
    if ((${#missing[@]} == 0)); then
        step "tools: cosign2, cosign3, oras present in $TOOLS_BIN"
        return
    fi
    mkdir -p "$TOOLS_BIN"
    prepare_private_apt
    for entry in "${missing[@]}"; do
        # shellcheck disable=SC2086  # the entry is five words on purpose
        install_tool $entry
    done
}

install_venv() {
    local stamp_file=$VENV/.signgate-setup-stamp stamp
    stamp=$(sha256sum <pyproject.toml | cut -d' ' -f1)
    if [[ -x "$VENV/bin/python" && -f "$stamp_file" && "$(cat "$stamp_file")" == "$stamp" ]] &&
        "$VENV/bin/python" -c 'import signgate' 2>/dev/null; then
        step "python: $VENV up to date"
        return
    fi
    if [[ ! -x "$VENV/bin/python" ]]; then
        step "python: creating $VENV"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
            die "$PYTHON is not Python 3.11 or newer (set PYTHON=/path/to/python3.11)"
        "$PYTHON" -m venv "$VENV" || die "python3 -m venv failed (is python3-venv installed?)"
    fi
    step "python: installing signgate[dev] (editable) into $VENV"
    local log=$VENV/.signgate-pip.log
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -e '.[dev]' >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "pip install -e '.[dev]' failed (full log: $log)"
    fi
    printf '%s\n' "$stamp" >"$stamp_file"
}

# Byte-compile the sources: an editable install never does, and machines that set
# PYTHONDONTWRITEBYTECODE would otherwise compile every module on every command's start.
compile_sources() {
    "$VENV/bin/python" -m compileall -q src || die "python -m compileall src failed"
    step "python: sources byte-compiled"
}

install_system_packages
install_tools
install_venv
compile_sources
step "done"
