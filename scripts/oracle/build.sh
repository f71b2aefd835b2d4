#!/usr/bin/env bash
# Builds the policy oracle (scripts/oracle/main.go around cyclonus, a test fixture only)
# from the Go module proxy and caches it by version outside the repository.
# Prints the path of the binary.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(awk '$1 == "require" && $2 == "github.com/mattfenwick/cyclonus" {print $3}' "$here/go.mod")
cache=${TORTIE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tortie}
# The wrapper's own source is part of the cache key: editing it rebuilds.
sum=$(cat "$here/go.mod" "$here/main.go" | sha256sum | cut -c1-12)
out="$cache/bin/oracle-cyclonus-$version-$sum"
if [ ! -x "$out" ]; then
  command -v go >/dev/null || { echo "[oracle] go is required to build the policy oracle" >&2; exit 1; }
  echo "[oracle] building cyclonus $version oracle (once per machine)" >&2
  src="$cache/src/oracle-$version-$sum"
  rm -rf "$src" && mkdir -p "$src" "$cache/bin"
  cp "$here/go.mod" "$here/main.go" "$src/"
  (cd "$src" && go mod tidy >&2 && CGO_ENABLED=0 go build -trimpath -o "$out.tmp" . >&2)
  mv "$out.tmp" "$out"
fi
echo "$out"
