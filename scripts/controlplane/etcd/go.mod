// Build-only wrapper around etcd's own entry point (etcdmain), kept apart from
// the kube-apiserver wrapper so their dependency graphs never have to agree.
module tortie.test/etcd

go 1.24

require go.etcd.io/etcd/server/v3 v3.6.16
