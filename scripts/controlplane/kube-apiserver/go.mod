// Build-only wrapper: lets `go build` fetch kube-apiserver from the official
// k8s.io/kubernetes module. build.sh adds one `replace` per staging module,
// read from upstream's own go.mod, so the list always matches the release.
module tortie.test/kube-apiserver

go 1.24

require k8s.io/kubernetes v1.34.4
